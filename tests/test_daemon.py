"""The daemon end to end: real processes, the real socket, real git, a real SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import git
from harness import (
    EXAMPLES,
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


@pytest.fixture
def paused_daemon(tmp_path: Path, repo: Path) -> Iterator[Daemon]:
    """A daemon whose merge queue is paused, so reported handoffs stay ``reported``."""
    config = write_config(tmp_path, repo, merge="paused = true")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    yield daemon
    daemon.stop()


def cli(*args: str, socket: Path | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["--socket", str(socket)] if socket else []
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *prefix, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_workers_take_the_examples_in_priority_order(
    paused_daemon: Daemon, tmp_path: Path, repo: Path
) -> None:
    files = sorted(str(p) for p in EXAMPLES.glob("*.md"))
    # Submitted lowest priority first, to show that order comes from priority.
    submitted = cli("submit", *reversed(files), socket=paused_daemon.socket)
    assert submitted.returncode == 0, submitted.stderr
    worker = start_worker(
        paused_daemon.socket, "good.py", tmp_path / "worker.log", extra=["--exit-when-idle"]
    )
    assert worker.wait(timeout=120) == 0, (tmp_path / "worker.log").read_text()

    status = json.loads(cli("status", "--json", socket=paused_daemon.socket).stdout)
    assert status["counts"]["reported"] == 2
    assert status["counts"]["waiting"] == 1
    assert status["mergeQueue"] == ["handoff-1-critical", "handoff-2-patterns"]
    assert states(paused_daemon.socket) == {
        "handoff-1-critical": "reported",
        "handoff-2-patterns": "reported",
        "handoff-3-ux": "waiting",
    }
    first = control(paused_daemon.socket, "handoff.get", {"name": "handoff-1-critical"})
    second = control(paused_daemon.socket, "handoff.get", {"name": "handoff-2-patterns"})
    # HIGH before MEDIUM: the first lease was granted first (tokens are never shown).
    assert first["leases"][0]["grantedAt"] < second["leases"][0]["grantedAt"]
    assert all("token" not in lease for lease in first["leases"] + second["leases"])
    for record in (first, second):
        assert record["reports"][-1]["status"] == "completed"
        head = record["reports"][-1]["head"]
        assert git(repo, "rev-parse", f"handoff/{record['name']}") == head
        assert f"{record['name']}: the work" in git(repo, "log", "-1", "--format=%s", head)
    shown = cli("show", "handoff-1-critical", "--markdown", socket=paused_daemon.socket)
    assert shown.returncode == 0, shown.stderr
    assert "# HANDOFF: handoff-1-critical" in shown.stdout
    assert "**HANDOFF COMPLETED**" in shown.stdout


def test_worker_commits_what_the_agent_left_uncommitted(
    paused_daemon: Daemon, tmp_path: Path, repo: Path
) -> None:
    control(paused_daemon.socket, "handoff.submit", {"markdown": [handoff_doc("leftover")]})
    worker = start_worker(
        paused_daemon.socket,
        "good.py",
        tmp_path / "worker.log",
        extra=["--max-handoffs", "1"],
        env={"AGENT_LEAVE_UNCOMMITTED": "1"},
    )
    assert worker.wait(timeout=120) == 0
    assert states(paused_daemon.socket)["leftover"] == "reported"
    files = git(repo, "ls-tree", "-r", "--name-only", "handoff/leftover")
    assert "work/leftover.txt" in files.splitlines()


def test_killed_worker_loses_its_lease_and_the_next_attempt_keeps_its_commits(
    tmp_path: Path, repo: Path
) -> None:
    config = write_config(tmp_path, repo, ttl_s=1.5, heartbeat_s=0.3, merge="paused = true")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("fragile")]})
        dying = start_worker(daemon.socket, "dies.py", tmp_path / "w1.log", name="w1")

        def partial_committed() -> bool:
            record = control(daemon.socket, "handoff.get", {"name": "fragile"})
            return (record["progress"] or {}).get("message") == "partial work committed"

        wait_for(partial_committed, "the dying agent to commit part of its work")
        first = control(daemon.socket, "handoff.get", {"name": "fragile"})["leases"][0]
        # committed in the lease's own repository (the daemon takes it on the next lease)
        partial = git(Path(first["worktree"]), "rev-parse", "handoff/fragile")
        kill_group(dying)

        def requeued() -> bool:
            record = control(daemon.socket, "handoff.get", {"name": "fragile"})
            return bool(record["state"] == "queued" and record["attempt"] == 2)

        wait_for(requeued, "the lease to expire and the handoff to be re-queued")

        # A call about the expired lease gets -32001 and changes nothing. Its token is never
        # shown outside the holder; the first lease of a new store has token 1.
        conn = Conn(daemon.socket)
        conn.initialize("worker", "late")
        reply = conn.request("lease.heartbeat", {"leaseId": first["id"], "token": 1})
        assert reply["error"]["code"] == -32001
        conn.close()
        assert states(daemon.socket)["fragile"] == "queued"

        good = start_worker(
            daemon.socket, "good.py", tmp_path / "w2.log", name="w2", extra=["--max-handoffs", "1"]
        )
        assert good.wait(timeout=120) == 0
        record = control(daemon.socket, "handoff.get", {"name": "fragile"})
        assert record["state"] == "reported"
        second = record["leases"][1]
        assert second["attempt"] == 2 and second["id"] != first["id"]
        assert second["baseCommit"] == partial  # the worktree started from the earlier work
        history = git(repo, "log", "--format=%s", "handoff/fragile")
        assert "fragile: partial work before dying" in history
        assert "fragile: the work" in history
        assert any(e["event"] == "lease_expired" for e in daemon.logs())
    finally:
        daemon.stop()


def test_expiry_beyond_max_attempts_fails_the_handoff(tmp_path: Path, repo: Path) -> None:
    # The connection stays silent on purpose, waiting for lease.revoked: longer than the
    # idle limit, which would otherwise be the 0.5 s TTL.
    config = write_config(
        tmp_path, repo, ttl_s=0.5, heartbeat_s=0.1, max_attempts=2, merge="paused = true",
        extra="idle_timeout_s = 60",
    )
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("doomed")]})
        conn = Conn(daemon.socket)
        conn.initialize("worker")
        for attempt in (1, 2):
            lease = conn.request("lease.acquire", {"waitS": 30})["result"]["lease"]
            assert lease["attempt"] == attempt
            # No heartbeats: it expires, and we are told so.
            revoked = conn.recv()
            assert revoked == {
                "jsonrpc": "2.0",
                "method": "lease.revoked",
                "params": {"leaseId": lease["id"], "reason": "expired"},
            }
        wait_for(lambda: states(daemon.socket)["doomed"] == "failed", "the handoff to fail")
        conn.close()
    finally:
        daemon.stop()


def test_dispatch_respects_dependencies_priority_and_labels(paused_daemon: Daemon) -> None:
    docs = [
        handoff_doc("low", priority="LOW"),
        handoff_doc("needs-gpu", priority="HIGH", labels="gpu"),
        handoff_doc("high", priority="HIGH"),
        handoff_doc("after-high", priority="HIGH", deps="high"),
    ]
    control(paused_daemon.socket, "handoff.submit", {"markdown": docs})
    assert states(paused_daemon.socket)["after-high"] == "waiting"
    plain = Conn(paused_daemon.socket)
    plain.initialize("worker", "plain")
    got = []
    for _ in range(2):
        lease = plain.request("lease.acquire", {"waitS": 0})["result"]["lease"]
        got.append(lease["handoff"]["name"])
    assert got == ["high", "low"]  # needs-gpu is not for this worker; after-high waits
    assert plain.request("lease.acquire", {"waitS": 0})["result"] == {"lease": None}
    gpu = Conn(paused_daemon.socket)
    gpu.initialize("worker", "gpu", labels=["gpu"])
    lease = gpu.request("lease.acquire", {"waitS": 0})["result"]["lease"]
    assert lease["handoff"]["name"] == "needs-gpu"
    assert lease["handoff"]["labels"] == ["gpu"]
    plain.close()
    gpu.close()


def test_long_poll_is_woken_by_a_submission(paused_daemon: Daemon) -> None:
    conn = Conn(paused_daemon.socket)
    conn.initialize("worker")
    conn.send_raw(b'{"jsonrpc":"2.0","id":7,"method":"lease.acquire","params":{"waitS":60}}\n')
    control(paused_daemon.socket, "handoff.submit", {"markdown": [handoff_doc("late")]})
    reply = conn.recv()
    assert reply is not None and reply["id"] == 7
    assert reply["result"]["lease"]["handoff"]["name"] == "late"
    conn.close()


def test_cancel_revokes_the_lease_and_stops_the_agent(
    paused_daemon: Daemon, tmp_path: Path
) -> None:
    control(paused_daemon.socket, "handoff.submit", {"markdown": [handoff_doc("endless")]})
    worker = start_worker(
        paused_daemon.socket, "hangs.py", tmp_path / "w.log", extra=["--max-handoffs", "1"]
    )
    wait_for(lambda: states(paused_daemon.socket)["endless"] == "leased", "the lease")
    result = cli("cancel", "endless", socket=paused_daemon.socket)
    assert result.returncode == 0, result.stderr
    # The worker hears lease.revoked, stops its agent and, with --max-handoffs 1, exits.
    assert worker.wait(timeout=60) == 0
    record = control(paused_daemon.socket, "handoff.get", {"name": "endless"})
    assert record["state"] == "cancelled"
    assert record["leases"][0]["endReason"] == "cancelled"
    retried = cli("retry", "endless", socket=paused_daemon.socket)
    assert retried.returncode == 0, retried.stderr
    assert states(paused_daemon.socket)["endless"] == "queued"


def test_daemon_killed_and_restarted_keeps_everything(tmp_path: Path, repo: Path) -> None:
    config = write_config(tmp_path, repo, ttl_s=60, merge="paused = true")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    control(
        daemon.socket,
        "handoff.submit",
        {"markdown": [handoff_doc("kept-a", priority="HIGH"), handoff_doc("kept-b")]},
    )
    conn = Conn(daemon.socket)
    conn.initialize("worker")
    first = conn.request("lease.acquire", {"waitS": 5})["result"]["lease"]
    worktree = Path(first["worktree"])
    (worktree / "done.txt").write_text("done\n")
    git(worktree, "add", "-A")
    git(worktree, "commit", "-q", "-m", "kept-a work")
    head = git(worktree, "rev-parse", "HEAD")
    reply = conn.request(
        "handoff.report",
        {
            "leaseId": first["id"],
            "token": first["token"],
            "report": {"status": "completed", "summary": "ok", "head": head},
        },
    )
    assert reply["result"] == {"accepted": True}
    second = conn.request("lease.acquire", {"waitS": 5})["result"]["lease"]
    conn.close()

    daemon.kill()
    daemon.start()

    record = control(daemon.socket, "handoff.get", {"name": "kept-a"})
    assert record["state"] == "reported"
    assert record["reports"][0]["head"] == head
    assert states(daemon.socket) == {"kept-a": "reported", "kept-b": "leased"}
    conn = Conn(daemon.socket)
    conn.initialize("worker")
    beat = conn.request("lease.heartbeat", {"leaseId": second["id"], "token": second["token"]})
    assert "expiresAt" in beat["result"], beat
    # Fencing tokens keep increasing across the restart.
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("kept-c")]})
    third = conn.request("lease.acquire", {"waitS": 5})["result"]["lease"]
    assert third["token"] > second["token"]
    conn.close()
    daemon.stop()


def test_a_second_daemon_on_the_same_state_dir_refuses(paused_daemon: Daemon) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--config", str(paused_daemon.config), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert "another orchestrator daemon" in second.stderr
    assert control(paused_daemon.socket, "status")["integrationBranch"] == "main"


def test_structured_submission_list_filter_and_release(paused_daemon: Daemon) -> None:
    result = control(paused_daemon.socket, "handoff.submit", {"handoffs": [{
        "name": "structured", "title": "Built from JSON", "priority": "high",
        "dependencies": [], "labels": [],
        "phases": [{"name": "Only", "objectives": ["do it"]}],
        "successMetrics": [{"name": "Overall", "criteria": "it is done"}],
    }]})
    assert result == {"names": ["structured"]}
    record = control(paused_daemon.socket, "handoff.get", {"name": "structured"})
    assert record["title"] == "Built from JSON" and record["priority"] == "HIGH"
    assert record["body"].startswith("# HANDOFF: structured - PENDING")
    for key in ("name", "title", "priority", "state", "attempt", "dependencies", "progress",
                "updatedAt", "body", "leases", "reports", "gates", "conflicts", "mergeCommit"):
        assert key in record, key
    listed = control(paused_daemon.socket, "handoff.list", {"state": "queued"})["handoffs"]
    assert [h["name"] for h in listed] == ["structured"]
    assert control(paused_daemon.socket, "handoff.list", {"state": "merged"}) == {"handoffs": []}

    conn = Conn(paused_daemon.socket)
    conn.initialize("worker")
    lease = conn.request("lease.acquire", {"waitS": 5})["result"]["lease"]
    assert lease["handoff"]["phases"] == [{"name": "Only", "objectives": ["do it"]}]
    assert lease["handoff"]["feedback"] is None
    released = conn.request("lease.release", {"leaseId": lease["id"], "token": lease["token"],
                                              "reason": "not my kind of work"})
    assert released["result"] == {}
    again = conn.request("lease.acquire", {"waitS": 5})["result"]["lease"]
    assert again["handoff"]["name"] == "structured" and again["attempt"] == 2
    assert again["token"] > lease["token"]
    conn.close()


def test_graceful_stop_answers_long_polls_and_keeps_leases(tmp_path: Path, repo: Path) -> None:
    config = write_config(tmp_path, repo, ttl_s=60, merge="paused = true")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("held")]})
    holder = Conn(daemon.socket)
    holder.initialize("worker")
    lease = holder.request("lease.acquire", {"waitS": 5})["result"]["lease"]
    poller = Conn(daemon.socket)
    poller.initialize("worker")
    poller.send_raw(b'{"jsonrpc":"2.0","id":5,"method":"lease.acquire","params":{"waitS":300}}\n')
    # Requests are read in order: once a later one is answered, the long poll is running.
    assert "result" in poller.request("lease.heartbeat", {"leaseId": lease["id"],
                                                          "token": lease["token"]})
    assert daemon.stop() == 0
    reply = poller.recv()
    assert reply == {"jsonrpc": "2.0", "id": 5, "result": {"lease": None}}
    poller.close()
    holder.close()
    daemon.start()
    conn = Conn(daemon.socket)
    conn.initialize("worker")
    beat = conn.request("lease.heartbeat", {"leaseId": lease["id"], "token": lease["token"]})
    assert "expiresAt" in beat["result"]
    conn.close()
    daemon.stop()


def test_default_state_dir_is_in_the_working_directory(tmp_path: Path, repo: Path) -> None:
    elsewhere = tmp_path / "configs"
    elsewhere.mkdir()
    config = elsewhere / "orchestrator.toml"
    config.write_text(f'[repository]\npath = "{repo}"\n[metrics]\nlisten = ""\n')
    run = tmp_path / "run"
    run.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--config", str(config), "check-config"],
        capture_output=True, text=True, timeout=60, cwd=run,
    )
    assert result.returncode == 0, result.stderr
    assert f"state dir    {run / '.orchestrator'}" in result.stdout
