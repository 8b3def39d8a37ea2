"""The daemon answers a heartbeat promptly while it checks out fresh worktrees.

A real ``orchestrator serve`` (merge paused, metrics off, state in the scratch dir) on a
generated repository of ``max(--files, 20000)`` files. One worker connection holds a
lease and sends ``lease.heartbeat`` after ``lease.heartbeat``, timing each round trip, in
two conditions within the same run:

(a) baseline: nothing else is happening;
(b) under load: other connections each ``lease.acquire`` a fresh handoff at once; the
    worktree pool is empty (every lease is held to the end), so each acquire is a real
    ``git worktree add`` of every file, and those run one after another on the daemon's
    git lane.

Only heartbeats sent between the first acquire's start and the last one's end count as
(b), however long their answer takes. Each row's ratio is (b) / (a): 1.0 means a
checkout costs a heartbeat nothing. Alongside, a second connection sends requests for an
unknown method ("pings"): they are answered by the event loop alone (no SQLite, no git),
which tells a blocked loop apart from a heartbeat's own SQLite commit
(``synchronous=FULL``) waiting on a busy disk. Rounds of (a) then (b) repeat, with 3
acquirers each: 2 rounds, then up to 2 more while less than 35 s have passed. Each phase
starts on a quiet disk (``sync`` first), and the samples of all rounds are pooled before
taking the median and the 95th percentile.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from . import GIT_ENV, BenchConfig, BenchResult, generate_repo

FILES = 20_000
"""Files in the repository unless ``--files`` asks for more: a checkout takes a while."""
PACE_S = 0.005
"""Pause between two probes, so the probing itself does not keep the daemon busy."""
WAIT_S = 60.0


@dataclass(frozen=True)
class SlowdownResult(BenchResult):
    """``ours`` measured under load, ``baseline`` idle; ``ratio`` is ours / baseline.

    1.0 means the load did not slow ours down at all; 2.0 means it took twice as long.
    """

    ratio_label: ClassVar[str] = "slow-down"
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours_s / self.baseline_s if self.baseline_s > 0 else float("inf")


@dataclass(frozen=True)
class _Plan:
    files: int
    rounds: int
    """At most this many rounds of (a) then (b)..."""
    min_rounds: int
    """...and at least this many, even past ``budget_s``."""
    budget_s: float
    """No new round starts once the rounds so far took this long (checkouts slow down
    10x on a busy disk)."""
    acquirers: int
    """Fresh handoffs acquired at once in each loaded round."""
    idle_probes: int
    """Heartbeats timed in each idle round."""


@dataclass
class _Samples:
    """Round trips (seconds) of heartbeats and of event-loop pings, with their send times."""

    heartbeat: list[tuple[float, float]]
    ping: list[tuple[float, float]]

    def within(self, start: float, end: float) -> _Samples:
        def keep(rows: list[tuple[float, float]]) -> list[tuple[float, float]]:
            return [(t, rtt) for t, rtt in rows if start <= t < end]

        return _Samples(keep(self.heartbeat), keep(self.ping))

    def extend(self, other: _Samples) -> None:
        self.heartbeat.extend(other.heartbeat)
        self.ping.extend(other.ping)


class _Conn:
    """One protocol connection: JSON-RPC requests, one line each, answered in order."""

    def __init__(self, path: Path, role: str, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(str(path))
        self.buffer = b""
        self.next_id = 1
        self.call(
            "initialize",
            {
                "protocolVersion": 1,
                "role": role,
                "client": {"name": "bench", "version": "0"},
                "worker": {"name": name, "labels": []},
            },
        )

    def close(self) -> None:
        self.sock.close()

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """The reply to one request (notifications in between are skipped)."""
        request_id = self.next_id
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            while b"\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise RuntimeError(f"the daemon closed the connection during {method}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            reply: dict[str, Any] = json.loads(line)
            if reply.get("id") == request_id:
                return reply

    def call(self, method: str, params: dict[str, Any]) -> Any:
        reply = self.request(method, params)
        if "result" not in reply:
            raise RuntimeError(f"{method} failed: {reply.get('error')}")
        return reply["result"]


def _handoff(name: str) -> str:
    return f"""# HANDOFF: {name} - PENDING

