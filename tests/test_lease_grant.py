"""The lease.acquire lease as a typed record: to_wire is the protocol's shape, from_wire
reads it back exactly and refuses a wrong field by name."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.protocol.lease_grant import (
    LeasedHandoff,
    LeaseGrant,
    LeasePorts,
    LeaseSetup,
    MetricSpec,
    PhaseSpec,
)
from orchestrator.protocol.records import Feedback


def _grant(**overrides: Any) -> LeaseGrant:
    handoff = LeasedHandoff(
        name="h1", title="Fix it", priority="HIGH", dependencies=("h0",), labels=("gpu",),
        body="# HANDOFF: h1\n", phases=(PhaseSpec("Only", ("do it", "test it")),),
        success_metrics=(MetricSpec("Phase 1", "tests pass"),),
        feedback=Feedback("gate_failed", "gate tests failed", "E   assert 1 == 2"),
    )
    fields: dict[str, Any] = {
        "id": "l-1", "token": 42, "handoff": handoff, "worktree": "/w/h1",
        "branch": "handoff/h1", "base_commit": "a" * 40, "integration_commit": "b" * 40,
        "attempt": 2, "expires_at": 1796420948.123,
    }
    return LeaseGrant(**{**fields, **overrides})


def test_the_wire_shape_is_the_protocols() -> None:
    wire = _grant(
        ports=LeasePorts(41000, 10),
        setup=LeaseSetup(("make", "deps"), needed=True, keep=(".venv",), timeout_s=900.0),
    ).to_wire()
    assert wire == {
        "id": "l-1", "token": 42,
        "handoff": {
            "name": "h1", "title": "Fix it", "priority": "HIGH", "dependencies": ["h0"],
            "labels": ["gpu"], "body": "# HANDOFF: h1\n",
            "phases": [{"name": "Only", "objectives": ["do it", "test it"]}],
            "successMetrics": [{"name": "Phase 1", "criteria": "tests pass"}],
            "feedback": {"reason": "gate_failed", "detail": "gate tests failed",
                         "log": "E   assert 1 == 2"},
        },
        "worktree": "/w/h1", "branch": "handoff/h1", "baseCommit": "a" * 40,
        "integrationCommit": "b" * 40, "attempt": 2, "expiresAt": "2026-12-04T21:49:08.123Z",
        "portBase": 41000, "portCount": 10,
        "setup": {"command": ["make", "deps"], "needed": True, "keep": [".venv"],
                  "timeoutS": 900.0},
    }


@pytest.mark.parametrize("grant", [
    _grant(),
    _grant(ports=LeasePorts(41000, 1), setup=LeaseSetup(("true",), False, (), 5)),
    _grant(handoff=LeasedHandoff("h", "t", "LOW", (), (), "", (), (), None, {"later": [1]})),
])
def test_from_wire_reads_back_what_to_wire_made(grant: LeaseGrant) -> None:
    assert LeaseGrant.from_wire(grant.to_wire()) == grant
    assert LeaseGrant.from_wire(grant.to_wire()).to_wire() == grant.to_wire()


def test_fields_an_older_daemon_does_not_send_are_optional() -> None:
    wire = _grant().to_wire()
    del wire["integrationCommit"]
    read = LeaseGrant.from_wire(wire)
    assert (read.integration_commit, read.ports, read.setup) == (None, None, None)


@pytest.mark.parametrize(("change", "message"), [
    (lambda w: w.pop("token"), "lease.token is missing"),
    (lambda w: w.update(token="42"), "lease.token must be an integer"),
    (lambda w: w.update(attempt=True), "lease.attempt must be an integer"),
    (lambda w: w.update(expiresAt="soon"), "lease.expiresAt must be an RFC 3339 time"),
    (lambda w: w["handoff"].update(labels="gpu"), "lease.handoff.labels must be a list of"),
    (lambda w: w["handoff"]["phases"][0].update(objectives=[1]),
     "lease.handoff.phases[0].objectives must be a list of strings"),
    (lambda w: w["handoff"].update(feedback={"reason": "conflict"}),
     "lease.handoff.feedback.detail is missing"),
    (lambda w: w.update(portBase=41000), "lease.portCount is missing"),
    (lambda w: w.update(setup={"command": [], "needed": True, "keep": [], "timeoutS": 1}),
     "lease.setup.command must not be empty"),
    (lambda w: w.update(setup={"command": ["x"], "needed": 1, "keep": [], "timeoutS": 1}),
     "lease.setup.needed must be true or false"),
])
def test_a_wrong_field_is_refused_by_name(change: Any, message: str) -> None:
    wire = _grant().to_wire()
    change(wire)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        LeaseGrant.from_wire(wire)
