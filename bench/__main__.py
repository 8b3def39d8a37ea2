"""``python -m bench``: run every benchmark and print markdown tables of ratios."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import pygit2

from . import BenchConfig, BenchResult


def _discover(only: str) -> list[str]:
    package = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(package)]))
    return [n for n in names if n.startswith("bench_") and only in n]


def _fmt(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1000:.2f} ms"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _table(results: list[BenchResult], label: str = "speed-up") -> str:
    # A speed-up is a median; other kinds of rows (a slow-down under load) name their
    # statistic in the benchmark column and sit near 1, so they get two decimals.
    stat, digits = ("median", 1) if label == "speed-up" else ("time", 2)
    lines = [
        f"| benchmark | ours | {stat} | baseline | {stat} | {label} |",
        "| --- | --- | ---: | --- | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.ours} | {_fmt(r.ours_s)} | {r.baseline} | "
            f"{_fmt(r.baseline_s)} | **{r.ratio:.{digits}f}x** |"
        )
    return "\n".join(lines)


def _tables(results: list[BenchResult]) -> str:
    """One table per kind of ratio (a row's ``ratio_label``, "speed-up" unless it says)."""
    groups: dict[str, list[BenchResult]] = {}
    for r in results:
        groups.setdefault(getattr(r, "ratio_label", "speed-up"), []).append(r)
    order = sorted(groups, key=lambda label: label != "speed-up")  # speed-ups first
    parts = [_table(groups[label], label) for label in order]
    notes = [note for r in results if (note := getattr(r, "note", ""))]
    return "\n\n".join(parts + notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--files", type=int, default=2000, help="files per generated repo")
    parser.add_argument("--only", default="", help="run only bench modules containing this")
    parser.add_argument("--quick", action="store_true", help="2 runs each (smoke test)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="scratch directory (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    modules = _discover(args.only)
    if not modules:
        parser.error(f"no benchmark matches {args.only!r}")
    results: list[BenchResult] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orchestrator-bench-", dir=args.dir) as scratch:
        config = BenchConfig(files=args.files, scratch=Path(scratch), quick=args.quick)
        for name in modules:
            module = importlib.import_module(f"{__package__}.{name}")
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results.extend(module.run(config))
    git_version = subprocess.run(
        ["git", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(_tables(results))
    print()
    print(
        f"Python {platform.python_version()}, {git_version}, pygit2 {version('pygit2')} / "
        f"libgit2 {pygit2.LIBGIT2_VERSION}; medians; took {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
