"""Bad input of every kind gets the documented error, and other peers never notice."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import git
from harness import Conn, Daemon, control, handoff_doc, states, wait_for, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path, repo: Path) -> Iterator[Daemon]:
    config = write_config(tmp_path, repo, merge="paused = true", extra="max_message_bytes = 4096")
    running = Daemon(config, tmp_path / "daemon.log").start()
    yield running
    running.stop()


@pytest.fixture
def bystander(daemon: Daemon) -> Iterator[Conn]:
    """A well-behaved peer connected throughout; it must keep working."""
    conn = Conn(daemon.socket)
    conn.initialize("control", "bystander")
    yield conn
    assert "result" in conn.request("status"), "the bystander lost its service"
    conn.close()


def test_invalid_json_keeps_the_connection(daemon: Daemon, bystander: Conn) -> None:
    conn = Conn(daemon.socket)
    conn.send_raw(b'{"jsonrpc": "2.0", "id": 1, "method": \n')
    reply = conn.recv()
    assert reply is not None and reply["error"]["code"] == -32700
    assert reply["id"] is None
    assert "result" in conn.request("initialize", {"protocolVersion": 1, "role": "control"})
    conn.send_raw(b"\xff\xfe not utf-8\n")
    assert conn.recv()["error"]["code"] == -32700  # type: ignore[index]
    assert "result" in conn.request("status")


def test_oversized_frame_is_refused_and_closed(daemon: Daemon, bystander: Conn) -> None:
    conn = Conn(daemon.socket)
    conn.initialize("control")
    big = (
        json.dumps(
            {"jsonrpc": "2.0", "id": 9, "method": "status", "params": {"pad": "x" * 10_000}}
        ).encode()
        + b"\n"
    )
    try:
        conn.send_raw(big)
    except BrokenPipeError:
        pass  # the daemon may close before we finished writing: that is the point
    reply = conn.recv()
    assert reply is not None and reply["error"]["code"] == -32600
    assert "max_message_bytes" in reply["error"]["message"]
    assert conn.recv() is None  # closed


def test_envelope_method_version_and_order_errors(daemon: Daemon, bystander: Conn) -> None:
    conn = Conn(daemon.socket)
    before = conn.request("status")
    assert before["error"]["code"] == -32600
    assert "initialize" in before["error"]["message"]
    version = conn.request("initialize", {"protocolVersion": 2, "role": "worker"})
    assert version["error"]["code"] == -32010
    assert version["error"]["data"]["supported"] == [1]
    conn.send_raw(b"[1, 2, 3]\n")
    assert conn.recv()["error"]["code"] == -32600  # type: ignore[index]
    conn.initialize("worker")
    unknown = conn.request("lease.steal", {})
    assert unknown["error"]["code"] == -32601
    control_call = conn.request("handoff.submit", {"markdown": [handoff_doc("x")]})
    assert control_call["error"]["code"] == -32002
    again = conn.request("initialize", {"protocolVersion": 1, "role": "control"})
    assert again["error"]["code"] == -32600
    params = conn.request("lease.acquire", {"waitS": 9999})
    assert params["error"]["code"] == -32602
    assert states(daemon.socket) == {}  # nothing was submitted by the worker


def test_worker_method_from_control_is_refused(daemon: Daemon, bystander: Conn) -> None:
    reply = bystander.request("lease.acquire", {"waitS": 0})
    assert reply["error"]["code"] == -32002


def test_stale_token_and_unknown_lease(daemon: Daemon, bystander: Conn) -> None:
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("fenced")]})
    conn = Conn(daemon.socket)
    conn.initialize("worker")
    lease = conn.request("lease.acquire", {"waitS": 5})["result"]["lease"]
    wrong = conn.request("lease.heartbeat", {"leaseId": lease["id"], "token": lease["token"] - 1})
    assert wrong["error"]["code"] == -32001
    missing = conn.request("lease.heartbeat", {"leaseId": "l-nope", "token": 1})
    assert missing["error"]["code"] == -32001
    ok = conn.request(
        "lease.heartbeat",
        {
            "leaseId": lease["id"],
            "token": lease["token"],
            "progress": {"percent": 10, "message": "going"},
        },
    )
    assert "expiresAt" in ok["result"]
    conn.close()


def test_report_with_uncommitted_changes_is_rejected_and_the_lease_kept(
    daemon: Daemon, bystander: Conn
) -> None:
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("sloppy")]})
    conn = Conn(daemon.socket)
    conn.initialize("worker")
    lease = conn.request("lease.acquire", {"waitS": 5})["result"]["lease"]
    worktree = Path(lease["worktree"])
    (worktree / "forgotten.txt").write_text("not committed\n")
    head = git(worktree, "rev-parse", "HEAD")
    report = {"status": "completed", "summary": "done", "head": head}
    reply = conn.request(
        "handoff.report", {"leaseId": lease["id"], "token": lease["token"], "report": report}
    )
    assert reply["error"]["code"] == -32007
    assert "forgotten.txt" in reply["error"]["data"]["reason"]
    wrong_head = conn.request(
        "handoff.report",
        {"leaseId": lease["id"], "token": lease["token"], "report": {**report, "head": "0" * 40}},
    )
    assert wrong_head["error"]["code"] == -32007
    # The lease is still valid: fix it and report again.
    git(worktree, "add", "-A")
    git(worktree, "commit", "-q", "-m", "commit it")
    fixed = {**report, "head": git(worktree, "rev-parse", "HEAD")}
    accepted = conn.request(
        "handoff.report", {"leaseId": lease["id"], "token": lease["token"], "report": fixed}
    )
    assert accepted["result"] == {"accepted": True}
    after = conn.request("lease.heartbeat", {"leaseId": lease["id"], "token": lease["token"]})
    assert after["error"]["code"] == -32001  # a reported lease is released
    conn.close()


def test_broken_handoff_files_are_refused_with_lines(
    daemon: Daemon, bystander: Conn, tmp_path: Path
) -> None:
    bad = handoff_doc("ok-name").replace("**PRIORITY**: MEDIUM", "**PRIORITY**: URGENT")
    reply = bystander.request("handoff.submit", {"markdown": [handoff_doc("fine"), bad]})
    assert reply["error"]["code"] == -32004
    errors = reply["error"]["data"]["errors"]
    assert errors and all(e["line"] >= 0 and e["message"] for e in errors)
    assert any(e["document"] == 1 and e["line"] == 3 for e in errors)
    assert states(daemon.socket) == {}  # all or nothing: "fine" was not stored either

    escape = handoff_doc("x").replace("# HANDOFF: x", "# HANDOFF: ../../etc")
    reply = bystander.request("handoff.submit", {"markdown": [escape]})
    assert reply["error"]["code"] == -32004

    path = tmp_path / "bad.md"
    path.write_text(bad)
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--socket", str(daemon.socket), "submit", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"{path}:3:" in result.stderr and "URGENT" in result.stderr


def test_duplicates_unknown_handoffs_and_dependency_problems(
    daemon: Daemon, bystander: Conn
) -> None:
    assert "result" in bystander.request("handoff.submit", {"markdown": [handoff_doc("one")]})
    dup = bystander.request("handoff.submit", {"markdown": [handoff_doc("one")]})
    assert dup["error"]["code"] == -32005
    unknown = bystander.request("handoff.get", {"name": "nobody"})
    assert unknown["error"]["code"] == -32003
    orphan = bystander.request(
        "handoff.submit", {"markdown": [handoff_doc("orphan", deps="ghost")]}
    )
    assert orphan["error"]["code"] == -32004
    cycle = bystander.request(
        "handoff.submit", {"markdown": [handoff_doc("a", deps="b"), handoff_doc("b", deps="a")]}
    )
    assert cycle["error"]["code"] == -32004
    assert "cycle" in cycle["error"]["message"]


def test_socket_mode_and_refused_peer(daemon: Daemon, tmp_path: Path, repo: Path) -> None:
    assert oct(os.stat(daemon.socket).st_mode & 0o777) == oct(0o660)
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    # A socket that uid nobody can reach (pytest's tmp dirs are private to root).
    public = Path(tempfile.mkdtemp(prefix="orch-sock-"))
    public.chmod(0o755)
    (tmp_path / "other").mkdir()
    config = write_config(tmp_path / "other", repo, extra='socket_mode = "0666"')
    config.write_text(
        config.read_text().replace(
            f'socket = "{tmp_path}/other/state/d.sock"', f'socket = "{public}/d.sock"'
        )
    )
    other = Daemon(config, tmp_path / "other.log").start()
    try:
        assert other.socket == public / "d.sock"
        assert oct(os.stat(other.socket).st_mode & 0o777) == oct(0o666)
        _refused_as_nobody(other.socket)
    finally:
        other.stop()
        shutil.rmtree(public, ignore_errors=True)


def _refused_as_nobody(path: Path) -> None:
    """A peer with another uid (nobody) is refused with -32002 on its first request."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and speaks first
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(str(path))
                s.sendall(
                    b'{"jsonrpc":"2.0","id":1,"method":"initialize",'
                    b'"params":{"protocolVersion":1,"role":"control"}}\n'
                )
                os.write(write_end, s.makefile("rb").readline())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        line = pipe.read()
    os.waitpid(pid, 0)
    assert json.loads(line)["error"]["code"] == -32002


