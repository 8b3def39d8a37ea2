"""Connections are admitted by the kernel's credentials before a byte is read, capped per
uid, and closed when idle; workers come back by themselves.

Peers run as real second users (created with useradd when missing), against the real
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

import pytest
from harness import (
    Conn,
    Daemon,
    control,
    handoff_doc,
    kill_group,
    start_worker,
    states,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

AGENT_USERS = ("orch-agent", "orch-agent2")

# As the given uid: open N connections, send initialize on each unless told to stay
# silent, print how many got a result / an error / nothing, then hold them all until
# stdin closes.
HOARDER = r"""
import json, os, socket, sys
path, uid, gid, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
os.setgid(gid); os.setgroups([]); os.setuid(uid)
held, tally = [], {"result": 0, "error": 0, "closed": 0}
for i in range(count):
    s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(path)
    held.append(s)
    try:
        s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": 1, "role": "worker", "worker": {"name": f"h{i}"}}}).encode() + b"\n")
        line = s.makefile("rb").readline()
    except OSError:
        line = b""
    tally["closed" if not line else "result" if "result" in json.loads(line) else "error"] += 1
print(json.dumps(tally), flush=True)
sys.stdin.read()
"""

# As the given uid: connect, send nothing, print what the daemon sends before it hangs up.
LISTENER = r"""
import json, os, socket, sys
os.setgid(int(sys.argv[3])); os.setgroups([]); os.setuid(int(sys.argv[2]))
s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(sys.argv[1])
buf = b""
try:
    while chunk := s.recv(65536):
        buf += chunk
    closed = True
except TimeoutError:
    closed = False
print(json.dumps({"lines": [json.loads(x) for x in buf.splitlines() if x], "closed": closed}))
"""


def _user(name: str) -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.skip("needs root to run peers as other users")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True)
        return pwd.getpwnam(name)


def _open_socket_dirs(sock: Path) -> None:
    for parent in sock.parents:  # let the other users reach the socket
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)


def _daemon(tmp_path: Path, repo: Path, extra: str, **kwargs: object) -> Daemon:
    config = write_config(tmp_path, repo, extra=f'socket_mode = "0666"\n{extra}', **kwargs)  # type: ignore[arg-type]
    running = Daemon(config, tmp_path / "daemon.log").start()
    _open_socket_dirs(running.socket)
    return running


def test_an_unknown_uid_is_refused_before_it_sends_a_byte(tmp_path: Path, repo: Path) -> None:
    stranger = _user(AGENT_USERS[0])
    daemon = _daemon(tmp_path, repo, "allowed_uids = []")
    try:
        out = subprocess.run(
            [sys.executable, "-c", LISTENER, str(daemon.socket), str(stranger.pw_uid),
             str(stranger.pw_gid)],
            check=True, capture_output=True, timeout=60,
        )
        got = json.loads(out.stdout)
        # The peer never sent anything: the refusal can only come from the credentials
        # checked at accept, before any frame was read or buffered.
        assert got["closed"], got
        assert [line["error"]["code"] for line in got["lines"]] == [-32002], got
        assert "daemon.allowed_uids" in got["lines"][0]["error"]["message"]
    finally:
        daemon.stop()


@pytest.fixture
def capped(tmp_path: Path, repo: Path) -> Iterator[Daemon]:
    users = [_user(n) for n in AGENT_USERS]
    daemon = _daemon(
        tmp_path, repo,
        f"allowed_uids = [{', '.join(str(u.pw_uid) for u in users)}]\n"
        "max_connections_per_uid = 16",
    )
    yield daemon
    daemon.stop()


def test_one_uid_with_512_silent_connections_locks_out_neither_another_uid_nor_the_cli(
    capped: Daemon,
) -> None:
    hoarder, other = (_user(n) for n in AGENT_USERS)
    hoard = subprocess.Popen(
        [sys.executable, "-c", HOARDER, str(capped.socket), str(hoarder.pw_uid),
         str(hoarder.pw_gid), "512"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert hoard.stdout is not None
        tally = json.loads(hoard.stdout.readline())
        assert tally["result"] == 16, tally  # the cap, and every other one refused
        assert tally["result"] + tally["error"] + tally["closed"] == 512, tally
        # Another uid's worker still gets in ...
        out = subprocess.run(
            [sys.executable, "-c", HOARDER, str(capped.socket), str(other.pw_uid),
             str(other.pw_gid), "1"],
            input=b"", check=True, capture_output=True, timeout=60,
        )
        assert json.loads(out.stdout)["result"] == 1, out
        # ... and so does the operator's CLI.
        cli = subprocess.run(
            [sys.executable, "-m", "orchestrator", "--socket", str(capped.socket), "status"],
            capture_output=True, text=True, timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
    finally:
        if hoard.stdin is not None:
            hoard.stdin.close()
        hoard.wait(timeout=60)


def test_an_idle_connection_is_closed_but_a_long_poll_is_not(
    tmp_path: Path, repo: Path
) -> None:
    daemon = Daemon(write_config(tmp_path, repo, extra="idle_timeout_s = 1"),
                    tmp_path / "daemon.log").start()
    idle, polling = Conn(daemon.socket), Conn(daemon.socket)
    try:
        idle.initialize("worker", name="idle")
        polling.initialize("worker", name="polling")
        # The long-poll outlasts the idle limit three times over and still gets its answer.
        reply = polling.request("lease.acquire", {"waitS": 3})
        assert reply.get("result") == {"lease": None}, reply
        assert idle.recv() is None, "an idle connection must be closed by the daemon"
        assert polling.recv() is None, "idle again after the long-poll: closed too"
        closed = [e for e in daemon.logs() if e.get("event") == "idle_connection_closed"]
        assert len(closed) == 2, closed
    finally:
        idle.close()
        polling.close()
        daemon.stop()


def test_a_worker_whose_connection_idles_out_reconnects_and_finishes(
    tmp_path: Path, repo: Path
) -> None:
    # Heartbeats every 2 s, idle limit 0.5 s: the connection is closed between heartbeats.
    daemon = Daemon(
        write_config(tmp_path, repo, extra="idle_timeout_s = 0.5", heartbeat_s=2,
                     merge="paused = true"),
        tmp_path / "daemon.log",
    ).start()
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("patient")]})
    worker = start_worker(daemon.socket, "slow.py", tmp_path / "worker.log")
    try:
        wait_for(lambda: states(daemon.socket).get("patient") == "reported",
                 "the slow handoff to be reported")
        assert any(e.get("event") == "idle_connection_closed" for e in daemon.logs())
        assert "reconnected" in (tmp_path / "worker.log").read_text()
    finally:
        kill_group(worker)
        daemon.stop()
