"""Merge-queue throughput: speculative gating against one candidate at a time.

A real ``orchestrator serve`` (metrics off, state in the scratch dir) on a generated
repository of ``min(--files, 500)`` files. Untimed set-up, once:

1. with merging paused, 3 warm-up handoffs are submitted and a real ``orchestrator
   worker`` reports them (its agent adds one file per handoff);
2. the daemon is restarted with merging on, ``speculative_window = 3`` and a trivial
   gate, and merges them as one train, which creates the three gate worktrees a running
   daemon keeps (so no side pays for a first ``git worktree add`` of the tree);
3. merging paused again, the N = 6 measured handoffs are submitted and reported (each
   adds its own file: none conflict), and the daemon stops. The repository and the state
   directory are then copied aside as the template.

Each timed run restores that template to the same path (worktrees name it; every
worktree's index is then refreshed, untimed, as a copy changes every file's inode and
ctime), starts the daemon with merging on and one gate, and times from starting the
process until ``handoff.list`` over the socket shows all 6 merged (polled every 20 ms).
Both sides run on the same copy in the same process, interleaved (the order alternates
from one repetition to the next), each on a quiet disk (``sync`` first):

- baseline: ``speculative_window = 1``, one candidate gated at a time (6 gate runs in
  a row);
- ours: ``speculative_window = 3``, candidate i built on candidate i-1, all three gated at
  once and landed in order (2 trains).

Two gates: one that takes a fixed wall time without using the CPU (``time.sleep``, like
a gate waiting on a remote CI runner or a test database), and one that burns a fixed
amount of CPU time (a busy loop), where the speed-up is bounded by the cores. Each run
checks that all 6 landed on the integration branch in report order, and records how
many gate runs overlapped.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from . import BenchConfig, BenchResult, generate_repo, git
from .bench_daemon import _Conn, _Daemon, _handoff

FILES = 500
"""Files in the repository (fewer if ``--files`` asks for fewer)."""
HANDOFFS = 6
"""Handoffs merged in each timed run."""
WINDOW = 3
"""``speculative_window`` of ours (the baseline is 1)."""
POLL_S = 0.02
WAIT_S = 120.0

AGENT = """\
import os, sys
from pathlib import Path
sys.stdin.read()
name = os.environ["ORCHESTRATOR_HANDOFF"]
path = Path(os.environ["ORCHESTRATOR_WORKTREE"]) / "work" / f"{name}.txt"
path.parent.mkdir(exist_ok=True)
path.write_text(f"done for {name}\\n")
"""
"""The agent: adds ``work/<handoff>.txt``; the worker commits it."""


@dataclass(frozen=True)
class _Gate:
    label: str
    """How the gate reads in the table."""
    code: str
    """``python -c`` source of the gate."""
    serial_s: float
    """What one run of it costs, for the note."""


def _sleep_gate(seconds: float) -> _Gate:
    return _Gate(
        f"{seconds:g} s sleep gate (no CPU)", f"import time; time.sleep({seconds})", seconds
    )


def _cpu_gate(seconds: float) -> _Gate:
    # A fixed amount of CPU work: it spins until the process has used ``seconds`` of CPU.
    code = (
        "import itertools, time; t = time.process_time(); "
        f"any(time.process_time() - t > {seconds} for _ in itertools.count())"
    )
    return _Gate(f"{seconds:g} s CPU-bound gate", code, seconds)


@dataclass(frozen=True)
class QueueResult(BenchResult):
    """A speed-up row with a note printed under the table."""

    note: str = ""


@dataclass(frozen=True)
class _Plan:
    files: int
    runs: int
    gates: tuple[_Gate, ...]


@dataclass
class _Run:
    seconds: float
    startup_s: float
    """From starting the process until its socket accepted a connection."""
    peak: int
    """Most gate runs in progress at the same moment."""


def _plan(config: BenchConfig) -> _Plan:
    # Every timed run starts from a copy of the repository and of the worktrees the
    # daemon keeps (one per reported handoff, 3 gate slots, the pool): capped at FILES files
    # so that copying does not take longer than the runs. The gates move by diff, so the
    # size of the tree barely matters to what is measured here.
    files = min(config.files, FILES)
    if config.quick:
        return _Plan(files, config.runs(3), (_sleep_gate(0.4), _cpu_gate(0.2)))
    return _Plan(files, config.runs(3), (_sleep_gate(1.0), _cpu_gate(0.5)))


class _Setup:
    """Paths and configs of one benchmark directory; the live copy is at a fixed path."""

    def __init__(self, root: Path, sock: Path) -> None:
        self.root = root
        self.live = root / "live"
        self.template = root / "template"
        self.repo = self.live / "repo.git"
        self.state = self.live / "state"
        self.sock = sock
        self.agent = root / "agent.py"
        self.agent.write_text(AGENT)

    def config(self, name: str, merge: str, gate_code: str = "") -> Path:
        gates = ""
        if gate_code:
            run = ", ".join(json.dumps(a) for a in (sys.executable, "-c", gate_code))
            gates = f'[[gates]]\nname = "check"\nrun = [{run}]\n'
        path = self.root / f"{name}.toml"
        path.write_text(
            f"""