def test_bad_config_is_explained(tmp_path: Path, repo: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        f'[repository]\npath = "{repo}"\n[leases]\nttl_s = "soon"\nmax_attempt = 3\n'
        '[[gates]]\nname = "tests"\nrun = "make test"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--config", str(config), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "leases.ttl_s must be a number" in result.stderr, result.stderr
    assert "unknown key leases.max_attempt" in result.stderr
    assert "run must be an argv list" in result.stderr
    good = write_config(tmp_path, repo)
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--config", str(good), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_a_peer_that_does_not_read_is_disconnected(tmp_path: Path, repo: Path) -> None:
    config = write_config(tmp_path, repo, extra="send_timeout_s = 1")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        greedy = Conn(daemon.socket)
        greedy.initialize("control")
        greedy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = b'{"jsonrpc":"2.0","id":1,"method":"status","params":{}}\n'
        try:
            for _ in range(20_000):  # far more replies than the socket buffers can hold
                greedy.send_raw(request)
        except OSError:
            pass  # the daemon hung up on us mid-flood: that is the point
        assert "counts" in control(daemon.socket, "status")  # others are still served

        def disconnected() -> bool:
            return any(e["event"] == "slow_peer_disconnected" for e in daemon.logs())

        wait_for(disconnected, "the slow peer to be disconnected")
        greedy.close()
    finally:
        daemon.stop()
