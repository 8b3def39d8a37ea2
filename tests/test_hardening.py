"""Regression tests for the ways a peer, an agent or a person could hurt the daemon."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import git
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


@pytest.fixture
def daemon(tmp_path: Path, repo: Path) -> Iterator[Daemon]:
    running = Daemon(write_config(tmp_path, repo, merge="paused = true"),
                     tmp_path / "daemon.log").start()
    yield running
    running.stop()


def test_text_that_is_not_unicode_never_crashes_the_daemon(daemon: Daemon) -> None:
    conn = Conn(daemon.socket)
    conn.send_raw(b'{"jsonrpc":"2.0","id":"\\ud800","method":"status"}\n')
    reply = conn.recv()
    assert reply is not None and reply["error"]["code"] == -32700
    conn.send_raw(b"[" * 100_000 + b"\n")
    reply = conn.recv()
    assert reply is not None and reply["error"]["code"] == -32700
    conn.send_raw(b'{"jsonrpc":"2.0","id":2,"method":"initialize","params":'
                  b'{"protocolVersion":1,"role":"worker","worker":{"name":"\\ud800"}}}\n')
    reply = conn.recv()
    assert reply is not None and reply["error"]["code"] == -32700
    assert "surrogate" in reply["error"]["message"]
    assert "counts" in control(daemon.socket, "status")
    conn.close()


def test_untracked_file_with_a_non_utf8_name_is_reported_not_fatal(daemon: Daemon) -> None:
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("bytes")]})
    conn = Conn(daemon.socket)
    conn.initialize("worker")
    lease = conn.request("lease.acquire", {"waitS": 5})["result"]["lease"]
    worktree = Path(lease["worktree"])
    with open(os.fsencode(worktree) + b"/caf\xe9.txt", "w") as f:
        f.write("latin-1 name\n")
    head = git(worktree, "rev-parse", "HEAD")
    reply = conn.request("handoff.report", {"leaseId": lease["id"], "token": lease["token"],
                                            "report": {"status": "completed", "head": head}})
    assert reply["error"]["code"] == -32007
    assert "caf" in reply["error"]["data"]["reason"]
    assert "counts" in control(daemon.socket, "status")
    conn.close()


def test_a_retried_report_after_a_lost_reply_is_accepted_once(daemon: Daemon) -> None:
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("twice")]})
    conn = Conn(daemon.socket)
    conn.initialize("worker")
    lease = conn.request("lease.acquire", {"waitS": 5})["result"]["lease"]
    head = git(Path(lease["worktree"]), "rev-parse", "HEAD")
    params = {"leaseId": lease["id"], "token": lease["token"],
              "report": {"status": "completed", "summary": "nothing to do", "head": head}}
    assert conn.request("handoff.report", params)["result"] == {"accepted": True}
    assert conn.request("handoff.report", params)["result"] == {"accepted": True}
    assert len(control(daemon.socket, "handoff.get", {"name": "twice"})["reports"]) == 1
    conn.close()


def test_stopping_a_worker_stops_its_agent_and_gives_the_lease_back(daemon: Daemon,
                                                                    tmp_path: Path) -> None:
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("interrupted")]})
    worker = start_worker(daemon.socket, "hangs.py", tmp_path / "w.log")
    wait_for(lambda: (control(daemon.socket, "handoff.get", {"name": "interrupted"})
                      ["progress"] or {}).get("message") == "thinking forever",
             "the agent to start")
    agents = _agent_pids("hangs.py", tmp_path)
    assert agents
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    wait_for(lambda: not any(map(_alive, agents)), "the agent to be stopped")
    record = control(daemon.socket, "handoff.get", {"name": "interrupted"})
    assert record["state"] == "queued"
    assert record["leases"][0]["endReason"] == "released"


def test_a_worker_killed_outright_takes_its_agent_with_it(daemon: Daemon,
                                                          tmp_path: Path) -> None:
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("orphan")]})
    worker = start_worker(daemon.socket, "hangs.py", tmp_path / "w.log")
    wait_for(lambda: _agent_pids("hangs-child", tmp_path), "the agent and its child to start")
    agents = _agent_pids("hangs.py", tmp_path) + _agent_pids("hangs-child", tmp_path)
    kill_group(worker)  # SIGKILL: the worker runs no cleanup at all
    wait_for(lambda: not any(map(_alive, agents)), "the orphaned agent and its child to die")


def test_cancelled_while_gating_never_lands(tmp_path: Path, repo: Path) -> None:
    started = tmp_path / "gate-started"
    release = tmp_path / "gate-release"
    gate_script = tmp_path / "gate.py"
    gate_script.write_text(
        "import time\nfrom pathlib import Path\n"
        f"Path({str(started)!r}).write_text('x')\n"
        f"while not Path({str(release)!r}).exists():\n    time.sleep(0.05)\n"
    )
    gates = f'[[gates]]\nname = "slow"\nrun = ["{sys.executable}", "{gate_script}"]\n'
    daemon = Daemon(write_config(tmp_path, repo, gates=gates), tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("changed-mind")]})
        wait_for(started.exists, "the gate to start")
        control(daemon.socket, "handoff.cancel", {"name": "changed-mind"})
        release.write_text("go")
        wait_for(lambda: not control(daemon.socket, "status")["mergeQueue"],
                 "the merge queue to let go of it")
        assert states(daemon.socket)["changed-mind"] == "cancelled"
        assert len(git(repo, "rev-list", "main").splitlines()) == 1
    finally:
        kill_group(worker)
        daemon.stop()


def test_commits_made_after_the_report_are_not_merged(tmp_path: Path, repo: Path) -> None:
    daemon = Daemon(write_config(tmp_path, repo, merge="paused = true"),
                    tmp_path / "daemon.log").start()
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("sneaky")]})
        conn = Conn(daemon.socket)
        conn.initialize("worker")
        lease = conn.request("lease.acquire", {"waitS": 5})["result"]["lease"]
        worktree = Path(lease["worktree"])
        (worktree / "reported.txt").write_text("reviewed work\n")
        git(worktree, "add", "-A")
        git(worktree, "commit", "-q", "-m", "reported work")
        head = git(worktree, "rev-parse", "HEAD")
        reply = conn.request("handoff.report", {"leaseId": lease["id"], "token": lease["token"],
                                                "report": {"status": "completed", "head": head}})
        assert reply["result"] == {"accepted": True}
        conn.close()
        # A stale agent keeps committing after its report was accepted.
        (worktree / "unreported.txt").write_text("nobody reported this\n")
        git(worktree, "add", "-A")
        git(worktree, "commit", "-q", "-m", "unreported work")
    finally:
        daemon.stop()
    config = write_config(tmp_path, repo)  # the same state dir, merging on
    daemon = Daemon(config, tmp_path / "daemon2.log").start()
    try:
        wait_for(lambda: states(daemon.socket)["sneaky"] == "merged", "the merge")
        files = git(repo, "ls-tree", "-r", "--name-only", "main").splitlines()
        assert "reported.txt" in files and "unreported.txt" not in files
    finally:
        daemon.stop()


def test_a_broken_merge_job_is_held_and_the_daemon_carries_on(tmp_path: Path,
                                                              repo: Path) -> None:
    daemon = Daemon(write_config(tmp_path, repo, merge="paused = true"),
                    tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log",
                          extra=["--max-handoffs", "2"])
    control(daemon.socket, "handoff.submit", {"markdown": [
        handoff_doc("doomed", priority="HIGH"), handoff_doc("fine", priority="LOW")]})
    assert worker.wait(timeout=120) == 0
    daemon.stop()
    # Someone deletes the reported branch (and the daemon's copy of the lease's head) and
    # garbage-collects its commits away.
    shutil.rmtree(tmp_path / "state" / "worktrees" / "doomed")
    git(repo, "branch", "-D", "handoff/doomed")
    git(repo, "update-ref", "-d", "refs/orchestrator/leases/doomed")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    git(repo, "gc", "-q", "--prune=now")
    daemon = Daemon(write_config(tmp_path, repo), tmp_path / "daemon2.log").start()
    try:
        wait_for(lambda: states(daemon.socket) == {"doomed": "failed", "fine": "merged"},
                 "the broken job held and the next one merged")
        detail = control(daemon.socket, "handoff.get", {"name": "doomed"})["detail"]
        assert "merge failed" in detail and "retry" in detail
    finally:
        daemon.stop()


def _agent_pids(script: str, within: Path) -> list[int]:
    """Live processes running ``script`` whose worktree lies in ``within`` (this test's
    tmp_path: other test runs on the machine have agents of their own)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        mine = f"ORCHESTRATOR_WORKTREE={within}".encode() in environ
        if mine and any(part.endswith(script.encode()) for part in cmdline) and _alive(
            int(entry.name)
        ):
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_an_agent_that_breaks_its_worktree_never_commits_onto_main(tmp_path: Path,
                                                                   repo: Path) -> None:
    # The default state dir lives inside the project: exactly where an upward search for
    # a repository from a broken worktree would land on the main checkout.
    config = write_config(tmp_path, repo, merge="paused = true")
    config.write_text(config.read_text().replace(f'"{tmp_path}/state', f'"{repo}/.orchestrator'))
    (repo / ".git" / "info" / "exclude").write_text(".orchestrator/\n")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("vandal")]})
        worker = start_worker(daemon.socket, "breaks_worktree.py", tmp_path / "w.log",
                              extra=["--max-handoffs", "1"])
        assert worker.wait(timeout=120) == 0
        assert len(git(repo, "rev-list", "main").splitlines()) == 1
        assert git(repo, "status", "--porcelain") == ""
        record = control(daemon.socket, "handoff.get", {"name": "vandal"})
        assert record["state"] == "queued" and record["attempt"] == 2
        assert "no longer a git worktree" in record["detail"]
    finally:
        daemon.stop()


