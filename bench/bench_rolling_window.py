"""The rolling merge train with failures: issue 14's scenario, scaled down.

A real ``orchestrator serve`` on a generated repository (``min(--files, 500)`` files), set
up as in ``bench_merge_queue`` (untimed, once): with merging paused, a real ``orchestrator
worker`` reports **20 handoffs**, of which **2 (a tenth: the 6th and the 15th) break the
gate**; a warm-up train has already created the gate worktrees. Each timed run restores
that template, starts the daemon with merging on and ``on_gate_failure = "hold"``, and
times from starting the process until ``handoff.list`` shows every handoff decided
(``merged`` or ``failed``). The gate (``sh -c "sleep T; test ! -d broken"``) sleeps T
using no CPU, like a remote CI runner, then fails if the candidate holds a ``broken/``
directory, which only the breaking agents write: a candidate built on a breaking one fails
too, as it would in real life.

- baseline: ``speculative_window = 1``, one candidate gated at a time;
- ours: ``speculative_window = 8``, the rolling train (the head lands and the next one
  joins at once; a failure rebuilds only those built on it; adaptive length);
- ours with batches: the same and ``max_batch = 20`` (one batch, bisected on failure).

A second template, the same but with **none** of the 20 breaking the gate, is run with
the baseline and with batches (issue 14's "none failing, ``max_batch`` on" case).

All sides run in the same process on copies of the same template, interleaved. Each run
checks that every decision was right (the two breaking ones refused, the 18 others
merged, once each, in queue order on the first-parent history) and counts gate runs.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import BenchConfig, BenchResult, generate_repo, git
from .bench_daemon import _Conn
from .bench_merge_queue import FILES, POLL_S, WAIT_S, QueueResult, _Setup, _wait_merged

HANDOFFS = 20
BREAKING = ("rw-06", "rw-15")
"""A tenth of them break the gate."""
WINDOW = 8
"""``speculative_window`` of ours, the issue's 8 gate slots (the baseline is 1)."""
BATCH = 20
"""``max_batch`` of the batching case: all of them in one batch, bisected on failure."""

AGENT = """\
import os, sys
from pathlib import Path
sys.stdin.read()
name = os.environ["ORCHESTRATOR_HANDOFF"]
root = Path(os.environ["ORCHESTRATOR_WORKTREE"])
path = root / "work" / f"{name}.txt"
path.parent.mkdir(exist_ok=True)
path.write_text(f"done for {name}\\n")
if name in BREAKING:
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / f"{name}.txt").write_text("this breaks the gate\\n")
""".replace("BREAKING", repr(BREAKING))
"""The agent: adds ``work/<handoff>.txt``; a breaking one also adds ``broken/``."""


def _gate(seconds: float) -> str:
    """A ``[[gates]]`` table: ``sleep`` (a process that costs no CPU, as issue 14's
    ``sleep 2``), then a failure if the candidate holds ``broken/``."""
    return f'\n[[gates]]\nname = "check"\nrun = ["sh", "-c", "sleep {seconds}; test ! -d broken"]\n'


@dataclass
class _Run:
    seconds: float
    gate_runs: int
    gate_s: float
    """Median wall time of one gate run as recorded (the sleep plus Python's start-up)."""


def _decided(conn: _Conn, names: list[str]) -> None:
    deadline = time.monotonic() + WAIT_S * 2
    while True:
        found = {h["name"]: h["state"] for h in conn.call("handoff.list", {})["handoffs"]}
        if all(found.get(n) in ("merged", "failed") for n in names):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not all decided in time: {found}")
        time.sleep(POLL_S)


def _timed_run(setup: _Setup, config: Path, names: list[str]) -> _Run:
    t0 = time.perf_counter()
    daemon = setup.daemon(config)
    try:
        conn = _Conn(setup.sock, "control", "bench")
        try:
            _decided(conn, names)
            elapsed = time.perf_counter() - t0
            records = {n: conn.call("handoff.get", {"name": n}) for n in names}
        finally:
            conn.close()
    finally:
        daemon.stop()
    wrong = {
        n: r["state"]
        for n, r in records.items()
        if r["state"] != ("failed" if n in BREAKING else "merged")
    }
    if wrong:
        raise RuntimeError(f"wrong decisions: {wrong}")
    goods = [n for n in names if n not in BREAKING]
    subjects = git(setup.repo, "log", "--first-parent", "--format=%s", "main").splitlines()
    landed = [s.split(":")[0].removeprefix("Merge handoff ") for s in subjects[: len(goods)]]
    if landed != goods[::-1]:
        raise RuntimeError(f"landed as {landed[::-1]}, not once each in order {goods}")
    if any(
        records[n]["mergeCommit"] != git(setup.repo, "rev-parse", f"main~{len(goods) - 1 - i}")
        for i, n in enumerate(goods)
    ):
        raise RuntimeError("a first-parent commit is not the candidate that was gated")
    # A batch's gate run is recorded for each of its handoffs: count each run once.
    runs = {
        (g["candidate"], g["startedAt"]): g["durationS"]
        for r in records.values()
        for g in r["gates"]
    }
    return _Run(elapsed, len(runs), statistics.median(runs.values()))


