"""Faults of workers, gates, the repository and the disk: each is handled, and visible in
``orchestrator status`` / ``show`` and the logs, and the daemon carries on.

(A worker that hangs without heartbeats is covered in test_daemon.py, a gate that never
exits in test_merge_queue.py.)
"""

from __future__ import annotations

import json
import resource
import shutil
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


def test_a_worker_that_heartbeats_forever_loses_its_lease_at_max_duration(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    config = write_config(tmp_path, repo, ttl_s=30, heartbeat_s=0.2, max_attempts=1,
                          leases="max_duration_s = 2", merge="paused = true")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("endless")]})
    worker = start_worker(daemon.socket, "hangs.py", tmp_path / "w.log")
    try:
        wait_for(lambda: states(daemon.socket)["endless"] == "failed",
                 "the endless lease to be revoked and the handoff to fail")
        # The worker hears of it on its next heartbeat, a moment after the store does.
        wait_for(lambda: "lease_revoked" in (tmp_path / "w.log").read_text(),
                 "the worker to be told its lease was revoked")
    finally:
        kill_group(worker)
    record = control(daemon.socket, "handoff.get", {"name": "endless"})
    assert "leases.max_duration_s" in record["detail"], record["detail"]
    assert [lease["endReason"] for lease in record["leases"]] == ["max_duration"]
    event = next(e for e in daemon.logs() if e["event"] == "lease_expired")
    assert event["reason"] == "max_duration"


def test_an_agent_that_deletes_its_worktree_costs_one_attempt(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    config = write_config(tmp_path, repo, ttl_s=5, heartbeat_s=0.2)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("self-destruct")]})
    worker = start_worker(daemon.socket, "deletes_worktree.py", tmp_path / "w.log")
    try:
        wait_for(lambda: states(daemon.socket)["self-destruct"] == "merged",
                 "the second attempt to merge")
    finally:
        kill_group(worker)
    record = control(daemon.socket, "handoff.get", {"name": "self-destruct"})
    assert record["attempt"] == 2
    # The worker saw the worktree gone and gave the lease back saying so.
    assert record["leases"][0]["endReason"] == "released"
    released = next(e for e in daemon.logs() if e["event"] == "lease_released")
    assert "no longer a git worktree" in released["reason"]
    assert git(repo, "show", "main:work/self-destruct.txt").startswith("done")


def test_a_worktree_deleted_while_the_daemon_was_down_ends_its_lease_at_start(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    config = write_config(tmp_path, repo, ttl_s=60, merge="paused = true")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("gone")]})
    conn = Conn(daemon.socket)
    conn.initialize("worker")
    lease = conn.request("lease.acquire", {"waitS": 10})["result"]["lease"]
    conn.close()
    daemon.kill()
    shutil.rmtree(lease["worktree"])
    daemon.start()
    record = control(daemon.socket, "handoff.get", {"name": "gone"})
    assert record["state"] == "queued" and record["attempt"] == 2
    assert record["leases"][0]["endReason"] == "worktree_missing"
    repairs = [e for e in daemon.logs() if e["event"] == "reconcile_lease_ended"]
    assert [(r["handoff"], r["cause"]) for r in repairs] == [("gone", "worktree_missing")]
    # The old lease is dead for its worker, with a reason it can act on.
    conn = Conn(daemon.socket)
    conn.initialize("worker")
    reply = conn.request("lease.heartbeat", {"leaseId": lease["id"], "token": lease["token"]})
    assert reply["error"]["code"] == -32001
    assert "worktree was deleted" in reply["error"]["message"]
    # The next attempt gets a worktree again, with the branch as it was.
    again = conn.request("lease.acquire", {"waitS": 10})["result"]["lease"]
    assert Path(again["worktree"]).is_dir() and again["attempt"] == 2
    conn.close()


@pytest.mark.parametrize("lock", ["ref", "index"])
def test_a_locked_integration_branch_makes_merging_wait_and_say_why(
    tmp_path: Path, repo: Path, stop_later: list[Daemon], lock: str
) -> None:
    # Another git process holds the branch's ref lock, or the index lock of its checkout.
    path = repo / ".git" / ("refs/heads/main.lock" if lock == "ref" else "index.lock")
    path.write_text("")
    config = write_config(tmp_path, repo)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("patient")]})
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        blocked = wait_for(lambda: control(daemon.socket, "status")["mergeBlocked"],
                           "status to say why merging waits")
        assert str(path) in blocked and "another git process" in blocked
        assert states(daemon.socket)["patient"] == "gating"
        assert any(e["event"] == "reconcile_integration_locked" and e["path"] == str(path)
                   for e in daemon.logs())
        path.unlink()
        wait_for(lambda: states(daemon.socket)["patient"] == "merged", "the merge after unlock")
    finally:
        kill_group(worker)
    assert control(daemon.socket, "status")["mergeBlocked"] is None
    # The checkout followed the branch: it is clean, with the merged work in it.
    assert git(repo, "status", "--porcelain") == ""
    assert (repo / "work" / "patient.txt").is_file()


