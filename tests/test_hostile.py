"""Hostile input, one test per case: each gets its documented error, and nothing changed:
not a row of the store, not a file outside the daemon's own state, not a ref.

(The protocol fuzzers in test_fuzz_protocol.py throw random input at the same socket; these
are the named attacks, each checked for its exact refusal.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import git
from harness import Conn, Daemon, control, handoff_doc, write_config

pytestmark = pytest.mark.slow

TABLES = ("meta", "handoffs", "leases", "reports", "gate_runs", "merges", "events")


class World:
    """Everything a hostile input could change: the store's rows, the files under the test's
    directory (bar the daemon's log and database files) and the repository's refs."""

    def __init__(self, root: Path, repo: Path) -> None:
        self.root = root
        self.repo = repo
        self.db = root / "state" / "orchestrator.sqlite3"

    def snapshot(self) -> dict[str, Any]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            rows = {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
                    for t in TABLES}
        finally:
            conn.close()
        files = sorted(
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if p.name != "daemon.log" and not p.name.startswith("orchestrator.sqlite3")
        )
        refs = git(self.repo, "for-each-ref", "--format=%(refname) %(objectname)")
        return {"rows": rows, "files": files, "refs": refs}


@pytest.fixture
def daemon(tmp_path: Path, repo: Path) -> Iterator[Daemon]:
    config = write_config(tmp_path, repo, merge="paused = true",
                          extra="max_message_bytes = 65536")
    running = Daemon(config, tmp_path / "daemon.log").start()
    # Something to be harmed: a handoff already in the store.
    control(running.socket, "handoff.submit", {"markdown": [handoff_doc("existing")]})
    yield running
    running.stop()


@pytest.fixture
def world(tmp_path: Path, repo: Path, daemon: Daemon) -> World:
    return World(tmp_path, repo)


def _control_error(daemon: Daemon, method: str, params: dict[str, Any]) -> dict[str, Any]:
    conn = Conn(daemon.socket)
    try:
        conn.initialize("control")
        reply = conn.request(method, params)
        assert "error" in reply, reply
        # The connection survives a refusal: the next request is answered.
        assert "result" in conn.request("status")
        return reply["error"]  # type: ignore[no-any-return]
    finally:
        conn.close()


HOSTILE_NAMES = [
    "..",
    "../escape",
    "a/../../../etc",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "bell\x07",
    "new\nline",
    "nul\x00byte",
    "esc\x1b[31mred",
    "-rf",
    "--upload-pack=touch pwned",
    "-",
    ".hidden",
    "x" * 10_000,
    "caf\u00e9",  # precomposed
    "cafe\u0301",  # decomposed: same look, other bytes
    "evil\u202etxt.exe",  # right-to-left override
    "zero\u200bwidth",
    "\ufb01x",  # the "fi" ligature
    "full\uff0fwidth",  # a slash look-alike
    "\u0440\u0430ypal",  # Cyrillic letters that look Latin
    "a.lock",
    "HEAD@{1}",
    "refs/heads/main",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=lambda n: repr(n)[:40])
@pytest.mark.parametrize("form", ["markdown", "handoffs"])
def test_a_hostile_handoff_name_is_refused(daemon: Daemon, world: World, name: str,
                                           form: str) -> None:
    before = world.snapshot()
    if form == "markdown":
        params: dict[str, Any] = {"markdown": [handoff_doc(name)]}
    else:
        params = {"handoffs": [{"name": name, "title": "t", "phases": [
            {"name": "p", "objectives": ["o"]}]}]}
    error = _control_error(daemon, "handoff.submit", params)
    assert error["code"] == -32004, error
    assert error["data"]["errors"], error
    assert world.snapshot() == before


@pytest.mark.parametrize("dep", ["../existing", "-existing", "existing/..", "exist\u0131ng"])
def test_a_hostile_dependency_name_is_refused(daemon: Daemon, world: World, dep: str) -> None:
    before = world.snapshot()
    error = _control_error(daemon, "handoff.submit",
                           {"markdown": [handoff_doc("innocent", deps=dep)]})
    assert error["code"] == -32004, error
    assert world.snapshot() == before


def test_hostile_names_in_lookups_are_unknown_handoffs(daemon: Daemon, world: World) -> None:
    before = world.snapshot()
    for method in ("handoff.get", "handoff.cancel", "handoff.retry"):
        for name in ("../existing", "existing\x00", "-existing", "EXISTING", "existing "):
            error = _control_error(daemon, method, {"name": name})
            assert error["code"] == -32003, (method, name, error)
    assert world.snapshot() == before


def test_huge_fields_are_refused(daemon: Daemon, world: World) -> None:
    before = world.snapshot()
    # Over daemon.max_message_bytes: -32600 and the connection is closed.
    conn = Conn(daemon.socket)
    conn.initialize("control")
    huge = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "handoff.submit",
                       "params": {"markdown": [handoff_doc("big") + "x" * 100_000]}})
    conn.send_raw(huge.encode() + b"\n")
    reply = conn.recv()
    assert reply is not None and reply["error"]["code"] == -32600
    assert conn.recv() is None
    conn.close()
    # Within the frame limit, fields too big for their kind are refused one by one.
    many_deps = ", ".join(f"d{i}" for i in range(5000))
    error = _control_error(daemon, "handoff.submit",
                           {"markdown": [handoff_doc("many-deps", deps=many_deps)]})
    assert error["code"] == -32004
    error = _control_error(daemon, "handoff.get", {"name": "n" * 60_000})
    assert error["code"] == -32003
    assert world.snapshot() == before


def test_deeply_nested_json_is_a_parse_error(daemon: Daemon, world: World) -> None:
    before = world.snapshot()
    conn = Conn(daemon.socket)
    conn.initialize("control")
    depth = 20_000
    nested = b'{"jsonrpc":"2.0","id":5,"method":"handoff.submit","params":{"markdown":' + (
        b"[" * depth + b"]" * depth
    ) + b"}}\n"
    conn.send_raw(nested)
    reply = conn.recv()
    assert reply is not None and reply["error"]["code"] == -32700, reply
    assert "result" in conn.request("status")  # the connection is still usable
    conn.close()
    assert world.snapshot() == before


def _worker(daemon: Daemon, name: str) -> Conn:
    conn = Conn(daemon.socket)
    conn.initialize("worker", name)
    return conn


def test_a_worker_using_another_workers_lease_is_refused(daemon: Daemon,
                                                         world: World) -> None:
    owner = _worker(daemon, "owner")
    lease = owner.request("lease.acquire", {"waitS": 10})["result"]["lease"]
    before = world.snapshot()
    thief = _worker(daemon, "thief")
    head = git(world.repo, "rev-parse", lease["branch"])
    calls: list[tuple[str, dict[str, Any]]] = [
        ("lease.heartbeat", {"progress": {"percent": 99, "message": "mine now"}}),
        ("handoff.report", {"report": {"status": "completed", "head": head}}),
        ("lease.release", {"reason": "stolen"}),
    ]
    for method, extra in calls:
        reply = thief.request(method, {"leaseId": lease["id"], "token": lease["token"], **extra})
        assert reply["error"]["code"] == -32001, reply
        assert "granted to worker 'owner', not 'thief'" in reply["error"]["message"]
    assert world.snapshot() == before
    # The rightful holder is unaffected.
    assert "result" in owner.request("lease.heartbeat",
                                     {"leaseId": lease["id"], "token": lease["token"]})
    owner.close()
    thief.close()


def test_replaying_an_old_token_after_the_lease_moved_on_is_refused(daemon: Daemon,
                                                                   world: World) -> None:
    worker = _worker(daemon, "w")
    old = worker.request("lease.acquire", {"waitS": 10})["result"]["lease"]
    assert "result" in worker.request("lease.release",
                                      {"leaseId": old["id"], "token": old["token"]})
    new = worker.request("lease.acquire", {"waitS": 10})["result"]["lease"]
    assert new["handoff"]["name"] == old["handoff"]["name"]
    assert new["token"] > old["token"]
    before = world.snapshot()
    head = git(world.repo, "rev-parse", new["branch"])
    for lease_id, token in ((old["id"], old["token"]), (new["id"], old["token"]),
                            (old["id"], new["token"])):
        for method, extra in (
            ("lease.heartbeat", {}),
            ("handoff.report", {"report": {"status": "completed", "head": head}}),
            ("lease.release", {"reason": "replay"}),
        ):
            reply = worker.request(method, {"leaseId": lease_id, "token": token, **extra})
            assert reply["error"]["code"] == -32001, (method, lease_id, token, reply)
            # The refusal never tells the token that would have worked.
            said = reply["error"]["message"].replace(old["id"], "").replace(new["id"], "")
            assert str(new["token"]) not in said.replace(f"token {token}", ""), said
    assert world.snapshot() == before
    worker.close()


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("handoff.submit", {"markdown": [handoff_doc("sneaky")]}),
        ("handoff.cancel", {"name": "existing"}),
        ("handoff.retry", {"name": "existing"}),
        ("handoff.list", {}),
        ("handoff.get", {"name": "existing"}),
        ("status", {}),
    ],
)
def test_a_control_call_from_a_worker_is_refused(daemon: Daemon, world: World, method: str,
                                                 params: dict[str, Any]) -> None:
    before = world.snapshot()
    worker = _worker(daemon, "w")
    reply = worker.request(method, params)
    assert reply["error"]["code"] == -32002, reply
    # Still connected, still a worker (a made-up lease is just not held).
    reply = worker.request("lease.heartbeat", {"leaseId": "l-made-up", "token": 1})
    assert reply["error"]["code"] == -32001
    worker.close()
    assert world.snapshot() == before


def test_a_peer_whose_uid_is_not_allowed_is_refused(tmp_path: Path, repo: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    # The socket must be reachable by uid nobody (pytest's tmp dirs are private to root).
    public = Path(tempfile.mkdtemp(prefix="orch-hostile-"))
    public.chmod(0o755)
    config = write_config(tmp_path, repo, extra='socket_mode = "0666"')
    config.write_text(config.read_text().replace(f'socket = "{tmp_path}/state/d.sock"',
                                                 f'socket = "{public}/d.sock"'))
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("existing")]})
        world = World(tmp_path, repo)
        before = world.snapshot()
        lines = _as_nobody(daemon.socket, [
            {"jsonrpc": "2.0", "id": 1, "method": "initialize",
             "params": {"protocolVersion": 1, "role": "control"}},
            {"jsonrpc": "2.0", "id": 2, "method": "handoff.cancel",
             "params": {"name": "existing"}},
        ])
        replies = [json.loads(line) for line in lines]
        assert replies[0]["error"]["code"] == -32002
        assert len(replies) == 1  # then disconnected: the cancel was never read
        assert world.snapshot() == before
        assert control(daemon.socket, "handoff.get", {"name": "existing"})["state"] == "queued"
    finally:
        daemon.stop()
        shutil.rmtree(public, ignore_errors=True)


def _as_nobody(path: Path, messages: list[dict[str, Any]]) -> list[bytes]:
    """Send ``messages`` in one write as uid/gid nobody; return the lines received."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(str(path))
                s.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in messages))
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                os.write(write_end, data)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return [line for line in data.split(b"\n") if line]
