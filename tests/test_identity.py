"""Roles come from the kernel's credentials (SO_PEERCRED), never from the peer's word.

The client runs as a real second user (created with useradd when missing), against the real
daemon and socket.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import Daemon, write_config

pytestmark = pytest.mark.slow

AGENT_USER = "orch-agent"

# Connects as the agent's uid (credentials are taken at connect time) and prints the replies.
CLIENT = r"""
import json, os, socket, sys
os.setgid(int(sys.argv[3])); os.setgroups([]); os.setuid(int(sys.argv[2]))
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
msg = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": 1,
       "role": sys.argv[4], "client": {"name": "t"}, "worker": {"name": "w"}}}
s.sendall(json.dumps(msg).encode() + b"\n")
buf = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
    if sys.argv[4] == "worker" and b"\n" in buf:
        break
print(json.dumps({"lines": [json.loads(x) for x in buf.splitlines() if x], "closed": not chunk}))
"""


def _agent() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as a second user")
    try:
        return pwd.getpwnam(AGENT_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", AGENT_USER], check=True)
        return pwd.getpwnam(AGENT_USER)


@pytest.fixture
def daemon(tmp_path: Path, repo: Path) -> Iterator[tuple[Daemon, Path]]:
    agent = _agent()
    extra = f'allowed_uids = [{agent.pw_uid}]\nsocket_mode = "0666"'
    running = Daemon(write_config(tmp_path, repo, extra=extra, merge="paused = true"),
                     tmp_path / "daemon.log").start()
    sock = tmp_path / "state" / "d.sock"
    for parent in sock.parents:  # let the second user reach the socket
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    yield running, sock
    running.stop()


def _as_agent(sock: Path, role: str) -> dict[str, object]:
    agent = _agent()
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, str(sock), str(agent.pw_uid), str(agent.pw_gid), role],
        check=True, capture_output=True, timeout=30,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_an_allowed_worker_uid_cannot_claim_the_control_role(daemon: tuple[Daemon, Path]) -> None:
    got = _as_agent(daemon[1], "control")
    lines = got["lines"]
    assert isinstance(lines, list) and lines[0]["error"]["code"] == -32002, got
    assert "daemon.control_uids" in lines[0]["error"]["message"]
    assert got["closed"], "the connection must be closed after a refused role"


def test_an_allowed_worker_uid_gets_the_worker_role(daemon: tuple[Daemon, Path]) -> None:
    got = _as_agent(daemon[1], "worker")
    lines = got["lines"]
    assert isinstance(lines, list) and "result" in lines[0], got


def test_a_uid_in_control_uids_gets_the_control_role(tmp_path: Path, repo: Path) -> None:
    agent = _agent()
    extra = f'control_uids = [{agent.pw_uid}]\nsocket_mode = "0666"'
    running = Daemon(write_config(tmp_path, repo, extra=extra, merge="paused = true"),
                     tmp_path / "daemon.log").start()
    try:
        sock = tmp_path / "state" / "d.sock"
        for parent in sock.parents:
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
        got = _as_agent(sock, "worker")  # an operator may also be a worker
        lines = got["lines"]
        assert isinstance(lines, list) and "result" in lines[0], got
    finally:
        running.stop()


# Runs a list of requests on one worker connection as the given uid; prints each reply.
SCRIPT_CLIENT = r"""
import json, os, socket, sys
path, uid, gid, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
calls = json.loads(sys.argv[5])
if uid != os.getuid():
    os.setgid(gid); os.setgroups([]); os.setuid(uid)
s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(path)
f = s.makefile("rb")
replies = []
for i, (method, params) in enumerate([["initialize", {"protocolVersion": 1, "role": "worker",
        "client": {"name": "t"}, "worker": {"name": name}}]] + calls):
    frame = {"jsonrpc": "2.0", "id": i, "method": method, "params": params}
    s.sendall(json.dumps(frame).encode() + b"\n")
    while True:
        line = f.readline()
        if not line:
            replies.append(None); break
        msg = json.loads(line)
        if msg.get("id") == i:
            replies.append(msg); break
print(json.dumps(replies))
"""


def _worker_calls(
    sock: Path, uid: int, gid: int, name: str, calls: list[list[object]]
) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT_CLIENT, str(sock), str(uid), str(gid), name,
         json.dumps(calls)],
        check=True, capture_output=True, timeout=60,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_a_lease_is_bound_to_the_uid_and_the_worker_name_that_acquired_it(
    daemon: tuple[Daemon, Path],
) -> None:
    from harness import Conn, control, handoff_doc

    _, sock = daemon
    control(sock, "handoff.submit", {"markdown": [handoff_doc("bound")]})
    holder = Conn(sock)
    try:
        holder.initialize("worker", name="w")
        lease = holder.request("lease.acquire", {"waitS": 30})["result"]["lease"]
        ident = {"leaseId": lease["id"], "token": lease["token"]}
        head = lease["baseCommit"]
        calls: list[list[object]] = [
            ["lease.heartbeat", ident],
            ["handoff.report", {**ident, "report": {"status": "completed", "head": head}}],
            ["lease.release", {**ident, "reason": "stolen"}],
        ]
        agent = _agent()
        thieves = {
            "another uid, same worker name": (agent.pw_uid, agent.pw_gid, "w"),
            "the same uid, another worker name": (os.getuid(), os.getgid(), "w2"),
        }
        for who, (uid, gid, name) in thieves.items():
            replies = _worker_calls(sock, uid, gid, name, calls)
            assert "result" in replies[0], (who, replies)
            for (method, _), reply in zip(calls, replies[1:], strict=True):
                assert reply is not None and reply.get("error", {}).get("code") == -32001, (
                    who, method, reply)
        # The holder itself still holds it: nothing above touched the lease.
        assert "result" in holder.request("lease.heartbeat", ident)
        assert "result" in holder.request("lease.release", {**ident, "reason": "done"})
    finally:
        holder.close()
