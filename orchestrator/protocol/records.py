"""Typed records of what the store keeps and the wire carries: handoffs, leases, reports,
gate runs, merges and events.

The store returns these; only their ``to_wire`` builds the camelCase JSON of
PROTOCOL.md (times as RFC 3339), and ``from_wire`` reads that JSON back strictly, with a
ValueError naming the field that is wrong. Times are seconds since the epoch in a
record and RFC 3339 strings (to the millisecond) on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.protocol import strict
from orchestrator.protocol.asking import OpenQuestion
from orchestrator.protocol.jsonrpc import rfc3339
from orchestrator.store.states import State

__all__ = [
    "REPORT_STATUSES",
    "EventRecord",
    "Feedback",
    "GateRunRecord",
    "HandoffDetail",
    "HandoffSummary",
    "LeaseRecord",
    "MergeRecord",
    "NeedsInput",
    "Progress",
    "Report",
    "ReportRecord",
]

# What a report's ``status`` may be (PROTOCOL.md, ``handoff.report``).
REPORT_STATUSES = ("completed", "failed", "blocked")


def _state(obj: Mapping[str, Any], key: str, where: str) -> State:
    text = strict.string(obj, key, where)
    try:
        return State(text)
    except ValueError:
        raise ValueError(f"{where}.{key} must be one of {', '.join(State)}, not {text!r}") from None


# ---- parts of a handoff record ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """A heartbeat's progress (``{"percent","phase","message"}``)."""

    percent: float | None
    phase: str | None
    message: str | None

    def to_wire(self) -> dict[str, Any]:
        """The wire object."""
        return {"percent": self.percent, "phase": self.phase, "message": self.message}

    @classmethod
    def from_wire(cls, obj: Any, where: str = "progress") -> Progress:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        return cls(
            strict.opt_number(obj, "percent", where),
            strict.opt_string(obj, "phase", where),
            strict.opt_string(obj, "message", where),
        )


@dataclass(frozen=True, slots=True)
class NeedsInput:
    """A summary's ``needsInput``: what the handoff's agent asked a person."""

    question: str
    choices: tuple[str, ...] | None
    asked_at: float

    def to_wire(self) -> dict[str, Any]:
        """The wire object (the same as ``asking.needs_input_to_wire``)."""
        return {
            "question": self.question,
            "choices": list(self.choices) if self.choices is not None else None,
            "askedAt": rfc3339(self.asked_at),
        }

    @classmethod
    def asked(cls, question: OpenQuestion | None) -> NeedsInput | None:
        """What ``question`` shows in a summary; None when nothing is asked."""
        if question is None:
            return None
        return cls(question.question.question, question.question.choices, question.asked_at)

    @classmethod
    def from_wire(cls, obj: Any, where: str = "needsInput") -> NeedsInput:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        choices = None if obj.get("choices", ...) is None else strict.strings(obj, "choices", where)
        return cls(
            strict.string(obj, "question", where), choices, strict.time(obj, "askedAt", where)
        )


@dataclass(frozen=True, slots=True)
class Feedback:
    """What the next attempt learns of the last one's failed gate or conflict."""

    reason: str  # "gate_failed" or "conflict"
    detail: str
    log: str

    def to_wire(self) -> dict[str, Any]:
        """The wire object."""
        return {"reason": self.reason, "detail": self.detail, "log": self.log}

    @classmethod
    def from_wire(cls, obj: Any, where: str = "feedback") -> Feedback:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        return cls(
            strict.string(obj, "reason", where),
            strict.string(obj, "detail", where),
            strict.string(obj, "log", where),
        )


def _optional(cls: Any, obj: Mapping[str, Any], key: str, where: str) -> Any:
    value = strict.field(obj, key, where)
    return None if value is None else cls.from_wire(value, f"{where}.{key}")


