"""Git plumbing for the daemon: branches, a pool of lease repositories, in-memory merges.

``Workspace`` is the one object the rest of the daemon holds; it composes the parts, each
in a module of its own, and passes each what it needs (the integration repository, the
resolved ``worktrees_dir``), never another part's fields:

* ``orchestrator.git.integration``: the integration repository, its refs and commits, and
  the compare-and-swap that lands a candidate on the integration branch;
* ``orchestrator.git.merging``: building candidates in the object database, the backends;
* ``orchestrator.git.lease_repos``: the lease repositories and their pool;
* ``orchestrator.git.gate_checkouts``: the gate worktrees;
* ``orchestrator.git.worktrees_dir``: the layout of ``worktrees_dir`` and what clears it;
* ``orchestrator.git.command``: running git, and ``GitError``.

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
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pygit2
from pygit2.enums import RepositoryOpenFlag

from orchestrator.config import WorkspaceConfig
from orchestrator.git import warm
from orchestrator.git.command import GIT_TIMEOUT_S, UNTRUSTED_GIT_TIMEOUT_S, GitError, run_git
from orchestrator.git.gate_checkouts import GateCheckouts
from orchestrator.git.integration import (
    IntegrationLocked,
    IntegrationRepository,
    IntegrationTreeDirty,
)
from orchestrator.git.lease_repos import LeaseRepositories
from orchestrator.git.merging import (
    MergeBackend,
    Merger,
    MergeResult,
    MergeStrategy,
    conflict_detail,
)
from orchestrator.git.untracked_only import tracked_untracked_only
from orchestrator.git.worktrees_dir import (
    is_inside,
    remove_special_files,
)

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
        self._leases = LeaseRepositories(self._integration, worktrees_dir)
        self.worktrees_dir = self._leases.worktrees_dir
        self._gates = GateCheckouts(self._integration, self.worktrees_dir)
        self.gate_path = self._gates.gate_path
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

    # ------------------------------------------------------------------ leased repositories
    # (orchestrator.git.lease_repos)

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
        out and nothing else in its working tree; see
        :meth:`LeaseRepositories.checkout_for_lease`."""
        return self._leases.checkout_for_lease(
            name, branch, integration=integration, owner_uid=owner_uid, warm_up=warm_up
        )

    def lease_warm_up(self, name: str, workspace: WorkspaceConfig) -> bool:
        """Whether ``[workspace] setup`` must run in the lease directory ``name``."""
        return self._leases.lease_warm_up(name, workspace)

    def confirm_lease_warm_up(self, name: str) -> bool:
        """Setup finished in the lease directory ``name``: record the key it built for."""
        return self._leases.confirm_warm_up(name)

    def release_worktree(self, name: str) -> None:
        """Put the directory of the lease ``name`` back in the pool."""
        self._leases.release_worktree(name)

    def warm_pool(self, size: int) -> int:
        """Create idle directories (at the integration tip) until the pool holds ``size``;
        returns how many were created."""
        self._gates.recover()
        return self._leases.warm_pool(size)

    def pool_size(self) -> int:
        """How many idle directories the pool holds."""
        return self._leases.pool_size()

    def peek_lease_head(self, name: str, branch: str, head: str) -> bool:
        """Make ``head``, a lease's unreported tip, mergeable here for an early conflict
        warning; True when our repository then has ``head``."""
        return self._leases.peek_lease_head(name, branch, head)

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
        """Take the reported ``head`` from the lease repository ``name`` into ours; returns
        why the report does not match, or "" when it does (``copy_files`` and ``keep``:
        paths it must not track)."""
        return self._leases.import_lease_head(
            name, branch, head, untracked_ok=untracked_ok, copy_files=copy_files, keep=keep
        )

    def tracked_untracked_only(
        self, commit: str, base: str, *, copy_files: Sequence[str], keep: Sequence[str]
    ) -> str:
        """Why ``commit`` tracks a path ``[workspace] copy_files`` or ``keep`` puts in
        place untracked (and ``base`` does not), or "" (see git/untracked_only.py)."""
        return tracked_untracked_only(
            self._integration.repo, commit, copy_files=copy_files, keep=keep, tracked_by=base
        )

    def lease_worktree_names(self) -> list[str]:
        """Names of the worktrees currently laid out for leases (``worktrees_dir/<name>``)."""
        return self._leases.lease_worktree_names()

    # ------------------------------------------------------------------ any checkout

    def dirty_paths(self, path: Path) -> list[str]:
        """Uncommitted changes in the working tree at ``path``: modified, staged, untracked.

        Ignored files are not reported. Paths are relative to the worktree, sorted. For
        the daemon's own checkouts; a lease's directory is read by
        :meth:`import_lease_head`, which runs nothing the directory configures.
        """
        path = Path(path)
        if not os.path.lexists(path / ".git"):
            raise GitError(f"{path} is not a git working tree (it has no .git)")
        out = run_git(
            "status",
            "--porcelain=v1",
            "-z",
            "--untracked-files=all",
            "--no-renames",
            "--ignore-submodules=all",
            cwd=path,
            optional_locks=is_inside(self.worktrees_dir, path),
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

    # ------------------------------------------------------------------ gate worktree
    # (orchestrator.git.gate_checkouts)

    def gate_checkout(
        self, commit: str, *, slot: int = 0, keep: Sequence[str] = (), key: str | None = None
    ) -> Path:
        """Return the gate worktree, detached at ``commit`` with exactly its files; see
        :meth:`GateCheckouts.gate_checkout`."""
        return self._gates.gate_checkout(commit, slot=slot, keep=keep, key=key)

    def gate_warm_key(self, path: Path) -> str | None:
        """The cache key the kept paths of the gate checkout at ``path`` were built for."""
        return self._gates.gate_warm_key(path)

    def mark_gate_warm(self, path: Path, key: str) -> None:
        """Record that the kept paths of the gate checkout at ``path`` are built for ``key``
        (after setup succeeded)."""
        self._gates.mark_gate_warm(path, key)

    def forget_gate_warm(self, path: Path) -> None:
        """Forget what the kept paths of the gate checkout at ``path`` were built for."""
        self._gates.forget_gate_warm(path)

    def clear_idle_locks(self) -> list[Path]:
        """Delete ``index.lock``/``HEAD.lock`` in the daemon's idle gate checkouts;
        returns what was deleted."""
        return self._gates.clear_idle_locks()

    def warm_key(self, commit: str, workspace: WorkspaceConfig) -> str:
        """The cache key of ``[workspace]`` kept paths for ``commit``."""
        return warm.cache_key(self._integration.repo, commit, workspace)

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
        self._gates.recover()
        self._leases.recover()
