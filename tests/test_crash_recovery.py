"""Start-up reconciliation: what a crash (or a person, while the daemon was down) leaves
out of step between the store and the repository is repaired, or reported when only a
person can decide, with one ``reconcile_*`` log event per item.

(The SIGKILL loop that used to live here grew into tests/test_chaos.py: 30 handoffs, four
workers, a gate, ten or more seeded kills, and the checks after them.)
"""

from __future__ import annotations

import sys
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

from orchestrator.git.workspace import Workspace

pytestmark = pytest.mark.slow


def _repairs(daemon: Daemon, since: int) -> list[dict[str, object]]:
    return [e for e in daemon.logs()[since:] if str(e.get("event", "")).startswith("reconcile_")]


def test_start_up_repairs_what_it_can_and_reports_the_rest(tmp_path: Path, repo: Path) -> None:
    gates = f'[[gates]]\nname = "ok"\nrun = ["{sys.executable}", "-c", "pass"]\n'
    config = write_config(tmp_path, repo, gates=gates, ttl_s=600)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("landed")]})
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log",
                          extra=["--max-handoffs", "1"])
    wait_for(lambda: states(daemon.socket)["landed"] == "merged", "the first merge")
    kill_group(worker)
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("moved")]})
    conn = Conn(daemon.socket)
    conn.initialize("worker", "w")
    lease = conn.request("lease.acquire", {"waitS": 10})["result"]["lease"]
    conn.close()
    daemon.kill()

    # While it is down: the pieces a crash or a person leave behind.
    worktrees = tmp_path / "state" / "worktrees"
    ws = Workspace(repo, "main", worktrees)
    # 1. A merged handoff's worktree laid out again (as if the crash came between the
    #    merge and putting it back in the pool).
    ws.checkout_for_lease("landed", "handoff/landed")
    # 2. A stale index.lock in the gate checkout, left by a git killed with the daemon.
    gate_admin = Path((worktrees / ".gate" / ".git").read_text().split(":", 1)[1].strip())
    (gate_admin / "index.lock").write_text("")
    # 3. The integration branch reset by hand to before the merge.
    merged_at = git(repo, "rev-parse", "main")
    git(repo, "reset", "-q", "--hard", "main~1")
    # 4. The leased handoff's branch moved by hand to a commit without the lease's base.
    orphan = git(repo, "commit-tree", "-m", "unrelated", git(repo, "rev-parse", "main^{tree}"))
    git(repo, "update-ref", "refs/heads/handoff/moved", orphan)
    # 5. A lock file on the integration branch: maybe a person's git, so never deleted.
    ref_lock = repo / ".git" / "refs" / "heads" / "main.lock"
    ref_lock.write_text("")

    seen = len(daemon.logs())
    daemon.start()
    try:
        repairs = _repairs(daemon, seen)
        kinds = sorted(str(r["event"]) for r in repairs)
        assert kinds == [
            "reconcile_branch_moved",
            "reconcile_integration_locked",
            "reconcile_lock_removed",
            "reconcile_merge_missing",
            "reconcile_worktree_released",
        ], repairs
        by_kind = {r["event"]: r for r in repairs}
        assert by_kind["reconcile_worktree_released"]["worktree"] == "landed"
        assert not (worktrees / "landed").exists()
        assert by_kind["reconcile_lock_removed"]["path"] == str(gate_admin / "index.lock")
        assert not (gate_admin / "index.lock").exists()
        assert by_kind["reconcile_merge_missing"]["handoff"] == "landed"
        assert by_kind["reconcile_merge_missing"]["commit"] == merged_at
        assert by_kind["reconcile_branch_moved"]["handoff"] == "moved"
        assert by_kind["reconcile_branch_moved"]["base"] == lease["baseCommit"]
        assert by_kind["reconcile_integration_locked"]["path"] == str(ref_lock)
        assert ref_lock.exists()
        # Reported, not "repaired" by merging again: the store still says merged.
        assert states(daemon.socket) == {"landed": "merged", "moved": "leased"}
        # The lease survived the restart, for the worker to carry on.
        conn = Conn(daemon.socket)
        conn.initialize("worker", "w")
        reply = conn.request("lease.heartbeat", {"leaseId": lease["id"], "token": lease["token"]})
        assert "result" in reply, reply
        conn.close()
    finally:
        daemon.kill()

    # What was repaired stays repaired; what only a person can settle is said again.
    ref_lock.unlink()
    seen = len(daemon.logs())
    daemon.start()
    try:
        kinds = sorted(str(r["event"]) for r in _repairs(daemon, seen))
        assert kinds == ["reconcile_branch_moved", "reconcile_merge_missing"]
    finally:
        daemon.stop()
