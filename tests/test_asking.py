"""Asking a person (capability "ask"): lease.ask, needsInput, handoff.answer and
lease.answered, over the real socket, across a reconnect, and from a real worker's agent."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
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

from orchestrator.protocol.asking import Question
from orchestrator.store.sqlite import Store

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path, repo: Path) -> Iterator[Daemon]:
    config = write_config(tmp_path, repo, merge="paused = true")
    running = Daemon(config, tmp_path / "daemon.log").start()
    yield running
    running.stop()


def cli(socket: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", "--socket", str(socket), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _leased_worker(daemon: Daemon, name: str = "h1") -> tuple[Conn, dict[str, Any]]:
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc(name)]})
    worker = Conn(daemon.socket)
    info = worker.initialize("worker", name="asker")
    assert "ask" in info["capabilities"]
    lease = worker.request("lease.acquire", {"waitS": 10})["result"]["lease"]
    assert lease is not None
    return worker, lease


def _summary(daemon: Daemon, name: str) -> dict[str, Any]:
    return next(
        h for h in control(daemon.socket, "handoff.list")["handoffs"] if h["name"] == name
    )


def test_ask_and_answer_over_the_socket(daemon: Daemon) -> None:
    worker, lease = _leased_worker(daemon)
    ids = {"leaseId": lease["id"], "token": lease["token"]}
    try:
        assert _summary(daemon, "h1")["needsInput"] is None
        assert control(daemon.socket, "status")["needsInput"] == 0
        # Nothing asked yet: -32602; an unknown handoff: -32003.
        conn = Conn(daemon.socket)
        conn.initialize("control")
        reply = conn.request("handoff.answer", {"name": "h1", "answer": "red"})
        assert reply["error"]["code"] == -32602, reply
        reply = conn.request("handoff.answer", {"name": "nope", "answer": "red"})
        assert reply["error"]["code"] == -32003, reply
        # Bad questions say what to fix; a wrong token changes nothing.
        bad = worker.request("lease.ask", {**ids, "question": ""})
        assert bad["error"]["code"] == -32602
        bad = worker.request("lease.ask", {**ids, "question": "x", "choices": "red"})
        assert bad["error"]["code"] == -32602 and "choices" in bad["error"]["message"]
        stale = worker.request("lease.ask", {**ids, "token": lease["token"] + 1, "question": "x"})
        assert stale["error"]["code"] == -32001
        assert _summary(daemon, "h1")["needsInput"] is None

        # A worker cannot answer (its own or any) question: that is a person's, by role.
        own = worker.request("handoff.answer", {"name": "h1", "answer": "red"})
        assert own["error"]["code"] == -32002, own
        asked = worker.request("lease.ask", {**ids, "question": "Which colour?",
                                             "choices": ["red", "blue"]})
        assert asked == {"jsonrpc": "2.0", "id": asked["id"], "result": {}}
        needs = _summary(daemon, "h1")["needsInput"]
        assert needs["question"] == "Which colour?"
        assert needs["choices"] == ["red", "blue"]
        assert needs["askedAt"].endswith("Z")
        assert control(daemon.socket, "handoff.get", {"name": "h1"})["needsInput"] == needs
        status = control(daemon.socket, "status")
        assert status["needsInput"] == 1
        assert status["leases"][0]["needsInput"] == needs
        # Heartbeats go on while the agent waits, and carry no answer yet.
        beat = worker.request("lease.heartbeat", ids)["result"]
        assert "answer" not in beat

        assert conn.request("handoff.answer", {"name": "h1", "answer": "blue"})["result"] == {}
        notice = wait_for(
            lambda: worker.notifications or [n for n in [worker.recv()] if n],
            "the lease.answered notification",
        )
        assert notice[0]["method"] == "lease.answered"
        assert notice[0]["params"] == {"leaseId": lease["id"], "answer": "blue"}
        assert _summary(daemon, "h1")["needsInput"] is None
        assert control(daemon.socket, "status")["needsInput"] == 0
        # Delivered once: the next heartbeat does not repeat it.
        assert "answer" not in worker.request("lease.heartbeat", ids)["result"]
        # Answered already: nothing to answer.
        again = conn.request("handoff.answer", {"name": "h1", "answer": "red"})
        assert again["error"]["code"] == -32602
        conn.close()
    finally:
        worker.close()


def test_a_disconnected_worker_finds_the_answer_in_its_next_heartbeat(daemon: Daemon) -> None:
    worker, lease = _leased_worker(daemon)
    ids = {"leaseId": lease["id"], "token": lease["token"]}
    assert "result" in worker.request("lease.ask", {**ids, "question": "Proceed?"})
    worker.close()
    wait_for(
        lambda: not control(daemon.socket, "status")["workers"], "the daemon to see it gone"
    )
    assert _summary(daemon, "h1")["needsInput"]["choices"] is None
    # The CLI answers; nobody is connected to hear it.
    answered = cli(daemon.socket, "answer", "h1", "yes, go ahead")
    assert answered.returncode == 0, answered.stderr
    back = Conn(daemon.socket)
    try:
        back.initialize("worker", name="asker")
        beat = back.request("lease.heartbeat", ids)["result"]
        assert beat["answer"] == "yes, go ahead"
        assert "answer" not in back.request("lease.heartbeat", ids)["result"]
        assert not [n for n in back.notifications if n.get("method") == "lease.answered"]
    finally:
        back.close()


def test_the_question_ends_with_its_lease(daemon: Daemon) -> None:
    worker, lease = _leased_worker(daemon)
    ids = {"leaseId": lease["id"], "token": lease["token"]}
    try:
        worker.request("lease.ask", {**ids, "question": "First?"})
        worker.request("lease.ask", {**ids, "question": "Second?"})
        # A newer question replaces the older one.
        assert _summary(daemon, "h1")["needsInput"]["question"] == "Second?"
        assert control(daemon.socket, "status")["needsInput"] == 1
        worker.request("lease.release", {**ids, "reason": "giving up"})
        assert _summary(daemon, "h1")["needsInput"] is None
        conn = Conn(daemon.socket)
        conn.initialize("control")
        assert conn.request("handoff.answer", {"name": "h1", "answer": "x"})["error"][
            "code"
        ] == -32602
        conn.close()
    finally:
        worker.close()


def test_a_real_worker_asks_through_the_question_file(
    daemon: Daemon, tmp_path: Path, repo: Path
) -> None:
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("colours")]})
    log = tmp_path / "worker.log"
    worker = start_worker(daemon.socket, "asks.py", log, extra=["--max-handoffs", "1"])
    try:
        needs = wait_for(
            lambda: _summary(daemon, "colours")["needsInput"], "the agent's question"
        )
        assert needs["question"] == "Which colour?" and needs["choices"] == ["red", "blue"]
        shown = cli(daemon.socket, "status")
        assert "asks: Which colour? [red | blue]" in shown.stdout, shown.stdout
        record = cli(daemon.socket, "show", "colours")
        assert "WAITING FOR AN ANSWER" in record.stdout, record.stdout + record.stderr
        assert cli(daemon.socket, "answer", "colours", "blue").returncode == 0
        assert worker.wait(timeout=120) == 0, log.read_text()
    finally:
        kill_group(worker)
    assert states(daemon.socket)["colours"] == "reported"
    head = git(repo, "rev-parse", "handoff/colours")
    assert git(repo, "show", f"{head}:work/colours.txt") == "the person said blue"
    events = json.dumps(control(daemon.socket, "handoff.get", {"name": "colours"}))
    assert '"needsInput": null' in events


def test_a_store_from_before_questions_gains_the_table(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store.open(path).close()
    with sqlite3.connect(path) as conn:  # as written by a daemon that had no questions
        conn.execute("DROP TABLE questions")
    store = Store.open(path)
    try:
        assert store.open_questions() == {}
        tables = {r[0] for r in store._conn.execute("SELECT name FROM sqlite_master")}
        assert "questions" in tables
        assert Question("q", None).choices is None
    finally:
        store.close()


def test_the_metrics_count_who_waits_and_for_how_long(tmp_path: Path) -> None:
    from orchestrator.observe.metrics import Metrics
    from orchestrator.store.sqlite import NewHandoff

    store = Store.open(tmp_path / "state.db")
    try:
        store.submit([NewHandoff(name="h", title="h", priority="HIGH", dependencies=(),
                                 labels=(), body="# HANDOFF: h - PENDING\n",
                                 wire={"name": "h"})], max_attempts=3, now=1000.0)
        grant = store.grant(worker="w", labels=(), ttl_s=600, now=1000.0)
        assert grant is not None
        store.ask(grant.lease_id, grant.token, Question("Which?", ("a", "b")), now=1100.0,
                  worker="w")
        snapshot = store.metrics_snapshot(now=1400.0)
        assert (snapshot.needing_input, snapshot.oldest_question_s) == (1, 300.0)
        metrics = Metrics("test")
        metrics.set_store_snapshot(snapshot)
        text = metrics.render().decode()
        assert "orchestrator_handoffs_needing_input 1.0" in text
        assert "orchestrator_question_oldest_age_seconds 300.0" in text
        store.answer("h", "a", now=1500.0)
        after = store.metrics_snapshot(now=1600.0)
        assert (after.needing_input, after.oldest_question_s) == (0, 0.0)
    finally:
        store.close()


def test_a_question_is_shown_with_its_control_characters_made_visible() -> None:
    from orchestrator.cli import format_record, format_status
    from orchestrator.protocol.records import HandoffDetail, HandoffSummary

    needs = {"question": "Delete\x1b[2J everything?", "choices": ["yes\r", "no"],
             "askedAt": "2026-12-04T10:00:00.000Z"}
    status = {"integrationBranch": "main", "integrationTip": "0" * 40, "counts": {},
              "workers": [], "leases": [], "mergeQueue": [], "needsInput": 1}
    handoff = {"name": "h", "title": "t", "state": "leased", "priority": "HIGH", "attempt": 1,
               "dependencies": [], "progress": None, "updatedAt": "2026-12-04T10:00:00.000Z",
               "needsInput": needs}
    shown = format_status(status, [HandoffSummary.from_wire(handoff)])
    assert "waiting for an answer: 1" in shown
    assert "\x1b" not in shown and "\r" not in shown
    assert "asks: Delete␛[2J everything? [yes␍ | no]" in shown
    record = format_record(HandoffDetail.from_wire({
        **handoff, "body": "", "labels": [], "detail": None, "feedback": None,
        "submittedAt": "2026-12-04T09:00:00.000Z", "mergedAt": None, "mergeCommit": None,
        "conflicts": [], "leases": [], "reports": [], "gates": [], "merges": []}))
    assert "\x1b" not in record and "orchestrator answer h TEXT" in record
    assert "(asked 2026-12-04T10:00:00.000Z)" in record
