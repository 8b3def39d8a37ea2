"""Benchmarks: ``python -m bench`` runs every ``bench/bench_*.py`` and prints a table.

Each benchmark module defines ``run(config: BenchConfig) -> list[BenchResult]``. A result
is a ratio against a baseline measured in the same process on the same generated
repository, because absolute times on these machines move by 10x with disk noise while
ratios stay put. Times are medians over several runs.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GIT_ENV",
    "BenchConfig",
    "BenchResult",
    "derive_commit",
    "generate_repo",
    "git",
    "median_seconds",
    "path_of",
    "quiesce",
]

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "Bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    "LC_ALL": "C",
}

_STAMP = "1700000000 +0000"


@dataclass(frozen=True)
class BenchConfig:
    files: int
    """How many files the generated repositories hold."""
    scratch: Path
    """A directory the benchmark may fill (on the disk being measured)."""
    quick: bool = False
    """Fewer runs, for smoke tests."""

    def runs(self, normal: int) -> int:
        return 2 if self.quick else normal


@dataclass(frozen=True)
class BenchResult:
    name: str
    ours: str
    ours_s: float
    baseline: str
    baseline_s: float
    runs: int

    @property
    def ratio(self) -> float:
        """How many times faster ours is than the baseline."""
        return self.baseline_s / self.ours_s if self.ours_s > 0 else float("inf")


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    out = subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def median_seconds(
    fn: Callable[[int], object],
    runs: int,
    *,
    before: Callable[[int], object] | None = None,
    after: Callable[[int], object] | None = None,
    settle: float = 0.1,
) -> float:
    """Median wall time of ``fn(i)`` over ``runs`` runs; ``before``/``after`` are untimed.

    Each run starts on a quiet disk (``sync`` then ``settle`` seconds): back to back, a
    run mostly measures the disk still writing back the previous run's files (3x slower
    here, and it penalises whichever side wrote more last), which is not how a daemon
    serving agents sees it.
    """
    times: list[float] = []
    for i in range(runs):
        if before is not None:
            before(i)
        os.sync()
        time.sleep(settle)
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        if after is not None:
            after(i)
    return statistics.median(times)


def quiesce() -> None:
    """Let a just-created checkout age, as pooled worktrees have by the time they're reused.

    git compares index timestamps at one-second granularity: for a second after its index
    was written, every file of a fresh checkout is "racily clean" and git re-reads and
    hashes each one on every command. A daemon never reuses a worktree that young.
    """
    os.sync()
    time.sleep(1.1)


def path_of(i: int) -> str:
    """Where file number ``i`` lives: 50 files a directory, two levels deep."""
    return f"pkg{i // 500}/mod{i // 50}/file{i}.py"


def _content(i: int, variant: str) -> bytes:
    body = "".join(
        f"def f{i}_{k}(x):\n    return x * {k} + {i}  # {variant}\n\n" for k in range(30)
    )
    return body.encode()


def _fast_import(repo: Path, stream: bytes) -> None:
    subprocess.run(
        ["git", "fast-import", "--quiet", "--force"],
        cwd=repo,
        input=stream,
        check=True,
        capture_output=True,
        env={**os.environ, **GIT_ENV},
    )


def generate_repo(path: Path, files: int) -> str:
    """A bare repository with one commit on ``main`` holding ``files`` ~1.5 KB files.

    Written with ``git fast-import`` straight into a pack, like a real cloned repository.
    Returns the commit's sha.
    """
    path.mkdir(parents=True)
    git(path, "init", "-q", "--bare", "-b", "main")
    parts = [
        b"commit refs/heads/main\n",
        f"committer Bench <bench@example.invalid> {_STAMP}\n".encode(),
        b"data 7\ninitial\n",
    ]
    for i in range(files):
        data = _content(i, "v0")
        parts.append(f"M 100644 inline {path_of(i)}\ndata {len(data)}\n".encode())
        parts.append(data + b"\n")
    _fast_import(path, b"".join(parts))
    return git(path, "rev-parse", "refs/heads/main")


def derive_commit(repo: Path, branch: str, parent: str, changed: list[int], tag: str) -> str:
    """Commit on ``branch`` (created or moved) = ``parent`` with files ``changed`` edited."""
    parts = [
        f"commit refs/heads/{branch}\n".encode(),
        f"committer Bench <bench@example.invalid> {_STAMP}\n".encode(),
        f"data {len(tag)}\n{tag}\n".encode(),
        f"from {parent}\n".encode(),
    ]
    for i in changed:
        data = _content(i, tag)
        parts.append(f"M 100644 inline {path_of(i)}\ndata {len(data)}\n".encode())
        parts.append(data + b"\n")
    _fast_import(repo, b"".join(parts))
    return git(repo, "rev-parse", f"refs/heads/{branch}")
