"""A store locked by another process is waited out like a full disk; a corrupt one stops
start-up with one message that says what to do. Real SQLite, real daemon."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from harness import Conn, Daemon, control, handoff_doc, states, wait_for, write_config

pytestmark = pytest.mark.slow


def test_a_store_locked_by_another_process_refuses_writes_and_serves_reads(
    tmp_path: Path, repo: Path
) -> None:
    config = write_config(tmp_path, repo, extra="store_lock_wait_s = 0.5", merge="paused = true")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    holder = sqlite3.connect(tmp_path / "state" / "orchestrator.sqlite3", isolation_level=None)
    conn = Conn(daemon.socket)
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("before")]})
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held by another process's connection
        conn.initialize("control")
        refused = conn.request("handoff.submit", {"markdown": [handoff_doc("during")]})
        error = refused.get("error") or {}
        assert error.get("code") == -32603, refused
        assert error.get("data") == {"reason": "store_locked"}, refused
        assert "locked by another process" in error["message"]
        # Reads are served meanwhile ...
        assert conn.request("status")["result"]["counts"]["queued"] == 1
        assert [h["name"] for h in conn.request("handoff.list")["result"]["handoffs"]] == ["before"]
        # ... and the lease clock, whose writes are refused too, does not take the daemon down.
        wait_for(lambda: any(e.get("event") == "store_locked" for e in daemon.logs()),
                 "the expiry loop to meet the lock")
        assert daemon.process is not None and daemon.process.poll() is None
        assert "result" in conn.request("status")
    finally:
        holder.execute("ROLLBACK") if holder.in_transaction else None
        holder.close()
    try:
        # Once the lock is free, writes work again at once.
        reply = conn.request("handoff.submit", {"markdown": [handoff_doc("after")]})
        assert reply.get("result") == {"names": ["after"]}, reply
        assert states(daemon.socket) == {"before": "queued", "after": "queued"}
    finally:
        conn.close()
        daemon.stop()


def test_a_corrupt_store_stops_start_up_with_one_message(tmp_path: Path, repo: Path) -> None:
    config = write_config(tmp_path, repo)
    store = tmp_path / "state" / "orchestrator.sqlite3"
    store.parent.mkdir(parents=True)
    store.write_bytes(os.urandom(8192))
    started = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--config", str(config), "serve"],
        capture_output=True, text=True, timeout=120,
    )
    assert started.returncode == 2, started
    assert "Traceback" not in started.stderr, started.stderr
    message = started.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert str(store) in message and "not a readable SQLite database" in message
    assert f"mv {store} {store}.corrupt" in message
