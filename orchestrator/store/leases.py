"""The leases and reports tables: grant, renew, expiry, release, report, restart recovery."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from orchestrator.protocol.records import LeaseRecord, Progress, Report
from orchestrator.store.connection import StoreConnection, from_json, to_json
from orchestrator.store.errors import LeaseNotHeld
from orchestrator.store.states import BLOCKED_DETAIL, State

# A granted lease does not expire while its worktree is being prepared (the TTL starts
# when the worker gets it); this bounds how long a preparation may take.
PREPARE_GRACE_S = 900.0


@dataclass(frozen=True)
class Grant:
    """A lease just granted: what the daemon needs to prepare the worktree and reply."""

    lease_id: str
    token: int
    handoff: str
    attempt: int
    expires_at: float
    wire: dict[str, Any]
    feedback: dict[str, Any] | None


@dataclass(frozen=True)
class Expired:
    lease_id: str
    handoff: str
    new_state: State
    # "expired" (no heartbeat within the TTL) or "max_duration" (held too long).
    reason: str = "expired"


def new_lease_id() -> str:
    # Time-prefixed so ids sort by grant time in logs; random part makes them unguessable.
    return f"l-{int(time.time() * 1000):x}{secrets.token_hex(6)}"


def lease_of_row(row: sqlite3.Row) -> LeaseRecord:
    return LeaseRecord(
        id=row["id"],
        handoff=row["handoff"],
        worker=row["worker"],
        attempt=row["attempt"],
        granted_at=row["granted_at"],
        expires_at=row["expires_at"],
        base_commit=row["base_commit"],
        worktree=row["worktree"],
        branch=row["branch"],
        ended_at=row["ended_at"],
        end_reason=row["end_reason"],
        token=row["token"],
        uid=row["uid"],
    )


class LeaseTable(StoreConnection):
    """Granting, renewing, ending and reporting on leases."""

    def queued_label_sets(self) -> set[frozenset[str]]:
        """The label sets of the queued handoffs: a worker whose labels hold none of them
        would find nothing to lease (a read, no write lock)."""
        rows = self._conn.execute(
            "SELECT DISTINCT labels FROM handoffs WHERE state = ?", (State.QUEUED,)
        )
        return {frozenset(from_json(r[0])) for r in rows.fetchall()}

    def grant(
        self,
        *,
        worker: str,
        labels: Iterable[str],
        ttl_s: float,
        now: float,
        uid: int | None = None,
    ) -> Grant | None:
        """Lease the first dispatchable handoff the worker's labels allow, or None.

        Order: priority (HIGH first), then submission order."""
        worker_labels = set(labels)
        with self._tx() as c:
            for row in c.execute(
                "SELECT * FROM handoffs WHERE state = ? ORDER BY priority_rank, seq",
                (State.QUEUED,),
            ).fetchall():
                if not set(json.loads(row["labels"])) <= worker_labels:
                    continue
                token = self._counter(c, "fencing_token")
                lease_id = new_lease_id()
                expires = now + ttl_s + PREPARE_GRACE_S
                c.execute(
                    "INSERT INTO leases(id, token, handoff, worker, attempt, granted_at,"
                    " expires_at, uid) VALUES (?,?,?,?,?,?,?,?)",
                    (lease_id, token, row["name"], worker, row["attempt"], now, expires, uid),
                )
                self._set_state(c, row["name"], State.LEASED, now, progress=None)
                self._event(
                    c,
                    now,
                    row["name"],
                    "lease_granted",
                    lease=lease_id,
                    token=token,
                    worker=worker,
                    attempt=row["attempt"],
                )
                return Grant(
                    lease_id=lease_id,
                    token=token,
                    handoff=row["name"],
                    attempt=row["attempt"],
                    expires_at=expires,
                    wire=json.loads(row["wire"]),
                    feedback=from_json(row["feedback"]),
                )
        return None

    def set_lease_workspace(
        self, lease_id: str, *, base_commit: str, worktree: str, branch: str, expires_at: float
    ) -> None:
        """Record the prepared worktree and start the lease's TTL."""
        with self._tx() as c:
            updated = c.execute(
                "UPDATE leases SET base_commit = ?, worktree = ?, branch = ?, expires_at = ?"
                " WHERE id = ? AND ended_at IS NULL",
                (base_commit, worktree, branch, expires_at, lease_id),
            ).rowcount
            if updated != 1:
                raise LeaseNotHeld(f"lease {lease_id} ended while its worktree was prepared")

    def abandon_grant(
        self, lease_id: str, *, reason: str, now: float, charge: bool = False
    ) -> None:
        """A lease the worker never received: end it and put the handoff back in the queue
        without spending an attempt (it was the daemon's failure, not the agent's). With
        ``charge`` (its preparation keeps failing, say on what its branch holds), an
        attempt is spent, and the handoff fails once none is left: first in line, it
        would otherwise stop every handoff behind it."""
        with self._tx() as c:
            lease = c.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if lease is None or lease["ended_at"] is not None:
                return
            self._end_lease(c, lease_id, "abandoned", now)
            self._event(c, now, lease["handoff"], "lease_abandoned", lease=lease_id, reason=reason)
            row = self._row(c, lease["handoff"])
            if row["state"] != State.LEASED:
                return
            if charge:
                self._requeue(c, row, now, feedback=from_json(row["feedback"]), detail=reason)
            else:
                self._set_state(c, lease["handoff"], State.QUEUED, now, detail=reason)

    def lease(self, lease_id: str, token: int, *, now: float) -> LeaseRecord:
        """The lease if it is held with this token; raises :class:`LeaseNotHeld`."""
        with self._tx() as c:
            return lease_of_row(self._held(c, lease_id, token, now))

    def renew(
        self,
        lease_id: str,
        token: int,
        *,
        ttl_s: float,
        progress: Progress | None,
        now: float,
        worker: str | None = None,
        uid: int | None = None,
    ) -> float:
        """Extend a held lease by ``ttl_s``; with ``worker`` (and ``uid``), only for the
        worker (and uid) that acquired it.

        The one commit not fsynced before the reply (``synchronous=NORMAL``): a renewal
        lost to a power cut costs nothing, since ``recover`` gives every open lease a full
        TTL at start-up, and the WAL keeps it in order behind every durable commit. On a
        disk shared with busy neighbours an fsync takes up to hundreds of ms, and 16
        leases heartbeating queued their fsyncs on the store's one lane (p99 > 100 ms)."""
        self._conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._tx() as c:
                row = self._held(c, lease_id, token, now, worker, uid)
                expires = now + ttl_s
                c.execute("UPDATE leases SET expires_at = ? WHERE id = ?", (expires, lease_id))
                if progress is not None:
                    c.execute(
                        "UPDATE handoffs SET progress = ?, updated_at = ? WHERE name = ?",
                        (to_json(progress.to_wire()), now, row["handoff"]),
                    )
                return expires
        finally:
            self._conn.execute("PRAGMA synchronous=FULL")

    def expire_due(self, *, now: float, max_duration_s: float | None = None) -> list[Expired]:
        """End every lease past its expiry, or (with ``max_duration_s``) held longer than
        that since it was granted however often it was renewed, and re-queue (or fail)
        its handoff."""
        out = []
        # 1e300 s stands for "no bound". A lease still being prepared has no worktree
        # yet: PREPARE_GRACE_S bounds that stretch instead.
        longest = max_duration_s or 1e300
        with self._tx() as c:
            for lease in c.execute(
                "SELECT * FROM leases WHERE ended_at IS NULL"
                " AND (expires_at <= ? OR (worktree IS NOT NULL AND granted_at + ? <= ?))",
                (now, longest, now),
            ).fetchall():
                too_long = lease["expires_at"] > now
                reason = "max_duration" if too_long else "expired"
                self._end_lease(c, lease["id"], reason, now)
                row = self._row(c, lease["handoff"])
                self._event(c, now, row["name"], "lease_" + reason, lease=lease["id"])
                state = State(row["state"])
                if state == State.LEASED:
                    detail = (
                        f"lease {lease['id']} held for more than leases.max_duration_s "
                        f"({longest:g} s) without a report; revoked"
                        if too_long
                        else f"lease {lease['id']} expired"
                    )
                    # Keep whatever feedback the attempt had: the next agent still needs it.
                    state = self._requeue(
                        c, row, now, feedback=from_json(row["feedback"]), detail=detail
                    )
                out.append(Expired(lease["id"], row["name"], state, reason))
        return out

    def release(
        self,
        lease_id: str,
        token: int,
        *,
        reason: str,
        now: float,
        worker: str | None = None,
        uid: int | None = None,
    ) -> State:
        """Give a held lease back unfinished; the handoff is re-queued at once."""
        with self._tx() as c:
            lease = self._held(c, lease_id, token, now, worker, uid)
            self._end_lease(c, lease_id, "released", now)
            row = self._row(c, lease["handoff"])
            self._event(c, now, row["name"], "lease_released", lease=lease_id, reason=reason)
            return self._requeue(
                c,
                row,
                now,
                feedback=from_json(row["feedback"]),
                detail=f"released by the worker: {reason}" if reason else "released by the worker",
            )

    def already_reported(
        self,
        lease_id: str,
        token: int,
        head: str,
        *,
        worker: str | None = None,
        uid: int | None = None,
    ) -> bool:
        """Whether this exact report was accepted before (a retry after a lost reply),
        from the same worker name and uid as the lease's when those are given."""
        row = self._conn.execute(
            "SELECT l.token, l.end_reason, l.worker, l.uid, r.head FROM leases l JOIN reports r"
            " ON r.lease_id = l.id WHERE l.id = ? ORDER BY r.id DESC LIMIT 1",
            (lease_id,),
        ).fetchone()
        return bool(
            row is not None
            and (worker is None or row["worker"] == worker)
            and (uid is None or row["uid"] is None or row["uid"] == uid)
            and row["token"] == token
            and row["end_reason"] == "reported"
            and row["head"] == head
        )

    def accept_report(
        self, lease_id: str, token: int, *, report: Report, head: str, now: float
    ) -> State:
        """Store a report and release its lease; returns the handoff's new state."""
        with self._tx() as c:
            lease = self._held(c, lease_id, token, now)
            name = lease["handoff"]
            handoff = self._row(c, name)
            if handoff["state"] != State.LEASED or handoff["attempt"] != lease["attempt"]:
                raise LeaseNotHeld(
                    f"lease {lease_id} no longer holds {name} (it is {handoff['state']}, "
                    f"attempt {handoff['attempt']}); stop working on it and acquire a new lease"
                )
            status = report.status
            summary = report.summary or ""
            c.execute(
                "INSERT INTO reports(handoff, lease_id, attempt, status, summary, head, report,"
                " received_at) VALUES (?,?,?,?,?,?,?,?)",
                (
                    name,
                    lease_id,
                    lease["attempt"],
                    status,
                    summary,
                    head,
                    json.dumps(report.to_wire(), allow_nan=False),
                    now,
                ),
            )
            self._end_lease(c, lease_id, "reported", now)
            self._event(c, now, name, "report", lease=lease_id, status=status, head=head)
            if status == "completed":
                seq = self._counter(c, "report_seq")
                # ``conflicts`` stays: it records what the earlier attempt ran into.
                self._set_state(c, name, State.REPORTED, now, report_seq=seq, detail=None)
                return State.REPORTED
            detail = ("the agent gave up: " if status == "failed" else BLOCKED_DETAIL) + (
                summary or "(no summary)"
            )
            self._set_state(c, name, State.FAILED, now, detail=detail)
            return State.FAILED

    def recover(self, *, ttl_s: float, now: float) -> list[str]:
        """After a restart: a handoff caught mid-gate goes back to ``reported``; a lease
        whose worktree was never handed over is abandoned; every other open lease gets a
        full TTL from now, so its worker can reconnect and carry on (the daemon's downtime
        is not the worker's fault)."""
        with self._tx() as c:
            names = [
                r[0]
                for r in c.execute(
                    "SELECT name FROM handoffs WHERE state = ?", (State.GATING,)
                ).fetchall()
                if self._pending_landing(c, r[0]) is None  # settled by reconcile_landings
            ]
            for name in names:
                self._set_state(
                    c, name, State.REPORTED, now, detail="gating interrupted by a restart"
                )
            for lease in c.execute(
                "SELECT id, handoff FROM leases WHERE ended_at IS NULL AND worktree IS NULL"
            ).fetchall():
                self._end_lease(c, lease["id"], "abandoned", now)
                if self._row(c, lease["handoff"])["state"] == State.LEASED:
                    self._set_state(
                        c,
                        lease["handoff"],
                        State.QUEUED,
                        now,
                        detail="lease abandoned by a restart before hand-over",
                    )
            c.execute(
                "UPDATE leases SET expires_at = MAX(expires_at, ?) WHERE ended_at IS NULL",
                (now + ttl_s,),
            )
            self._release_waiting(c, now)
            return names

    def extend_open_leases(self, *, until: float) -> int:
        """Give every open lease at least until ``until``; returns how many were extended.

        For after a spell when the store could not be written: heartbeats failed then
        through no fault of their workers, so their leases must not expire for it."""
        with self._tx() as c:
            return c.execute(
                "UPDATE leases SET expires_at = ? WHERE ended_at IS NULL AND expires_at < ?",
                (until, until),
            ).rowcount

    def open_leases(self) -> list[LeaseRecord]:
        """Every lease not ended yet, expired or not (for start-up reconciliation)."""
        rows = self._conn.execute("SELECT * FROM leases WHERE ended_at IS NULL ORDER BY token")
        return [lease_of_row(r) for r in rows.fetchall()]

    def end_lease_fault(
        self, lease_id: str, *, reason: str, detail: str, now: float
    ) -> State | None:
        """End an open lease the daemon found broken (e.g. its worktree is gone) and
        re-queue its handoff, spending an attempt as an expiry does. Returns the handoff's
        new state, or None if the lease had ended meanwhile."""
        with self._tx() as c:
            lease = c.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if lease is None or lease["ended_at"] is not None:
                return None
            self._end_lease(c, lease_id, reason, now)
            row = self._row(c, lease["handoff"])
            self._event(c, now, row["name"], "lease_" + reason, lease=lease_id, detail=detail)
            if row["state"] != State.LEASED:
                return State(row["state"])
            return self._requeue(c, row, now, feedback=from_json(row["feedback"]), detail=detail)

    def active_leases(self, *, now: float) -> list[LeaseRecord]:
        """Leases held and not expired at ``now``, in grant order."""
        rows = self._conn.execute(
            "SELECT * FROM leases WHERE ended_at IS NULL AND expires_at > ? ORDER BY token", (now,)
        ).fetchall()
        return [lease_of_row(r) for r in rows]
