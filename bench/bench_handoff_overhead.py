"""Per-handoff overhead: submit to merged with an instant agent and a ``true`` gate.

A real ``orchestrator serve`` (merging on, one gate ``true``, metrics off, state in the
scratch dir) on a generated repository of ``--files`` files (2,000 by default), and one
real ``orchestrator worker`` long-polling it whose agent is instant: ``sh`` writes one
file and exits; the worker commits it and reports at once. Untimed warm-up: 2 handoffs
go all the way through first, so the worktree pool and the gate checkout exist, as in a
daemon that has been running for a while.

Then N handoffs one after another: each timed from sending ``handoff.submit`` until
``handoff.get`` over the socket says ``merged`` (polled every 2 ms; the polling is in the
measured time, so it is a slight overestimate). That is everything the daemon does for a
handoff: the long-poll wakes, the lease's checkout is prepared, the agent runs, the
report imports the head, a candidate is merged, the gate runs in its checkout, the
branch moves, the record is written.

Baseline, in the same process on the same repository: what a hand-written script does
for the same change, with ``git`` commands in a non-bare checkout: ``git worktree add -b
BRANCH``, write the file, ``git add`` and ``git commit`` there, ``git merge --no-ff`` in
the checkout, ``git worktree remove``. Both sides start each run on a quiet disk.

The note under the table breaks the daemon's median handoff down by step, from the
daemon's own log (each step's event timestamp; see ``docs/benchmarks.md``).
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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import GIT_ENV, BenchConfig, BenchResult, generate_repo, git, quiesce
from .bench_daemon import _Conn, _Daemon, _handoff

POLL_S = 0.002
WAIT_S = 60.0
AGENT = 'cat >/dev/null; echo "done" > "$ORCHESTRATOR_WORKTREE/$ORCHESTRATOR_HANDOFF.txt"'
"""The instant agent (``sh -c``): drains the handoff on stdin, writes one file."""


@dataclass(frozen=True)
class OverheadResult(BenchResult):
    """A speed-up row with a note printed under the table."""

    note: str = ""


def _config(root: Path, repo: Path, sock: Path) -> Path:
    path = root / "orchestrator.toml"
    path.write_text(
        f"""
