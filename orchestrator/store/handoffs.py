"""The handoffs table: submission with its dependency checks, cancel, retry, and the
summaries and full records the control API reads."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.handoff.template import Priority
from orchestrator.protocol.asking import OpenQuestion
from orchestrator.protocol.records import (
    Feedback,
    GateRunRecord,
    HandoffDetail,
    HandoffSummary,
    MergeRecord,
    NeedsInput,
    Progress,
    Report,
    ReportRecord,
)
from orchestrator.store.connection import StoreConnection, from_json
from orchestrator.store.errors import DuplicateHandoff, InvalidSubmission, InvalidTransition
from orchestrator.store.leases import lease_of_row
from orchestrator.store.states import RETRYABLE_STATES, STATES, State


@dataclass(frozen=True)
class NewHandoff:
    """A validated handoff ready to store (the caller parsed and checked it)."""

    name: str
    title: str
    priority: str
    dependencies: tuple[str, ...]
    labels: tuple[str, ...]
    body: str
    wire: dict[str, Any]


def _summary(row: sqlite3.Row, asked: OpenQuestion | None) -> HandoffSummary:
    progress = from_json(row["progress"])
    return HandoffSummary(
        name=row["name"],
        title=row["title"],
        priority=row["priority"],
        state=State(row["state"]),
        attempt=row["attempt"],
        dependencies=tuple(json.loads(row["dependencies"])),
        progress=None if progress is None else Progress.from_wire(progress),
        updated_at=row["updated_at"],
        needs_input=NeedsInput.asked(asked),
    )


def _find_cycle(graph: dict[str, tuple[str, ...]]) -> list[str] | None:
    """A dependency cycle within one submission batch, as a path, or None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done or node not in graph:
            return None
        visiting.append(node)
        for dep in graph[node]:
            found = visit(dep)
            if found:
                return found
        visiting.pop()
        done.add(node)
        return None

    for start in graph:
        found = visit(start)
        if found:
            return found
    return None


