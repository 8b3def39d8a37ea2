"""Git plumbing for the daemon: branches, a pool of lease repositories, in-memory merges.

Everything here is blocking and meant to run in a worker thread. The caller runs one git
operation at a time per repository, so there is no locking here.

Why it is shaped this way (see DESIGN.md, "Where speed comes from"):

* A fresh checkout writes every file of the tree; moving an existing checkout to another
  commit only rewrites the files that differ. So lease directories are never thrown
  away: a released one goes to a pool (``<worktrees_dir>/.pool/<id>``) and the next lease
  renames it into place and moves it by diff. The gate worktree is moved the same way.
* Each lease directory is a repository of its own (its own ``.git``, objects borrowed
  read-only through alternates), not a ``git worktree`` of ours: whatever its agent does
  to refs, config or hooks stays there. Its ``.git`` is written afresh by the daemon for
  every lease; the daemon checks it out with a git dir and an index of its own, and
  takes reported work by fetching from it (see ``checkout_for_lease``).
* Merge candidates are built in the object database (pygit2 ``merge_commits``, or
  ``git merge-tree --write-tree``), never in a checkout.
* Working-tree changes (checkout, clean) go through the git CLI: it is the faster of the
  two on big trees. On directories an agent can write (leases, the gate worktree) it
  runs with no hooks, fsmonitor, filters or config the agent could have written
  (``orchestrator.git.untrusted``).

The layout of ``worktrees_dir`` is in ``orchestrator.git.worktrees_dir``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import pygit2
from pygit2.enums import RepositoryOpenFlag

from orchestrator.config import WorkspaceConfig
from orchestrator.git import lease_access, warm
from orchestrator.git.command import GIT_TIMEOUT_S, UNTRUSTED_GIT_TIMEOUT_S, GitError, run_git
from orchestrator.git.integration import (
    IntegrationLocked,
    IntegrationRepository,
    IntegrationTreeDirty,
    check_branch_name,
)
from orchestrator.git.merging import (
    MergeBackend,
    Merger,
    MergeResult,
    MergeStrategy,
    conflict_detail,
)
from orchestrator.git.untrusted import (
    is_plain_dir,
    open_dir_nofollow,
    read_regular_nofollow,
    write_new_nofollow,
)
from orchestrator.git.worktrees_dir import (
    BUILD_DIR,
    GATE_DIR,
    POOL_DIR,
    STATE_DIR,
    TRASH_DIR,
    assert_inside,
    is_inside,
    listdir,
    make_writable_and_retry,
    remove_special_files,
)
from orchestrator.observe import logs

__all__ = [
    "GIT_TIMEOUT_S",
    "UNTRUSTED_GIT_TIMEOUT_S",
    "GitError",
    "IntegrationLocked",
    "IntegrationTreeDirty",
    "MergeBackend",
    "MergeResult",
    "MergeStrategy",
    "Workspace",
    "conflict_detail",
    "remove_special_files",
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


class Workspace:
    """The repository being integrated into, and the worktrees the daemon manages in it."""

    def __init__(
        self,
        repo_path: Path,
        integration_branch: str,
        worktrees_dir: Path,
        *,
        merge_backend: MergeBackend = "auto",
    ) -> None:
        """Open the repository and check the integration branch exists.

        ``merge_backend`` picks how merge candidates are computed: ``"pygit2"`` (libgit2,
        in process), ``"git"`` (``git merge-tree --write-tree``, git >= 2.38) or ``"auto"``:
        the first few clean merges run both, check they agree, and the faster one is kept.
        libgit2 rebuilds the whole tree from a flat index, so on big trees merge-ort is
        many times faster, while on small ones the in-process call saves a process spawn.
        """
        self._integration = IntegrationRepository(repo_path, integration_branch)
        self._merger = Merger(self._integration, merge_backend)
        self.repo_path = self._integration.repo_path
        self.integration_branch = integration_branch
        self._repo = self._integration.repo
        self._common_dir = self._integration.common_dir
        self._admin_root = self._common_dir / "worktrees"
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
        self.gate_path = self.worktrees_dir / GATE_DIR
        # Gate checkout -> its admin dir, as found when it was checked out: a gate or a
        # setup command may rewrite the checkout's .git file, so it is not read again.
        self._gate_admins: dict[Path, Path] = {}
        self.recover()

    # ------------------------------------------------------------------ refs and commits
    # (orchestrator.git.integration)

    @property
    def git_dir(self) -> Path:
        """The integration repository's (common) git dir: what agents fetch from and
        borrow objects of."""
        return self._integration.git_dir

    @property
    def common_dir(self) -> Path:
        """The integration repository's git dir (objects, refs): what gates must not write."""
        return self._integration.common_dir

    def integration_tip(self) -> str:
        """The sha the integration branch points to."""
        return self._integration.integration_tip()

    def branch_tip(self, branch: str) -> str | None:
        """The sha ``refs/heads/<branch>`` points to, or None if there is no such branch."""
        return self._integration.branch_tip(branch)

    def ensure_branch(self, branch: str, start: str) -> str:
        """Create ``refs/heads/<branch>`` at ``start`` unless it exists; return its tip."""
        return self._integration.ensure_branch(branch, start)

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """True if ``ancestor`` is ``descendant`` or one of its ancestors."""
        return self._integration.is_ancestor(ancestor, descendant)

    def reachable(self, commits: Iterable[str], tip: str) -> set[str]:
        """Those of ``commits`` (full ids) that ``tip`` contains, in one walk of history."""
        return self._integration.reachable(commits, tip)

    def commits_between(
        self, base: str, head: str, *, limit: int | None = None
    ) -> list[tuple[str, str]]:
        """``(sha, subject)`` of commits reachable from ``head`` but not ``base``, newest first."""
        return self._integration.commits_between(base, head, limit=limit)

    def has_commit(self, rev: str) -> bool:
        """Whether ``rev`` names a commit of the integration repository."""
        return self._integration.has_commit(rev)

    def tree_of(self, commit: str) -> str:
        """The id of ``commit``'s tree: what a gate sees, whatever the commit's message."""
        return self._integration.tree_of(commit)

    def advance_integration(self, expected: str, new: str, message: str) -> bool:
        """Move the integration branch from ``expected`` to ``new`` (compare-and-swap);
        see :meth:`IntegrationRepository.advance_integration`."""
        return self._integration.advance_integration(expected, new, message)

    def integration_locks(self, checkouts: Sequence[Path] | None = None) -> list[Path]:
        """Lock files that stop the integration branch (or a checkout of it) from moving."""
        return self._integration.integration_locks(checkouts)

    def finish_interrupted_update(self, old: str, new: str) -> list[Path]:
        """Finish bringing checkouts of the integration branch from ``old`` to ``new``
        after the daemon died between moving the branch and updating them."""
        return self._integration.finish_interrupted_update(old, new)

    def _commit(self, rev: str) -> pygit2.Commit:
        return self._integration.commit(rev)

    # ------------------------------------------------------------------ leased repositories

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
        tip = self.branch_tip(branch)
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
        origin = integration if integration is not None else self.integration_tip()
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
        there, or one is missing. The key is recorded now: the worker runs setup before
        the agent (as the agent's uid, never the daemon), and removes the kept paths
        when setup fails, so the next lease of the directory builds them again."""
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
        warm.write_stamp(state, want)
        return needed

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
        tip = self.integration_tip()
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
        if left == tip or not self.is_ancestor(tip, left):
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
        result = self._git(
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
        if self.has_commit(head):
            return True
        check_branch_name(branch)
        path = self._lease_path(name)
        if not self._intact(path):
            return False
        if not self._fetch_lease_branch(path, branch, f"{PEEK_REF_PREFIX}{name}"):
            return False
        return self.has_commit(head)

    def import_lease_head(
        self, name: str, branch: str, head: str, *, untracked_ok: Sequence[str] = ()
    ) -> str:
        """Take the reported ``head`` from the lease repository ``name`` into ours.

        ``refs/heads/<branch>`` of the lease repository is fetched (by our repository,
        with our configuration: nothing the lease repository configures runs) into
        ``refs/orchestrator/leases/<name>``; it must be ``head``, and the lease's working
        tree must have no uncommitted changes. Then our ``refs/heads/<branch>`` is moved to
        ``head``: it is where the next attempt starts. Returns why the report does not
        match, or "" when it does. ``untracked_ok``: paths (``[workspace] keep`` and
        ``copy_files``) whose files do not count as uncommitted changes.
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

    def dirty_paths(self, path: Path) -> list[str]:
        """Uncommitted changes in the working tree at ``path``: modified, staged, untracked.

        Ignored files are not reported. Paths are relative to the worktree, sorted. For
        the daemon's own checkouts; a lease's directory is read by
        :meth:`import_lease_head`, which runs nothing the directory configures.
        """
        path = Path(path)
        if not os.path.lexists(path / ".git"):
            raise GitError(f"{path} is not a git working tree (it has no .git)")
        out = self._git(
            "status",
            "--porcelain=v1",
            "-z",
            "--untracked-files=all",
            "--no-renames",
            "--ignore-submodules=all",
            cwd=path,
            optional_locks=self._owns(path),
            untrusted=True,
        ).stdout
        return sorted({entry[3:] for entry in out.split("\0") if len(entry) > 3})

    def head_of(self, path: Path) -> str | None:
        """The commit HEAD points to in the worktree at ``path``; None if HEAD is unborn."""
        path = Path(path)
        try:
            repo = pygit2.Repository(str(path), RepositoryOpenFlag.NO_SEARCH)
        except (pygit2.GitError, KeyError) as exc:
            raise GitError(f"{path} is not a git working tree: {exc}") from exc
        try:
            if repo.head_is_unborn:
                return None
            return str(repo.head.target)
        except (pygit2.GitError, KeyError):
            return None
        finally:
            repo.free()

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
        return self._git(
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

    # ------------------------------------------------------------------ merging
    # (orchestrator.git.merging)

    def merge_candidate(
        self,
        branch: str,
        *,
        strategy: str,
        message: str,
        author_name: str = "orchestrator",
        author_email: str = "orchestrator@localhost",
        head: str | None = None,
        onto: str | None = None,
    ) -> MergeResult:
        """Build the commit that merging ``branch`` would produce, without any checkout;
        see :meth:`Merger.merge_candidate`."""
        return self._merger.merge_candidate(
            branch,
            strategy=strategy,
            message=message,
            author_name=author_name,
            author_email=author_email,
            head=head,
            onto=onto,
        )

    def conflicting_paths(self, ours: str, theirs: str) -> tuple[str, ...]:
        """The paths a three-way merge of ``theirs`` into ``ours`` would conflict in."""
        return self._merger.conflicting_paths(ours, theirs)

    @property
    def merge_backend(self) -> MergeBackend:
        """The backend merges use: ``auto`` until calibration has picked one."""
        return self._merger.merge_backend

    def lease_worktree_names(self) -> list[str]:
        """Names of the worktrees currently laid out for leases (``worktrees_dir/<name>``)."""
        return sorted(e for e in listdir(self.worktrees_dir) if not e.startswith("."))

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

    # ------------------------------------------------------------------ gate worktree

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
        sha = str(self._commit(commit).id)
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
        self._git("worktree", "add", "-q", "--detach", str(path), sha, cwd=self.repo_path)
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
        want_tree = str(self._commit(sha).tree_id)
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

    def warm_key(self, commit: str, workspace: WorkspaceConfig) -> str:
        """The cache key of ``[workspace]`` kept paths for ``commit``."""
        return warm.cache_key(self._repo, commit, workspace)

    # ------------------------------------------------------------------ crash recovery

    def recover(self) -> None:
        """Repair what an interrupted run may have left in ``worktrees_dir``.

        * a gate worktree renamed whose admin entry still names the old place is
          re-linked; admin entries for worktrees under ``worktrees_dir`` that no longer
          exist are pruned (only ours: a person's worktree on an unmounted disk is left
          alone);
        * half-built git dirs and trash of lease directories are deleted, and so are the
          daemon's records of lease directories that are gone.

        Cheap (a few small files per directory); run on startup and before each lease.
        Lease directories themselves are not read: their ``.git`` is the agent's.
        """
        for entry in listdir(self.worktrees_dir):
            if entry.startswith(GATE_DIR):
                self._adopt(self.worktrees_dir / entry)
        self._prune_registrations()
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

    # ------------------------------------------------------------------ internals

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

    def _owns(self, path: Path) -> bool:
        return is_inside(self.worktrees_dir, path)

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
        return self._git(
            f"--git-dir={admin}", f"--work-tree={path}", *args, cwd=path, untrusted=True
        )

    def _git(
        self,
        *args: str,
        cwd: Path,
        check: bool = True,
        optional_locks: bool = True,
        untrusted: bool = False,
        index: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run_git(
            *args,
            cwd=cwd,
            check=check,
            optional_locks=optional_locks,
            untrusted=untrusted,
            index=index,
        )


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


def _lease_key(name: str) -> str:
    return f"L-{name}"


def _pool_key(slot: str) -> str:
    return f"P-{slot}"
