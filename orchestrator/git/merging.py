"""Building merge candidates in the object database, never in a checkout: the merge,
squash and fast-forward strategies, the two backends (pygit2's ``merge_commits`` and
``git merge-tree --write-tree``) and the timing that picks between them, and what an
agent is told about a conflict.

Everything here is blocking and meant to run in a worker thread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pygit2

from orchestrator.git.command import GitError, run_git
from orchestrator.git.integration import IntegrationRepository
from orchestrator.git.strategy import MERGE_STRATEGIES, MergeStrategy
from orchestrator.observe import logs

__all__ = [
    "ALREADY_MERGED",
    "MergeBackend",
    "MergeResult",
    "MergeStrategy",
    "Merger",
    "conflict_detail",
]

log = logs.get("git")

# A MergeResult's detail when the branch holds nothing the base does not.
ALREADY_MERGED = "already merged"

MergeBackend = Literal["auto", "pygit2", "git"]


# How many clean merges "auto" times with both backends before it keeps the faster one.
_CALIBRATION_MERGES = 3


@dataclass(frozen=True)
class MergeResult:
    """Outcome of :meth:`Merger.merge_candidate`."""

    candidate: str | None
    """sha of the candidate commit (on no branch); None on conflict or nothing to do."""
    conflicts: tuple[str, ...]
    """Conflicting paths, sorted; empty on success."""
    base: str
    """The integration tip the candidate was built on."""
    detail: str = ""
    """Why there is no candidate, e.g. ``already merged`` or ``not a fast-forward: ...``."""


class Merger:
    """Builds candidates on the integration repository's objects; keeps the backend."""

    def __init__(self, integration: IntegrationRepository, merge_backend: MergeBackend) -> None:
        """``merge_backend`` picks how merge candidates are computed: ``"pygit2"`` (libgit2,
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
        self._integration = integration
        self._repo = integration.repo
        self.repo_path = integration.repo_path
        self.integration_branch = integration.integration_branch

    @property
    def merge_backend(self) -> MergeBackend:
        """The backend merges use: ``auto`` until calibration has picked one."""
        return self._merge_backend

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
        if strategy not in MERGE_STRATEGIES:
            raise ValueError(
                f"unknown merge strategy {strategy!r}; use one of {', '.join(MERGE_STRATEGIES)}"
            )
        base = onto if onto is not None else self._integration.integration_tip()
        theirs = head if head is not None else self._integration.branch_tip(branch)
        if theirs is None:
            raise GitError(f"branch {branch!r} does not exist; nothing to merge")
        if head is not None and not isinstance(self._repo.get(head), pygit2.Commit):
            raise GitError(f"commit {head} of {branch!r} is missing from the repository")
        base_id = pygit2.Oid(hex=base)
        theirs_id = pygit2.Oid(hex=theirs)
        if theirs == base or self._repo.descendant_of(base_id, theirs_id):
            return MergeResult(None, (), base, ALREADY_MERGED)
        if strategy == MergeStrategy.FF_ONLY:
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
            detail = conflict_detail(self.integration_branch, base, conflicts)
            return MergeResult(None, conflicts, base, detail)
        assert tree is not None
        base_commit = self._integration.commit(base)
        if strategy == MergeStrategy.SQUASH and tree == base_commit.tree_id:
            # Its changes are all on the integration branch already (e.g. cherry-picked);
            # an empty squash commit would only add noise.
            return MergeResult(None, (), base, ALREADY_MERGED)
        parents = [base_id, theirs_id] if strategy == MergeStrategy.MERGE else [base_id]
        sig = pygit2.Signature(author_name, author_email)
        if not message.endswith("\n"):
            message += "\n"
        candidate = self._repo.create_commit(None, sig, sig, message, tree, parents)
        return MergeResult(str(candidate), (), base)

    def conflicting_paths(self, ours: str, theirs: str) -> tuple[str, ...]:
        """The paths a three-way merge of ``theirs`` into ``ours`` would conflict in, by
        an in-memory merge that writes nothing; empty when it merges cleanly or the two
        share no history. :class:`GitError` when either commit is missing."""
        ours_id, theirs_id = self._integration.commit(ours).id, self._integration.commit(theirs).id
        if self._repo.merge_base(ours_id, theirs_id) is None:
            return ()
        conflicts = self._repo.merge_commits(ours_id, theirs_id).conflicts
        if conflicts is None:
            return ()
        paths: set[str] = set()
        for entries in conflicts:
            paths.update(e.path for e in entries if e is not None)
        return tuple(sorted(paths))

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
        result = run_git(
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


def conflict_detail(integration_branch: str, commit: str, paths: Sequence[str]) -> str:
    """What an agent is told when its branch conflicts with ``integration_branch`` at
    ``commit``: that commit in full, the paths, and how to repair (its repository has the
    branch as ``origin/<integration_branch>``; PROTOCOL.md, "integration-tip")."""
    n = len(paths)
    shown = ", ".join(paths[:20]) + (f", ... ({n} in all)" if n > 20 else "")
    return (
        f"{n} conflicting path{'s' * (n != 1)} with {integration_branch} at {commit}: {shown}; "
        f"run `git fetch origin && git merge origin/{integration_branch}` (or rebase onto "
        f"origin/{integration_branch}), resolve, commit, and report again"
    )