[repository]
path = "{repo}"
integration_branch = "main"
[daemon]
state_dir = "{root / "state"}"
socket = "{sock}"
[leases]
ttl_s = 600
heartbeat_interval_s = 150
[[gates]]
name = "true"
run = ["true"]
[metrics]
listen = ""
"""
    )
    return path


def _worker(sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "--socket",
                str(sock),
                "worker",
                "--name",
                "instant",
                "--wait",
                "30",
                "--",
                "sh",
                "-c",
                AGENT,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **GIT_ENV},
        )


def _through(conn: _Conn, name: str) -> float:
    """Submit ``name`` and wait until it is merged; returns the seconds that took."""
    t0 = time.perf_counter()
    conn.call("handoff.submit", {"markdown": [_handoff(name)]})
    deadline = time.monotonic() + WAIT_S
    while True:
        state = conn.call("handoff.get", {"name": name})["state"]
        if state == "merged":
            return time.perf_counter() - t0
        if state in ("failed", "conflict", "cancelled") or time.monotonic() > deadline:
            raise RuntimeError(f"{name} ended {state!r} instead of merged")
        time.sleep(POLL_S)


def _script(checkout: Path, scratch: Path, name: str) -> float:
    """The hand-written baseline for one change; returns the seconds it took."""
    tree = scratch / name
    t0 = time.perf_counter()
    git(checkout, "worktree", "add", "-q", "-b", name, str(tree), "main")
    (tree / f"{name}.txt").write_text("done\n")
    git(tree, "add", f"{name}.txt")
    git(tree, "commit", "-q", "-m", name)
    git(checkout, "merge", "-q", "--no-ff", "-m", f"Merge {name}", name)
    git(checkout, "worktree", "remove", str(tree))
    return time.perf_counter() - t0


def _quiet() -> None:
    os.sync()
    time.sleep(0.2)


# Log events (daemon's and worker's) that end the steps of one handoff, in order.
STEPS = (
    ("lease_granted", "submit, long-poll wake, prepare the lease's checkout"),
    ("agent_exited", "start the agent (wrapper) and run it"),
    ("report_accepted", "worker commit, report (import head, checks)"),
    ("candidate_built", "queue wake, merge the candidate"),
    ("gate_started", "gate checkout"),
    ("gate_finished", "gate run (supervisor, bwrap, `true`)"),
    ("merged", "land (move the branch, record)"),
)


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _breakdown(
    logs: list[Path], names: list[str], submits: dict[str, float], ends: dict[str, float]
) -> dict[str, float]:
    """Median ms of each step over ``names``, from the JSON log lines of ``logs``."""
    seen: dict[tuple[str, str], float] = {}
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            try:
                event: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            handoff = event.get("handoff")
            if handoff in submits and "timestamp" in event:
                seen.setdefault((handoff, str(event.get("event"))), _epoch(event["timestamp"]))
    steps: dict[str, list[float]] = {label: [] for _, label in STEPS}
    steps["the bench sees it merged (poll)"] = []
    for name in names:
        last = submits[name]
        for step, label in STEPS:
            at = seen.get((name, step))
            if at is None:
                continue
            steps[label].append((at - last) * 1000)
            last = at
        steps["the bench sees it merged (poll)"].append((ends[name] - last) * 1000)
    return {label: statistics.median(v) for label, v in steps.items() if v}


def run(config: BenchConfig) -> list[BenchResult]:
    runs = config.runs(15)
    root = config.scratch / "handoff_overhead"
    repo = root / "repo.git"
    generate_repo(repo, config.files)
    sock_dir = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
    sock = sock_dir / "d.sock"
    log = root / "daemon.log"
    daemon: _Daemon | None = None
    worker: subprocess.Popen[bytes] | None = None
    ours: list[float] = []
    submits: dict[str, float] = {}
    ends: dict[str, float] = {}
    names = [f"oh-{i:02d}" for i in range(runs)]
    try:
        daemon = _Daemon(_config(root, repo, sock), sock, log)
        worker = _worker(sock, root / "worker.log")
        conn = _Conn(sock, "control", "bench")
        try:
            for warm in ("warmup-1", "warmup-2"):
                _through(conn, warm)
            for name in names:
                _quiet()
                submits[name] = time.time()
                ours.append(_through(conn, name))
                ends[name] = time.time()
        finally:
            conn.close()
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    steps = _breakdown([log, root / "worker.log"], names, submits, ends)

    checkout = root / "checkout"
    git(root, "clone", "-q", str(repo), str(checkout))
    trees = root / "scripted"
    trees.mkdir()
    quiesce()
    base: list[float] = []
    for i in range(runs):
        _quiet()
        base.append(_script(checkout, trees, f"script-{i:02d}"))
    shutil.rmtree(root)

    ours_s, base_s = statistics.median(ours), statistics.median(base)
    load = os.getloadavg()
    note = (
        f"{runs} handoffs one after another, submit to merged (polled every "
        f"{POLL_S * 1000:g} ms): {min(ours) * 1000:.0f}-{max(ours) * 1000:.0f} ms, median "
        f"{ours_s * 1000:.0f} ms; the script {min(base) * 1000:.0f}-{max(base) * 1000:.0f} ms. "
        "Median per step, from the daemon log: "
        + "; ".join(f"{label} {ms:.0f} ms" for label, ms in steps.items())
        + f". Load average at the end: {load[0]:.1f}."
    )
    return [
        OverheadResult(
            f"one handoff, instant agent, `true` gate ({config.files} files)",
            "daemon + worker, submit to merged",
            ours_s,
            "script: worktree add, commit, merge --no-ff, remove",
            base_s,
            runs,
            note=note,
        )
    ]