# ---- the records --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandoffSummary:
    """A handoff as ``handoff.list`` shows it."""

    name: str
    title: str
    priority: str
    state: State
    attempt: int
    dependencies: tuple[str, ...]
    progress: Progress | None
    updated_at: float
    needs_input: NeedsInput | None = None

    def to_wire(self) -> dict[str, Any]:
        """The summary object of PROTOCOL.md."""
        return {
            "name": self.name,
            "title": self.title,
            "priority": self.priority,
            "state": str(self.state),
            "attempt": self.attempt,
            "dependencies": list(self.dependencies),
            "progress": None if self.progress is None else self.progress.to_wire(),
            "updatedAt": rfc3339(self.updated_at),
            "needsInput": None if self.needs_input is None else self.needs_input.to_wire(),
        }

    @classmethod
    def from_wire(cls, obj: Any, where: str = "handoff") -> HandoffSummary:
        """Read back what :meth:`to_wire` made (also the summary part of a detail)."""
        obj = strict.mapping(obj, where)
        return cls(
            name=strict.string(obj, "name", where),
            title=strict.string(obj, "title", where),
            priority=strict.string(obj, "priority", where),
            state=_state(obj, "state", where),
            attempt=strict.integer(obj, "attempt", where),
            dependencies=strict.strings(obj, "dependencies", where),
            progress=_optional(Progress, obj, "progress", where),
            updated_at=strict.time(obj, "updatedAt", where),
            needs_input=_optional(NeedsInput, obj, "needsInput", where),
        )


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A lease as the store keeps it.

    ``token`` is the fencing token: the store has it, the wire never carries it (only
    the worker holding a lease ever sees it, in ``lease.acquire``), so a record read
    back from the wire has ``token`` None. ``uid`` is whoever acquired it (None before
    leases were bound to a uid)."""

    id: str
    handoff: str
    worker: str
    attempt: int
    granted_at: float
    expires_at: float
    base_commit: str | None
    worktree: str | None
    branch: str | None
    ended_at: float | None
    end_reason: str | None
    token: int | None = None
    uid: int | None = None

    def to_wire(self) -> dict[str, Any]:
        """The lease as ``handoff.get`` lists it (no token, no handoff: it is the record's)."""
        return {
            "id": self.id,
            "worker": self.worker,
            "attempt": self.attempt,
            "grantedAt": rfc3339(self.granted_at),
            "expiresAt": rfc3339(self.expires_at),
            "baseCommit": self.base_commit,
            "worktree": self.worktree,
            "branch": self.branch,
            "endedAt": rfc3339(self.ended_at),
            "endReason": self.end_reason,
        }

    def to_status_wire(self, needs_input: NeedsInput | None) -> dict[str, Any]:
        """The lease as ``status`` lists it, with what its agent is asking, if anything."""
        return {
            "id": self.id,
            "handoff": self.handoff,
            "worker": self.worker,
            "attempt": self.attempt,
            "grantedAt": rfc3339(self.granted_at),
            "expiresAt": rfc3339(self.expires_at),
            "needsInput": None if needs_input is None else needs_input.to_wire(),
        }

    @classmethod
    def from_wire(
        cls, obj: Any, where: str = "lease", *, handoff: str | None = None
    ) -> LeaseRecord:
        """Read back what :meth:`to_wire` made; ``handoff`` names the record it came from
        (a ``handoff.get`` lease has none of its own)."""
        obj = strict.mapping(obj, where)
        if handoff is None:
            handoff = strict.string(obj, "handoff", where)
        return cls(
            id=strict.string(obj, "id", where),
            handoff=handoff,
            worker=strict.string(obj, "worker", where),
            attempt=strict.integer(obj, "attempt", where),
            granted_at=strict.time(obj, "grantedAt", where),
            expires_at=strict.time(obj, "expiresAt", where),
            base_commit=strict.opt_string(obj, "baseCommit", where),
            worktree=strict.opt_string(obj, "worktree", where),
            branch=strict.opt_string(obj, "branch", where),
            ended_at=strict.opt_time(obj, "endedAt", where),
            end_reason=strict.opt_string(obj, "endReason", where),
        )


_REPORT_FIELDS = ("status", "head", "summary", "markdown", "phases", "metrics")


@dataclass(frozen=True, slots=True)
class Report:
    """The ``report`` of ``handoff.report``.

    ``extra`` keeps what the worker sent beyond the typed fields (keys this daemon does
    not know, and optional fields sent as an explicit null) so that nothing accepted is
    lost and ``handoff.get`` shows the report as it came. An optional field that is None
    was not sent."""

    status: str
    head: str
    summary: str | None = None
    markdown: str | None = None
    phases: tuple[Any, ...] | None = None
    metrics: tuple[Any, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """The report object as the worker sent it."""
        wire: dict[str, Any] = {"status": self.status, "head": self.head}
        if self.summary is not None:
            wire["summary"] = self.summary
        if self.markdown is not None:
            wire["markdown"] = self.markdown
        if self.phases is not None:
            wire["phases"] = list(self.phases)
        if self.metrics is not None:
            wire["metrics"] = list(self.metrics)
        wire.update(self.extra)
        return wire

    @classmethod
    def from_wire(cls, obj: Any) -> Report:
        """Check a report as ``handoff.report`` receives it. The ValueError's text is the
        -32602 message the worker gets."""
        if not isinstance(obj, dict):
            raise ValueError('invalid params: "report" must be an object')
        status = obj.get("status")
        if status not in REPORT_STATUSES:
            raise ValueError(
                f"invalid params: report.status must be one of {', '.join(REPORT_STATUSES)}"
            )
        head = obj.get("head")
        if not isinstance(head, str) or not head:
            raise ValueError("invalid params: report.head must be the branch tip sha")
        for key in ("summary", "markdown"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise ValueError(f"invalid params: report.{key} must be a string")
        for key in ("phases", "metrics"):
            if obj.get(key) is not None and not isinstance(obj[key], list):
                raise ValueError(f"invalid params: report.{key} must be a list")
        extra = {
            k: v for k, v in obj.items() if k not in _REPORT_FIELDS or (v is None and k != "head")
        }
        phases, metrics = obj.get("phases"), obj.get("metrics")
        return cls(
            status=str(status),
            head=head,
            summary=obj.get("summary"),
            markdown=obj.get("markdown"),
            phases=None if phases is None else tuple(phases),
            metrics=None if metrics is None else tuple(metrics),
            extra=extra,
        )


@dataclass(frozen=True, slots=True)
class ReportRecord:
    """A report as stored: which attempt and lease sent it, and when it arrived."""

    report: Report
    attempt: int
    lease_id: str
    received_at: float

    def to_wire(self) -> dict[str, Any]:
        """A ``handoff.get`` report: the report's fields plus ``attempt``, ``leaseId``
        and ``receivedAt``."""
        return {
            **self.report.to_wire(),
            "attempt": self.attempt,
            "leaseId": self.lease_id,
            "receivedAt": rfc3339(self.received_at),
        }

    @classmethod
    def from_wire(cls, obj: Any, where: str = "report") -> ReportRecord:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        attempt = strict.integer(obj, "attempt", where)
        lease_id = strict.string(obj, "leaseId", where)
        received_at = strict.time(obj, "receivedAt", where)
        rest = {k: v for k, v in obj.items() if k not in ("attempt", "leaseId", "receivedAt")}
        try:
            report = Report.from_wire(rest)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}".replace("invalid params: ", "")) from None
        return cls(report, attempt, lease_id, received_at)


@dataclass(frozen=True, slots=True)
class GateRunRecord:
    """One run of one gate on one candidate."""

    gate: str
    attempt: int
    candidate: str
    exit_status: int | None  # None when it timed out or could not start
    timed_out: bool
    duration_s: float
    output_tail: str
    started_at: float

    @property
    def passed(self) -> bool:
        """Whether this run passed (exit status 0 within its timeout)."""
        return self.exit_status == 0 and not self.timed_out

    def to_wire(self) -> dict[str, Any]:
        """A ``handoff.get`` gate run."""
        return {
            "gate": self.gate,
            "attempt": self.attempt,
            "candidate": self.candidate,
            "exitStatus": self.exit_status,
            "timedOut": self.timed_out,
            "durationS": self.duration_s,
            "outputTail": self.output_tail,
            "startedAt": rfc3339(self.started_at),
        }

    @classmethod
    def from_wire(cls, obj: Any, where: str = "gate") -> GateRunRecord:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        return cls(
            gate=strict.string(obj, "gate", where),
            attempt=strict.integer(obj, "attempt", where),
            candidate=strict.string(obj, "candidate", where),
            exit_status=strict.opt_integer(obj, "exitStatus", where),
            timed_out=strict.boolean(obj, "timedOut", where),
            duration_s=strict.number(obj, "durationS", where),
            output_tail=strict.string(obj, "outputTail", where),
            started_at=strict.time(obj, "startedAt", where),
        )


@dataclass(frozen=True, slots=True)
class MergeRecord:
    """One merge decision on a handoff: merged, conflict, gate_failed, ..."""

    attempt: int
    result: str
    base: str | None
    candidate: str | None
    detail: str
    at: float

    def to_wire(self) -> dict[str, Any]:
        """A ``handoff.get`` merge."""
        return {
            "attempt": self.attempt,
            "result": self.result,
            "base": self.base,
            "candidate": self.candidate,
            "detail": self.detail,
            "at": rfc3339(self.at),
        }

    @classmethod
    def from_wire(cls, obj: Any, where: str = "merge") -> MergeRecord:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        return cls(
            attempt=strict.integer(obj, "attempt", where),
            result=strict.string(obj, "result", where),
            base=strict.opt_string(obj, "base", where),
            candidate=strict.opt_string(obj, "candidate", where),
            detail=strict.string(obj, "detail", where),
            at=strict.time(obj, "at", where),
        )


@dataclass(frozen=True, slots=True)
class HandoffDetail:
    """The full record of ``handoff.get``: the summary's fields plus everything else."""

    summary: HandoffSummary
    body: str
    labels: tuple[str, ...]
    detail: str | None
    feedback: Feedback | None
    submitted_at: float
    merged_at: float | None
    merge_commit: str | None
    conflicts: tuple[str, ...]
    leases: tuple[LeaseRecord, ...]
    reports: tuple[ReportRecord, ...]
    gates: tuple[GateRunRecord, ...]
    merges: tuple[MergeRecord, ...]
    # Filled in by the daemon for a handoff in the merge queue (the store cannot know).
    eta_s: float | None = None

    @property
    def name(self) -> str:
        """The handoff's name."""
        return self.summary.name

    @property
    def state(self) -> State:
        """The handoff's state."""
        return self.summary.state

    def to_wire(self) -> dict[str, Any]:
        """The ``handoff.get`` result."""
        return {
            **self.summary.to_wire(),
            "body": self.body,
            "labels": list(self.labels),
            "detail": self.detail,
            "feedback": None if self.feedback is None else self.feedback.to_wire(),
            "submittedAt": rfc3339(self.submitted_at),
            "mergedAt": rfc3339(self.merged_at),
            "mergeCommit": self.merge_commit,
            "conflicts": list(self.conflicts),
            "leases": [lease.to_wire() for lease in self.leases],
            "reports": [report.to_wire() for report in self.reports],
            "gates": [gate.to_wire() for gate in self.gates],
            "merges": [merge.to_wire() for merge in self.merges],
            "etaS": self.eta_s,
        }

    @classmethod
    def from_wire(cls, obj: Any, where: str = "handoff") -> HandoffDetail:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        summary = HandoffSummary.from_wire(obj, where)

        def each(key: str, read: Any) -> tuple[Any, ...]:
            return tuple(
                read(item, f"{where}.{key}[{i}]")
                for i, item in enumerate(strict.array(obj, key, where))
            )

        return cls(
            summary=summary,
            body=strict.string(obj, "body", where),
            labels=strict.strings(obj, "labels", where),
            detail=strict.opt_string(obj, "detail", where),
            feedback=_optional(Feedback, obj, "feedback", where),
            submitted_at=strict.time(obj, "submittedAt", where),
            merged_at=strict.opt_time(obj, "mergedAt", where),
            merge_commit=strict.opt_string(obj, "mergeCommit", where),
            conflicts=strict.strings(obj, "conflicts", where),
            leases=each("leases", lambda o, w: LeaseRecord.from_wire(o, w, handoff=summary.name)),
            reports=each("reports", ReportRecord.from_wire),
            gates=each("gates", GateRunRecord.from_wire),
            merges=each("merges", MergeRecord.from_wire),
            eta_s=strict.opt_number(obj, "etaS", where) if "etaS" in obj else None,
        )


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One line of the store's event log; ``fields`` are the event's own (they vary by
    ``kind``: a lease id, a status, a head, ...)."""

    at: float
    handoff: str | None
    kind: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """The event as one flat object: ``at``, ``handoff``, ``kind`` and its fields."""
        return {"at": rfc3339(self.at), "handoff": self.handoff, "kind": self.kind, **self.fields}

    @classmethod
    def from_wire(cls, obj: Any, where: str = "event") -> EventRecord:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        rest = {k: v for k, v in obj.items() if k not in ("at", "handoff", "kind")}
        return cls(
            strict.time(obj, "at", where),
            strict.opt_string(obj, "handoff", where),
            strict.string(obj, "kind", where),
            rest,
        )
