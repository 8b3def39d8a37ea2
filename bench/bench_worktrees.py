"""orchestrator.git.workspace against the naive way of doing the same job.

(a) preparing a worktree for a new handoff: pooled worktree moved by diff vs
    ``git worktree add``; and what the lease's own repository costs over a plain
    ``git worktree`` of the integration repository moved by diff (issue 12 allows 5 ms);
(b) a merge candidate: in memory (pygit2, and ``git merge-tree``) vs ``git merge --no-ff``
    in a checkout;
(c) the gate worktree: moved by diff vs a fresh checkout.

Two bases always differ in 5 files, as consecutive integration tips typically do.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from orchestrator.git.workspace import Workspace

from . import (
    BenchConfig,
    BenchResult,
    derive_commit,
    generate_repo,
    git,
    median_seconds,
    quiesce,
)

CHANGED = 5


def _setup(config: BenchConfig, name: str) -> tuple[Path, Path, str]:
    root = config.scratch / name
    repo = root / "repo.git"
    base = generate_repo(repo, config.files)
    return root, repo, base


def _fresh_worktree_add(repo: Path, root: Path, commits: list[str], runs: int) -> float:
    """Median of ``git worktree add --detach`` (a full checkout) of alternating commits."""
    target = root / "fresh"

    def add(i: int) -> None:
        git(repo, "worktree", "add", "-q", "--detach", str(target), commits[i % len(commits)])

    def remove(_: int) -> None:
        shutil.rmtree(target)
        git(repo, "worktree", "prune")

    return median_seconds(add, runs, after=remove)


def bench_lease(config: BenchConfig) -> BenchResult:
    root, repo, base = _setup(config, "lease")
    n = config.files
    a = derive_commit(repo, "handoff/a", base, [], "a")
    b = derive_commit(repo, "handoff/b", base, [n // 7 * k for k in range(1, CHANGED + 1)], "b")
    ws = Workspace(repo, "main", root / "worktrees")
    # one worktree in the pool, as after the first handoff
    ws.checkout_for_lease("warm", "handoff/a")
    ws.release_worktree("warm")
    quiesce()
    branches = ["handoff/b", "handoff/a"]
    runs = config.runs(9)

    def lease(i: int) -> None:
        ws.checkout_for_lease(f"h{i}", branches[i % 2])

    def release(i: int) -> None:
        ws.release_worktree(f"h{i}")

    ours = median_seconds(lease, runs, after=release)
    baseline = _fresh_worktree_add(repo, root, [b, a], config.runs(5))
    shutil.rmtree(root)
    return BenchResult(
        f"lease a worktree ({n} files, {CHANGED} differ)",
        "pooled lease repository moved by diff",
        ours,
        "`git worktree add`",
        baseline,
        runs,
    )


@dataclass(frozen=True)
class OverheadResult(BenchResult):
    """``ours`` against a cheaper ``baseline`` doing less; ``ratio`` is ours / baseline,
    and the note says the difference in milliseconds."""

    ratio_label: ClassVar[str] = "slow-down"
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours_s / self.baseline_s if self.baseline_s > 0 else float("inf")


def bench_lease_repository(config: BenchConfig) -> BenchResult:
    """A pooled lease repository handed out (checkout_for_lease: a new .git written, the
    daemon's index moved in, reset --hard + clean by diff, .git renamed into place), against
    what the daemon did before leases had repositories of their own: a pooled
    ``git worktree`` renamed into place and moved by diff (``checkout -f`` + ``clean``)."""
    root, repo, base = _setup(config, "lease-repo")
    n = config.files
    derive_commit(repo, "handoff/a", base, [], "a")
    derive_commit(repo, "handoff/b", base, [n // 7 * k for k in range(1, CHANGED + 1)], "b")
    ws = Workspace(repo, "main", root / "worktrees")
    ws.checkout_for_lease("warm", "handoff/a")
    ws.release_worktree("warm")
    plain_pool = root / "plain-pool"
    plain_lease = root / "plain-lease"
    git(repo, "worktree", "add", "-q", "--detach", str(plain_pool), base)
    quiesce()
    branches = ["handoff/b", "handoff/a"]
    runs = config.runs(15)

    def lease(i: int) -> None:
        ws.checkout_for_lease(f"h{i}", branches[i % 2])

    def release(i: int) -> None:
        ws.release_worktree(f"h{i}")

    admin = Path((plain_pool / ".git").read_text().split(":", 1)[1].strip())

    def relink(path: Path) -> None:
        # what the daemon did after renaming a pooled worktree (like `git worktree move`)
        (admin / "gitdir").write_text(f"{path / '.git'}\n")
        (path / ".git").write_text(f"gitdir: {admin}\n")

    def plain(i: int) -> None:
        plain_pool.rename(plain_lease)
        relink(plain_lease)
        git(plain_lease, "checkout", "-f", "-q", "--detach", branches[i % 2], "--")
        git(plain_lease, "clean", "-ffdxq")

    def plain_back(_: int) -> None:
        plain_lease.rename(plain_pool)
        relink(plain_pool)

    # interleaved, so that disk noise hits both alike
    ours_times: list[float] = []
    plain_times: list[float] = []
    for k in range(runs):
        ours_times.append(median_seconds(lease, 1, after=release))
        plain_times.append(median_seconds(plain, 1, after=plain_back))
        del k
    ours = sorted(ours_times)[len(ours_times) // 2]
    baseline = sorted(plain_times)[len(plain_times) // 2]
    shutil.rmtree(root)
    return OverheadResult(
        f"lease repository overhead ({n} files, {CHANGED} differ)",
        "pooled lease repository (own .git)",
        ours,
        "pooled `git worktree` moved by diff",
        baseline,
        runs,
        note=(
            f"A lease repository of its own costs {1000 * (ours - baseline):+.1f} ms over a "
            f"plain pooled worktree ({n} files; issue 12 allows 5 ms)."
        ),
    )


def bench_merge(config: BenchConfig) -> list[BenchResult]:
    root, repo, base = _setup(config, "merge")
    n = config.files
    ours_files = [n // 11 * k for k in range(1, CHANGED + 1)]
    theirs_files = [n // 13 * k + 1 for k in range(1, CHANGED + 1)]
    tip = derive_commit(repo, "main", base, ours_files, "main")
    derive_commit(repo, "handoff/m", base, theirs_files, "topic")
    checkout = root / "checkout"
    git(repo, "worktree", "add", "-q", "--detach", str(checkout), tip)
    quiesce()
    runs = config.runs(15)

    def merge_in_checkout(_: int) -> None:
        git(checkout, "-c", "gc.auto=0", "merge", "-q", "--no-ff", "-m", "merge", "handoff/m")

    def reset(_: int) -> None:
        git(checkout, "reset", "-q", "--hard", tip)

    baseline = median_seconds(merge_in_checkout, runs, before=reset)
    results = []
    for backend in ("pygit2", "git"):
        ws = Workspace(repo, "main", root / "worktrees", merge_backend=backend)

        def candidate(_: int, ws: Workspace = ws) -> None:
            result = ws.merge_candidate("handoff/m", strategy="merge", message="merge")
            assert result.candidate is not None

        ours = median_seconds(candidate, runs)
        label = "pygit2" if backend == "pygit2" else "`git merge-tree --write-tree`"
        results.append(
            BenchResult(
                f"merge candidate ({n} files)",
                f"in memory, {label}",
                ours,
                "`git merge --no-ff` in a checkout",
                baseline,
                runs,
            )
        )
    shutil.rmtree(root)
    return results


def bench_gate(config: BenchConfig) -> BenchResult:
    root, repo, base = _setup(config, "gate")
    n = config.files
    other = derive_commit(repo, "next", base, [n // 9 * k for k in range(1, CHANGED + 1)], "next")
    commits = [other, base]
    ws = Workspace(repo, "main", root / "worktrees")
    gate = ws.gate_checkout(base)
    quiesce()
    runs = config.runs(9)

    def leave_build_output(_: int) -> None:
        # what a gate run leaves behind: caches and build output the next run must not see
        out = gate / "build"
        out.mkdir(exist_ok=True)
        for k in range(20):
            (out / f"obj{k}.o").write_bytes(b"\0" * 4096)
        (gate / "gate.log").write_text("log\n")

    def move(i: int) -> None:
        ws.gate_checkout(commits[i % 2])

    ours = median_seconds(move, runs, before=leave_build_output)
    baseline = _fresh_worktree_add(repo, root, commits, config.runs(5))
    shutil.rmtree(root)
    return BenchResult(
        f"gate checkout ({n} files, {CHANGED} differ)",
        "gate worktree moved by diff + clean",
        ours,
        "fresh checkout",
        baseline,
        runs,
    )


def run(config: BenchConfig) -> list[BenchResult]:
    return [
        bench_lease(config),
        bench_lease_repository(config),
        *bench_merge(config),
        bench_gate(config),
    ]