def _prepare(setup: _Setup, files: int, names: list[str]) -> None:
    """The template: a repository, warm gate worktrees, ``names`` reported."""
    setup.agent.write_text(AGENT)
    generate_repo(setup.repo, files)
    warmups = [f"warmup-{i}" for i in range(1, WINDOW + 1)]
    setup.report(warmups)
    daemon = setup.daemon(setup.config("warm", f"speculative_window = {WINDOW}", "pass"))
    try:
        conn = _Conn(setup.sock, "control", "bench")
        try:
            _wait_merged(conn, warmups)
        finally:
            conn.close()
    finally:
        daemon.stop()
    setup.report(names)
    subprocess.run(["cp", "-a", str(setup.live), str(setup.template)], check=True)


CASES = {
    "w1": "speculative_window = 1",
    "w8": f"speculative_window = {WINDOW}",
    "w8b": f"speculative_window = {WINDOW}\nmax_batch = {BATCH}",
}


def run(config: BenchConfig) -> list[BenchResult]:
    gate_s = 0.3 if config.quick else 0.5
    runs = config.runs(2)
    files = min(config.files, FILES)
    sock_dir = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
    # Two scenarios, each its own template: a tenth failing, and none failing.
    scenarios = {
        "failing": ([f"rw-{i:02d}" for i in range(1, HANDOFFS + 1)], ["w1", "w8", "w8b"]),
        "passing": ([f"ok-{i:02d}" for i in range(1, HANDOFFS + 1)], ["w1", "w8b"]),
    }
    results: dict[tuple[str, str], list[_Run]] = {}
    try:
        for scenario, (names, cases) in scenarios.items():
            root = config.scratch / f"rolling_window_{scenario}"
            root.mkdir()
            setup = _Setup(root, sock_dir / "d.sock")
            _prepare(setup, files, names)
            configs = {
                case: setup.config(case, f'on_gate_failure = "hold"\n{CASES[case]}')
                for case in cases
            }
            for path in configs.values():
                path.write_text(path.read_text() + _gate(gate_s))
            for case in cases:
                results[(scenario, case)] = []
            for rep in range(runs):
                for case in cases if rep % 2 == 0 else cases[::-1]:
                    setup.restore()
                    os.sync()
                    time.sleep(0.3)
                    results[(scenario, case)].append(_timed_run(setup, configs[case], names))
            shutil.rmtree(root)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    gate_run_s = statistics.median(r.gate_s for rs in results.values() for r in rs)

    def median(key: tuple[str, str]) -> float:
        return statistics.median(r.seconds for r in results[key])

    def side(key: tuple[str, str]) -> str:
        rs = results[key]
        return (
            f"`{CASES[key[1]].replace(chr(10), ', ')}` took {median(key) / gate_run_s:.1f} T "
            f"({', '.join(f'{r.seconds:.2f}' for r in rs)} s) with "
            f"{'/'.join(str(r.gate_runs) for r in rs)} gate runs"
        )

    note = (
        f"{HANDOFFS} handoffs, a {gate_s:g} s sleep gate whose runs took T = {gate_run_s:.2f} s "
        f"as recorded (median; the sleep plus starting the gate), {runs} runs each, every "
        "decision right in every run. With 2 of them breaking the gate: "
        + "; ".join(side(("failing", c)) for c in scenarios["failing"][1])
        + ". With none breaking it: "
        + "; ".join(side(("passing", c)) for c in scenarios["passing"][1])
        + ". The time runs from starting the daemon to the last decision."
    )
    rows = [
        QueueResult(
            f"decide {HANDOFFS} handoffs, {what}, {gate_s:g} s sleep gate ({files} files)",
            f"`{CASES[case].replace(chr(10), ', ')}`",
            median((scenario, case)),
            "`speculative_window = 1`",
            median((scenario, "w1")),
            runs,
        )
        for scenario, what in (("failing", "a tenth failing"), ("passing", "none failing"))
        for case in scenarios[scenario][1]
        if case != "w1"
    ]
    return [replace(rows[0], note=note), *rows[1:]]
