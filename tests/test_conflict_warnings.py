"""Early conflict warnings: a heartbeat's head is checked against the integration branch
and the merge queue ahead, and each new set of conflicting paths is sent once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import git
from harness import Conn, Daemon, handoff_doc, write_config

from orchestrator.protocol.jsonrpc import INVALID_PARAMS

pytestmark = pytest.mark.slow


def commit_all(worktree: Path, message: str) -> str:
    git(worktree, "add", "-A")
    git(worktree, "-c", "user.name=a", "-c", "user.email=a@x", "commit", "-q", "-m", message)
    return git(worktree, "rev-parse", "HEAD")


def warnings_after(conn: Conn, lease: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """The lease.warning notifications once ``count`` have come (bounded wait)."""
    deadline = time.monotonic() + 60
    while True:
        found = [n["params"] for n in conn.notifications if n.get("method") == "lease.warning"]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        # A heartbeat without a head asks for nothing; it only lets notifications in.
        conn.request("lease.heartbeat", {"leaseId": lease["id"], "token": lease["token"]})
        time.sleep(0.05)


def test_a_heartbeat_head_that_would_conflict_is_warned_once_per_set_of_paths(
    tmp_path: Path, repo: Path
) -> None:
    daemon = Daemon(write_config(tmp_path, repo, merge="paused = true"),
                    tmp_path / "daemon.log").start()
    first, second = Conn(daemon.socket), Conn(daemon.socket)
    try:
        control = Conn(daemon.socket)
        control.initialize("control")
        control.request("handoff.submit", {"markdown": [
            handoff_doc("ahead", priority="HIGH"), handoff_doc("mine", priority="LOW")]})
        control.close()
        # "ahead" is reported (and waits in the paused queue) with its change to app.py.
        assert "warnings" in first.initialize("worker", name="w1")["capabilities"]
        ahead = first.request("lease.acquire", {"waitS": 5})["result"]["lease"]
        assert ahead["handoff"]["name"] == "ahead"
        (Path(ahead["worktree"]) / "src" / "app.py").write_text("def answer():\n    return 43\n")
        ahead_head = commit_all(Path(ahead["worktree"]), "ahead's change")
        reply = first.request("handoff.report", {
            "leaseId": ahead["id"], "token": ahead["token"],
            "report": {"status": "completed", "summary": "done", "head": ahead_head}})
        assert reply["result"] == {"accepted": True}

        second.initialize("worker", name="w2")
        mine = second.request("lease.acquire", {"waitS": 5})["result"]["lease"]
        worktree = Path(mine["worktree"])
        (worktree / "src" / "app.py").write_text("def answer():\n    return 44\n")
        (worktree / "README.md").write_text("mine\n")
        head = commit_all(worktree, "my change")
        # Meanwhile a person changes README.md on main.
        (repo / "README.md").write_text("a person's\n")
        commit_all(repo, "a person's change")

        def beat(sha: str) -> dict[str, Any]:
            return second.request("lease.heartbeat", {
                "leaseId": mine["id"], "token": mine["token"], "head": sha})

        assert "result" in beat(head)
        got = warnings_after(second, mine, 2)
        assert sorted((w["with"], tuple(w["paths"])) for w in got) == [
            ("ahead", ("src/app.py",)), ("main", ("README.md",))]
        assert all(w["leaseId"] == mine["id"] and w["kind"] == "conflict" for w in got)

        # The same head again, and a new head with the same conflicts: nothing new.
        assert "result" in beat(head)
        (worktree / "notes.txt").write_text("more work\n")
        head = commit_all(worktree, "more work")
        assert "result" in beat(head)
        # Resolving README.md but clashing in a new path is a new set: warned again.
        (worktree / "README.md").write_text("a person's\n")
        head = commit_all(worktree, "take main's README")
        git(repo, "rm", "-q", "src/app.py")
        commit_all(repo, "a person removes app.py")
        assert "result" in beat(head)
        # Checks run in order, so this one coming means none came for the two before.
        got = warnings_after(second, mine, 3)
        assert len(got) == 3
        assert got[2]["with"] == "main" and got[2]["paths"] == ["src/app.py"]

        bad = second.request("lease.heartbeat", {
            "leaseId": mine["id"], "token": mine["token"], "head": "not a sha"})
        assert bad["error"]["code"] == INVALID_PARAMS
    finally:
        first.close()
        second.close()
        daemon.stop()