FLOOD = """\
import os, sys
out = sys.stdout.buffer
chunk = b"x" * 65535 + b"\\n"
for _ in range(3200):   # 200 MiB on stdout
    out.write(chunk)
os.makedirs("junk", exist_ok=True)
first = not os.listdir("junk")
with open(os.path.join("junk", os.environ.get("N", "blob")), "wb") as f:
    f.write(os.urandom(1 << 20) * 8)   # and 8 MiB into its checkout
print("junk was clean" if first else "junk left by an earlier gate", flush=True)
sys.exit(0 if first else 1)
"""


def test_a_gate_that_floods_its_output_and_its_checkout_is_contained(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    flood = tmp_path / "flood.py"
    flood.write_text(FLOOD)
    gates = f'[[gates]]\nname = "flood"\nrun = ["{sys.executable}", "{flood}"]\n'
    config = write_config(tmp_path, repo, gates=gates, merge="gate_output_tail_bytes = 4096")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    names = ["flood-1", "flood-2"]
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc(n) for n in names]})
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        wait_for(lambda: set(states(daemon.socket).values()) == {"merged"},
                 "both to merge: each gate found a clean checkout")
        assert daemon.process is not None
        status = Path(f"/proc/{daemon.process.pid}/status").read_text()
    finally:
        kill_group(worker)
    for name in names:
        gate = control(daemon.socket, "handoff.get", {"name": name})["gates"][-1]
        # Only the tail is kept: the daemon never held 200 MiB of it.
        assert gate["outputTail"].startswith("[... ")
        assert gate["outputTail"].endswith("junk was clean\n")
        assert len(gate["outputTail"]) < 4096 + 100
    peak_kib = int(next(line for line in status.splitlines()
                        if line.startswith("VmHWM:")).split()[1])
    assert peak_kib < 150 * 1024, f"the daemon's peak RSS was {peak_kib} KiB"
    assert (tmp_path / "state" / "orchestrator.sqlite3").stat().st_size < 5 * 1024 * 1024


SANDBOX = """\
import json, os, sys
# A stand-in for bwrap/systemd-run: record what it was asked to run, then run it (or, with
# SANDBOX_DENY set, refuse as a sandbox refusing a forbidden action would).
with open(os.environ["SANDBOX_LOG"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}) + "\\n")
if os.path.exists(os.environ["SANDBOX_LOG"] + ".deny"):
    print("sandbox: denied", flush=True)
    sys.exit(99)
os.execvp(sys.argv[1], sys.argv[1:])
"""


def test_gates_run_behind_the_configured_sandbox_prefix(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    sandbox = tmp_path / "sandbox.py"
    sandbox.write_text(SANDBOX)
    record = tmp_path / "sandbox.log"
    gate_argv = [sys.executable, "-c", "print('gate ran')"]
    gates = f'[[gates]]\nname = "check"\nrun = {json.dumps(gate_argv)}\n'
    config = write_config(tmp_path, repo, gates=gates,
                          merge=f'gate_sandbox = ["{sys.executable}", "{sandbox}"]')
    daemon = Daemon(config, tmp_path / "daemon.log", env={"SANDBOX_LOG": str(record)}).start()
    stop_later.append(daemon)
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("boxed")]})
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        wait_for(lambda: states(daemon.socket)["boxed"] == "merged", "the sandboxed gate")
        runs = [json.loads(line) for line in record.read_text().splitlines()]
        assert [run["argv"] for run in runs] == [gate_argv]
        assert Path(runs[0]["cwd"]) == tmp_path / "state" / "worktrees" / ".gate"
        gate = control(daemon.socket, "handoff.get", {"name": "boxed"})["gates"][0]
        assert gate["outputTail"] == "gate ran\n"

        # What the sandbox refuses fails the gate: nothing lands around it.
        Path(f"{record}.deny").write_text("")
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("escape")]})
        # A new handoff starts out queued too, so wait for its gate run, not its state.
        def denied() -> bool:
            gates_ = control(daemon.socket, "handoff.get", {"name": "escape"})["gates"]
            return bool(gates_) and gates_[0]["exitStatus"] is not None
        wait_for(denied, "the denied gate to fail")
    finally:
        kill_group(worker)
    record_ = control(daemon.socket, "handoff.get", {"name": "escape"})
    assert record_["gates"][0]["exitStatus"] == 99
    assert "sandbox: denied" in record_["gates"][0]["outputTail"]
    assert "escape" not in git(repo, "log", "--format=%s", "main")


