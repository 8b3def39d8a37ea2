"""The integration branch moves only by the merge queue, and the store's state changes are
guarded: ``merged`` only from ``gating`` through a recorded landing, a report only on a
held lease, a cancel during landing refused (never both cancelled and landed)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import git
from harness import (
    Daemon,
    control,
    handoff_doc,
    kill_group,
    start_worker,
    states,
    wait_for,
    write_config,
)
from test_store import hand_over, new, report

from orchestrator.protocol.records import Report
from orchestrator.store.sqlite import InvalidTransition, LeaseNotHeld, Store, StoreError

SUITE = (
    "import sys; sys.path.insert(0, 'src'); import app; "
    "assert app.answer() == 42, 'answer() is not 42'"
)


def _gating(tmp_path: Path, name: str = "h") -> Store:
    store = Store.open(tmp_path / "db.sqlite3")
    store.submit([new(name)], max_attempts=3, now=1.0)
    report(store, name, now=2.0)
    (job,) = store.next_merge_jobs(limit=1, now=3.0)
    assert job.name == name and store.state_of(name) == "gating"
    return store


def test_merged_only_from_gating_through_a_recorded_landing(tmp_path: Path) -> None:
    store = _gating(tmp_path)
    # No landing was recorded (no gate passed on anything): not merged, whatever it says.
    with pytest.raises(InvalidTransition, match="only a gated candidate"):
        store.mark_merged("h", attempt=1, base="a" * 40, commit="b" * 40, now=4.0)
    assert store.state_of("h") == "gating"
    store.record_landing_intent("h", attempt=1, base="a" * 40, candidate="c" * 40, now=4.0)
    with pytest.raises(InvalidTransition):  # not the candidate whose landing was recorded
        store.mark_merged("h", attempt=1, base="a" * 40, commit="b" * 40, now=5.0)
    store.mark_merged("h", attempt=1, base="a" * 40, commit="c" * 40, now=5.0)
    assert store.state_of("h") == "merged"
    with pytest.raises(InvalidTransition):  # and never twice
        store.mark_merged("h", attempt=1, base="a" * 40, commit="c" * 40, now=6.0)


def test_a_cancel_during_landing_is_refused_and_it_lands_once(tmp_path: Path) -> None:
    store = _gating(tmp_path)
    store.record_landing_intent("h", attempt=1, base="a" * 40, candidate="c" * 40, now=4.0)
    assert store.begin_ref_move("h")  # the merge queue is moving the branch now
    with pytest.raises(InvalidTransition, match="landing on the integration branch"):
        store.cancel("h", now=4.5)
    assert store.state_of("h") == "gating"
    store.mark_merged("h", attempt=1, base="a" * 40, commit="c" * 40, now=5.0)
    with pytest.raises(InvalidTransition):
        store.retry("h", max_attempts=3, now=6.0)
    merges = [m.to_wire() for m in store.detail("h").merges]
    assert [m["result"] for m in merges] == ["merged"]


def test_a_cancel_before_landing_wins_and_nothing_lands(tmp_path: Path) -> None:
    store = _gating(tmp_path)
    store.cancel("h", now=4.0)
    with pytest.raises(InvalidTransition):
        store.record_landing_intent("h", attempt=1, base="a" * 40, candidate="c" * 40, now=4.5)
    with pytest.raises(InvalidTransition):
        store.mark_merged("h", attempt=1, base="a" * 40, commit="c" * 40, now=5.0)
    assert store.state_of("h") == "cancelled"


def test_a_cancel_while_the_move_waits_for_a_person_wins_and_nothing_lands(
    tmp_path: Path,
) -> None:
    store = _gating(tmp_path)
    store.record_landing_intent("h", attempt=1, base="a" * 40, candidate="c" * 40, now=4.0)
    assert store.begin_ref_move("h")
    store.end_ref_move("h")  # a dirty checkout of main held the move back
    store.cancel("h", now=4.5)
    assert not store.begin_ref_move("h")  # so the queue never moves the branch
    with pytest.raises(InvalidTransition):
        store.mark_merged("h", attempt=1, base="a" * 40, commit="c" * 40, now=5.0)
    assert store.state_of("h") == "cancelled"


def test_a_pending_landing_stays_gating_across_a_restart_until_settled(tmp_path: Path) -> None:
    store = _gating(tmp_path)
    store.record_landing_intent("h", attempt=1, base="a" * 40, candidate="c" * 40, now=4.0)
    store.return_to_queue("h", now=4.5)
    assert store.recover(ttl_s=30, now=5.0) == []
    assert store.recover_gating(now=5.0) == []
    assert store.state_of("h") == "gating"
    assert store.pending_landings() == [("h", 1, "a" * 40, "c" * 40)]
    store.mark_merged("h", attempt=1, base="a" * 40, commit="c" * 40, now=6.0)  # it landed


def test_a_report_only_on_a_held_lease_of_a_leased_handoff(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "db.sqlite3")
    store.submit([new("a"), new("b")], max_attempts=3, now=1.0)
    grant = store.grant(worker="w", labels=(), ttl_s=60, now=1.0)
    assert grant is not None and grant.handoff == "a"
    hand_over(store, grant, ttl_s=60, now=1.0)
    store.cancel("a", now=2.0)  # ends the lease
    with pytest.raises(LeaseNotHeld):
        store.accept_report(grant.lease_id, grant.token,
                            report=Report(status="completed", head="0" * 40),
                            head="0" * 40, now=3.0)
    assert store.state_of("a") == "cancelled"
    # A lease row left open while its handoff moved on (here by hand: no code path does it
    # today) does not make a report count either.
    other = store.grant(worker="w", labels=(), ttl_s=60, now=4.0)
    assert other is not None and other.handoff == "b"
    hand_over(store, other, ttl_s=60, now=4.0)
    with sqlite3.connect(tmp_path / "db.sqlite3") as raw:
        raw.execute("UPDATE handoffs SET state = 'failed' WHERE name = 'b'")
    with pytest.raises(StoreError, match="no longer holds b"):
        store.accept_report(other.lease_id, other.token,
                            report=Report(status="completed", head="0" * 40),
                            head="0" * 40, now=5.0)
    assert store.state_of("b") == "failed"


@pytest.mark.slow
def test_a_handoff_an_agent_pushed_to_main_itself_is_gated_on_the_new_tip(
    tmp_path: Path, repo: Path
) -> None:
    git(repo, "checkout", "-q", "--detach")  # so nothing has main checked out to update
    argv = ", ".join(f'"{a}"' for a in (sys.executable, "-c", SUITE))
    config = write_config(
        tmp_path, repo, gates=f'[[gates]]\nname = "tests"\nrun = [{argv}]\n',
        merge='on_gate_failure = "hold"',
    )
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "pushes_to_main.py", tmp_path / "w.log",
                          env={"HOSTILE_TARGET_REPO": str(repo)})
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("pusher")]})
        wait_for(lambda: states(daemon.socket)["pusher"] == "failed",
                 "the pushed handoff to fail its gate")
        record = control(daemon.socket, "handoff.get", {"name": "pusher"})
        head = record["reports"][-1]["head"]
        assert git(repo, "rev-parse", "main") == head  # the agent did move main
        assert [g["candidate"] for g in record["gates"]] == [head]  # the tip was gated
        assert "answer() is not 42" in record["gates"][0]["outputTail"]
        assert record["mergeCommit"] is None
        moved = control(daemon.socket, "status")["integrationMovedOutside"]
        assert moved["count"] == 1 and moved["to"] == head
        events = [e for e in daemon.logs() if e["event"] == "integration_moved_outside"]
        assert len(events) == 1 and events[0]["new"] == head
        assert events[0]["metric"] == "orchestrator_integration_moved_outside_total"
        shown = subprocess.run(
            [sys.executable, "-m", "orchestrator", "--socket", str(daemon.socket), "status"],
            capture_output=True, text=True, timeout=60,
        )
        assert "INTEGRATION BRANCH MOVED OUTSIDE THE QUEUE: 1 time(s)" in shown.stdout, shown
    finally:
        kill_group(worker)
        daemon.stop()
