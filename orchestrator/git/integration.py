"""The integration repository: its refs and commits, and the landing of a candidate on the
integration branch (a compare-and-swap that keeps checkouts of the branch in step).

Everything here is blocking and meant to run in a worker thread; the caller runs one git
operation at a time per repository.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pygit2
from pygit2.enums import RepositoryOpenFlag, SortMode

from orchestrator.git.command import GitError, run_git
from orchestrator.observe import logs

__all__ = [
    "IntegrationLocked",
    "IntegrationRepository",
    "IntegrationTreeDirty",
    "check_branch_name",
]

log = logs.get("git")


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
class _Checkout:
    """A working tree reported by ``git worktree list``."""

    path: Path
    branch: str | None  # full ref name, None when detached
    bare: bool


class IntegrationRepository:
    """The repository being integrated into and its integration branch."""

    def __init__(self, repo_path: Path, integration_branch: str) -> None:
        """Open the repository and check the integration branch exists."""
        self.repo_path = Path(repo_path).resolve()
        try:
            self._repo = pygit2.Repository(str(self.repo_path), RepositoryOpenFlag.NO_SEARCH)
        except (pygit2.GitError, KeyError) as exc:
            raise GitError(
                f"{self.repo_path} is not a git repository ({exc}); set repository.path to "
                "the repository's working tree or its .git directory"
            ) from exc
        self._common_dir = _common_dir(Path(self._repo.path))
        self.integration_branch = integration_branch
        if self.branch_tip(integration_branch) is None:
            raise GitError(
                f"the integration branch {integration_branch!r} does not exist in "
                f"{self.repo_path}; create it (git branch {integration_branch} <commit>) or "
                "set repository.integration_branch to an existing branch"
            )

    @property
    def repo(self) -> pygit2.Repository:
        """The pygit2 handle of the repository, for the parts that build or read objects."""
        return self._repo

    @property
    def git_dir(self) -> Path:
        """The integration repository's (common) git dir: what agents fetch from and
        borrow objects of."""
        return self._common_dir

    @property
    def common_dir(self) -> Path:
        """The integration repository's git dir (objects, refs): what gates must not write."""
        return self._common_dir

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
        check_branch_name(branch)
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
        commit = self.commit(start)
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
        a = self.commit(ancestor).id
        d = self.commit(descendant).id
        return a == d or bool(self._repo.descendant_of(d, a))

    def reachable(self, commits: Iterable[str], tip: str) -> set[str]:
        """Those of ``commits`` (full ids) that ``tip`` contains, in one walk of history.

        For many commits at once: asking :meth:`is_ancestor` of each costs a walk per
        commit, so after months of merges a start-up would spend minutes on it."""
        wanted = set(commits)
        found: set[str] = set()
        if not wanted:
            return found
        for commit in self._repo.walk(self.commit(tip).id, SortMode.NONE):
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
        head_id = self.commit(head).id
        base_id = self.commit(base).id
        walker = self._repo.walk(head_id, SortMode.TOPOLOGICAL | SortMode.TIME)
        walker.hide(base_id)
        out: list[tuple[str, str]] = []
        for commit in walker:
            if limit is not None and len(out) >= limit:
                break
            lines = commit.message.splitlines()
            out.append((str(commit.id), lines[0] if lines else ""))
        return out

    def has_commit(self, rev: str) -> bool:
        """Whether ``rev`` names a commit of the integration repository."""
        try:
            self.commit(rev)
        except GitError:
            return False
        return True

    def tree_of(self, commit: str) -> str:
        """The id of ``commit``'s tree: what a gate sees, whatever the commit's message."""
        return str(self.commit(commit).tree_id)

    def commit(self, rev: str) -> pygit2.Commit:
        """The commit ``rev`` names; :class:`GitError` when it names none."""
        try:
            obj = self._repo.revparse_single(rev)
            commit = obj.peel(pygit2.Commit)
        except (KeyError, ValueError, pygit2.GitError) as exc:
            raise GitError(f"{rev!r} does not name a commit in {self.repo_path}") from exc
        assert isinstance(commit, pygit2.Commit)
        return commit

    def advance_integration(self, expected: str, new: str, message: str) -> bool:
        """Move the integration branch from ``expected`` to ``new`` (compare-and-swap).

        Returns False, changing nothing, if the branch no longer points at ``expected``.
        Working trees that have the branch checked out are kept in step, as git's
        ``receive.denyCurrentBranch=updateInstead`` does: if one has local changes (or
        untracked files the update would overwrite) :class:`IntegrationTreeDirty` is raised
        and nothing changes; otherwise it is moved to ``new`` after the branch.
        """
        new_id = str(self.commit(new).id)
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
        result = run_git(
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
            done = run_git("read-tree", "-m", "-u", expected, new_id, cwd=tree, check=False)
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

    def finish_interrupted_update(self, old: str, new: str) -> list[Path]:
        """Finish bringing checkouts of the integration branch from ``old`` to ``new`` after
        the daemon died between moving the branch and updating them.

        Such a checkout looks dirty (its files are still ``old``'s), which would block
        merging for good. Only a checkout whose index is still exactly ``old``'s tree is
        touched, with the same two-tree update as :meth:`advance_integration`, which
        refuses to overwrite anything a person changed; anything else is left alone.
        """
        ref = f"refs/heads/{self.integration_branch}"
        old_tree = str(self.commit(old).tree_id)
        new_id = str(self.commit(new).id)
        fixed = []
        for checkout in self._checkouts():
            if checkout.branch != ref or checkout.bare:
                continue
            index = run_git("write-tree", cwd=checkout.path, check=False)
            if index.returncode != 0 or index.stdout.strip() != old_tree:
                continue
            done = run_git("read-tree", "-m", "-u", old, new_id, cwd=checkout.path, check=False)
            if done.returncode == 0:
                fixed.append(checkout.path)
        return fixed

    def _checkouts(self) -> list[_Checkout]:
        out = run_git("worktree", "list", "--porcelain", "-z", cwd=self.repo_path).stdout
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
        status = run_git(
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
        dry = run_git("read-tree", "-m", "-u", "-n", old, new, cwd=tree, check=False)
        if dry.returncode == 0:
            return []
        blocked = [
            line.split("'")[1]
            for line in dry.stderr.splitlines()
            if "would be" in line and line.count("'") >= 2
        ]
        return blocked or [dry.stderr.strip() or "git read-tree refused the update"]


def _common_dir(git_dir: Path) -> Path:
    try:
        rel = (git_dir / "commondir").read_text(encoding="utf-8").strip()
    except OSError:
        return git_dir.resolve()
    return (git_dir / rel).resolve()


def check_branch_name(branch: str) -> None:
    """Raise :class:`GitError` unless ``refs/heads/<branch>`` is a valid, safe ref name."""
    if branch.startswith("-") or not pygit2.reference_is_valid_name(f"refs/heads/{branch}"):
        raise GitError(f"{branch!r} is not a valid branch name")
