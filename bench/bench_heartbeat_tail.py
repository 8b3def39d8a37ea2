"""The heartbeat tail with 500 idle workers attached and merges running.

A real ``orchestrator serve`` (merging on, one gate ``true``, metrics off,
``daemon.max_connections_per_uid = 600``) on a generated repository of ``--files``
files. Untimed set-up: 16 + M handoffs are submitted and leased by 16 + M worker
connections; in each of the M leases' checkouts one file is committed (what a worker
does for an instant agent), ready to be reported.

Two phases in the same run, each on a quiet disk:

(a) baseline: only the 16 leases send ``lease.heartbeat``, each from its own thread, one
    request in flight, a pause of a few ms after each answer;
(b) the same 16 while 500 more worker connections long-poll ``lease.acquire`` (nothing is
    queued, so they wait) and the M prepared handoffs are reported one after another, each
    as soon as the one before is merged: every report and every landing changes states,
    which wakes every long-poll.

Only heartbeats sent between the first report and the last merge count as (b). The rows
are p50 and p99 of the round trip, (b) against (a).
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import BenchConfig, BenchResult, generate_repo, git
from .bench_daemon import SlowdownResult, _Conn, _Daemon, _handoff

LEASES = 16
IDLE = 500
PACE_S = 0.02
WAIT_S = 120.0


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
max_connections_per_uid = {IDLE + LEASES + 100}
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


def _idle(sock: Path, i: int) -> socket.socket:
    """A worker connection with a ``lease.acquire`` long-poll in flight (never read)."""
    conn = _Conn(sock, "worker", f"idle-{i}")
    message = (
        b'{"jsonrpc":"2.0","id":99,"method":"lease.acquire","params":{"waitS":300}}\n'
    )
    conn.sock.sendall(message)
    return conn.sock


def _heartbeats(
    workers: list[tuple[_Conn, dict[str, Any]]], stop: threading.Event
) -> list[tuple[float, float]]:
    """(send time, round trip) of every heartbeat until ``stop``, one thread per lease."""
    samples: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def beat(conn: _Conn, lease: dict[str, Any]) -> None:
        params = {"leaseId": lease["id"], "token": lease["token"]}
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                conn.call("lease.heartbeat", params)
                rtt = time.perf_counter() - t0
                with lock:
                    samples.append((t0, rtt))
                time.sleep(PACE_S)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=beat, args=w, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join(WAIT_S)
    if errors:
        raise RuntimeError(f"a heartbeat failed: {errors[0]}") from errors[0]
    return samples


def _merge_all(control: _Conn, reports: list[tuple[_Conn, dict[str, Any], str]]) -> float:
    """Report each prepared lease, the next once the last is merged; returns the seconds."""
    t0 = time.perf_counter()
    for conn, lease, head in reports:
        report = {"status": "completed", "summary": "", "head": head, "phases": [], "metrics": []}
        conn.call(
            "handoff.report", {"leaseId": lease["id"], "token": lease["token"], "report": report}
        )
        name = lease["handoff"]["name"]
        deadline = time.monotonic() + WAIT_S
        while (state := control.call("handoff.get", {"name": name})["state"]) != "merged":
            if state in ("failed", "conflict") or time.monotonic() > deadline:
                raise RuntimeError(f"{name} ended {state!r} instead of merged")
            time.sleep(0.01)
    return time.perf_counter() - t0


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def run(config: BenchConfig) -> list[BenchResult]:
    merges = 4 if config.quick else 12
    baseline_s = 3.0 if config.quick else 8.0
    root = config.scratch / "heartbeat_tail"
    repo = root / "repo.git"
    generate_repo(repo, config.files)
    sock_dir = Path(tempfile.mkdtemp(prefix="orchestrator-bench-"))
    sock = sock_dir / "d.sock"
    daemon: _Daemon | None = None
    conns: list[_Conn] = []
    idle: list[socket.socket] = []
    try:
        daemon = _Daemon(_config(root, repo, sock), sock, root / "daemon.log")
        control = _Conn(sock, "control", "bench")
        conns.append(control)
        names = [f"hb-{i:02d}" for i in range(LEASES)] + [f"mg-{i:02d}" for i in range(merges)]
        control.call("handoff.submit", {"markdown": [_handoff(n) for n in names]})
        leased: list[tuple[_Conn, dict[str, Any]]] = []
        for name in names:
            conn = _Conn(sock, "worker", f"w-{name}")
            conns.append(conn)
            lease = conn.call("lease.acquire", {"waitS": 30})["lease"]
            if lease is None:
                raise RuntimeError("a set-up lease.acquire found nothing to lease")
            leased.append((conn, lease))
        beating = leased[:LEASES]
        reports: list[tuple[_Conn, dict[str, Any], str]] = []
        for conn, lease in leased[LEASES:]:
            tree = Path(lease["worktree"])
            (tree / f"{lease['handoff']['name']}.txt").write_text("done\n")
            git(tree, "add", "-A")
            git(tree, "commit", "-q", "-m", lease["handoff"]["name"])
            reports.append((conn, lease, git(tree, "rev-parse", "HEAD")))

        os.sync()
        time.sleep(0.5)
        stop = threading.Event()
        timer = threading.Timer(baseline_s, stop.set)
        timer.start()
        base = [rtt for _, rtt in _heartbeats(beating, stop)]

        for i in range(IDLE):
            idle.append(_idle(sock, i))
        time.sleep(1.0)  # every long-poll has reached the daemon and is waiting
        os.sync()
        time.sleep(0.5)
        stop = threading.Event()
        window: list[float] = []

        def merge() -> None:
            try:
                time.sleep(0.2)
                window.append(time.perf_counter())
                _merge_all(control, reports)
                window.append(time.perf_counter())
            finally:
                stop.set()

        merger = threading.Thread(target=merge, daemon=True)
        merger.start()
        loaded_all = _heartbeats(beating, stop)
        merger.join(WAIT_S)
        if len(window) != 2:
            raise RuntimeError("the merges did not finish")
        loaded = [rtt for t, rtt in loaded_all if window[0] <= t < window[1]]
        status = control.call("status", {})
    finally:
        for s in idle:
            s.close()
        for conn in conns:
            conn.close()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    shutil.rmtree(root)
    workers = len(status.get("workers", []))
    note = (
        f"{LEASES} leases heartbeating (a {PACE_S * 1000:g} ms pause after each answer), "
        f"{IDLE} idle worker connections long-polling `lease.acquire` ({workers} workers in "
        f"`status`), {merges} handoffs reported and merged one after another (`true` gate) "
        f"in {window[1] - window[0]:.1f} s: {len(loaded)} heartbeats in that window, "
        f"{len(base)} in the baseline; slowest {max(loaded) * 1000:.1f} ms / "
        f"{max(base) * 1000:.1f} ms. Load average at the end: {os.getloadavg()[0]:.1f}."
    )
    load = f"{IDLE} idle workers long-polling, merges running"
    base_what = "no idle workers, no merges"
    return [
        SlowdownResult(
            f"`lease.heartbeat` round trip, {stat}, {LEASES} leases ({config.files} files)",
            load,
            fn(loaded),
            base_what,
            fn(base),
            len(loaded),
            note=note if stat == "median" else "",
        )
        for stat, fn in (("median", statistics.median), ("p99", _p99))
    ]
