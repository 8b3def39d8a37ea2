"""Lease repositories: the pool of directories leased to agents, each checked out with a
``.git`` the daemon writes from scratch, and the import of the head a lease reports.

Each lease directory is a repository of its own (its own ``.git``, objects borrowed
read-only through alternates), not a ``git worktree`` of ours: whatever its agent does
to refs, config or hooks stays there. Its ``.git`` is written afresh by the daemon for
every lease; the daemon checks it out with a git dir and an index of its own, and takes
reported work by fetching from it (see ``checkout_for_lease``). A released directory goes
to the pool and the next lease renames it into place and moves it by diff.

Everything here is blocking and meant to run in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pygit2

from orchestrator.config import WorkspaceConfig
from orchestrator.git import lease_access, warm
from orchestrator.git.command import GitError, run_git
from orchestrator.git.integration import IntegrationRepository, check_branch_name
from orchestrator.git.untracked_only import tracked_untracked_only
from orchestrator.git.untrusted import is_plain_dir, open_dir_nofollow, read_regular_nofollow
from orchestrator.git.worktrees_dir import (
    BUILD_DIR,
    POOL_DIR,
    STATE_DIR,
    TRASH_DIR,
    assert_inside,
    listdir,
    make_writable_and_retry,
    remove_special_files,
)
from orchestrator.observe import logs

__all__ = [
    "LEASE_REF_PREFIX",
    "MAX_INDEX_BYTES",
    "PEEK_REF_PREFIX",
    "PUSH_REFUSED_URL",
    "LeaseRepositories",
]

log = logs.get("git")

# Where the daemon imports each lease's reported branch (fetched from its repository).
LEASE_REF_PREFIX = "refs/orchestrator/leases/"


# Where a lease's branch is brought, unreported, for an early conflict warning.
PEEK_REF_PREFIX = "refs/orchestrator/peek/"


# The push URL of a lease repository's origin: no repository, so `git push` fails at once.
PUSH_REFUSED_URL = "/dev/null/orchestrator-lease-repositories-cannot-push"


# A git index bigger than this is no index an agent's checkout needs; it is not copied.
MAX_INDEX_BYTES = 1 << 30


class LeaseRepositories:
    """The lease directories under ``worktrees_dir`` and their pool."""

    def __init__(self, integration: IntegrationRepository, worktrees_dir: Path) -> None:
        """Create ``worktrees_dir`` and the daemon's folders in it, if missing."""
        self._integration = integration
        self._repo = integration.repo
        self._common_dir = integration.common_dir
        self.repo_path = integration.repo_path
        self.integration_branch = integration.integration_branch
        self.worktrees_dir = Path(worktrees_dir)
        try:
            self.worktrees_dir.mkdir(parents=True, exist_ok=True)
            self.worktrees_dir = self.worktrees_dir.resolve()
            for sub in (POOL_DIR, STATE_DIR, BUILD_DIR, TRASH_DIR):
                (self.worktrees_dir / sub).mkdir(mode=0o755, exist_ok=True)
        except OSError as exc:
            raise GitError(
                f"cannot create the worktrees directory {worktrees_dir}: {exc}; "
                "make it writable by the daemon's user"
            ) from exc
        self._pool_dir = self.worktrees_dir / POOL_DIR
        self._state_dir = self.worktrees_dir / STATE_DIR
        self._build_dir = self.worktrees_dir / BUILD_DIR
        self._trash_dir = self.worktrees_dir / TRASH_DIR
        # State key -> (commit, branch) each lease or pool directory was last checked out
        # at by this daemon: only its own memory, never read back from a directory.
        self._checked_out: dict[str, tuple[str, str | None]] = {}
        # State key -> the uid (not the daemon's) a directory was made writable for.
        self._granted: dict[str, int] = {}
        self._last_fetch_error = ""
        # The identity people set on the integration repository (README: agents that
        # commit need one) is given to each lease repository's config.
        self._identity = _identity_section(self._repo)

    def recover(self) -> None:
        """Delete half-built git dirs and the trash of lease directories, and the daemon's
        records of lease directories that are gone. Lease directories themselves are not
        read: their ``.git`` is the agent's."""
        for entry in listdir(self._build_dir):
            shutil.rmtree(self._build_dir / entry, ignore_errors=True)
        self._empty_trash()
        for key in listdir(self._state_dir):
            where = (
                self.worktrees_dir / key[2:]
                if key.startswith("L-")
                else self._pool_dir / key[2:]
                if key.startswith("P-")
                else None
            )
            if where is None or not os.path.lexists(where):
                self._drop_state(key)

    def lease_worktree_names(self) -> list[str]:
        """Names of the worktrees currently laid out for leases (``worktrees_dir/<name>``)."""
        return sorted(e for e in listdir(self.worktrees_dir) if not e.startswith("."))

    def checkout_for_lease(
        self,
        name: str,
        branch: str,
        *,
        integration: str | None = None,
        owner_uid: int | None = None,
        warm_up: WorkspaceConfig | None = None,
    ) -> Path:
        """Return ``worktrees_dir/<name>``: a repository of its own with ``branch`` checked
        out and nothing else in its working tree.

        Its ``.git`` is a directory the daemon writes afresh for every lease: HEAD attached
        to ``refs/heads/<branch>`` at the branch tip, ``origin/<integration branch>`` at
        the integration tip, a remote ``origin`` to fetch newer tips from, and the
        integration repository's objects borrowed through ``objects/info/alternates``
        (read-only: git never writes into an alternate). Nothing the last holder of the
        directory did to its ``.git`` (config, hooks, refs) survives.

        A directory of that name is reused (a retry continues where the last attempt
        stopped); otherwise an idle pooled directory is renamed into place; only when the
        pool is empty is a fresh checkout made. Reuse rewrites only the files that differ,
        using an index the daemon keeps for each directory (not the agent's). A directory
        an agent broke (``.git`` not a directory, changed owner, modes) is discarded.

        ``integration`` (default: the integration tip now) is the commit
        ``origin/<integration branch>`` names there. ``owner_uid``: the uid that will
        work there, when it is not the daemon's: it gets write access by POSIX ACLs (see
        orchestrator.git.lease_access); a directory an earlier lease of another uid had
        is not reused for it.

        ``warm_up`` (``[workspace]``): its ``keep`` paths survive the clean while the
        directory's recorded cache key is the one of ``branch``'s tip; see
        :meth:`lease_warm_up`.
        """
        path = self._lease_path(name)
        if branch == self.integration_branch:
            raise GitError(
                f"refusing to lease the integration branch {branch!r}: agents work on their "
                "own branches and only the merge queue advances the integration branch"
            )
        tip = self._integration.branch_tip(branch)
        if tip is None:
            raise GitError(
                f"branch {branch!r} does not exist in {self.repo_path}; create it with "
                "ensure_branch() before leasing a worktree for it"
            )
        holder = self._lease_holding(branch)
        if holder is not None and holder != name:
            raise GitError(
                f"branch {branch!r} is already checked out for the lease {holder!r}; release "
                "that one first"
            )
        key = _lease_key(name)
        origin = integration if integration is not None else self._integration.integration_tip()
        uid = owner_uid if owner_uid is not None and owner_uid != os.geteuid() else None
        reused = False
        if os.path.lexists(path) and not self._intact(path):
            self._discard(path, key)
        if os.path.lexists(path):
            reused = True
            # An earlier attempt that never reported (its worker died, its lease
            # expired) may have committed: that work continues, not from scratch.
            tip = self._salvage(name, branch, tip)
        else:
            slot = self._take_pool_slot(tip, uid)
            if slot is not None:
                self._rename_slot(self._pool_dir / slot, _pool_key(slot), path, key)
                reused = True
        if not reused:
            path.mkdir(mode=0o700)
        spare: Sequence[str] = ()
        # Kept and copied paths are never the agent's work: its `git add -A` skips them.
        exclude = (*warm_up.keep, *warm_up.copy_files) if warm_up is not None else ()
        if warm_up is not None and warm_up.keep:
            if warm.read_stamp(self._state_dir / key) == warm.cache_key(self._repo, tip, warm_up):
                spare = warm_up.keep
            else:
                warm.write_stamp(self._state_dir / key, None)
        try:
            self._populate(path, key, branch, tip, origin, uid, spare=spare, exclude=exclude)
        except (GitError, OSError) as exc:
            if not reused:
                raise
            # Whatever the agent did to it (unreadable files, odd modes, ACLs), a fresh
            # directory is the way back.
            log.info("lease_directory_replaced", path=str(path), error=str(exc))
            self._discard(path, key)
            path.mkdir(mode=0o700)
            self._populate(path, key, branch, tip, origin, uid, exclude=exclude)
        return path

    def lease_warm_up(self, name: str, workspace: WorkspaceConfig) -> bool:
        """Whether ``[workspace] setup`` must run in the lease directory ``name`` (just
        checked out): its kept paths were not built for the key of what is checked out
        there, or one is missing. When it must, the key is only pending (see
        warm.write_pending) until :meth:`confirm_warm_up`: the worker runs setup before
        the agent (as the agent's uid, never the daemon), and a worker killed mid-setup
        leaves half-built kept paths the next lease must build again."""
        key = _lease_key(name)
        at = self._checked_out.get(key)
        if at is None:
            raise GitError(f"the lease directory {name!r} was not checked out by this daemon")
        want = warm.cache_key(self._repo, at[0], workspace)
        state = self._state_dir / key
        path = self._lease_path(name)
        needed = warm.read_stamp(state) != want or not all(
            os.path.lexists(path / kept) for kept in workspace.keep
        )
        if needed and workspace.setup:
            warm.write_pending(state, want)
        else:
            # Without setup, what the agent builds in the kept paths is what they hold.
            warm.forget_pending(state)
            warm.write_stamp(state, want)
        return needed

    def confirm_warm_up(self, name: str) -> bool:
        """The lease of directory ``name`` shows its setup finished (the worker reports
        only after a setup that succeeded): the key :meth:`lease_warm_up` left pending is
        recorded. False when none was pending."""
        return warm.confirm_pending(self._state_dir / _lease_key(name))

    def release_worktree(self, name: str) -> None:
        """Put the directory of the lease ``name`` back in the pool.

        Nothing in it is touched (the next lease rebuilds its ``.git`` anyway); a broken
        one is deleted instead. A missing directory is not an error.
        """
        path = self._lease_path(name)
        key = _lease_key(name)
        if not os.path.lexists(path):
            self._drop_state(key)
            return
        if not self._intact(path):
            self._discard(path, key)
            return
        slot = secrets.token_hex(6)
        self._rename_slot(path, key, self._pool_dir / slot, _pool_key(slot))
        self._empty_trash()

    def warm_pool(self, size: int) -> int:
        """Create idle directories (at the integration tip) until the pool holds ``size``.

        Lets the daemon pay for full checkouts at startup instead of on the first leases.
        Returns how many were created.
        """
        self.recover()
        have = self.pool_size()
        tip = self._integration.integration_tip()
        created = 0
        while have + created < size:
            slot = secrets.token_hex(6)
            path = self._pool_dir / slot
            path.mkdir(mode=0o700)
            self._populate(path, _pool_key(slot), None, tip, tip)
            created += 1
        return created

    def pool_size(self) -> int:
        """How many idle directories the pool holds."""
        return len(listdir(self._pool_dir))

    def _salvage(self, name: str, branch: str, tip: str) -> str:
        """Take the commits an unreported attempt left on ``branch`` in the lease
        directory ``name`` (fetched as a report's are, see :meth:`import_lease_head`).
        Our branch moves to them only if they build on it; returns its tip."""
        path = self._lease_path(name)
        if not self._intact(path) or not is_plain_dir(path / ".git"):
            return tip
        ref = f"{LEASE_REF_PREFIX}{name}"
        fetched = self._fetch_lease_branch(path, branch, ref)
        got = self._repo.references.get(ref) if fetched else None
        if got is None:
            return tip
        left = str(got.target)
        if left == tip or not self._integration.is_ancestor(tip, left):
            return tip
        log.info("unreported_commits_kept", lease=name, branch=branch, old=tip, new=left)
        self._repo.references.create(f"refs/heads/{branch}", got.target, force=True)
        return left

    def _fetch_lease_branch(self, path: Path, branch: str, ref: str) -> bool:
        # git looks for <url>/.git before <url> itself: a .git/.git the agent made would
        # send the fetch to a repository of its choosing.
        if os.path.lexists(path / ".git" / ".git"):
            self._last_fetch_error = f"{path / '.git' / '.git'} exists; remove it"
            return False
        # A FIFO where upload-pack reads (packed-refs, a ref) would block the fetch.
        removed = remove_special_files(path / ".git")
        if removed:
            log.warning("lease_special_files_removed", path=str(path), files=removed[:10])
        result = run_git(
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-recurse-submodules",
            "--no-write-fetch-head",
            "--no-auto-gc",
            str(path / ".git"),
            f"+refs/heads/{branch}:{ref}",
            cwd=self.repo_path,
            check=False,
            untrusted=True,
        )
        self._last_fetch_error = result.stderr.strip()
        return result.returncode == 0

    def peek_lease_head(self, name: str, branch: str, head: str) -> bool:
        """Make ``head``, a lease's current tip it has not reported, mergeable here for an
        early conflict warning: fetched from the lease repository (as a report's head is,
        running nothing it configures) into ``refs/orchestrator/peek/<name>``. True when
        our repository then has ``head``."""
        if self._integration.has_commit(head):
            return True
        check_branch_name(branch)
        path = self._lease_path(name)
        if not self._intact(path):
            return False
        if not self._fetch_lease_branch(path, branch, f"{PEEK_REF_PREFIX}{name}"):
            return False
        return self._integration.has_commit(head)

    def import_lease_head(
        self,
        name: str,
        branch: str,
        head: str,
        *,
        untracked_ok: Sequence[str] = (),
        copy_files: Sequence[str] = (),
        keep: Sequence[str] = (),
    ) -> str:
        """Take the reported ``head`` from the lease repository ``name`` into ours.

        ``refs/heads/<branch>`` of the lease repository is fetched (by our repository,
        with our configuration: nothing the lease repository configures runs) into
        ``refs/orchestrator/leases/<name>``; it must be ``head``, and the lease's working
        tree must have no uncommitted changes. Then our ``refs/heads/<branch>`` is moved to
        ``head``: it is where the next attempt starts. Returns why the report does not
        match, or "" when it does. ``untracked_ok``: paths (``[workspace] keep`` and
        ``copy_files``) whose files do not count as uncommitted changes. ``copy_files``
        and ``keep``: paths ``head`` must not track (see orchestrator.git.untracked_only).
        """
        path = self._lease_path(name)
        check_branch_name(branch)
        if not self._intact(path):
            return (
                f"the lease's repository {path} is broken (its .git is not a directory the "
                "daemon made); the next attempt gets a fresh one"
            )
        ref = f"{LEASE_REF_PREFIX}{name}"
        if not self._fetch_lease_branch(path, branch, ref):
            return (
                f"could not take {branch} from the lease's repository: "
                f"{self._last_fetch_error[:300] or 'git fetch failed'}; commit your work on "
                f"{branch} there and report its tip"
            )
        got = self._repo.references.get(ref)
        tip = str(got.target) if got is not None else ""
        if tip != head:
            return (
                f"head {head[:12]} is not the tip of {branch} ({tip[:12]}); "
                "commit your work on the branch and report its tip"
            )
        tracked = tracked_untracked_only(
            self._repo,
            head,
            copy_files=copy_files,
            keep=keep,
            tracked_by=self._integration.integration_tip(),
        )
        if tracked:
            return tracked
        try:
            dirty = self._lease_dirty(path, head, untracked_ok)
        except GitError as exc:
            return f"could not read the lease's working tree: {exc}"
        if dirty:
            shown = ", ".join(dirty[:10]) + (" ..." if len(dirty) > 10 else "")
            return f"the worktree has uncommitted changes ({shown}); commit or remove them"
        try:
            self._repo.references.create(f"refs/heads/{branch}", pygit2.Oid(hex=head), force=True)
        except (pygit2.GitError, ValueError) as exc:
            raise GitError(f"cannot move {branch} to {head}: {exc}") from exc
        return ""

    # Lease-repository internals. Layout: worktrees_dir/<name>/ and .pool/<id>/ are
    # directories agents (may) write; .state/ (the daemon's index of each directory,
    # and the commit and branch it was handed out at), .build/ (git dirs being made)
    # and .trash/ are the daemon's own.

    def _intact(self, path: Path) -> bool:
        """``path`` is still a directory the daemon can reuse: a real directory it owns
        with full access, holding a real ``.git`` directory (not a file or symlink)."""
        try:
            info = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            return False
        if info.st_mode & 0o700 != 0o700:
            return False
        return is_plain_dir(path / ".git") or not os.path.lexists(path / ".git")

    def _populate(
        self,
        path: Path,
        key: str,
        branch: str | None,
        tip: str,
        integration: str,
        uid: int | None = None,
        *,
        spare: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> None:
        """Check ``tip`` out in ``path`` with a ``.git`` made from scratch; ``uid`` (not
        the daemon's) gets write access to all of it; ``spare``: kept paths the clean
        leaves alone."""
        granted = self._granted.get(key)
        if granted is not None and granted != uid:
            # Files the earlier uid created are its own: only a new directory is clean.
            raise GitError(f"{path} was handed to uid {granted}; a new one is made for {uid}")
        if uid is not None and granted is None:
            # Inherited (default ACL) by every file git writes from now on; what is there
            # already (a reused directory the daemon knows nothing of) gets it too.
            try:
                lease_access.grant(path, uid)
            except lease_access.ForeignFiles as exc:
                raise GitError(f"{exc}; a new directory is made for uid {uid}") from exc
            self._granted[key] = uid
        build = Path(tempfile.mkdtemp(prefix="git-", dir=self._build_dir))
        try:
            self._write_git_dir(build, branch, tip, integration, exclude)
            state = self._state_dir / key
            state.mkdir(exist_ok=True)
            index = state / "index"
            # The git dir is ours and named explicitly, and the index is the daemon's own
            # copy, so git reads no config, hook or index the agent wrote; .git entries in
            # the work tree are never touched. checkout -f (not read-tree, which keeps
            # stale stat data and so rehashes every file the next time) rewrites what
            # differs or was touched; no reflog is worth the writes here.
            target = [branch] if branch else ["--detach", tip]
            self._lease_git(
                build,
                path,
                "-c",
                "core.logAllRefUpdates=false",
                "checkout",
                "-f",
                "-q",
                *target,
                "--",
                index=index,
            )
            self._lease_git(
                build, path, "clean", "-ffdxq", *warm.clean_excludes(spare), index=index
            )
            shutil.copyfile(index, build / "index")
            if uid is not None:
                lease_access.grant(build, uid)
            self._checked_out[key] = (tip, branch)
            dir_fd = open_dir_nofollow(path)
            try:
                if os.path.lexists(path / ".git"):
                    os.rename(".git", self._trash_dir / build.name, src_dir_fd=dir_fd)
                os.rename(build, ".git", dst_dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        # The old .git waits in the trash: deleting it (the agent's objects too) is left
        # to release_worktree and recover, off the path of a lease being granted.

    def _write_git_dir(
        self,
        build: Path,
        branch: str | None,
        tip: str,
        integration: str,
        exclude: Sequence[str] = (),
    ) -> None:
        integ = self.integration_branch
        objects = self._common_dir / "objects"
        # As few entries as git needs (each costs a syscall now and one when it is
        # thrown away): git makes the rest on demand.
        for sub in ("objects/info", "refs"):
            (build / sub).mkdir(parents=True, exist_ok=True)
        head = f"ref: refs/heads/{branch}\n" if branch else f"{tip}\n"
        refs = {f"refs/remotes/origin/{integ}": integration}
        if branch:
            refs[f"refs/heads/{branch}"] = tip
        packed = "# pack-refs with: peeled fully-peeled sorted \n" + "".join(
            f"{sha} {ref}\n" for ref, sha in sorted(refs.items())
        )
        # pushurl: a plain `git push` fails at once with a clear message; the real
        # guarantee is that the agent's uid cannot write the integration repository.
        config = (
            "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n"
            "\tlogallrefupdates = true\n"
            '[remote "origin"]\n'
            f"\turl = {self._common_dir}\n"
            f"\tfetch = +refs/heads/{integ}:refs/remotes/origin/{integ}\n"
            f"\tpushurl = {PUSH_REFUSED_URL}\n"
            f"{self._identity}"
        )
        files = {
            "HEAD": head,
            "config": config,
            "packed-refs": packed,
            "objects/info/alternates": f"{objects}\n",
        }
        if exclude:
            (build / "info").mkdir(exist_ok=True)
            files["info/exclude"] = "".join(f"/{p}\n" for p in exclude)
        for rel, text in files.items():
            (build / rel).write_text(text, encoding="utf-8")

    def _lease_dirty(self, path: Path, head: str, untracked_ok: Sequence[str] = ()) -> list[str]:
        """Uncommitted changes in the lease at ``path`` against ``head``, read with a
        git dir of ours and a copy of the agent's index (its stat data saves rehashing
        every file); the agent's config, hooks and fsmonitor play no part. FIFOs, sockets
        and devices in it go first (git cannot commit them, and one named .gitignore would
        block git's read of it)."""
        removed = remove_special_files(path)
        if removed:
            log.warning("lease_special_files_removed", path=str(path), files=removed[:10])
        build = Path(tempfile.mkdtemp(prefix="status-", dir=self._build_dir))
        try:
            self._write_git_dir(build, None, head, head)
            index: bytes | None = None
            with contextlib.suppress(OSError):
                dir_fd = open_dir_nofollow(path)
                try:
                    git_fd = open_dir_nofollow(".git", dir_fd)
                    try:
                        index = read_regular_nofollow(git_fd, "index", MAX_INDEX_BYTES)
                    finally:
                        os.close(git_fd)
                finally:
                    os.close(dir_fd)
            if index is not None:
                (build / "index").write_bytes(index)
            else:
                self._lease_git(build, path, "read-tree", head)
            out = self._lease_git(
                build,
                path,
                "status",
                "--porcelain=v1",
                "-z",
                "--untracked-files=all",
                "--no-renames",
                "--ignore-submodules=all",
                "--",
                ":(top)",
                *(f":(top,exclude){p}" for p in untracked_ok),
            ).stdout
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return sorted({entry[3:] for entry in out.split("\0") if len(entry) > 3})

    def _lease_git(
        self, git_dir: Path, work_tree: Path, *args: str, index: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_git(
            f"--git-dir={git_dir}",
            f"--work-tree={work_tree}",
            *args,
            cwd=git_dir,
            untrusted=True,
            index=index,
        )

    def _lease_holding(self, branch: str) -> str | None:
        """The lease directory this daemon checked ``branch`` out in, if it is still there."""
        for key, (_, held) in self._checked_out.items():
            if held == branch and key.startswith("L-"):
                if os.path.lexists(self.worktrees_dir / key[2:]):
                    return key[2:]
        return None

    def _take_pool_slot(self, want: str | None, uid: int | None = None) -> str | None:
        """An idle directory: one already at ``want`` if any, else the latest released.

        The latest released one is most likely close to the current integration tip, and
        its files are the likeliest to still be in the page cache. (What each is at is
        known for those released since the daemon started; the others rank by age.)
        """
        best: tuple[bool, bool, float, str] | None = None
        for slot in listdir(self._pool_dir):
            path = self._pool_dir / slot
            if not self._intact(path):
                self._discard(path, _pool_key(slot))
                continue
            at = self._checked_out.get(_pool_key(slot))
            try:
                released = os.stat(self._state_dir / _pool_key(slot)).st_mtime
            except OSError:
                released = 0.0
            # A directory made writable for another uid would only be discarded.
            same_uid = self._granted.get(_pool_key(slot)) == uid
            rank = (same_uid, at is not None and at[0] == want, released, slot)
            if best is None or rank > best:
                best = rank
        return best[3] if best is not None else None

    def _rename_slot(self, src: Path, src_key: str, dst: Path, dst_key: str) -> None:
        # The directory first: a crash after it leaves the index under the old key, and
        # the next checkout of dst is a full one (correct, only slower).
        os.rename(src, dst)
        self._drop_state(dst_key)
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._state_dir / src_key, self._state_dir / dst_key)
        at = self._checked_out.pop(src_key, None)
        if at is not None:
            self._checked_out[dst_key] = at
        uid = self._granted.pop(src_key, None)
        if uid is not None:
            self._granted[dst_key] = uid

    def _drop_state(self, key: str) -> None:
        self._checked_out.pop(key, None)
        self._granted.pop(key, None)
        shutil.rmtree(self._state_dir / key, ignore_errors=True)

    def _discard(self, path: Path, key: str) -> None:
        """Delete a lease or pool directory, never following anything in it."""
        log.info("lease_directory_discarded", path=str(path))
        self._drop_state(key)
        if not os.path.lexists(path):
            return
        # Renamed out of the way first, so a half-deleted directory never looks usable.
        doomed = self._trash_dir / f"{path.name}-{secrets.token_hex(4)}"
        os.rename(path, doomed)
        self._empty_trash()

    def _empty_trash(self) -> None:
        for entry in listdir(self._trash_dir):
            target = self._trash_dir / entry
            try:
                if target.is_symlink() or not target.is_dir():
                    target.unlink(missing_ok=True)
                else:
                    shutil.rmtree(target, onerror=make_writable_and_retry)
            except OSError as exc:
                # e.g. an agent of another uid made a directory of its own unwritable:
                # it is out of the way here, and nothing waits for it.
                log.warning("trash_not_emptied", path=str(target), error=str(exc))

    def _lease_path(self, name: str) -> Path:
        if (
            not name
            or name in (".", "..")
            or name.startswith((".", "-"))
            or any(c in name for c in "/\\\0")
        ):
            raise GitError(
                f"invalid worktree name {name!r}: use one path component that does not "
                "start with '.' or '-'"
            )
        path = self.worktrees_dir / name
        assert_inside(self.worktrees_dir, path)
        return path


def _identity_section(repo: pygit2.Repository) -> str:
    """``[user]`` with the integration repository's user.name / user.email, if set."""
    lines = []
    for key in ("name", "email"):
        try:
            value = str(repo.config[f"user.{key}"])
        except (KeyError, pygit2.GitError):
            continue
        if value and not any(c in value for c in '\n\0"\\'):
            lines.append(f'\t{key} = "{value}"\n')
    return "[user]\n" + "".join(lines) if lines else ""


def _lease_key(name: str) -> str:
    return f"L-{name}"


def _pool_key(slot: str) -> str:
    return f"P-{slot}"
