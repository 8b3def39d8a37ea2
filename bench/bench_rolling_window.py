"""The rolling merge train with failures: issue 14's scenario at its scale.

A real ``orchestrator serve`` on a generated repository (``min(--files, 500)`` files), set
up as in ``bench_merge_queue`` (untimed, once): a warm-up train creates the 8 gate
worktrees, then, with merging paused, a real ``orchestrator worker`` reports **50
handoffs** (20 with ``--quick``). The repository and state are copied aside as the
template; every timed run restores it.

Each timed run starts the daemon with ``merge.paused = true`` and ``on_gate_failure =
"hold"``, waits until ``status`` says the queue is paused, rewrites the config with
merging on and sends SIGHUP (what ``systemctl reload`` does), and times **from that
resume to the moment ``handoff.list`` shows every handoff decided** (issue 14's "from
the first report to the last decision", with all of them reported at once; the daemon's
start-up is not in it). Two gates on the same template:

- failing: ``sh -c "sleep T; test ! -d broken"``, T = 2 s (0.5 s with ``--quick``): the
  5 agents of a tenth (the 6th, 16th, 26th, 36th, 46th) write ``broken/``, so their
  candidates fail, and so does any candidate built on one of them, as in real life;
- passing: ``sh -c "sleep T"``: none fails.

Sides: the baseline ``speculative_window = 1`` (about 50 gate times: run once per
scenario), ``speculative_window = 8`` (failing only) and ``speculative_window = 8,
max_batch = 50`` (both), 2 runs each, interleaved. Each run checks every decision (the
breaking ones refused, all others merged, once each, in queue order on the first-parent
history, each merge commit the candidate that landed) and counts gate runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import BenchConfig, BenchResult, generate_repo, git
from .bench_daemon import _Conn
from .bench_merge_queue import FILES, POLL_S, WAIT_S, QueueResult, _epoch, _Setup, _wait_merged


@dataclass(frozen=True)
class _Scale:
    handoffs: int
    breaking: tuple[int, ...]
    """Which of them (1-based) break the gate: a tenth, spread out."""
    gate_s: float
    """What the gate sleeps: issue 14's T = 2 s (0.5 s with --quick)."""


FULL = _Scale(50, (6, 16, 26, 36, 46), 2.0)
"""Issue 14's scenario."""
QUICK = _Scale(20, (6, 16), 0.5)
"""``--quick``: the same shape, scaled down."""
WINDOW = 8
"""``speculative_window`` of ours, the issue's 8 gate slots (the baseline is 1)."""


def _name(i: int) -> str:
    return f"rw-{i:02d}"


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
"""
"""The agent: adds ``work/<handoff>.txt``; a breaking one also adds ``broken/`` (which
breaking ones: ``BREAKING``, replaced by the scale's names)."""


def _gate(seconds: float, *, check: bool) -> str:
    """A ``[[gates]]`` table: ``sleep`` (a process that costs no CPU, as issue 14's
    ``sleep 2``), then, with ``check``, a failure if the candidate holds ``broken/``."""
    test = "; test ! -d broken" if check else ""
    return f'\n[[gates]]\nname = "check"\nrun = ["sh", "-c", "sleep {seconds}{test}"]\n'


@dataclass
class _Run:
    seconds: float
    """From resuming merging to the last decision."""
    gate_runs: int
    gate_s: float
    """Median wall time of one gate run as recorded (the sleep plus starting it)."""
    first_gate_s: float
    """From resuming merging until the first gate run started."""


def _decided(conn: _Conn, names: list[str]) -> None:
    deadline = time.monotonic() + WAIT_S * 4
    while True:
        found = {h["name"]: h["state"] for h in conn.call("handoff.list", {})["handoffs"]}
        if all(found.get(n) in ("merged", "failed") for n in names):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"not all decided in time: {found}")
        time.sleep(POLL_S)


def _paused(conn: _Conn) -> None:
    """Wait until the queue itself says it is paused (it has started and looked)."""
    deadline = time.monotonic() + WAIT_S
    while "paused" not in (conn.call("status", {}).get("mergeBlocked") or ""):
        if time.monotonic() > deadline:
            raise RuntimeError("the merge queue never said it was paused")
        time.sleep(POLL_S)


def _timed_run(
    setup: _Setup, config: Path, text: str, names: list[str], breaking: set[str]
) -> _Run:
    """Start the daemon paused with every handoff reported, resume merging (the config
    rewritten, then SIGHUP, as ``systemctl reload`` does), and time from there to the
    last decision: issue 14's "from the first report to the last decision" with all of
    them reported at once."""
    config.write_text(text.replace("\n[merge]\n", "\n[merge]\npaused = true\n", 1))
    daemon = setup.daemon(config)
    try:
        conn = _Conn(setup.sock, "control", "bench")
        try:
            _paused(conn)
            config.write_text(text)
            t0, wall0 = time.perf_counter(), time.time()
            daemon.process.send_signal(signal.SIGHUP)
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
        if r["state"] != ("failed" if n in breaking else "merged")
    }
    if wrong:
        raise RuntimeError(f"wrong decisions: {wrong}")
    goods = [n for n in names if n not in breaking]
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
    first = min(_epoch(started) for _, started in runs) - wall0
    return _Run(elapsed, len(runs), statistics.median(runs.values()), first)


