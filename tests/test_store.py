"""The store on a real SQLite file: ordering, fencing, durability, the state-dir lock."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from orchestrator.protocol.records import Report
from orchestrator.store.sqlite import (
    Grant,
    InvalidTransition,
    LeaseNotHeld,
    NewHandoff,
    StateLocked,
    Store,
    lock_state_dir,
)


def new(name: str, priority: str = "MEDIUM", deps: tuple[str, ...] = ()) -> NewHandoff:
    return NewHandoff(name=name, title=name, priority=priority, dependencies=deps, labels=(),
                      body=f"# HANDOFF: {name} - PENDING\n", wire={"name": name})


def hand_over(store: Store, grant: Grant, *, ttl_s: float, now: float) -> None:
    """What the daemon does once the worktree is ready: the TTL starts now."""
    store.set_lease_workspace(grant.lease_id, base_commit="0" * 40, worktree="/w",
                              branch=f"handoff/{grant.handoff}", expires_at=now + ttl_s)


def report(store: Store, name: str, now: float) -> None:
    grant = store.grant(worker="w", labels=(), ttl_s=60, now=now)
    assert grant is not None and grant.handoff == name
    store.accept_report(grant.lease_id, grant.token,
                        report=Report(status="completed", head="0" * 40), head="0" * 40, now=now)


def test_merge_queue_order_is_priority_then_report_order(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "db.sqlite3")
    store.submit([new("low-1", "LOW"), new("mid", "MEDIUM"), new("low-2", "LOW"),
                  new("high", "HIGH")], max_attempts=3, now=1.0)
    # Dispatch: priority, then submission order.
    for name in ("high", "mid", "low-1", "low-2"):
        report(store, name, now=2.0)
    assert store.merge_queue() == ["high", "mid", "low-1", "low-2"]
    jobs = store.next_merge_jobs(limit=2, now=3.0)
    assert [job.name for job in jobs] == ["high", "mid"]
    assert store.merge_queue()[:2] == ["high", "mid"]  # those being gated lead the queue


def test_fencing_tokens_increase_across_reopen_and_stale_tokens_fail(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = Store.open(path)
    store.submit([new("a"), new("b")], max_attempts=3, now=1.0)
    first = store.grant(worker="w", labels=(), ttl_s=10, now=1.0)
    assert first is not None
    hand_over(store, first, ttl_s=10, now=1.0)
    store.close()
    store = Store.open(path)
    second = store.grant(worker="w", labels=(), ttl_s=10, now=2.0)
    assert second is not None and second.token > first.token
    with pytest.raises(LeaseNotHeld):
        store.renew(first.lease_id, first.token + 1, ttl_s=10, progress=None, now=2.0)
    with pytest.raises(LeaseNotHeld):
        store.renew(first.lease_id, first.token, ttl_s=10, progress=None, now=50.0)  # expired
    assert store.renew(first.lease_id, first.token, ttl_s=10, progress=None, now=5.0) == 15.0


def test_wal_mode_and_all_or_nothing_submission(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = Store.open(path)
    with sqlite3.connect(path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(Exception, match="unknown handoff"):
        store.submit([new("ok"), new("bad", deps=("ghost",))], max_attempts=3, now=1.0)
    assert store.summaries() == []


def test_retry_only_from_failed_conflict_or_cancelled(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "db.sqlite3")
    store.submit([new("a")], max_attempts=1, now=1.0)
    with pytest.raises(InvalidTransition):
        store.retry("a", max_attempts=1, now=2.0)
    grant = store.grant(worker="w", labels=(), ttl_s=1, now=2.0)
    assert grant is not None
    assert store.expire_due(now=10.0) == []  # not while its worktree is being prepared
    hand_over(store, grant, ttl_s=1, now=2.0)
    expired = store.expire_due(now=10.0)
    assert [e.new_state for e in expired] == ["failed"]  # max_attempts = 1
    assert store.retry("a", max_attempts=1, now=11.0) == "queued"
    assert store.summaries()[0].attempt == 2


def test_a_second_lock_on_the_state_dir_is_refused(tmp_path: Path) -> None:
    fd = lock_state_dir(tmp_path)
    try:
        with pytest.raises(StateLocked, match="already using state dir"):
            lock_state_dir(tmp_path)
    finally:
        os.close(fd)
    os.close(lock_state_dir(tmp_path))  # free again once the holder is gone


def test_restart_abandons_unhanded_leases_and_extends_the_others(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    store = Store.open(path)
    store.submit([new("handed"), new("preparing")], max_attempts=3, now=1.0)
    handed = store.grant(worker="w", labels=(), ttl_s=5, now=1.0)
    preparing = store.grant(worker="w", labels=(), ttl_s=5, now=1.0)
    assert handed is not None and preparing is not None
    hand_over(store, handed, ttl_s=5, now=1.0)
    store.close()
    store = Store.open(path)
    store.recover(ttl_s=5, now=100.0)  # the daemon was down far longer than the TTL
    assert store.renew(handed.lease_id, handed.token, ttl_s=5, progress=None, now=101.0)
    summaries = {s.name: s for s in store.summaries()}
    assert summaries["preparing"].state == "queued"
    assert summaries["preparing"].attempt == 1  # the daemon's failure costs no attempt
