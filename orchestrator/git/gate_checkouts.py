"""Gate checkouts: the ``git worktree`` checkouts of the integration repository where
gates run, each detached at the candidate being validated, moved by diff rather than made
afresh, proven to hold exactly the commit's files (``[workspace] keep`` paths aside), and
repaired or replaced when a gate (the agents' code) damaged it.

Everything here is blocking and meant to run in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from orchestrator.git import warm
from orchestrator.git.command import GitError, run_git
from orchestrator.git.integration import IntegrationRepository
from orchestrator.git.untrusted import open_dir_nofollow, write_new_nofollow
from orchestrator.git.worktrees_dir import (
    GATE_DIR,
    assert_inside,
    listdir,
    make_writable_and_retry,
    remove_special_files,
)
from orchestrator.observe import logs

__all__ = ["GateCheckouts"]

log = logs.get("git")

# State an interrupted merge/rebase/cherry-pick/bisect leaves in a worktree's admin dir.
# A reused worktree must start clean, and `git checkout -f` does not remove all of it
# (rebase and bisect state survive), which would confuse the next agent.
_IN_PROGRESS_STATE = (
    "MERGE_HEAD",
    "MERGE_MSG",
    "MERGE_MODE",
    "AUTO_MERGE",
    "CHERRY_PICK_HEAD",
    "REVERT_HEAD",
    "SQUASH_MSG",
    "rebase-merge",
    "rebase-apply",
    "sequencer",
    "BISECT_START",
    "BISECT_LOG",
    "BISECT_EXPECTED_REV",
    "BISECT_ANCESTORS_OK",
    "BISECT_NAMES",
    "BISECT_TERMS",
    "BISECT_FIRST_PARENT",
    "refs/bisect",
)


class GateCheckouts:
    """The gate worktrees under ``worktrees_dir`` (``.gate``, ``.gate-<slot>``)."""

    def __init__(self, integration: IntegrationRepository, worktrees_dir: Path) -> None:
        """``worktrees_dir``: the resolved directory the gate worktrees live in."""
        self._integration = integration
        self.repo_path = integration.repo_path
        self._admin_root = integration.common_dir / "worktrees"
        self.worktrees_dir = worktrees_dir
        self.gate_path = self.worktrees_dir / GATE_DIR
        # Gate checkout -> its admin dir, as found when it was checked out: a gate or a
        # setup command may rewrite the checkout's .git file, so it is not read again.
        self._gate_admins: dict[Path, Path] = {}

    def gate_checkout(
        self, commit: str, *, slot: int = 0, keep: Sequence[str] = (), key: str | None = None
    ) -> Path:
        """Return the gate worktree, detached at ``commit`` with exactly its files.

        Created once, then moved by diff; untracked and ignored files are removed so build
        leftovers of an earlier gate run cannot leak into this one. ``slot`` > 0 selects
        another gate worktree (``.gate-<slot>``), for gating speculative candidates in
        parallel. ``keep`` (``[workspace] keep``) spares those paths, but only while
        ``key`` is the one they were built for (:mod:`orchestrator.git.warm`); otherwise
        everything goes and the recorded key is forgotten.
        """
        if slot < 0:
            raise ValueError(f"gate slot must be >= 0, not {slot}")
        sha = str(self._integration.commit(commit).id)
        path = self.gate_path if slot == 0 else self.worktrees_dir / f"{GATE_DIR}-{slot}"
        admin = self._adopt_or_discard(path)
        if admin is None:
            self.recover()
            return self._fresh_gate_checkout(path, sha)
        self._gate_admins[path] = admin
        self._clear_stale_state(admin)
        # A gate may leave a FIFO (or socket, or device) where git reads, such as a
        # .gitattributes: git would block on it forever, holding the daemon's git lane.
        # Plain code removes them before git looks at the checkout.
        removed = remove_special_files(path)
        if removed:
            log.warning("gate_special_files_removed", path=str(path), files=removed[:10])
        # A gate runs the agents' code: it may have marked tracked files skip-worktree or
        # assume-unchanged (so checkout leaves its rewritten copies alone) or turned on
        # sparse checkout. Clear every such flag before checking out, then prove the result.
        flagged = self._index_flagged(path, admin)
        # One flag per call: update-index applies only the last of several such options.
        for option in ("--no-skip-worktree", "--no-assume-unchanged"):
            for start in range(0, len(flagged), 500):
                batch = flagged[start : start + 500]
                self._gate_git(path, admin, "update-index", option, "--", *batch)
        self._gate_git(path, admin, "checkout", "-f", "-q", "--detach", sha, "--")
        spared: Sequence[str] = ()
        if keep and key is not None and warm.read_stamp(admin) == key:
            spared = keep
        else:
            warm.write_stamp(admin, None)
        self._gate_git(path, admin, "clean", "-ffdxq", *warm.clean_excludes(spared))
        problem = self._gate_differs(path, admin, sha, spared)
        if problem is None:
            return path
        # Whatever the last gate did to this checkout, a fresh one starts from git alone.
        log.warning("gate_checkout_replaced", path=str(path), commit=sha, reason=problem)
        self._remove_tree(path)
        self._prune_registrations()
        return self._fresh_gate_checkout(path, sha)

    def _fresh_gate_checkout(self, path: Path, sha: str) -> Path:
        """A new gate worktree at ``path``, detached at ``sha``, no kept paths, verified."""
        run_git("worktree", "add", "-q", "--detach", str(path), sha, cwd=self.repo_path)
        admin = self._adopt(path)
        if admin is None:
            raise GitError(f"git worktree add did not register {path}")
        warm.write_stamp(admin, None)
        self._gate_admins[path] = admin
        return self._gate_verified(path, admin, sha)

    def _gate_verified(self, path: Path, admin: Path, sha: str) -> Path:
        problem = self._gate_differs(path, admin, sha)
        if problem is not None:
            raise GitError(
                f"refusing to gate {sha[:12]}: the gate checkout {path} is not exactly that "
                f"commit even when freshly made ({problem}); check the repository's "
                "filters and attributes (.gitattributes, git config filter.*)"
            )
        return path

    # Config that decides which files git looks at. The agents' code a gate runs can set it
    # in the gate worktree's git dir; the daemon's own checks must see every file anyway.
    _GATE_GIT_CONFIG = (
        "core.sparseCheckout=false",
        "core.sparseCheckoutCone=false",
        "core.fsmonitor=false",
        "core.untrackedCache=false",
        "core.splitIndex=false",
        "index.sparse=false",
        "status.showUntrackedFiles=all",
    )

    def _gate_git(self, path: Path, admin: Path, *args: str) -> subprocess.CompletedProcess[str]:
        overrides = [part for item in self._GATE_GIT_CONFIG for part in ("-c", item)]
        return self._wt_git(path, admin, *overrides, *args)

    def _index_flagged(self, path: Path, admin: Path) -> list[str]:
        """Paths of the gate worktree's index marked skip-worktree or assume-unchanged."""
        out = self._gate_git(path, admin, "ls-files", "-z", "-v").stdout
        flagged = []
        for entry in out.split("\0"):
            if len(entry) < 3:
                continue
            tag, name = entry[0], entry[2:]
            # ls-files -v: "S" skip-worktree, lowercase letters assume-unchanged.
            if tag == "S" or tag.islower():
                flagged.append(name)
        return flagged

    def _gate_differs(
        self, path: Path, admin: Path, sha: str, spared: Sequence[str] = ()
    ) -> str | None:
        """Why the gate worktree is not exactly ``sha``'s tree (``spared``, the kept paths
        of ``[workspace] keep``, aside), or None when it is."""
        want_tree = str(self._integration.commit(sha).tree_id)
        head = self._gate_git(path, admin, "rev-parse", "--verify", "HEAD").stdout.strip()
        if head != sha:
            return f"HEAD is {head[:12]}, not {sha[:12]}"
        flagged = self._index_flagged(path, admin)
        if flagged:
            return f"{len(flagged)} path(s) still flagged in the index, e.g. {flagged[0]!r}"
        tree = self._gate_git(path, admin, "write-tree").stdout.strip()
        if tree != want_tree:
            return f"its index holds tree {tree[:12]}, not the commit's {want_tree[:12]}"
        status = self._gate_git(
            path,
            admin,
            "status",
            "--porcelain=v1",
            "-z",
            "--ignored",
            "--untracked-files=all",
            "--",
            ":(top)",
            *(f":(top,exclude){kept}" for kept in spared),
        ).stdout
        changes = [item for item in status.split("\0") if item]
        if changes:
            return f"{len(changes)} path(s) differ from the commit, e.g. {changes[0]!r}"
        return None

    def gate_warm_key(self, path: Path) -> str | None:
        """The cache key the kept paths of the gate checkout at ``path`` were built for."""
        admin = self._gate_admins.get(path)
        return warm.read_stamp(admin) if admin is not None else None

    def mark_gate_warm(self, path: Path, key: str) -> None:
        """Record that the kept paths of the gate checkout at ``path`` are built for ``key``
        (after setup succeeded)."""
        admin = self._gate_admins.get(path)
        if admin is None:
            raise GitError(f"{path} is not a gate checkout of {self.repo_path}")
        warm.write_stamp(admin, key)

    def forget_gate_warm(self, path: Path) -> None:
        """Forget what the kept paths of the gate checkout at ``path`` were built for: the
        next checkout cleans them and ``setup`` builds them again."""
        admin = self._gate_admins.get(path)
        if admin is not None:
            warm.write_stamp(admin, None)

    def clear_idle_locks(self) -> list[Path]:
        """Delete ``index.lock``/``HEAD.lock`` in the daemon's idle gate checkouts;
        returns what was deleted.

        Only the daemon runs git there, one call at a time, and this runs at start-up
        before any: such a lock was left by a git process killed with the daemon. Pooled
        lease directories need nothing: each gets a new ``.git`` when it is leased."""
        removed: list[Path] = []
        paths = [
            self.worktrees_dir / e for e in listdir(self.worktrees_dir) if e.startswith(GATE_DIR)
        ]
        for path in paths:
            admin = self._adopt(path)
            if admin is not None:
                removed += self._clear_locks(admin)
        return removed

    def recover(self) -> None:
        """Re-link a gate worktree renamed whose admin entry still names the old place;
        prune admin entries for worktrees under ``worktrees_dir`` that no longer exist
        (only ours: a person's worktree on an unmounted disk is left alone)."""
        for entry in listdir(self.worktrees_dir):
            if entry.startswith(GATE_DIR):
                self._adopt(self.worktrees_dir / entry)
        self._prune_registrations()

    def _admin_of(self, path: Path) -> Path | None:
        """The admin dir that ``path/.git`` names, if it is one of this repository's."""
        try:
            text = (path / ".git").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        if not text.startswith("gitdir:"):
            return None
        admin = Path(text[len("gitdir:") :].strip())
        if not admin.is_absolute():
            admin = path / admin
        admin = Path(os.path.realpath(admin))
        if admin.parent != Path(os.path.realpath(self._admin_root)):
            return None
        if not (admin / "gitdir").is_file() or not (admin / "HEAD").is_file():
            return None
        return admin

    def _adopt(self, path: Path) -> Path | None:
        """Admin dir of the worktree at ``path``, re-linking a half-finished move.

        None if ``path`` is not a usable worktree of this repository (no ``.git`` file,
        its admin entry is gone, or the entry belongs to another live directory).
        """
        admin = self._admin_of(path)
        if admin is None:
            return None
        try:
            recorded = Path((admin / "gitdir").read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError):
            return None
        here = Path(os.path.realpath(path / ".git"))
        if Path(os.path.realpath(recorded)) == here:
            return admin
        if os.path.lexists(recorded.parent):
            return None  # a live directory owns that entry; this one is a stray copy
        # Crash between renaming the directory and rewriting the link (what
        # `git worktree move` also does in that order): finish the move.
        log.info("worktree_relinked", path=str(path), recorded=str(recorded))
        self._write_links(path, admin)
        return admin

    def _adopt_or_discard(self, path: Path) -> Path | None:
        """Like _adopt, but a directory there that is not a usable worktree is deleted."""
        if not os.path.lexists(path):
            return None
        admin = self._adopt(path)
        if admin is None:
            # Its git metadata is gone (pruned, or the admin entry was deleted): the files
            # are useless without it, and recreating is the only way back.
            log.info(
                "worktree_removed_unregistered", path=str(path), repository=str(self.repo_path)
            )
            self._remove_tree(path)
        return admin

    def _write_links(self, path: Path, admin: Path) -> None:
        # Both links absolute: git writes absolute ones too, and a relative one in the
        # worktree's .git file would break on the rename.
        _write_atomic(admin / "gitdir", f"{path / '.git'}\n")
        dotgit = f"gitdir: {admin}\n"
        try:
            current = (path / ".git").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            current = ""
        if current != dotgit:
            _write_atomic(path / ".git", dotgit)

    def _prune_registrations(self) -> None:
        """Drop admin entries of worktrees under worktrees_dir whose directory is gone.

        Otherwise git still considers their branches checked out, and refuses to create a
        worktree at their path.
        """
        root = os.path.realpath(self.worktrees_dir)
        for entry in listdir(self._admin_root):
            admin = self._admin_root / entry
            try:
                recorded = Path((admin / "gitdir").read_text(encoding="utf-8").strip())
            except (OSError, UnicodeDecodeError):
                continue
            where = os.path.realpath(recorded.parent)
            if not where.startswith(root + os.sep) or os.path.lexists(recorded.parent):
                continue
            if (admin / "locked").exists():
                continue
            log.info("worktree_registration_pruned", entry=entry, missing=str(recorded.parent))
            shutil.rmtree(admin, ignore_errors=True)

    def _clear_locks(self, admin: Path) -> list[Path]:
        # Only this daemon (one call at a time) and the agent holding the lease run git in
        # our worktrees, and we get here only when no lease is live for it. So a lock file
        # here was left by a killed process, and git would refuse to touch the index (or
        # HEAD) until someone deleted it by hand.
        removed = []
        for lock in ("index.lock", "HEAD.lock"):
            with contextlib.suppress(FileNotFoundError):
                (admin / lock).unlink()
                removed.append(admin / lock)
        return removed

    def _clear_stale_state(self, admin: Path) -> None:
        self._clear_locks(admin)
        for name in _IN_PROGRESS_STATE:
            target = admin / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()

    def _remove_tree(self, path: Path) -> None:
        if path.is_symlink() or not path.is_dir():
            # Remove the link itself, wherever it points; only its location must be ours.
            parent = path.parent.resolve()
            if parent != self.worktrees_dir and self.worktrees_dir not in parent.parents:
                raise GitError(f"refusing to remove {path}: outside {self.worktrees_dir}")
            path.unlink(missing_ok=True)
            return
        assert_inside(self.worktrees_dir, path)
        shutil.rmtree(path, onerror=make_writable_and_retry)

    def _wt_git(self, path: Path, admin: Path, *args: str) -> subprocess.CompletedProcess[str]:
        # Name both directories explicitly: if the worktree's .git file were broken, plain
        # `git -C path` would walk up and could find (and clean!) an enclosing repository,
        # e.g. the main checkout when worktrees_dir lives inside it.
        # Gate code (an agent's) writes in the gate worktree: untrusted.
        return run_git(f"--git-dir={admin}", f"--work-tree={path}", *args, cwd=path, untrusted=True)


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``. The temporary file has a random name and is
    created with O_EXCL | O_NOFOLLOW: a symlink an agent planted under a name we might
    use is never written through, and the rename replaces a symlink at ``path`` itself
    rather than what it points to."""
    dir_fd = open_dir_nofollow(path.parent)
    try:
        tmp = f".{path.name}.orchestrator-{secrets.token_hex(6)}"
        write_new_nofollow(dir_fd, tmp, text.encode("utf-8"))
        try:
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)