def _prepare(setup: _Setup, files: int, names: list[str]) -> None:
    """The template: a repository, warm gate worktrees, ``names`` reported."""
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


def _cases(handoffs: int) -> dict[str, str]:
    return {
        "w1": "speculative_window = 1",
        "w8": f"speculative_window = {WINDOW}",
        "w8b": f"speculative_window = {WINDOW}\nmax_batch = {handoffs}",
    }


def run(config: BenchConfig) -> list[BenchResult]:
    scale = QUICK if config.quick else FULL
    runs = config.runs(2)
    files = min(config.files, FILES)
    names = [_name(i) for i in range(1, scale.handoffs + 1)]
    breaking = {_name(i) for i in scale.breaking}
    cases = _cases(scale.handoffs)
    sock_dir = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
    # One template for both scenarios: with a gate that refuses ``broken/`` a tenth
    # fail; with one that only sleeps, none does. The baseline (about N gate times) runs
    # once per scenario, ours ``runs`` times, interleaved.
    scenarios = {"failing": (True, ["w8", "w8b"]), "passing": (False, ["w8b"])}
    results: dict[tuple[str, str], list[_Run]] = {}
    root = config.scratch / "rolling_window"
    root.mkdir()
    setup = _Setup(root, sock_dir / "d.sock")
    setup.agent.write_text(AGENT.replace("BREAKING", repr(sorted(breaking))))
    try:
        _prepare(setup, files, names)
        plan: list[tuple[str, str]] = []
        for scenario, (_, ours) in scenarios.items():
            plan.append((scenario, "w1"))
            for rep in range(runs):
                plan += [(scenario, c) for c in (ours if rep % 2 == 0 else ours[::-1])]
        for scenario, case in plan:
            check = scenarios[scenario][0]
            path = root / f"{scenario}-{case}.toml"
            text = setup.config(
                f"{scenario}-{case}", f'on_gate_failure = "hold"\n{cases[case]}'
            ).read_text() + _gate(scale.gate_s, check=check)
            setup.restore()
            os.sync()
            time.sleep(0.3)
            one = _timed_run(setup, path, text, names, breaking if check else set())
            print(
                f"  {scenario} {case}: {one.seconds:.2f} s, {one.gate_runs} gate runs, "
                f"first gate after {one.first_gate_s:.2f} s",
                file=sys.stderr,
                flush=True,
            )
            results.setdefault((scenario, case), []).append(one)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    gate_run_s = statistics.median(r.gate_s for rs in results.values() for r in rs)

    def median(key: tuple[str, str]) -> float:
        return statistics.median(r.seconds for r in results[key])

    def side(key: tuple[str, str]) -> str:
        rs = results[key]
        return (
            f"`{cases[key[1]].replace(chr(10), ', ')}` took {median(key) / gate_run_s:.1f} T "
            f"({', '.join(f'{r.seconds:.2f}' for r in rs)} s) with "
            f"{'/'.join(str(r.gate_runs) for r in rs)} gate runs, the first starting "
            f"{'/'.join(f'{r.first_gate_s:.2f}' for r in rs)} s after the resume"
        )

    note = (
        f"{scale.handoffs} handoffs, a {scale.gate_s:g} s sleep gate whose runs took "
        f"T = {gate_run_s:.2f} s as recorded (median; the sleep plus starting the gate); "
        f"the baseline once, ours {runs} runs; every decision right in every run. With "
        f"{len(breaking)} of them breaking the gate: "
        + "; ".join(side(("failing", c)) for c in ["w1", *scenarios["failing"][1]])
        + ". With none breaking it: "
        + "; ".join(side(("passing", c)) for c in ["w1", *scenarios["passing"][1]])
        + ". The time runs from resuming merging (all reported) to the last decision."
    )
    rows = [
        QueueResult(
            f"decide {scale.handoffs} handoffs, {what}, {scale.gate_s:g} s sleep gate "
            f"({files} files)",
            f"`{cases[case].replace(chr(10), ', ')}`",
            median((scenario, case)),
            "`speculative_window = 1`",
            median((scenario, "w1")),
            len(results[(scenario, case)]),
        )
        for scenario, what in (("failing", "a tenth failing"), ("passing", "none failing"))
        for case in scenarios[scenario][1]
    ]
    return [replace(rows[0], note=note), *rows[1:]]