def test_an_agent_that_changes_nothing_does_not_complete(daemon: Daemon, tmp_path: Path) -> None:
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("idle")]})
    worker = start_worker(daemon.socket, "does_nothing.py", tmp_path / "w.log",
                          extra=["--max-handoffs", "1"])
    assert worker.wait(timeout=120) == 0
    record = control(daemon.socket, "handoff.get", {"name": "idle"})
    assert record["state"] == "failed"
    assert record["reports"][0]["status"] == "failed"
    assert "without committing" in record["reports"][0]["summary"]


def test_cancelled_while_waiting_for_a_dirty_checkout_never_lands(tmp_path: Path,
                                                                  repo: Path) -> None:
    daemon = Daemon(write_config(tmp_path, repo), tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    (repo / "README.md").write_text("a person's unsaved edit\n")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("patient")]})
        wait_for(lambda: control(daemon.socket, "status")["mergeBlocked"], "the blocked merge")
        control(daemon.socket, "handoff.cancel", {"name": "patient"})
        wait_for(lambda: control(daemon.socket, "status")["mergeBlocked"] is None,
                 "the merge queue to let go of it")
        git(repo, "checkout", "README.md")
        record = control(daemon.socket, "handoff.get", {"name": "patient"})
        assert record["state"] == "cancelled"
        assert record["merges"][-1]["result"] == "superseded"
        assert len(git(repo, "rev-list", "main").splitlines()) == 1
    finally:
        kill_group(worker)
        daemon.stop()


