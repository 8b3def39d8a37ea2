"""`orchestrator mcp` end to end: a real daemon, a real worker, and an agent that speaks
MCP to the server through the SDK's own stdio client."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import git
from harness import Daemon, control, handoff_doc, kill_group, start_worker, wait_for, write_config

pytest.importorskip("mcp", reason="the MCP SDK is the optional extra orchestrator[mcp]")

from orchestrator.agent import channel
from orchestrator.agent.asking import Asking
from orchestrator.agent.channel import LeaseChannel
from orchestrator.protocol.lease_grant import LeasedHandoff, LeaseGrant

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path, repo: Path) -> Iterator[Daemon]:
    config = write_config(tmp_path, repo, merge="paused = true")
    running = Daemon(config, tmp_path / "daemon.log").start()
    yield running
    running.stop()


def _summary(daemon: Daemon, name: str) -> dict[str, Any]:
    return next(
        h for h in control(daemon.socket, "handoff.list")["handoffs"] if h["name"] == name
    )


def test_an_agent_does_its_whole_lease_over_mcp(
    daemon: Daemon, tmp_path: Path, repo: Path
) -> None:
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("indent")]})
    log = tmp_path / "worker.log"
    record_base = tmp_path / "record"
    worker = start_worker(
        daemon.socket,
        "mcp_client.py",
        log,
        extra=["--max-handoffs", "1"],
        env={"MCP_AGENT_RECORD": str(record_base)},
    )
    try:
        needs = wait_for(lambda: _summary(daemon, "indent")["needsInput"], "the MCP question")
        assert needs["question"] == "Tabs or spaces?"
        assert needs["choices"] == ["tabs", "spaces"]
        # Sent with the next heartbeat.
        wait_for(
            lambda: _summary(daemon, "indent")["progress"]
            == {"percent": 30, "phase": "Do it", "message": "thinking"},
            "the progress reported over MCP",
        )
        control(daemon.socket, "handoff.answer", {"name": "indent", "answer": "spaces"})
        assert worker.wait(timeout=120) == 0, log.read_text()
    finally:
        kill_group(worker)
    record = json.loads(Path(f"{record_base}.indent.json").read_text())
    assert record["tools"] == [
        "ask_person", "get_handoff", "list_warnings", "report_progress", "submit_report"
    ]
    assert "# HANDOFF: indent" in record["handoff"]
    assert record["answer"] == "spaces"
    assert record["warnings"] == []
    assert record["bad_progress"]["is_error"]
    assert "0 to 100" in record["bad_progress"]["text"]
    # The lease's channel went away with the lease: nothing can act for it any more.
    assert not os.path.exists(record["socket"])

    got = control(daemon.socket, "handoff.get", {"name": "indent"})
    assert got["state"] == "reported"
    report = got["reports"][-1]
    assert report["status"] == "completed"
    assert report["summary"] == "Indented with spaces, as the person said."
    assert report["phases"] == [
        {"name": "Do it", "done": True,
         "objectives": [{"text": "Make the change for indent", "done": True}]}
    ]
    assert report["metrics"] == [
        {"name": "Overall", "result": "the tests pass", "achieved": True}
    ]
    # Rendered by the worker in the template, not written by the agent.
    assert report["markdown"] == record["report"]
    assert "## IMPLEMENTATION COMPLETED" in report["markdown"]
    assert "**HANDOFF COMPLETED**: Indented with spaces" in report["markdown"]
    head = git(repo, "rev-parse", "handoff/indent")
    assert git(repo, "show", f"{head}:work/indent.txt") == "indented with spaces"


def test_the_server_refuses_to_run_without_a_lease() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_AGENT_SOCKET"}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "mcp"],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert "orchestrator worker" in done.stderr


PEEK = """
import json, os, socket, sys
os.setgroups([])
os.setgid(int(sys.argv[3]))
os.setuid(int(sys.argv[2]))
s = socket.socket(socket.AF_UNIX)
s.settimeout(20)
s.connect(sys.argv[1])
s.sendall(b'{"op": "handoff"}\\n')
buf = b""
while not buf.endswith(b"\\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
print(buf.decode())
"""


def _second_user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as a second user")
    try:
        return pwd.getpwnam("orch-agent-test")
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "orch-agent-test"], check=True
        )
        return pwd.getpwnam("orch-agent-test")


@pytest.mark.anyio
async def test_another_uid_cannot_use_a_lease_channel(tmp_path: Path) -> None:
    other = _second_user()
    # As if an agent loosened its lease directory: only the uid check is left.
    loose = Path(tempfile.mkdtemp(prefix="orch-channel-"))
    try:
        os.chmod(loose, 0o755)
        files = loose / "files"
        os.mkdir(files)
        asked: list[str] = []

        async def daemon_call(method: str, params: dict[str, Any]) -> dict[str, Any]:
            asked.append(method)
            return {}

        lease = LeaseGrant(
            id="l-1", token=1, worktree=str(tmp_path), branch="b", base_commit="0" * 40,
            integration_commit=None, attempt=1, expires_at=0.0,
            handoff=LeasedHandoff(
                name="h", title="h", priority="HIGH", dependencies=(), labels=(),
                body=handoff_doc("h"), phases=(), success_metrics=(), feedback=None,
            ),
        )
        chan = LeaseChannel(
            lease=lease, asking=Asking("l-1", 1, files / "answer.txt"), call=daemon_call,
            progress_file=files / "progress", report_file=files / "report.md",
        )
        path = loose / "agent.sock"
        async with anyio.create_task_group() as tg:
            await tg.start(chan.serve, path)
            os.chmod(path, 0o666)
            mine = await channel.request(path, {"op": "handoff"}, timeout_s=20)
            assert mine["handoff"]["name"] == "h"
            theirs = await anyio.run_process(
                [sys.executable, "-c", PEEK, str(path), str(other.pw_uid), str(other.pw_gid)]
            )
            tg.cancel_scope.cancel()
        reply = json.loads(theirs.stdout)
        assert reply == {"error": f"uid {other.pw_uid} may not use this lease's channel"}
        assert asked == []
    finally:
        shutil.rmtree(loose)


def test_an_answer_given_while_the_worker_is_away_reaches_the_mcp_tool(
    tmp_path: Path, repo: Path
) -> None:
    config = write_config(tmp_path, repo, merge="paused = true")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    log = tmp_path / "worker.log"
    worker = None
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("away")]})
        worker = start_worker(
            daemon.socket, "mcp_client.py", log, extra=["--max-handoffs", "1"],
            env={"MCP_AGENT_RECORD": str(tmp_path / "record")},
        )
        wait_for(lambda: _summary(daemon, "away")["needsInput"], "the MCP question")
        # The daemon dies: the worker loses its connection while its agent waits.
        daemon.kill()
        daemon.start()
        # Answered before the worker is back (or just as it is): nobody hears a
        # notification, so the answer waits for the worker's next heartbeat.
        control(daemon.socket, "handoff.answer", {"name": "away", "answer": "tabs"})
        assert worker.wait(timeout=120) == 0, log.read_text()
    finally:
        if worker is not None:
            kill_group(worker)
        daemon.stop()
    record = json.loads((tmp_path / "record.away.json").read_text())
    assert record["answer"] == "tabs"
    head = git(repo, "rev-parse", "handoff/away")
    assert git(repo, "show", f"{head}:work/away.txt") == "indented with tabs"
