"""The ``lease`` object of the ``lease.acquire`` result, as a typed record.

The daemon builds a :class:`LeaseGrant` and sends its ``to_wire``; a worker reads the
result back with ``from_wire``, which is strict: a field of the wrong type is a
ValueError naming it. Fields the protocol added within version 1 (``integrationCommit``,
``portBase``/``portCount``, ``setup``) are optional on the way in, since an older daemon
does not send them, and left out on the way out when a lease has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.protocol import strict
from orchestrator.protocol.jsonrpc import rfc3339
from orchestrator.protocol.records import Feedback

__all__ = ["LeaseGrant", "LeasePorts", "LeaseSetup", "LeasedHandoff", "MetricSpec", "PhaseSpec"]


# ---- the parts ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    """One phase of the handoff's plan: its name and objectives."""

    name: str
    objectives: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        """The wire object."""
        return {"name": self.name, "objectives": list(self.objectives)}

    @classmethod
    def from_wire(cls, obj: Any, where: str = "phase") -> PhaseSpec:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        return cls(strict.string(obj, "name", where), strict.strings(obj, "objectives", where))


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One success metric of the handoff: its name and criteria."""

    name: str
    criteria: str

    def to_wire(self) -> dict[str, Any]:
        """The wire object."""
        return {"name": self.name, "criteria": self.criteria}

    @classmethod
    def from_wire(cls, obj: Any, where: str = "successMetric") -> MetricSpec:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        return cls(strict.string(obj, "name", where), strict.string(obj, "criteria", where))


_HANDOFF_FIELDS = (
    "name",
    "title",
    "priority",
    "dependencies",
    "labels",
    "body",
    "phases",
    "successMetrics",
    "feedback",
)


@dataclass(frozen=True, slots=True)
class LeasedHandoff:
    """The handoff a lease is for: its spec, its markdown, and the last attempt's feedback.

    ``extra`` keeps keys the typed fields do not know, so that what the store kept of a
    handoff reaches the worker whole."""

    name: str
    title: str
    priority: str
    dependencies: tuple[str, ...]
    labels: tuple[str, ...]
    body: str
    phases: tuple[PhaseSpec, ...]
    success_metrics: tuple[MetricSpec, ...]
    feedback: Feedback | None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """The ``handoff`` object of the lease."""
        return {
            "name": self.name,
            "title": self.title,
            "priority": self.priority,
            "dependencies": list(self.dependencies),
            "labels": list(self.labels),
            "body": self.body,
            "phases": [phase.to_wire() for phase in self.phases],
            "successMetrics": [metric.to_wire() for metric in self.success_metrics],
            "feedback": None if self.feedback is None else self.feedback.to_wire(),
            **self.extra,
        }

    @classmethod
    def from_wire(cls, obj: Any, where: str = "handoff") -> LeasedHandoff:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        feedback = strict.field(obj, "feedback", where)
        return cls(
            name=strict.string(obj, "name", where),
            title=strict.string(obj, "title", where),
            priority=strict.string(obj, "priority", where),
            dependencies=strict.strings(obj, "dependencies", where),
            labels=strict.strings(obj, "labels", where),
            body=strict.string(obj, "body", where),
            phases=tuple(
                PhaseSpec.from_wire(p, f"{where}.phases[{i}]")
                for i, p in enumerate(strict.mappings(obj, "phases", where))
            ),
            success_metrics=tuple(
                MetricSpec.from_wire(m, f"{where}.successMetrics[{i}]")
                for i, m in enumerate(strict.mappings(obj, "successMetrics", where))
            ),
            feedback=None
            if feedback is None
            else Feedback.from_wire(feedback, f"{where}.feedback"),
            extra={k: v for k, v in obj.items() if k not in _HANDOFF_FIELDS},
        )


@dataclass(frozen=True, slots=True)
class LeasePorts:
    """Ports ``base`` .. ``base + count - 1``: no other live lease or gate uses them."""

    base: int
    count: int


@dataclass(frozen=True, slots=True)
class LeaseSetup:
    """``[workspace] setup``, for the worker to run in the worktree before the agent:
    ``needed`` is false while the kept paths were built for the same cache key."""

    command: tuple[str, ...]
    needed: bool
    keep: tuple[str, ...]
    timeout_s: float

    def to_wire(self) -> dict[str, Any]:
        """The lease's ``setup`` object."""
        return {
            "command": list(self.command),
            "needed": self.needed,
            "keep": list(self.keep),
            "timeoutS": self.timeout_s,
        }

    @classmethod
    def from_wire(cls, obj: Any, where: str = "setup") -> LeaseSetup:
        """Read back what :meth:`to_wire` made; the command must not be empty."""
        obj = strict.mapping(obj, where)
        command = strict.strings(obj, "command", where)
        if not command:
            raise ValueError(f"{where}.command must not be empty")
        needed = strict.field(obj, "needed", where)
        if not isinstance(needed, bool):
            raise ValueError(f"{where}.needed must be true or false")
        timeout = strict.field(obj, "timeoutS", where)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise ValueError(f"{where}.timeoutS must be a number")
        return cls(command, needed, strict.strings(obj, "keep", where), timeout)


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """A granted lease, as only the worker holding it sees it (it carries the token).

    ``base_commit`` is where the handoff branch stood when the lease was granted (the
    integration tip on a first attempt, the earlier attempts' commits on a retry);
    ``integration_commit`` is the integration tip then (None from an older daemon)."""

    id: str
    token: int
    handoff: LeasedHandoff
    worktree: str
    branch: str
    base_commit: str
    integration_commit: str | None
    attempt: int
    expires_at: float
    ports: LeasePorts | None = None
    setup: LeaseSetup | None = None

    def to_wire(self) -> dict[str, Any]:
        """The ``lease`` object of the ``lease.acquire`` result."""
        wire: dict[str, Any] = {
            "id": self.id,
            "token": self.token,
            "handoff": self.handoff.to_wire(),
            "worktree": self.worktree,
            "branch": self.branch,
            "baseCommit": self.base_commit,
        }
        if self.integration_commit is not None:
            wire["integrationCommit"] = self.integration_commit
        wire["attempt"] = self.attempt
        wire["expiresAt"] = rfc3339(self.expires_at)
        if self.ports is not None:
            wire["portBase"] = self.ports.base
            wire["portCount"] = self.ports.count
        if self.setup is not None:
            wire["setup"] = self.setup.to_wire()
        return wire

    @classmethod
    def from_wire(cls, obj: Any, where: str = "lease") -> LeaseGrant:
        """Read back what :meth:`to_wire` made."""
        obj = strict.mapping(obj, where)
        integration = obj.get("integrationCommit")
        if integration is not None and not isinstance(integration, str):
            raise ValueError(f"{where}.integrationCommit must be a string")
        ports = None
        if obj.get("portBase") is not None:
            ports = LeasePorts(
                strict.integer(obj, "portBase", where), strict.integer(obj, "portCount", where)
            )
        setup = obj.get("setup")
        return cls(
            id=strict.string(obj, "id", where),
            token=strict.integer(obj, "token", where),
            handoff=LeasedHandoff.from_wire(
                strict.field(obj, "handoff", where), f"{where}.handoff"
            ),
            worktree=strict.string(obj, "worktree", where),
            branch=strict.string(obj, "branch", where),
            base_commit=strict.string(obj, "baseCommit", where),
            integration_commit=integration,
            attempt=strict.integer(obj, "attempt", where),
            expires_at=strict.time(obj, "expiresAt", where),
            ports=ports,
            setup=None if setup is None else LeaseSetup.from_wire(setup, f"{where}.setup"),
        )