class HandoffTable(StoreConnection):
    """Submitting, cancelling and retrying handoffs, and reading them back."""

    def submit(self, handoffs: Sequence[NewHandoff], *, max_attempts: int, now: float) -> list[str]:
        """Store all of ``handoffs`` or none of them."""
        with self._tx() as c:
            names = [h.name for h in handoffs]
            dupes = sorted({n for n in names if names.count(n) > 1})
            existing = [
                n
                for n in names
                if c.execute("SELECT 1 FROM handoffs WHERE name = ?", (n,)).fetchone()
            ]
            if dupes or existing:
                raise DuplicateHandoff(sorted(set(dupes) | set(existing)))
            batch = {h.name: h for h in handoffs}
            problems: list[dict[str, Any]] = []
            for h in handoffs:
                for dep in h.dependencies:
                    if dep in batch:
                        continue
                    if not c.execute("SELECT 1 FROM handoffs WHERE name = ?", (dep,)).fetchone():
                        problems.append(
                            {
                                "line": 0,
                                "handoff": h.name,
                                "message": f"{h.name} depends on unknown handoff {dep!r}: "
                                "submit it first or in the same batch",
                            }
                        )
            cycle = _find_cycle({h.name: h.dependencies for h in handoffs})
            if cycle:
                problems.append(
                    {
                        "line": 0,
                        "handoff": cycle[0],
                        "message": "dependency cycle: " + " -> ".join(cycle),
                    }
                )
            if problems:
                raise InvalidSubmission(problems)
            for h in handoffs:
                seq = self._counter(c, "handoff_seq")
                c.execute(
                    "INSERT INTO handoffs(name, seq, title, priority, priority_rank, dependencies,"
                    " labels, body, wire, state, attempt, attempt_limit, submitted_at, updated_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        h.name,
                        seq,
                        h.title,
                        h.priority,
                        Priority(h.priority).rank,
                        json.dumps(list(h.dependencies)),
                        json.dumps(list(h.labels)),
                        h.body,
                        json.dumps(h.wire, allow_nan=False),
                        State.WAITING,
                        1,
                        max_attempts,
                        now,
                        now,
                    ),
                )
                self._event(c, now, h.name, "submitted", priority=h.priority)
            self._release_waiting(c, now)
            return names

    def cancel(self, name: str, *, now: float) -> str | None:
        """Cancel a handoff; returns the id of the lease to revoke, if one was held."""
        with self._tx() as c:
            row = self._row(c, name)
            if row["state"] == State.MERGED:
                raise InvalidTransition(f"{name} is already merged; nothing to cancel")
            if row["state"] == State.CANCELLED:
                return None
            if row["state"] == State.GATING and self._moving(c, name):
                # Its gates passed and the branch is moving: a cancel now could only be
                # overridden (the work lands anyway) or leave landed work marked cancelled.
                # Before the move (even while it waits for a dirty checkout) a cancel wins.
                raise InvalidTransition(
                    f"{name} passed its gates and is landing on the integration branch right "
                    "now; it cannot be cancelled any more. Once it is merged, revert its merge "
                    "commit if the work must go"
                )
            lease = c.execute(
                "SELECT id FROM leases WHERE handoff = ? AND ended_at IS NULL", (name,)
            ).fetchone()
            if lease is not None:
                self._end_lease(c, lease["id"], "cancelled", now)
            self._set_state(c, name, State.CANCELLED, now, detail="cancelled by a person")
            return None if lease is None else str(lease["id"])

    def retry(self, name: str, *, max_attempts: int, now: float) -> State:
        """Give a failed, conflicting or cancelled handoff a fresh attempt budget."""
        with self._tx() as c:
            row = self._row(c, name)
            if row["state"] not in RETRYABLE_STATES:
                raise InvalidTransition(
                    f"{name} is {row['state']}; only a failed, conflict or cancelled handoff "
                    "can be retried"
                )
            attempt = row["attempt"] + 1
            self._set_state(
                c,
                name,
                State.WAITING,
                now,
                attempt=attempt,
                attempt_limit=attempt + max_attempts - 1,
                detail="retried by a person",
            )
            self._release_waiting(c, now)
            return State(self._row(c, name)["state"])

    def counts(self) -> dict[str, int]:
        """How many handoffs are in each state (every state, 0 when none)."""
        counts: dict[str, int] = dict.fromkeys(STATES, 0)
        for row in self._conn.execute("SELECT state, COUNT(*) FROM handoffs GROUP BY state"):
            counts[row[0]] = row[1]
        return counts

    def summaries(self, state: State | None = None) -> list[HandoffSummary]:
        """Every handoff (in ``state``, if given) in submission order."""
        sql = "SELECT * FROM handoffs"
        args: tuple[Any, ...] = ()
        if state is not None:
            sql += " WHERE state = ?"
            args = (state,)
        rows = self._conn.execute(sql + " ORDER BY seq", args).fetchall()
        asked = self.open_questions()
        return [_summary(r, asked.get(r["name"])) for r in rows]

    def recent_summaries(self, states: Sequence[State], limit: int) -> list[HandoffSummary]:
        """The ``limit`` handoffs in ``states`` that changed last, newest first (one index
        probe per state, however many merged handoffs the store holds). Meant for
        outcomes: ``needs_input`` is not looked up (only a live lease asks)."""
        rows: list[sqlite3.Row] = []
        for state in states:
            # Per state, so each is a backwards walk of handoffs_state_since (an IN list
            # would sort every merged handoff ever).
            rows += self._conn.execute(
                "SELECT * FROM handoffs WHERE state = ? ORDER BY updated_at DESC LIMIT ?",
                (state, limit),
            ).fetchall()
        rows.sort(key=lambda r: r["updated_at"], reverse=True)
        return [_summary(r, None) for r in rows[:limit]]

    def has_open_lease(self, name: str) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM leases WHERE handoff = ? AND ended_at IS NULL", (name,)
            ).fetchone()
            is not None
        )

    def state_of(self, name: str) -> State:
        """The handoff's state; raises :class:`UnknownHandoff`."""
        return State(self._row(self._conn, name)["state"])

    def detail(self, name: str) -> HandoffDetail:
        """The full record for ``handoff.get``."""
        c = self._conn
        row = self._row(c, name)
        asked = self._open_questions(c, name)
        feedback = from_json(row["feedback"])
        return HandoffDetail(
            summary=_summary(row, asked[0][1] if asked else None),
            body=row["body"],
            labels=tuple(json.loads(row["labels"])),
            detail=row["detail"],
            feedback=None if feedback is None else Feedback.from_wire(feedback),
            submitted_at=row["submitted_at"],
            merged_at=row["merged_at"],
            merge_commit=row["merge_commit"],
            conflicts=tuple(from_json(row["conflicts"]) or ()),
            leases=tuple(
                lease_of_row(r)
                for r in c.execute("SELECT * FROM leases WHERE handoff = ? ORDER BY token", (name,))
            ),
            reports=tuple(
                ReportRecord(
                    report=Report.from_wire(json.loads(r["report"])),
                    attempt=r["attempt"],
                    lease_id=r["lease_id"],
                    received_at=r["received_at"],
                )
                for r in c.execute("SELECT * FROM reports WHERE handoff = ? ORDER BY id", (name,))
            ),
            gates=tuple(
                GateRunRecord(
                    gate=r["gate"],
                    attempt=r["attempt"],
                    candidate=r["candidate"],
                    exit_status=r["exit_status"],
                    timed_out=bool(r["timed_out"]),
                    duration_s=r["duration_s"],
                    output_tail=r["output_tail"],
                    started_at=r["started_at"],
                )
                for r in c.execute("SELECT * FROM gate_runs WHERE handoff = ? ORDER BY id", (name,))
            ),
            merges=tuple(
                MergeRecord(
                    attempt=r["attempt"],
                    result=r["result"],
                    base=r["base"],
                    candidate=r["candidate"],
                    detail=r["detail"],
                    at=r["at"],
                )
                for r in c.execute("SELECT * FROM merges WHERE handoff = ? ORDER BY id", (name,))
            ),
        )