[repository]
path = "{self.repo}"
integration_branch = "main"
[daemon]
state_dir = "{self.state}"
socket = "{self.sock}"
[leases]
ttl_s = 600
heartbeat_interval_s = 150
[merge]
{merge}
{gates}
[metrics]
listen = ""
"""
        )
        return path

    def daemon(self, config: Path) -> _Daemon:
        return _Daemon(config, self.sock, self.root / "daemon.log")

    def report(self, names: list[str]) -> None:
        """Submit ``names`` to a paused daemon and have one real worker report them all."""
        daemon = self.daemon(self.config("paused", "paused = true"))
        try:
            control = _Conn(self.sock, "control", "bench")
            try:
                control.call("handoff.submit", {"markdown": [_handoff(n) for n in names]})
            finally:
                control.close()
            with (self.root / "worker.log").open("ab") as log:
                worker = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "orchestrator",
                        "--socket",
                        str(self.sock),
                        "worker",
                        "--name",
                        "bench-worker",
                        "--wait",
                        "1",
                        "--exit-when-idle",
                        "--",
                        sys.executable,
                        str(self.agent),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=WAIT_S,
                    check=False,
                )
            if worker.returncode != 0:
                raise RuntimeError(f"the worker failed; see {self.root / 'worker.log'}")
            found = _states(self.sock)
            if any(found.get(n) != "reported" for n in names):
                raise RuntimeError(f"not every handoff was reported: {found}")
        finally:
            daemon.stop()

    def restore(self) -> None:
        """Put the template back at the live path, then refresh every worktree's index.

        A copied file has a new inode and ctime, so git would take every file of a copied
        worktree for modified and re-read all of them on the next checkout (0.5 s a
        worktree at 2,000 files, three in a row for a train): a cost of the copy, not of
        a daemon whose worktrees have been in place all along.
        """
        shutil.rmtree(self.live)
        subprocess.run(["cp", "-a", str(self.template), str(self.live)], check=True)
        listing = git(self.repo, "worktree", "list", "--porcelain")
        for line in listing.splitlines():
            path = Path(line.removeprefix("worktree "))
            if line.startswith("worktree ") and path != self.repo:
                git(path, "update-index", "-q", "--refresh")


def _states(sock: Path) -> dict[str, str]:
    conn = _Conn(sock, "control", "bench")
    try:
        handoffs = conn.call("handoff.list", {})["handoffs"]
    finally:
        conn.close()
    return {h["name"]: h["state"] for h in handoffs}


def _wait_merged(conn: _Conn, names: list[str], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        found = {h["name"]: h["state"] for h in conn.call("handoff.list", {})["handoffs"]}
        if all(found.get(n) == "merged" for n in names):
            return
        stuck = {n: s for n, s in found.items() if s in ("failed", "conflict")}
        if stuck:
            raise RuntimeError(f"handoffs did not merge: {stuck}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not all merged within {timeout} s: {found}")
        time.sleep(POLL_S)


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _peak_overlap(conn: _Conn, names: list[str]) -> int:
    """Most gate runs of ``names`` that were in progress at the same moment."""
    events: list[tuple[float, int]] = []
    for name in names:
        for run in conn.call("handoff.get", {"name": name})["gates"]:
            start = _epoch(run["startedAt"])
            events += [(start, 1), (start + run["durationS"], -1)]
    peak = now = 0
    for _, step in sorted(events):  # an end sorts before a start at the same instant
        now += step
        peak = max(peak, now)
    return peak


def _timed_run(setup: _Setup, config: Path, names: list[str]) -> _Run:
    t0 = time.perf_counter()
    daemon = setup.daemon(config)
    try:
        listening = time.perf_counter()
        conn = _Conn(setup.sock, "control", "bench")
        try:
            _wait_merged(conn, names)
            elapsed = time.perf_counter() - t0
            peak = _peak_overlap(conn, names)
        finally:
            conn.close()
    finally:
        daemon.stop()
    subjects = git(setup.repo, "log", "--first-parent", "--format=%s", "main").splitlines()
    landed = [s.split(":")[0].removeprefix("Merge handoff ") for s in subjects[: len(names)]]
    if landed != names[::-1]:
        raise RuntimeError(f"the handoffs landed as {landed[::-1]}, not in order {names}")
    return _Run(elapsed, listening - t0, peak)


def run(config: BenchConfig) -> list[BenchResult]:
    plan = _plan(config)
    root = config.scratch / "merge_queue"
    root.mkdir()
    # AF_UNIX paths are short (107 bytes): keep the socket out of a deep scratch dir.
    sock_dir = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
    setup = _Setup(root, sock_dir / "d.sock")
    names = [f"mq-{i}" for i in range(1, HANDOFFS + 1)]
    try:
        generate_repo(setup.repo, plan.files)
        warmups = [f"warmup-{i}" for i in range(1, WINDOW + 1)]
        setup.report(warmups)
        warm = setup.config("warm", f"speculative_window = {WINDOW}", "pass")
        daemon = setup.daemon(warm)
        try:
            conn = _Conn(setup.sock, "control", "bench")
            try:
                _wait_merged(conn, warmups)
            finally:
                conn.close()
        finally:
            daemon.stop()
        slot = setup.state / "worktrees" / f".gate-{WINDOW - 1}"
        if not slot.is_dir():
            raise RuntimeError(f"the warm-up train did not create the gate worktree {slot}")
        setup.report(names)
        subprocess.run(["cp", "-a", str(setup.live), str(setup.template)], check=True)

        cases = [(gate, window) for gate in plan.gates for window in (1, WINDOW)]
        configs = {
            case: setup.config(f"g{i}-w{case[1]}", f"speculative_window = {case[1]}", case[0].code)
            for i, case in enumerate(cases)
        }
        runs: dict[tuple[_Gate, int], list[_Run]] = {case: [] for case in cases}
        for rep in range(plan.runs):
            for case in cases if rep % 2 == 0 else cases[::-1]:
                setup.restore()
                os.sync()
                time.sleep(0.3)
                runs[case].append(_timed_run(setup, configs[case], names))
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    shutil.rmtree(root)
    return _results(plan, runs)


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f} s"


def _results(plan: _Plan, runs: dict[tuple[_Gate, int], list[_Run]]) -> list[BenchResult]:
    rows: list[QueueResult] = []
    details: list[str] = []
    for gate in plan.gates:
        base, ours = runs[(gate, 1)], runs[(gate, WINDOW)]
        base_s = statistics.median(r.seconds for r in base)
        ours_s = statistics.median(r.seconds for r in ours)
        trains = -(-HANDOFFS // WINDOW)
        details.append(
            f"{gate.label}: window 1 took {_span([r.seconds for r in base])}, window {WINDOW} "
            f"{_span([r.seconds for r in ours])}; at most {max(r.peak for r in base)} / "
            f"{max(r.peak for r in ours)} gate runs at once; gates alone would take "
            f"{HANDOFFS * gate.serial_s:.1f} s / {trains * gate.serial_s:.1f} s"
        )
        rows.append(
            QueueResult(
                f"merge {HANDOFFS} reported handoffs, {gate.label} ({plan.files} files)",
                f"`speculative_window = {WINDOW}`",
                ours_s,
                "`speculative_window = 1`",
                base_s,
                len(ours),
            )
        )
    startup = statistics.median(r.startup_s for rs in runs.values() for r in rs)
    note = (
        f"Time from starting the daemon until all {HANDOFFS} are merged, median of "
        f"{plan.runs} runs each; it includes the daemon's start-up (median "
        f"{startup:.2f} s until its socket listened). " + "; ".join(details) + "."
    )
    return [replace(rows[0], note=note), *rows[1:]]
