"""The typed wire records: each survives to_wire -> from_wire unchanged, and bad input
gets a ValueError naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.protocol.records import (
    EventRecord,
    Feedback,
    GateRunRecord,
    HandoffDetail,
    HandoffSummary,
    LeaseRecord,
    MergeRecord,
    NeedsInput,
    Progress,
    Report,
    ReportRecord,
)
from orchestrator.store.states import LIVE_STATES, STATES, State

# Whole milliseconds: the wire keeps times to the millisecond.
T = 1_700_000_000.125


def summary(**overrides: Any) -> HandoffSummary:
    fields: dict[str, Any] = dict(
        name="fix-crash", title="Fix the crash", priority="HIGH", state=State.LEASED,
        attempt=2, dependencies=("base",), progress=Progress(40, "Fix", None), updated_at=T,
        needs_input=NeedsInput("Which?", ("a", "b"), T + 1),
    )
    fields.update(overrides)
    return HandoffSummary(**fields)


def lease(**overrides: Any) -> LeaseRecord:
    fields: dict[str, Any] = dict(
        id="l-1", handoff="fix-crash", worker="w1", attempt=2, granted_at=T, expires_at=T + 60,
        base_commit="a" * 40, worktree="/w", branch="handoff/fix-crash", ended_at=None,
        end_reason=None,
    )
    fields.update(overrides)
    return LeaseRecord(**fields)


def detail() -> HandoffDetail:
    report = Report(status="completed", head="b" * 40, summary="done", phases=({"name": "p"},),
                    metrics=(), extra={"future": 1})
    return HandoffDetail(
        summary=summary(), body="# HANDOFF: fix-crash\n", labels=("py",), detail=None,
        feedback=Feedback("gate_failed", "tests failed", "tail"), submitted_at=T - 10,
        merged_at=None, merge_commit=None, conflicts=("a.py",),
        leases=(lease(ended_at=T + 5, end_reason="reported"),),
        reports=(ReportRecord(report, 2, "l-1", T + 5),),
        gates=(GateRunRecord("tests", 2, "c" * 40, 1, False, 1.5, "FAILED", T + 6),),
        merges=(MergeRecord(2, "gate_failed", "d" * 40, "c" * 40, "tests failed", T + 7),),
        eta_s=12.5,
    )


def through_json(wire: dict[str, Any]) -> Any:
    return json.loads(json.dumps(wire, allow_nan=False))


def test_state_is_its_wire_text() -> None:
    assert State("gating") is State.GATING and json.dumps(State.GATING) == '"gating"'
    assert [str(s) for s in STATES] == ["queued", "waiting", "leased", "reported", "gating",
                                        "merged", "conflict", "failed", "cancelled"]
    assert set(LIVE_STATES) < set(STATES)


def test_summary_round_trip() -> None:
    record = summary()
    wire = record.to_wire()
    assert wire["updatedAt"] == "2023-11-14T22:13:20.125Z"
    assert wire["needsInput"] == {"question": "Which?", "choices": ["a", "b"],
                                  "askedAt": "2023-11-14T22:13:21.125Z"}
    assert HandoffSummary.from_wire(through_json(wire)) == record
    plain = summary(progress=None, needs_input=None)
    assert HandoffSummary.from_wire(through_json(plain.to_wire())) == plain


def test_detail_round_trip_keeps_every_field() -> None:
    record = detail()
    wire = through_json(record.to_wire())
    assert "token" not in wire["leases"][0]
    assert wire["reports"][0] == {"status": "completed", "head": "b" * 40, "summary": "done",
                                  "phases": [{"name": "p"}], "metrics": [], "future": 1,
                                  "attempt": 2, "leaseId": "l-1",
                                  "receivedAt": "2023-11-14T22:13:25.125Z"}
    back = HandoffDetail.from_wire(wire)
    assert back == record
    assert back.to_wire() == record.to_wire()


def test_lease_status_shape() -> None:
    wire = lease().to_status_wire(None)
    assert wire == {"id": "l-1", "handoff": "fix-crash", "worker": "w1", "attempt": 2,
                    "grantedAt": "2023-11-14T22:13:20.125Z",
                    "expiresAt": "2023-11-14T22:14:20.125Z", "needsInput": None}
    assert LeaseRecord.from_wire(through_json(lease().to_wire()), handoff="fix-crash") == lease()


def test_gate_and_event_round_trip() -> None:
    gate = GateRunRecord("lint", 1, "c" * 40, None, True, 30.0, "", T)
    assert not gate.passed
    assert GateRunRecord.from_wire(through_json(gate.to_wire())) == gate
    event = EventRecord(T, "fix-crash", "report", {"lease": "l-1", "status": "completed"})
    assert event.to_wire()["status"] == "completed"
    assert EventRecord.from_wire(through_json(event.to_wire())) == event


def test_report_keeps_what_the_worker_sent() -> None:
    sent = {"status": "failed", "head": "e" * 40, "summary": None, "phases": [], "x": [1]}
    report = Report.from_wire(sent)
    assert report.status == "failed" and report.summary is None
    assert report.to_wire() == sent
    assert Report.from_wire(report.to_wire()) == report


@pytest.mark.parametrize(
    ("report", "message"),
    [
        ([], 'invalid params: "report" must be an object'),
        ({"status": "done", "head": "a"},
         "invalid params: report.status must be one of completed, failed, blocked"),
        ({"status": "completed", "head": ""},
         "invalid params: report.head must be the branch tip sha"),
        ({"status": "completed", "head": "a", "summary": 3},
         "invalid params: report.summary must be a string"),
        ({"status": "completed", "head": "a", "metrics": {}},
         "invalid params: report.metrics must be a list"),
    ],
)
def test_report_errors_say_what_to_fix(report: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        Report.from_wire(report)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"state": "done"}, "handoff.state must be one of"),
        ({"attempt": "2"}, "handoff.attempt must be an integer"),
        ({"updatedAt": "yesterday"}, "handoff.updatedAt must be an RFC 3339 time"),
        ({"progress": {"percent": "x", "phase": None, "message": None}},
         "handoff.progress.percent must be a number"),
        ({"dependencies": [1]}, "handoff.dependencies must be a list of strings"),
    ],
)
def test_from_wire_names_the_wrong_field(change: dict[str, Any], named: str) -> None:
    wire = {**summary().to_wire(), **change}
    with pytest.raises(ValueError, match=named):
        HandoffSummary.from_wire(wire)


def test_missing_field_is_named() -> None:
    wire = detail().to_wire()
    del wire["gates"][0]["timedOut"]
    with pytest.raises(ValueError, match=r"handoff\.gates\[0\]\.timedOut is missing"):
        HandoffDetail.from_wire(wire)


def test_the_store_gives_back_the_report_as_the_worker_sent_it(tmp_path: Path) -> None:
    """A real store: handoff.get's fields, and a report's explicit null and unknown field
    survive storage (nothing accepted is lost)."""
    from orchestrator.store.sqlite import NewHandoff, Store

    store = Store.open(tmp_path / "db.sqlite3")
    try:
        store.submit([NewHandoff("a", "A", "LOW", (), (), "# HANDOFF: a\n", {"name": "a"})],
                     max_attempts=3, now=T)
        grant = store.grant(worker="w", labels=(), ttl_s=60, now=T)
        assert grant is not None
        store.set_lease_workspace(grant.lease_id, base_commit="0" * 40, worktree="/w",
                                  branch="handoff/a", expires_at=T + 60)
        sent = {"status": "completed", "head": "1" * 40, "summary": None, "later": [1]}
        assert store.accept_report(grant.lease_id, grant.token, report=Report.from_wire(sent),
                                   head="1" * 40, now=T + 1) is State.REPORTED
        wire = through_json(store.detail("a").to_wire())
        assert set(wire) == {
            "name", "title", "priority", "state", "attempt", "dependencies", "progress",
            "updatedAt", "needsInput", "body", "labels", "detail", "feedback", "submittedAt",
            "mergedAt", "mergeCommit", "conflicts", "leases", "reports", "gates", "merges",
            "etaS",
        }
        assert wire["state"] == "reported" and wire["priority"] == "LOW"
        assert wire["reports"] == [{**sent, "attempt": 1, "leaseId": grant.lease_id,
                                    "receivedAt": "2023-11-14T22:13:21.125Z"}]
        assert set(wire["leases"][0]) == {"id", "worker", "attempt", "grantedAt", "expiresAt",
                                          "baseCommit", "worktree", "branch", "endedAt",
                                          "endReason"}
        assert HandoffDetail.from_wire(wire).to_wire() == wire
        [held] = store.summaries(State.REPORTED)
        assert held.state is State.REPORTED
    finally:
        store.close()