def test_a_full_disk_for_the_store_refuses_new_work_and_keeps_serving_reads(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    config = write_config(tmp_path, repo, merge="paused = true")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("before")]})
    assert daemon.process is not None
    # A full disk, for this process only and without root: RLIMIT_FSIZE makes every write
    # past the limit fail (EFBIG) as a full disk's writes fail (ENOSPC). The limit sits
    # above every file the daemon has open now (so its log still works) but below what
    # the next big transaction needs.
    state = tmp_path / "state"
    files = [state / "orchestrator.sqlite3", state / "orchestrator.sqlite3-wal",
             tmp_path / "daemon.log"]
    limit = max(f.stat().st_size for f in files if f.exists()) + 256 * 1024
    pid = daemon.process.pid
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
    notes = "\n## NOTES\n" + "a line of notes that takes up room\n" * 20_000  # ~700 KB
    big = handoff_doc("too-big") + notes
    try:
        conn = Conn(daemon.socket)
        conn.initialize("control")
        reply = conn.request("handoff.submit", {"markdown": [big]})
        assert reply["error"]["code"] == -32603, reply
        assert reply["error"]["data"] == {"reason": "store_full"}
        assert "cannot be written" in reply["error"]["message"]
        assert "new work is refused" in reply["error"]["message"]
        # Reads keep working, on the same connection and on others.
        assert [h["name"] for h in conn.request("handoff.list")["result"]["handoffs"]] == [
            "before"]
        assert conn.request("status")["result"]["counts"]["queued"] == 1
        assert control(daemon.socket, "handoff.get", {"name": "before"})["state"] == "queued"
        conn.close()
        assert daemon.process.poll() is None
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
    # Space is back: the same submission goes through, and nothing was lost meanwhile.
    control(daemon.socket, "handoff.submit", {"markdown": [big]})
    assert states(daemon.socket) == {"before": "queued", "too-big": "queued"}
    db = sqlite3.connect(state / "orchestrator.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_a_gate_that_fills_the_disk_is_stopped_by_a_sandbox_size_limit(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    # The disk itself cannot be filled in a test; a per-file size cap from the sandbox
    # prefix (RLIMIT_FSIZE, here via prlimit) stops the gate the same way, at its first
    # write past the cap, and the daemon is not affected.
    fill = [sys.executable, "-c", "open('huge.bin', 'wb').write(b'x' * (64 << 20))"]
    gates = f'[[gates]]\nname = "fill"\nrun = {json.dumps(fill)}\n'
    config = write_config(tmp_path, repo, gates=gates, max_attempts=1,
                          merge='gate_sandbox = ["prlimit", "--fsize=1048576", "--"]')
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("filler")]})
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        wait_for(lambda: states(daemon.socket)["filler"] == "failed", "the gate to fail")
    finally:
        kill_group(worker)
    gate = control(daemon.socket, "handoff.get", {"name": "filler"})["gates"][0]
    assert gate["exitStatus"] != 0
    assert "File too large" in gate["outputTail"]
    assert (tmp_path / "state" / "worktrees" / ".gate" / "huge.bin").stat().st_size <= 1 << 20
    assert "filler" not in git(repo, "log", "--format=%s", "main")


