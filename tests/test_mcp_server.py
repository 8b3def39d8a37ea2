"""`orchestrator mcp` end to end: a real daemon, a real worker, and an agent that speaks
MCP to the server through the SDK's own stdio client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import git
from harness import Daemon, control, handoff_doc, kill_group, start_worker, wait_for, write_config

pytest.importorskip("mcp", reason="the MCP SDK is the optional extra orchestrator[mcp]")

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path, repo: Path) -> Iterator[Daemon]:
    config = write_config(tmp_path, repo, merge="paused = true")
    running = Daemon(config, tmp_path / "daemon.log").start()
    yield running
    running.stop()


def _summary(daemon: Daemon, name: str) -> dict:
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