def test_crash_between_moving_the_branch_and_updating_its_checkout(tmp_path: Path,
                                                                   repo: Path) -> None:
    from orchestrator.git.workspace import Workspace
    from orchestrator.store.sqlite import Store

    daemon = Daemon(write_config(tmp_path, repo, merge="paused = true"),
                    tmp_path / "paused.log").start()
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("torn")]})
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log",
                          extra=["--max-handoffs", "1"])
    assert worker.wait(timeout=120) == 0
    daemon.stop()
    # Replay the merge queue up to the moment of the crash: intent recorded, the branch
    # moved (compare-and-swap), the checkout of main not yet updated.
    store = Store.open(tmp_path / "state" / "orchestrator.sqlite3")
    job = store.next_merge_jobs(limit=1, now=1.0)[0]
    workspace = Workspace(repo, "main", tmp_path / "state" / "worktrees")
    result = workspace.merge_candidate("handoff/torn", strategy="merge", message="Merge torn",
                                       head=job.head)
    assert result.candidate is not None
    store.record_landing_intent("torn", attempt=1, base=result.base,
                                candidate=result.candidate, now=2.0)
    store.close()
    git(repo, "update-ref", "refs/heads/main", result.candidate, result.base)
    assert git(repo, "status", "--porcelain")  # the checkout now looks dirty

    daemon = Daemon(write_config(tmp_path, repo), tmp_path / "daemon.log").start()
    try:
        wait_for(lambda: states(daemon.socket)["torn"] == "merged", "the recovered merge")
        assert git(repo, "status", "--porcelain") == ""
        assert (repo / "work" / "torn.txt").exists()
        assert control(daemon.socket, "status")["mergeBlocked"] is None
        assert any(e["event"] == "checkout_update_finished" for e in daemon.logs())
    finally:
        daemon.stop()
