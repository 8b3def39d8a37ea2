"""The events table, and the read-only snapshots the metrics take at scrape time."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.protocol.records import EventRecord
from orchestrator.store.connection import StoreConnection
from orchestrator.store.states import LIVE_STATES, STATES, State


@dataclass(frozen=True)
class StoreSnapshot:
    """What the gauges mirror from the store, read in one go at scrape time."""

    counts: Mapping[str, int]
    """Handoffs by state."""
    leases_active: int
    merge_queue_depth: int
    """Handoffs ``reported`` or ``gating``."""
    oldest_s: Mapping[str, float] = field(default_factory=dict)
    """Per live state: how long its longest-waiting handoff has been in it."""
    needing_input: int = 0
    """Handoffs whose agent waits for a person's answer (``lease.ask``)."""
    oldest_question_s: float = 0.0
    """How long the longest-waiting of those questions has waited; 0 when none does."""


class EventLog(StoreConnection):
    """The event log and the metrics' read-only snapshots."""

    def events(self, name: str | None = None, limit: int = 200) -> list[EventRecord]:
        """The last ``limit`` events (of handoff ``name``, if given), oldest first."""
        sql = "SELECT * FROM events"
        args: tuple[Any, ...] = ()
        if name is not None:
            sql += " WHERE handoff = ?"
            args = (name,)
        rows = self._conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [
            EventRecord(
                at=r["at"], handoff=r["handoff"], kind=r["kind"], fields=json.loads(r["detail"])
            )
            for r in reversed(rows)
        ]

    def metrics_snapshot(self, *, now: float) -> StoreSnapshot:
        """What the store-backed gauges show, read in one transaction for a scrape.

        ``counts`` (handoffs by state), ``leases_active``, ``merge_queue_depth`` and
        ``oldest_s`` (per live state, how long its longest-waiting handoff has been in it).
        Costs an index scan plus a row per *live* handoff, so thousands of merged ones in
        the history do not slow a scrape down.
        """
        c = self._conn
        c.execute("BEGIN")  # deferred: one read snapshot for every query, no write lock
        try:
            # Covered by the handoffs_state index: no row is read.
            counts = dict.fromkeys(STATES, 0)
            for state, n in c.execute("SELECT state, COUNT(*) FROM handoffs GROUP BY state"):
                counts[state] = n
            # updated_at is when the handoff entered its state, except that a heartbeat's
            # progress also moves it while leased: a leased one's age comes from its lease.
            # One query per state: SQLite answers MIN() with a single probe of the
            # (state, updated_at) index, where a GROUP BY would walk a whole backlog.
            oldest: dict[str, float] = {}
            for state in LIVE_STATES:
                if state == State.LEASED or not counts.get(state):
                    continue
                (since,) = c.execute(
                    "SELECT MIN(updated_at) FROM handoffs WHERE state = ?", (state,)
                ).fetchone()
                if since is not None:
                    oldest[state] = now - since
            active, granted = c.execute(
                "SELECT COUNT(*), MIN(granted_at) FROM leases"
                " WHERE ended_at IS NULL AND expires_at > ?",
                (now,),
            ).fetchone()
            if granted is not None:
                oldest[State.LEASED] = now - granted
            # Open questions are few (one per live lease at most): a join, not a scan.
            asking, asked_at = c.execute(
                "SELECT COUNT(DISTINCT q.handoff), MIN(q.asked_at) FROM questions q"
                " JOIN leases l ON l.id = q.lease_id"
                " WHERE q.closed_at IS NULL AND l.ended_at IS NULL"
            ).fetchone()
        finally:
            c.execute("COMMIT")
        return StoreSnapshot(
            counts={str(state): n for state, n in counts.items()},
            leases_active=int(active),
            merge_queue_depth=counts[State.REPORTED] + counts[State.GATING],
            oldest_s=oldest,
            needing_input=int(asking),
            oldest_question_s=now - asked_at if asked_at is not None else 0.0,
        )

    def state_clock_start(self) -> tuple[int, list[tuple[str, str, float]]]:
        """Where :meth:`state_changes` should start reading (the last event's id), and the
        live handoffs with their state and since when, to time their next change."""
        c = self._conn
        c.execute("BEGIN")
        try:
            last = c.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
            live = ",".join("?" * len(LIVE_STATES))
            rows = c.execute(
                f"SELECT name, state, updated_at FROM handoffs WHERE state IN ({live})",
                LIVE_STATES,
            ).fetchall()
        finally:
            c.execute("COMMIT")
        return int(last), [(r[0], r[1], float(r[2])) for r in rows]

    def state_changes(self, after: int, limit: int = 10_000) -> list[tuple[int, float, str, str]]:
        """State changes recorded after event id ``after``, oldest first, as
        ``(event id, at, handoff, new state)``; a submission enters ``waiting``."""
        rows = self._conn.execute(
            "SELECT id, at, handoff, kind, detail FROM events"
            " WHERE id > ? AND kind IN ('state', 'submitted') ORDER BY id LIMIT ?",
            (after, limit),
        ).fetchall()
        return [
            (
                int(r[0]),
                float(r[1]),
                str(r[2]),
                State.WAITING if r[3] == "submitted" else str(json.loads(r[4])["state"]),
            )
            for r in rows
        ]
