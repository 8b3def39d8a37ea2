"""Helpers to drive the real daemon, real workers and the real socket from tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

AGENTS = Path(__file__).parent / "agents"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "handoffs"
# Generous bounds for waiting on real processes on a loaded 2-core CI machine; a test
# fails only if a condition never comes true, never because something was slow.
WAIT_S = 60.0


def write_config(
    tmp_path: Path,
    repo: Path,
    *,
    gates: str = "",
    extra: str = "",
    ttl_s: float = 30,
    heartbeat_s: float = 0.5,
    max_attempts: int = 3,
    merge: str = "",
    metrics: str = "",
    leases: str = "",
) -> Path:
    """A config for a daemon on ``repo`` with its state under ``tmp_path/state``."""
    state = tmp_path / "state"
    config = tmp_path / "orchestrator.toml"
    config.write_text(
        f"""
[repository]
path = "{repo}"
integration_branch = "main"
[daemon]
state_dir = "{state}"
socket = "{state}/d.sock"
{extra}
[leases]
ttl_s = {ttl_s}
heartbeat_interval_s = {heartbeat_s}
max_attempts = {max_attempts}
{leases}
[merge]
{merge}
{gates}
[metrics]
listen = "{metrics}"
"""
    )
    return config


def host_pids(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle``, as this test sees them.

    A gate in a PID namespace knows only its namespace's pids, so tests find its
    processes from outside by a word in their argv instead of by a pid they wrote."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except (OSError, IndexError):
            continue
        if needle in cmdline and not zombie:
            found.append(int(entry))
    return found


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test naming ``what`` if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Daemon:
    """``orchestrator serve`` as a real child process."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log
        self.env = env
        self.process: subprocess.Popen[bytes]  # set by start()
        text = config.read_text()
        self.socket = Path(text.split('socket = "')[1].split('"')[0])

    def start(self) -> Daemon:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "--config", str(self.config), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(self.env or {})},
        )
        wait_for(self._ready, f"the daemon to listen on {self.socket}")
        return self

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited early:\n{self.log_path.read_text()}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.socket))
            return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


class Conn:
    """A raw protocol connection: bytes in, JSON lines out, for exact protocol tests."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(str(path))
        self.buffer = b""
        self.next_id = 1
        self.notifications: list[dict[str, Any]] = []

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None when the daemon closed the connection."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request and return its reply (notifications seen meanwhile are kept)."""
        request_id = self.next_id
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        self.send_raw(json.dumps(message).encode() + b"\n")
        while True:
            reply = self.recv()
            assert reply is not None, f"connection closed while waiting for {method}"
            if reply.get("id") == request_id:
                return reply
            self.notifications.append(reply)

    def initialize(
        self, role: str, name: str = "test", labels: list[str] | None = None
    ) -> dict[str, Any]:
        reply = self.request(
            "initialize",
            {
                "protocolVersion": 1,
                "role": role,
                "client": {"name": "tests", "version": "0"},
                "worker": {"name": name, "labels": labels or []},
            },
        )
        assert "result" in reply, reply
        return reply["result"]  # type: ignore[no-any-return]


def control(path: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    """One control call; returns the result, raises AssertionError on an error reply."""
    conn = Conn(path)
    try:
        conn.initialize("control")
        reply = conn.request(method, params)
    finally:
        conn.close()
    assert "result" in reply, reply
    return reply["result"]


def states(path: Path) -> dict[str, str]:
    return {h["name"]: h["state"] for h in control(path, "handoff.list")["handoffs"]}


def start_worker(
    socket_path: Path,
    agent: str,
    log: Path,
    *,
    name: str = "w",
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``orchestrator worker`` running one of tests/agents/*.py, in its own session."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "--socket",
            str(socket_path),
            "worker",
            "--name",
            name,
            "--wait",
            "1",
            *(extra or []),
            "--",
            sys.executable,
            str(AGENTS / agent),
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker and its agent (they share a session made by start_worker)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def handoff_doc(
    name: str, *, priority: str = "MEDIUM", deps: str = "none", labels: str = ""
) -> str:
    """A minimal valid handoff in the template."""
    label_line = f"**Labels**: {labels}\n" if labels else ""
    return f"""# HANDOFF: {name} - PENDING

**DATE**: 2026-11-24 | **PRIORITY**: {priority} | **STATUS**: PENDING

## STATUS UPDATE
**Status**: PENDING
**Priority**: {priority} - work item {name}
**Dependencies**: {deps}
{label_line}**Progress**: 0% - not started

## IMPLEMENTATION PLAN
### PHASE 1: Do it
- Make the change for {name}

## SUCCESS METRICS
- **Overall**: the tests pass
"""