**DATE**: 2026-11-24 | **PRIORITY**: MEDIUM | **STATUS**: PENDING

## STATUS UPDATE
**Status**: PENDING
**Priority**: MEDIUM - benchmark work item {name}
**Dependencies**: none
**Progress**: 0% - not started

## IMPLEMENTATION PLAN
### PHASE 1: Do it
- Make the change for {name}

## SUCCESS METRICS
- **Overall**: the tests pass
"""


def _write_config(root: Path, repo: Path, sock: Path) -> Path:
    config = root / "orchestrator.toml"
    # Leases outlive the run (no heartbeats on the acquirers' leases), merging is paused
    # so nothing but the checkouts touches git, and there is no metrics listener.
    config.write_text(
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
[merge]
paused = true
[metrics]
listen = ""
"""
    )
    return config


class _Daemon:
    """``python -m orchestrator --config X serve`` as a child process."""

    def __init__(self, config: Path, sock: Path, log: Path) -> None:
        self.sock = sock
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "--config", str(config), "serve"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **GIT_ENV},
            )
        deadline = time.monotonic() + WAIT_S
        while not self._listening():
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited early:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the daemon did not listen on {sock} within {WAIT_S} s")
            time.sleep(0.05)

    def _listening(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.sock))
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _probe(
    worker: _Conn, pinger: _Conn, lease: dict[str, Any], done: Callable[[int], bool]
) -> _Samples:
    """Time heartbeats until ``done(heartbeats so far)``, and pings alongside in a thread.

    Each connection has one request in flight at a time, with a short pause after each
    answer; the two loops are independent, so a stalled heartbeat does not stop pings.
    """
    samples = _Samples([], [])
    params = {"leaseId": lease["id"], "token": lease["token"]}
    clock = time.perf_counter
    stop = threading.Event()
    errors: list[BaseException] = []

    def ping() -> None:
        try:
            while not stop.is_set():
                t0 = clock()
                reply = pinger.request("bench.ping", {})
                samples.ping.append((t0, clock() - t0))
                if reply.get("error", {}).get("code") != -32601:
                    raise RuntimeError(f"expected 'method not found' for a ping, got {reply}")
                time.sleep(PACE_S)
        except BaseException as exc:
            errors.append(exc)

    pinging = threading.Thread(target=ping, daemon=True)
    pinging.start()
    try:
        while not done(len(samples.heartbeat)) and not errors:
            t0 = clock()
            worker.call("lease.heartbeat", params)
            samples.heartbeat.append((t0, clock() - t0))
            time.sleep(PACE_S)
    finally:
        stop.set()
        pinging.join()
    if errors:
        raise RuntimeError(f"a ping failed: {errors[0]}") from errors[0]
    return samples


def _loaded_round(
    worker: _Conn, pinger: _Conn, lease: dict[str, Any], acquirers: list[_Conn]
) -> tuple[_Samples, list[float], float]:
    """Probe while every acquirer takes a fresh lease; returns (samples, acquire s, window s)."""
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    go = threading.Barrier(len(acquirers) + 1)

    def acquire(conn: _Conn) -> None:
        try:
            go.wait()
            t0 = time.perf_counter()
            granted = conn.call("lease.acquire", {"waitS": 5})["lease"]
            t1 = time.perf_counter()
            if granted is None:
                raise RuntimeError("lease.acquire found no handoff to lease")
            spans.append((t0, t1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=acquire, args=(c,), daemon=True) for c in acquirers]
    for thread in threads:
        thread.start()
    go.wait()
    samples = _probe(worker, pinger, lease, lambda _: not any(t.is_alive() for t in threads))
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"an acquire failed: {errors[0]}") from errors[0]
    start = min(s for s, _ in spans)
    end = max(e for _, e in spans)
    return samples.within(start, end), [e - s for s, e in spans], end - start


def _quiet() -> None:
    """Start each phase on a quiet disk, not while the last checkout is written back."""
    os.sync()
    time.sleep(0.3)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def _plan(config: BenchConfig) -> _Plan:
    if config.quick:
        return _Plan(max(config.files, 5000), 1, 1, 10.0, acquirers=2, idle_probes=100)
    return _Plan(max(config.files, FILES), 4, 2, 35.0, acquirers=3, idle_probes=300)


