"""Git plumbing for the daemon: branches, a pool of reusable worktrees, in-memory merges.

Everything here is blocking and meant to run in a worker thread. The caller runs one git
operation at a time per repository, so there is no locking here.

Why it is shaped this way (see DESIGN.md, "Where speed comes from"):

* A fresh checkout writes every file of the tree; moving an existing checkout to another
  commit only rewrites the files that differ. So worktrees are never thrown away: a
  released worktree goes to a pool (``<worktrees_dir>/.pool/<id>``) and the next lease
  renames it into place and moves it by diff. The gate worktree is moved the same way.
* Merge candidates are built in the object database (pygit2 ``merge_commits``, or
  ``git merge-tree --write-tree``), never in a checkout.
* Working-tree changes (checkout, clean, worktree add) go through the git CLI: it is the
  faster of the two on big trees, and it runs the repository's filters (LFS, eol) and
  hooks the way a person's git would.

Layout of ``worktrees_dir``::

    <name>/          a worktree leased to the handoff <name>
    .pool/<id>/      idle worktrees (detached HEAD); <id> is git's admin id for it
    .gate/           the gate worktree, detached at the candidate being validated
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pygit2
from pygit2.enums import RepositoryOpenFlag, SortMode

from orchestrator.observe import logs

__all__ = [
    "GitError",
    "IntegrationLocked",
    "IntegrationTreeDirty",
    "MergeBackend",
    "MergeResult",
    "MergeStrategy",
    "Workspace",
]

log = logs.get("git")

MergeStrategy = Literal["merge", "squash", "ff-only"]
MergeBackend = Literal["auto", "pygit2", "git"]
_STRATEGIES: tuple[str, ...] = ("merge", "squash", "ff-only")
# How many clean merges "auto" times with both backends before it keeps the faster one.
_CALIBRATION_MERGES = 3

POOL_DIR = ".pool"
GATE_DIR = ".gate"

# Variables that would point our git subprocesses at some other repository, index or
# object store (they are set, for instance, when the daemon is started from a git hook).
_GIT_LOCATION_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_QUARANTINE_PATH",
)

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


# No single git command the daemon runs should take this long, even on a huge checkout.
GIT_TIMEOUT_S = 1800.0


class GitError(RuntimeError):
    """A git operation failed; the message says what went wrong and what to do."""


class IntegrationTreeDirty(GitError):
    """A working tree with the integration branch checked out has local changes.

    Advancing the branch under it would leave it showing the new commit's changes
    reversed, so nothing was changed.
    """

    def __init__(self, path: Path, changes: Sequence[str] = ()) -> None:
        self.path = path
        self.changes = tuple(changes)
        shown = ", ".join(self.changes[:10])
        if len(self.changes) > 10:
            shown += f", ... ({len(self.changes)} in all)"
        super().__init__(
            f"the working tree at {path} has the integration branch checked out and "
            f"local changes ({shown or 'unknown'}); the branch was not advanced. "
            "Commit or stash those changes (or check out another branch there) and the "
            "merge queue will continue."
        )


class IntegrationLocked(GitError):
    """Another git process holds a lock the branch update needs (the branch's ref lock,
    or the index lock of a checkout of the integration branch); nothing was changed.

    Not a failure of the handoff: the merge waits until the lock is gone."""

    def __init__(self, locks: Sequence[Path]) -> None:
        self.locks = tuple(locks)
        super().__init__(
            "locked by another git process: "
            + ", ".join(str(p) for p in self.locks)
            + "; the merge waits until it finishes (if no git process is running there, "
            "the lock is stale: delete the file)"
        )


@dataclass(frozen=True)
class MergeResult:
    """Outcome of :meth:`Workspace.merge_candidate`."""

    candidate: str | None
    """sha of the candidate commit (on no branch); None on conflict or nothing to do."""
    conflicts: tuple[str, ...]
    """Conflicting paths, sorted; empty on success."""
    base: str
    """The integration tip the candidate was built on."""
    detail: str = ""
    """Why there is no candidate, e.g. ``already merged`` or ``not a fast-forward: ...``."""


@dataclass(frozen=True)
class _Checkout:
    """A working tree reported by ``git worktree list``."""

    path: Path
    branch: str | None  # full ref name, None when detached
    bare: bool


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
        if merge_backend not in ("auto", "pygit2", "git"):
            raise ValueError(
                f"merge_backend must be 'auto', 'pygit2' or 'git', not {merge_backend!r}"
            )
        self._merge_backend: MergeBackend = merge_backend
        self._merge_seconds: dict[str, list[float]] = {"pygit2": [], "git": []}
        self.repo_path = Path(repo_path).resolve()
        try:
            self._repo = pygit2.Repository(str(self.repo_path), RepositoryOpenFlag.NO_SEARCH)
        except (pygit2.GitError, KeyError) as exc:
            raise GitError(
                f"{self.repo_path} is not a git repository ({exc}); set repository.path to "
                "the repository's working tree or its .git directory"
            ) from exc
        self._common_dir = _common_dir(Path(self._repo.path))
        self._admin_root = self._common_dir / "worktrees"
        self.integration_branch = integration_branch
        if self.branch_tip(integration_branch) is None:
            raise GitError(
                f"the integration branch {integration_branch!r} does not exist in "
                f"{self.repo_path}; create it (git branch {integration_branch} <commit>) or "
                "set repository.integration_branch to an existing branch"
            )
        self.worktrees_dir = Path(worktrees_dir)
        try:
            self.worktrees_dir.mkdir(parents=True, exist_ok=True)
            self.worktrees_dir = self.worktrees_dir.resolve()
            (self.worktrees_dir / POOL_DIR).mkdir(exist_ok=True)
        except OSError as exc:
            raise GitError(
                f"cannot create the worktrees directory {worktrees_dir}: {exc}; "
                "make it writable by the daemon's user"
            ) from exc
        self._pool_dir = self.worktrees_dir / POOL_DIR
        self.gate_path = self.worktrees_dir / GATE_DIR
        self.recover()

    # ------------------------------------------------------------------ refs and commits

    def integration_tip(self) -> str:
        """The sha the integration branch points to."""
        tip = self.branch_tip(self.integration_branch)
        if tip is None:
            raise GitError(
                f"the integration branch {self.integration_branch!r} was deleted from "
                f"{self.repo_path}; recreate it to let the merge queue continue"
            )
        return tip

    def branch_tip(self, branch: str) -> str | None:
        """The sha ``refs/heads/<branch>`` points to, or None if there is no such branch."""
        _check_branch_name(branch)
        ref = self._repo.references.get(f"refs/heads/{branch}")
        if ref is None:
            return None
        try:
            return str(ref.resolve().target)
        except (KeyError, pygit2.GitError):
            return None

    def ensure_branch(self, branch: str, start: str) -> str:
        """Create ``refs/heads/<branch>`` at ``start`` unless it exists; return its tip.

        An existing branch is left where it is: it holds the commits of earlier attempts.
        """
        tip = self.branch_tip(branch)
        if tip is not None:
            return tip
        commit = self._commit(start)
        try:
            self._repo.branches.local.create(branch, commit)
        except pygit2.AlreadyExistsError:
            pass  # created by someone else since we looked; theirs wins
        except (pygit2.GitError, ValueError) as exc:
            raise GitError(f"cannot create branch {branch!r} at {start!r}: {exc}") from exc
        tip = self.branch_tip(branch)
        if tip is None:
            raise GitError(f"branch {branch!r} vanished right after it was created")
        return tip

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """True if ``ancestor`` is ``descendant`` or one of its ancestors."""
        a = self._commit(ancestor).id
        d = self._commit(descendant).id
        return a == d or bool(self._repo.descendant_of(d, a))

    def reachable(self, commits: Iterable[str], tip: str) -> set[str]:
        """Those of ``commits`` (full ids) that ``tip`` contains, in one walk of history.

        For many commits at once: asking :meth:`is_ancestor` of each costs a walk per
        commit, so after months of merges a start-up would spend minutes on it."""
        wanted = set(commits)
        found: set[str] = set()
        if not wanted:
            return found
        for commit in self._repo.walk(self._commit(tip).id, SortMode.NONE):
            sha = str(commit.id)
            if sha in wanted:
                found.add(sha)
                if len(found) == len(wanted):
                    break
        return found

    def commits_between(
        self, base: str, head: str, *, limit: int | None = None
    ) -> list[tuple[str, str]]:
        """``(sha, subject)`` of commits reachable from ``head`` but not ``base``, newest first."""
        head_id = self._commit(head).id
        base_id = self._commit(base).id
        walker = self._repo.walk(head_id, SortMode.TOPOLOGICAL | SortMode.TIME)
        walker.hide(base_id)
        out: list[tuple[str, str]] = []
        for commit in walker:
            if limit is not None and len(out) >= limit:
                break
            lines = commit.message.splitlines()
            out.append((str(commit.id), lines[0] if lines else ""))
        return out

    # ------------------------------------------------------------------ leased worktrees

    def checkout_for_lease(self, name: str, branch: str) -> Path:
        """Return ``worktrees_dir/<name>`` with ``branch`` checked out and nothing else in it.

        HEAD is attached to ``refs/heads/<branch>``, the files are exactly the branch tip
        and there are no untracked or ignored files. An existing worktree of that name is
        reused; otherwise an idle pooled worktree is moved into place; only when the pool
        is empty is a new worktree created. Reuse rewrites only the files that differ.
        """
        path = self._lease_path(name)
        if branch == self.integration_branch:
            raise GitError(
                f"refusing to lease the integration branch {branch!r}: agents work on their "
                "own branches and only the merge queue advances the integration branch"
            )
        if self.branch_tip(branch) is None:
            raise GitError(
                f"branch {branch!r} does not exist in {self.repo_path}; create it with "
                "ensure_branch() before leasing a worktree for it"
            )
        self.recover()
        admin = self._adopt_or_discard(path)
        from_pool: Path | None = None
        if admin is None:
            slot = self._take_pool_slot(self.branch_tip(branch))
            if slot is not None:
                from_pool, admin = slot
                self._move(from_pool, path, admin)
        if admin is None:
            self._git("worktree", "add", "-q", str(path), branch, cwd=self.repo_path)
            if self._adopt(path) is None:
                raise GitError(f"git worktree add did not register {path}")
            return path
        self._clear_stale_state(admin)
        try:
            self._wt_git(path, admin, "checkout", "-f", "-q", branch, "--")
        except GitError:
            if from_pool is not None:
                # e.g. the branch is checked out in another worktree: give the slot back
                # rather than leave a worktree under a name nobody will release.
                self._move(path, from_pool, admin)
            raise
        self._wt_git(path, admin, "clean", "-ffdxq")
        return path

    def release_worktree(self, name: str) -> None:
        """Detach the worktree ``name`` from its branch and put it back in the pool.

        After this the branch may be deleted or checked out elsewhere. The files stay as
        they are until the worktree is leased again. A missing worktree is not an error.
        """
        path = self._lease_path(name)
        admin = self._adopt_or_discard(path)
        if admin is None:
            # Maybe it was half-moved into the pool already: recover() finishes that move
            # before it prunes registrations of directories that are really gone.
            self.recover()
            return
        self._clear_locks(admin)
        self._detach(path, admin)
        slot = self._pool_dir / admin.name
        if os.path.lexists(slot):
            # Not the registered location of this admin entry (that is `path`), so it is
            # debris from an interrupted run.
            self._remove_tree(slot)
        self._move(path, slot, admin)

    def warm_pool(self, size: int) -> int:
        """Create idle worktrees (at the integration tip) until the pool holds ``size``.

        Lets the daemon pay for full checkouts at startup instead of on the first leases.
        Returns how many were created.
        """
        self.recover()
        have = len(self._pool_slots())
        tip = self.integration_tip()
        created = 0
        n = 0
        while have + created < size:
            n += 1
            slot = self._pool_dir / f"slot-{n}"
            if os.path.lexists(slot) or os.path.lexists(self._admin_root / slot.name):
                continue
            self._git("worktree", "add", "-q", "--detach", str(slot), tip, cwd=self.repo_path)
            admin = self._adopt(slot)
            if admin is None:
                raise GitError(f"git worktree add did not register {slot}")
            if admin.name != slot.name:
                self._move(slot, self._pool_dir / admin.name, admin)
            created += 1
        return created

    def pool_size(self) -> int:
        """How many idle worktrees the pool holds."""
        return len(self._pool_slots())

    def dirty_paths(self, path: Path) -> list[str]:
        """Uncommitted changes in the worktree at ``path``: modified, staged, untracked.

        Ignored files are not reported. Paths are relative to the worktree, sorted.
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
            cwd=path,
            optional_locks=self._owns(path),
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
        """Build the commit that merging ``branch`` would produce, without any checkout.

        ``head`` (a commit on the branch, e.g. the one a report named) is merged instead of
        the branch tip when given, so commits nobody reported can never slip in. ``onto``
        (a candidate ahead in the queue) replaces the integration tip as the base, for
        speculative gating.

        The candidate sits on top of the current integration tip and is on no branch;
        :meth:`advance_integration` publishes it once the gates pass.

        * ``merge``: a merge commit with parents ``[tip, branch tip]``;
        * ``squash``: one commit with parent ``[tip]`` holding the merged tree;
        * ``ff-only``: the branch tip itself, if it contains the integration tip.

        A branch already contained in the tip (or, for ``squash``, whose changes all are)
        gives no candidate and detail ``already merged``; conflicts give no candidate and
        the conflicting paths; ``ff-only`` on a diverged branch and unrelated histories
        give no candidate, no paths, and the reason in ``detail``.
        """
        if strategy not in _STRATEGIES:
            raise ValueError(f"unknown merge strategy {strategy!r}; use one of {_STRATEGIES}")
        base = onto if onto is not None else self.integration_tip()
        theirs = head if head is not None else self.branch_tip(branch)
        if theirs is None:
            raise GitError(f"branch {branch!r} does not exist; nothing to merge")
        if head is not None and not isinstance(self._repo.get(head), pygit2.Commit):
            raise GitError(f"commit {head} of {branch!r} is missing from the repository")
        base_id = pygit2.Oid(hex=base)
        theirs_id = pygit2.Oid(hex=theirs)
        if theirs == base or self._repo.descendant_of(base_id, theirs_id):
            return MergeResult(None, (), base, "already merged")
        if strategy == "ff-only":
            if self._repo.descendant_of(theirs_id, base_id):
                return MergeResult(theirs, (), base)
            return MergeResult(
                None,
                (),
                base,
                f"not a fast-forward: {branch} ({theirs[:12]}) does not contain "
                f"{self.integration_branch} ({base[:12]}); rebase it onto "
                f"{self.integration_branch}",
            )
        # pygit2 returns None here (its stub says Oid) when there is no common commit.
        merge_base: pygit2.Oid | None = self._repo.merge_base(base_id, theirs_id)
        if merge_base is None:
            return MergeResult(
                None,
                (),
                base,
                f"unrelated histories: {branch} shares no commit with {self.integration_branch}",
            )
        tree, conflicts = self._merge_trees(base_id, theirs_id)
        if conflicts:
            n = len(conflicts)
            return MergeResult(None, conflicts, base, f"{n} conflicting path{'s' * (n != 1)}")
        assert tree is not None
        base_commit = self._commit(base)
        if strategy == "squash" and tree == base_commit.tree_id:
            # Its changes are all on the integration branch already (e.g. cherry-picked);
            # an empty squash commit would only add noise.
            return MergeResult(None, (), base, "already merged")
        parents = [base_id, theirs_id] if strategy == "merge" else [base_id]
        sig = pygit2.Signature(author_name, author_email)
        if not message.endswith("\n"):
            message += "\n"
        candidate = self._repo.create_commit(None, sig, sig, message, tree, parents)
        return MergeResult(str(candidate), (), base)

    def advance_integration(self, expected: str, new: str, message: str) -> bool:
        """Move the integration branch from ``expected`` to ``new`` (compare-and-swap).

        Returns False, changing nothing, if the branch no longer points at ``expected``.
        Working trees that have the branch checked out are kept in step, as git's
        ``receive.denyCurrentBranch=updateInstead`` does: if one has local changes (or
        untracked files the update would overwrite) :class:`IntegrationTreeDirty` is raised
        and nothing changes; otherwise it is moved to ``new`` after the branch.
        """
        new_id = str(self._commit(new).id)
        if self.branch_tip(self.integration_branch) != expected:
            return False
        ref = f"refs/heads/{self.integration_branch}"
        checkouts = [c.path for c in self._checkouts() if c.branch == ref and not c.bare]
        # Checked before anything moves: with the ref lock held update-ref would fail (and
        # the handoff with it), with an index lock held the branch would move but its
        # checkout could not follow, and then look dirty.
        locks = self.integration_locks(checkouts)
        if locks:
            raise IntegrationLocked(locks)
        for tree in checkouts:
            changes = self._blocking_changes(tree, expected, new_id)
            if changes:
                raise IntegrationTreeDirty(tree, changes)
        result = self._git(
            "update-ref", "-m", message, ref, new_id, expected, cwd=self.repo_path, check=False
        )
        if result.returncode != 0:
            if self.branch_tip(self.integration_branch) != expected:
                return False
            raise GitError(
                f"could not move {ref} from {expected[:12]} to {new_id[:12]}: "
                f"{result.stderr.strip()}; if a stale {ref}.lock is left in "
                f"{self._common_dir} by a killed git process, remove it"
            )
        for tree in checkouts:
            # The same two-tree update updateInstead uses: it refuses, instead of
            # overwriting, anything the user touched since the check above.
            done = self._git("read-tree", "-m", "-u", expected, new_id, cwd=tree, check=False)
            if done.returncode != 0:
                log.warning(
                    "integration_checkout_not_updated",
                    branch=self.integration_branch,
                    commit=new_id,
                    checkout=str(tree),
                    error=done.stderr.strip(),
                    remedy=f"run `git reset --keep {new_id}` there",
                )
        return True

    def integration_locks(self, checkouts: Sequence[Path] | None = None) -> list[Path]:
        """Lock files that stop the integration branch (or a checkout of it) from moving.

        They may belong to a live git process (a person's ``git commit``) or be stale,
        left by a killed one: the daemon cannot tell, so it never deletes them."""
        if checkouts is None:
            ref = f"refs/heads/{self.integration_branch}"
            checkouts = [c.path for c in self._checkouts() if c.branch == ref and not c.bare]
        candidates = [self._common_dir / "refs" / "heads" / f"{self.integration_branch}.lock"]
        for tree in checkouts:
            git_dir = self._git_dir_of(tree)
            if git_dir is not None:
                candidates.append(git_dir / "index.lock")
        return [p for p in candidates if os.path.lexists(p)]

    def _git_dir_of(self, tree: Path) -> Path | None:
        dotgit = tree / ".git"
        if dotgit.is_dir():
            return dotgit
        try:
            text = dotgit.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        if not text.startswith("gitdir:"):
            return None
        target = Path(text[len("gitdir:") :].strip())
        return target if target.is_absolute() else tree / target

    def lease_worktree_names(self) -> list[str]:
        """Names of the worktrees currently laid out for leases (``worktrees_dir/<name>``)."""
        return sorted(e for e in _listdir(self.worktrees_dir) if not e.startswith("."))

    def clear_idle_locks(self) -> list[Path]:
        """Delete ``index.lock``/``HEAD.lock`` in the daemon's idle worktrees (pool slots
        and gate checkouts); returns what was deleted.

        Only the daemon runs git there, one call at a time, and this runs at start-up
        before any: such a lock was left by a git process killed with the daemon."""
        removed: list[Path] = []
        paths = [
            self.worktrees_dir / e for e in _listdir(self.worktrees_dir) if e.startswith(GATE_DIR)
        ]
        paths += [self._pool_dir / e for e in _listdir(self._pool_dir)]
        for path in paths:
            admin = self._adopt(path)
            if admin is not None:
                removed += self._clear_locks(admin)
        return removed

    def finish_interrupted_update(self, old: str, new: str) -> list[Path]:
        """Finish bringing checkouts of the integration branch from ``old`` to ``new`` after
        the daemon died between moving the branch and updating them.

        Such a checkout looks dirty (its files are still ``old``'s), which would block
        merging for good. Only a checkout whose index is still exactly ``old``'s tree is
        touched, with the same two-tree update as :meth:`advance_integration`, which
        refuses to overwrite anything a person changed; anything else is left alone.
        """
        ref = f"refs/heads/{self.integration_branch}"
        old_tree = str(self._commit(old).tree_id)
        new_id = str(self._commit(new).id)
        fixed = []
        for checkout in self._checkouts():
            if checkout.branch != ref or checkout.bare:
                continue
            index = self._git("write-tree", cwd=checkout.path, check=False)
            if index.returncode != 0 or index.stdout.strip() != old_tree:
                continue
            done = self._git("read-tree", "-m", "-u", old, new_id, cwd=checkout.path, check=False)
            if done.returncode == 0:
                fixed.append(checkout.path)
        return fixed

    # ------------------------------------------------------------------ gate worktree

    def conflicting_paths(self, ours: str, theirs: str) -> tuple[str, ...]:
        """The paths a three-way merge of ``theirs`` into ``ours`` would conflict in, by
        an in-memory merge that writes nothing; empty when it merges cleanly or the two
        share no history. :class:`GitError` when either commit is missing."""
        ours_id, theirs_id = self._commit(ours).id, self._commit(theirs).id
        if self._repo.merge_base(ours_id, theirs_id) is None:
            return ()
        conflicts = self._repo.merge_commits(ours_id, theirs_id).conflicts
        if conflicts is None:
            return ()
        paths: set[str] = set()
        for entries in conflicts:
            paths.update(e.path for e in entries if e is not None)
        return tuple(sorted(paths))

    def tree_of(self, commit: str) -> str:
        """The id of ``commit``'s tree: what a gate sees, whatever the commit's message."""
        return str(self._commit(commit).tree_id)

    def gate_checkout(self, commit: str, *, slot: int = 0) -> Path:
        """Return the gate worktree, detached at ``commit`` with exactly its files.

        Created once, then moved by diff; untracked and ignored files are removed so build
        leftovers of an earlier gate run cannot leak into this one. ``slot`` > 0 selects
        another gate worktree (``.gate-<slot>``), for gating speculative candidates in
        parallel.
        """
        if slot < 0:
            raise ValueError(f"gate slot must be >= 0, not {slot}")
        sha = str(self._commit(commit).id)
        path = self.gate_path if slot == 0 else self.worktrees_dir / f"{GATE_DIR}-{slot}"
        admin = self._adopt_or_discard(path)
        if admin is None:
            self.recover()
            self._git("worktree", "add", "-q", "--detach", str(path), sha, cwd=self.repo_path)
            if self._adopt(path) is None:
                raise GitError(f"git worktree add did not register {path}")
            return path
        self._clear_stale_state(admin)
        self._wt_git(path, admin, "checkout", "-f", "-q", "--detach", sha, "--")
        self._wt_git(path, admin, "clean", "-ffdxq")
        return path

    # ------------------------------------------------------------------ crash recovery

    def recover(self) -> None:
        """Repair what an interrupted run may have left in ``worktrees_dir``.

        * a worktree renamed into or out of the pool whose admin entry still names the old
          place (the crash fell between the rename and the link update) is re-linked;
        * pool slots whose git metadata is gone are deleted;
        * admin entries for worktrees under ``worktrees_dir`` that no longer exist are
          pruned (only ours: a person's worktree on an unmounted disk is left alone).

        Cheap (a few small files per worktree); run on startup and before each lease.
        """
        for entry in _listdir(self.worktrees_dir):
            if entry in (POOL_DIR,):
                continue
            self._adopt(self.worktrees_dir / entry)
        self._pool_slots()
        self._prune_registrations()

    # ------------------------------------------------------------------ internals

    def _commit(self, rev: str) -> pygit2.Commit:
        try:
            obj = self._repo.revparse_single(rev)
            commit = obj.peel(pygit2.Commit)
        except (KeyError, ValueError, pygit2.GitError) as exc:
            raise GitError(f"{rev!r} does not name a commit in {self.repo_path}") from exc
        assert isinstance(commit, pygit2.Commit)
        return commit

    @property
    def merge_backend(self) -> MergeBackend:
        """The backend merges use: ``auto`` until calibration has picked one."""
        return self._merge_backend

    def _merge_trees(
        self, ours: pygit2.Oid, theirs: pygit2.Oid
    ) -> tuple[pygit2.Oid | None, tuple[str, ...]]:
        if self._merge_backend == "git":
            return self._merge_tree_git(str(ours), str(theirs))
        if self._merge_backend == "pygit2":
            return self._merge_tree_pygit2(ours, theirs)
        t0 = time.perf_counter()
        result = self._merge_tree_pygit2(ours, theirs)
        t1 = time.perf_counter()
        try:
            other = self._merge_tree_git(str(ours), str(theirs))
        except GitError as exc:
            log.info(
                "merge_backend_chosen", backend="pygit2", reason=f"git merge-tree unusable: {exc}"
            )
            self._merge_backend = "pygit2"
            return result
        t2 = time.perf_counter()
        if result[1] or other[1]:
            return result  # conflict listings may legitimately differ; time clean merges
        if result[0] != other[0]:
            log.warning(
                "merge_backends_disagree",
                ours=str(ours),
                theirs=str(theirs),
                pygit2_tree=str(result[0]),
                git_tree=str(other[0]),
                keeping="pygit2",
            )
            self._merge_backend = "pygit2"
            return result
        self._merge_seconds["pygit2"].append(t1 - t0)
        self._merge_seconds["git"].append(t2 - t1)
        if len(self._merge_seconds["git"]) >= _CALIBRATION_MERGES:
            pygit2_s = statistics.median(self._merge_seconds["pygit2"])
            git_s = statistics.median(self._merge_seconds["git"])
            self._merge_backend = "git" if git_s < pygit2_s else "pygit2"
            log.info(
                "merge_backend_chosen",
                backend=self._merge_backend,
                pygit2_median_ms=round(pygit2_s * 1000, 1),
                git_median_ms=round(git_s * 1000, 1),
            )
        return result

    def _merge_tree_pygit2(
        self, ours: pygit2.Oid, theirs: pygit2.Oid
    ) -> tuple[pygit2.Oid | None, tuple[str, ...]]:
        index = self._repo.merge_commits(ours, theirs)
        conflicts = index.conflicts
        if conflicts is not None:
            paths: set[str] = set()
            for entries in conflicts:
                paths.update(e.path for e in entries if e is not None)
            return None, tuple(sorted(paths))
        return index.write_tree(self._repo), ()

    def _merge_tree_git(self, ours: str, theirs: str) -> tuple[pygit2.Oid | None, tuple[str, ...]]:
        result = self._git(
            "merge-tree",
            "--write-tree",
            "-z",
            "--name-only",
            "--no-messages",
            ours,
            theirs,
            cwd=self.repo_path,
            check=False,
        )
        if result.returncode not in (0, 1):
            raise GitError(f"git merge-tree failed: {result.stderr.strip()}")
        tokens = result.stdout.split("\0")
        if result.returncode == 0:
            return pygit2.Oid(hex=tokens[0].strip()), ()
        names: set[str] = set()
        for token in tokens[1:]:
            if not token:
                break
            names.add(token)
        return None, tuple(sorted(names))

    def _checkouts(self) -> list[_Checkout]:
        out = self._git("worktree", "list", "--porcelain", "-z", cwd=self.repo_path).stdout
        found: list[_Checkout] = []
        for record in out.split("\0\0"):
            fields = [f for f in record.split("\0") if f]
            if not fields or not fields[0].startswith("worktree "):
                continue
            path = Path(fields[0][len("worktree ") :])
            branch = next((f[len("branch ") :] for f in fields if f.startswith("branch ")), None)
            bare = "bare" in fields
            if bare or path.is_dir():
                found.append(_Checkout(path, branch, bare))
        return found

    def _blocking_changes(self, tree: Path, old: str, new: str) -> list[str]:
        """What in ``tree`` stops it from being moved from ``old`` to ``new``."""
        status = self._git(
            "status",
            "--porcelain=v1",
            "-z",
            "--untracked-files=no",
            "--no-renames",
            cwd=tree,
            optional_locks=False,
        ).stdout
        changed = sorted({e[3:] for e in status.split("\0") if len(e) > 3})
        if changed:
            return changed
        # Untracked files are the user's business unless the update would overwrite them;
        # a dry run of the very update we will make tells exactly which.
        dry = self._git("read-tree", "-m", "-u", "-n", old, new, cwd=tree, check=False)
        if dry.returncode == 0:
            return []
        blocked = [
            line.split("'")[1]
            for line in dry.stderr.splitlines()
            if "would be" in line and line.count("'") >= 2
        ]
        return blocked or [dry.stderr.strip() or "git read-tree refused the update"]

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
        self._assert_inside(path)
        return path

    def _assert_inside(self, path: Path) -> None:
        resolved = path.resolve()
        if resolved == self.worktrees_dir or self.worktrees_dir not in resolved.parents:
            raise GitError(
                f"refusing to touch {path}: it resolves to {resolved}, outside the "
                f"worktrees directory {self.worktrees_dir}"
            )

    def _owns(self, path: Path) -> bool:
        try:
            self._assert_inside(path)
        except GitError:
            return False
        return True

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

    def _pool_slots(self) -> list[tuple[Path, Path]]:
        slots: list[tuple[Path, Path]] = []
        for entry in _listdir(self._pool_dir):
            slot = self._pool_dir / entry
            admin = self._adopt_or_discard(slot)
            if admin is not None:
                slots.append((slot, admin))
        return slots

    def _take_pool_slot(self, want: str | None) -> tuple[Path, Path] | None:
        """An idle worktree: one already at ``want`` if any, else the latest released.

        The latest released one is most likely close to the current integration tip, and
        its files are the likeliest to still be in the page cache.
        """
        slots = self._pool_slots()
        if not slots:
            return None

        def rank(slot: tuple[Path, Path]) -> tuple[bool, float]:
            head = slot[1] / "HEAD"
            try:
                at_want = head.read_text(encoding="utf-8").strip() == want
                return (at_want, head.stat().st_mtime)
            except OSError:
                return (False, 0.0)

        return max(slots, key=rank)

    def _move(self, src: Path, dst: Path, admin: Path) -> None:
        """Rename a worktree directory and update its links, like `git worktree move`."""
        self._assert_inside(src)
        self._assert_inside(dst)
        os.rename(src, dst)
        self._write_links(dst, admin)

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
        for entry in _listdir(self._admin_root):
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

    def _detach(self, path: Path, admin: Path) -> None:
        """Point HEAD of the worktree at its current commit instead of at its branch."""
        try:
            head = (admin / "HEAD").read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise GitError(f"cannot read HEAD of the worktree {path}: {exc}") from exc
        if not head.startswith("ref:"):
            return
        ref = self._repo.references.get(head[len("ref:") :].strip())
        try:
            sha = str(ref.resolve().target) if ref is not None else None
        except (KeyError, pygit2.GitError):
            sha = None
        if sha is None:
            # The branch was deleted under it; any commit will do, the next lease does a
            # forced checkout from the index anyway.
            sha = self.integration_tip()
        self._wt_git(
            path, admin, "update-ref", "--no-deref", "-m", "orchestrator: release", "HEAD", sha
        )

    def _remove_tree(self, path: Path) -> None:
        if path.is_symlink() or not path.is_dir():
            # Remove the link itself, wherever it points; only its location must be ours.
            parent = path.parent.resolve()
            if parent != self.worktrees_dir and self.worktrees_dir not in parent.parents:
                raise GitError(f"refusing to remove {path}: outside {self.worktrees_dir}")
            path.unlink(missing_ok=True)
            return
        self._assert_inside(path)
        shutil.rmtree(path, onerror=_make_writable_and_retry)

    def _wt_git(self, path: Path, admin: Path, *args: str) -> subprocess.CompletedProcess[str]:
        # Name both directories explicitly: if the worktree's .git file were broken, plain
        # `git -C path` would walk up and could find (and clean!) an enclosing repository,
        # e.g. the main checkout when worktrees_dir lives inside it.
        return self._git(f"--git-dir={admin}", f"--work-tree={path}", *args, cwd=path)

    def _git(
        self,
        *args: str,
        cwd: Path,
        check: bool = True,
        optional_locks: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_ENV}
        env["LC_ALL"] = "C"
        env["GIT_TERMINAL_PROMPT"] = "0"
        if not optional_locks:
            # Reading someone else's checkout must not take its index.lock, or their own
            # git commands could fail while we look.
            env["GIT_OPTIONAL_LOCKS"] = "0"
        try:
            result = subprocess.run(
                ["git", *args],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                errors="surrogateescape",
                check=False,
                timeout=GIT_TIMEOUT_S,
            )
        except FileNotFoundError as exc:
            raise GitError(
                f"cannot run git in {cwd}: {exc}; install git or fix the daemon's PATH"
            ) from exc
        except subprocess.TimeoutExpired:
            # Every lease and merge waits on the one git lane: a hung git must not stall
            # the daemon for good.
            raise GitError(
                f"`git {' '.join(args)}` in {cwd} did not finish within {GIT_TIMEOUT_S:g} s "
                "(a stuck lock, a hook, or a network filesystem?)"
            ) from None
        if check and result.returncode != 0:
            raise GitError(
                f"`git {' '.join(args)}` failed in {cwd} (exit {result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result


def _common_dir(git_dir: Path) -> Path:
    try:
        rel = (git_dir / "commondir").read_text(encoding="utf-8").strip()
    except OSError:
        return git_dir.resolve()
    return (git_dir / rel).resolve()


def _check_branch_name(branch: str) -> None:
    if branch.startswith("-") or not pygit2.reference_is_valid_name(f"refs/heads/{branch}"):
        raise GitError(f"{branch!r} is not a valid branch name")


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.orchestrator-tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _make_writable_and_retry(
    func: Callable[..., Any], target: str, _exc: Any
) -> None:  # pragma: no cover - only with read-only files (e.g. Go's module cache)
    parent = os.path.dirname(target)
    for p in (parent, target):
        with contextlib.suppress(OSError):
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR | stat.S_IRUSR | stat.S_IXUSR)
    func(target)