def test_leases_heartbeating_through_a_full_store_do_not_expire_for_it(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    config = write_config(tmp_path, repo, ttl_s=2, heartbeat_s=0.25, merge="paused = true")
    log = tmp_path / "daemon.log"
    daemon = Daemon(config, log).start()
    stop_later.append(daemon)
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("steady")]})
    worker = start_worker(daemon.socket, "hangs.py", tmp_path / "w.log")
    assert daemon.process is not None
    pid = daemon.process.pid
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    try:
        wait_for(lambda: states(daemon.socket)["steady"] == "leased", "the lease")

        def heartbeating() -> list[dict[str, Any]]:
            # Until its worktree is ready a lease expires a preparation grace later than
            # the TTL: wait for the first heartbeat's TTL-long expiry.
            leases: list[dict[str, Any]] = control(daemon.socket, "status")["leases"]
            if leases and _overdue(leases[0]["expiresAt"], -10.0):
                return leases
            return []

        before = wait_for(heartbeating, "a heartbeat to set the lease's expiry")
        # Every write past the files' current sizes now fails: each heartbeat's commit
        # (appended to the WAL) is refused, as on a full disk.
        state = tmp_path / "state"
        files = [state / "orchestrator.sqlite3", state / "orchestrator.sqlite3-wal", log]
        limit = max(f.stat().st_size for f in files if f.exists()) + 4096
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
        wait_for(lambda: "store_full" in log.read_text(), "expiry to meet the full store")
        # Well past the TTL without one heartbeat recorded.
        wait_for(lambda: _overdue(before[0]["expiresAt"], 2.0), "the TTL to pass")
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
    try:
        wait_for(lambda: "store_writable_again" in log.read_text(), "the store to recover")
        # The spell was not the worker's fault: same lease, same attempt, still held.
        after = control(daemon.socket, "status")["leases"]
        assert [(lease["id"], lease["attempt"]) for lease in after] == [
            (lease["id"], lease["attempt"]) for lease in before]
        assert not [e for e in daemon.logs() if e.get("event") == "lease_expired"]
        assert states(daemon.socket)["steady"] == "leased"
    finally:
        kill_group(worker)


def _overdue(expires_at: str, margin_s: float) -> bool:
    """True once the wall clock is ``margin_s`` past an RFC 3339 time from the daemon."""
    moment = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    return datetime.now(UTC).timestamp() > moment.timestamp() + margin_s


def test_a_store_that_fills_just_after_the_branch_moved_records_the_merge_once(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    state = tmp_path / "state"
    log = tmp_path / "daemon.log"
    marker = tmp_path / "limited"
    # git's reference-transaction hook runs inside the daemon's `git update-ref`: once the
    # integration branch has moved, it fills the daemon's disk (every write past the
    # store's current size fails), so the merge is on main but cannot be recorded.
    hook = repo / ".git" / "hooks" / "reference-transaction"
    hook.write_text(f"""#!{sys.executable}
import os, pathlib, resource, sys
lines = sys.stdin.read()
marker = pathlib.Path({str(marker)!r})
if sys.argv[1] == "committed" and " refs/heads/main" in lines and not marker.exists():
    git_pid = os.getppid()
    stat = pathlib.Path(f"/proc/{{git_pid}}/stat").read_text()
    daemon = int(stat.rsplit(")", 1)[1].split()[1])
    files = [pathlib.Path({str(state)!r}) / n for n in
             ("orchestrator.sqlite3", "orchestrator.sqlite3-wal")] + [pathlib.Path({str(log)!r})]
    limit = max(f.stat().st_size for f in files if f.exists()) + 4096
    _, hard = resource.prlimit(daemon, resource.RLIMIT_FSIZE)
    resource.prlimit(daemon, resource.RLIMIT_FSIZE, (limit, hard))
    marker.write_text(str(daemon))
""")
    hook.chmod(0o755)
    gates = f'[[gates]]\nname = "tests"\nrun = [{json.dumps(sys.executable)}, "-c", "pass"]\n'
    daemon = Daemon(write_config(tmp_path, repo, gates=gates), log).start()
    stop_later.append(daemon)
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("tight")]})
        wait_for(lambda: '"store_full"' in log.read_text(), "the merge queue to meet the full disk")
        assert "Merge handoff tight:" in git(repo, "log", "--first-parent", "--format=%s", "main")
        blocked = control(daemon.socket, "status")["mergeBlocked"]
        assert blocked and "cannot be written" in blocked
        # Keep the disk full past the queue's first retry (BLOCKED_RETRY_S = 2 s), so that
        # retry fails too: recovery must not give up after one try.
        time.sleep(2.5)
        pid = int(marker.read_text())
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
        # Space is back: the landing is recorded as the merge it was, never failed and
        # never landed a second time, and merging resumes.
        wait_for(lambda: states(daemon.socket)["tight"] == "merged", "the merge to be recorded")
        wait_for(lambda: control(daemon.socket, "status")["mergeBlocked"] is None,
                 "merging to resume")
    finally:
        kill_group(worker)
    subjects = git(repo, "log", "--first-parent", "--format=%s", "main")
    assert subjects.count("Merge handoff tight:") == 1