def run(config: BenchConfig) -> list[BenchResult]:
    plan = _plan(config)
    root = config.scratch / "daemon"
    # AF_UNIX paths are short (107 bytes): keep the socket out of a deep scratch dir.
    repo = root / "repo.git"
    generate_repo(repo, plan.files)
    sock_dir = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
    sock = sock_dir / "d.sock"
    daemon: _Daemon | None = None
    conns: list[_Conn] = []
    try:
        daemon = _Daemon(_write_config(root, repo, sock), sock, root / "daemon.log")
        control = _Conn(sock, "control", "bench")
        conns.append(control)
        names = [f"bench-{i}" for i in range(1 + plan.rounds * plan.acquirers)]
        control.call("handoff.submit", {"markdown": [_handoff(n) for n in names]})
        worker = _Conn(sock, "worker", "heartbeats")
        pinger = _Conn(sock, "worker", "pings")
        acquirers = [_Conn(sock, "worker", f"acquirer-{i}") for i in range(plan.acquirers)]
        conns += [worker, pinger, *acquirers]
        lease = worker.call("lease.acquire", {"waitS": 5})["lease"]
        if lease is None:
            raise RuntimeError("no lease for the heartbeat connection")
        idle, loaded = _Samples([], []), _Samples([], [])
        acquire_s: list[float] = []
        windows: list[float] = []
        _probe(worker, pinger, lease, lambda n: n >= 20)  # warm up both connections
        started = time.monotonic()
        for done in range(plan.rounds):
            if done >= plan.min_rounds and time.monotonic() - started > plan.budget_s:
                break
            _quiet()
            idle.extend(_probe(worker, pinger, lease, lambda n: n >= plan.idle_probes))
            _quiet()
            samples, took, window = _loaded_round(worker, pinger, lease, acquirers)
            loaded.extend(samples)
            acquire_s += took
            windows.append(window)
    finally:
        for conn in conns:
            conn.close()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    shutil.rmtree(root)
    if len(loaded.heartbeat) < 2:
        raise RuntimeError(
            f"only {len(loaded.heartbeat)} heartbeats overlapped the checkouts; "
            "use a bigger repository (--files)"
        )
    return _results(plan, idle, loaded, acquire_s, windows)


def _results(
    plan: _Plan,
    idle: _Samples,
    loaded: _Samples,
    acquire_s: list[float],
    windows: list[float],
) -> list[BenchResult]:
    hb_idle = [rtt for _, rtt in idle.heartbeat]
    hb_load = [rtt for _, rtt in loaded.heartbeat]
    ping_idle = [rtt for _, rtt in idle.ping]
    ping_load = [rtt for _, rtt in loaded.ping]
    note = (
        f"{len(acquire_s)} lease.acquire calls, each a fresh checkout of {plan.files} files "
        f"({plan.acquirers} at once, {_count(len(windows), 'round')}): each took "
        f"{min(acquire_s):.2f}-{max(acquire_s):.2f} s (median "
        f"{statistics.median(acquire_s):.2f} s) as the daemon ran them one after another; "
        f"the {_count(len(windows), 'loaded window')} lasted {sum(windows):.1f} s in all, holding "
        f"{len(hb_load)} heartbeats (idle: {len(hb_idle)}). Slowest heartbeat: "
        f"{max(hb_load) * 1000:.1f} ms under load, {max(hb_idle) * 1000:.1f} ms idle; "
        f"slowest ping {max(ping_load) * 1000:.1f} ms / {max(ping_idle) * 1000:.1f} ms."
    )
    load = f"while {plan.acquirers} fresh checkouts run"
    rows: list[BenchResult] = []
    for what, under, base in (
        ("`lease.heartbeat`", hb_load, hb_idle),
        ("event-loop ping (unknown method)", ping_load, ping_idle),
    ):
        for stat, fn in (("median", statistics.median), ("p95", _p95)):
            rows.append(
                SlowdownResult(
                    f"{what} round trip, {stat} ({plan.files} files)",
                    load,
                    fn(under),
                    "daemon idle",
                    fn(base),
                    len(under),
                    note=note if not rows else "",
                )
            )
    return rows
