"""The merge queue's tables (gate_runs, gate_cache, merges): taking jobs into gating,
recording gate runs and landings, merged or failed outcomes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.protocol.records import Feedback
from orchestrator.store.connection import MOVING_DETAIL, StoreConnection, to_json
from orchestrator.store.errors import InvalidTransition
from orchestrator.store.states import MERGE_QUEUE_STATES, State


@dataclass(frozen=True)
class CachedGatePass:
    """A gate that already passed on the same tree under the same fingerprint."""

    gate: str
    handoff: str
    candidate: str
    duration_s: float
    passed_at: float


@dataclass(frozen=True)
class GatingHistory:
    """What the store remembers of recent merges, for the merge queue's ETAs."""

    candidate_s: tuple[float, ...]
    """Total gate time of each recent candidate (all its gate runs), newest first."""
    refused: int
    """Gate failures among the recent decisions."""
    decided: int
    """Recent decisions: merged, conflict or gate failure."""


@dataclass(frozen=True)
class MergeJob:
    """The next reported handoff the merge queue should integrate."""

    name: str
    title: str
    attempt: int
    submitted_at: float
    head: str
    summary: str


class MergeTable(StoreConnection):
    """The merge queue's side: gating, gate runs, landings and their outcomes."""

    def next_merge_jobs(self, *, limit: int, now: float) -> list[MergeJob]:
        """Take the next ``limit`` reported handoffs (priority, then report order) into
        ``gating``, in the order they are to land."""
        jobs = []
        with self._tx() as c:
            rows = c.execute(
                "SELECT * FROM handoffs WHERE state = ? ORDER BY priority_rank, report_seq LIMIT ?",
                (State.REPORTED, limit),
            ).fetchall()
            for row in rows:
                report = c.execute(
                    "SELECT head, summary FROM reports WHERE handoff = ? ORDER BY id DESC LIMIT 1",
                    (row["name"],),
                ).fetchone()
                self._set_state(c, row["name"], State.GATING, now)
                jobs.append(
                    MergeJob(
                        name=row["name"],
                        title=row["title"],
                        attempt=row["attempt"],
                        submitted_at=row["submitted_at"],
                        head=report["head"],
                        summary=report["summary"],
                    )
                )
        return jobs

    def record_gate(
        self,
        name: str,
        *,
        attempt: int,
        candidate: str,
        gate: str,
        exit_status: int | None,
        timed_out: bool,
        duration_s: float,
        output_tail: str,
        started_at: float,
        cache_key: tuple[str, str] | None = None,
    ) -> None:
        """Record one gate run; a pass with ``cache_key`` (tree, gate fingerprint) is
        also remembered for :meth:`cached_gate_pass`, in the same transaction."""
        with self._tx() as c:
            if cache_key is not None and exit_status == 0 and not timed_out:
                c.execute(
                    "INSERT OR REPLACE INTO gate_cache(tree, gate_key, gate, handoff, candidate,"
                    " duration_s, passed_at) VALUES (?,?,?,?,?,?,?)",
                    (*cache_key, gate, name, candidate, duration_s, started_at + duration_s),
                )
            c.execute(
                "INSERT INTO gate_runs(handoff, attempt, candidate, gate, exit_status, timed_out,"
                " duration_s, output_tail, started_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    attempt,
                    candidate,
                    gate,
                    exit_status,
                    int(timed_out),
                    duration_s,
                    output_tail,
                    started_at,
                ),
            )

    def cached_gate_pass(self, tree: str, gate_key: str) -> CachedGatePass | None:
        """The recorded pass of a gate with fingerprint ``gate_key`` on ``tree``, if any."""
        row = self._conn.execute(
            "SELECT gate, handoff, candidate, duration_s, passed_at FROM gate_cache"
            " WHERE tree = ? AND gate_key = ?",
            (tree, gate_key),
        ).fetchone()
        if row is None:
            return None
        return CachedGatePass(
            gate=row["gate"],
            handoff=row["handoff"],
            candidate=row["candidate"],
            duration_s=float(row["duration_s"]),
            passed_at=float(row["passed_at"]),
        )

    def record_landing_intent(
        self, name: str, *, attempt: int, base: str, candidate: str, now: float
    ) -> None:
        """Written just before the ref moves, so a crash between the two is resolvable.

        Refused (:class:`InvalidTransition`) if the handoff left ``gating`` meanwhile, e.g.
        a person cancelled it: then nothing may land."""
        with self._tx() as c:
            state = self._row(c, name)["state"]
            if state != State.GATING:
                raise InvalidTransition(f"{name} is {state} now; its candidate will not land")
            c.execute(
                "INSERT INTO merges(handoff, attempt, result, base, candidate, at)"
                " VALUES (?,?,?,?,?,?)",
                (name, attempt, "landing", base, candidate, now),
            )

    def begin_ref_move(self, name: str) -> bool:
        """The merge queue is about to move the branch to the recorded landing: True if the
        handoff is still ``gating`` with that landing pending, and from now until
        :meth:`end_ref_move` (or the outcome) a cancel is refused. False: a cancel won."""
        with self._tx() as c:
            row_id = self._pending_landing(c, name)
            if self._row(c, name)["state"] != State.GATING or row_id is None:
                return False
            c.execute("UPDATE merges SET detail = ? WHERE id = ?", (MOVING_DETAIL, row_id))
            return True

    def end_ref_move(self, name: str) -> None:
        """The branch did not move (a lock or a dirty checkout held it back): a cancel may
        win again while the queue waits."""
        with self._tx() as c:
            row_id = self._pending_landing(c, name)
            if row_id is not None:
                c.execute(
                    "UPDATE merges SET detail = '' WHERE id = ? AND detail = ?",
                    (row_id, MOVING_DETAIL),
                )

    def landing_superseded(self, name: str, *, detail: str, now: float) -> None:
        """The compare-and-swap lost: the branch moved, the candidate will be rebuilt."""
        with self._tx() as c:
            row_id = self._pending_landing(c, name)
            if row_id is not None:
                c.execute(
                    "UPDATE merges SET result = 'superseded', detail = ?, at = ? WHERE id = ?",
                    (detail, now, row_id),
                )

    def mark_merged(self, name: str, *, attempt: int, base: str, commit: str, now: float) -> float:
        """Record a landed merge; returns the cycle time (submitted to merged).

        Only from ``gating`` and only for the landing :meth:`record_landing_intent` wrote
        for this attempt and candidate (so only after every gate passed on it); anything
        else raises :class:`InvalidTransition`. A cancel cannot come in between: it is
        refused while a landing is pending."""
        with self._tx() as c:
            row = self._row(c, name)
            landing = self._pending_landing(c, name)
            recorded = (
                None
                if landing is None
                else c.execute(
                    "SELECT attempt, candidate FROM merges WHERE id = ?", (landing,)
                ).fetchone()
            )
            if (
                row["state"] != State.GATING
                or recorded is None
                or recorded["attempt"] != attempt
                or recorded["candidate"] != commit
            ):
                raise InvalidTransition(
                    f"{name} is {row['state']} with no landing of {commit[:12]} (attempt "
                    f"{attempt}) recorded; only a gated candidate that landed is merged"
                )
            c.execute(
                "UPDATE merges SET result = 'merged', base = ?, candidate = ?, detail = '',"
                " at = ? WHERE id = ?",
                (base, commit, now, landing),
            )
            self._set_state(
                c,
                name,
                State.MERGED,
                now,
                merge_commit=commit,
                merged_at=now,
                detail=None,
                feedback=None,
                progress=None,
            )
            self._release_waiting(c, now)
            return now - float(row["submitted_at"])

    def mark_merge_failed(
        self,
        name: str,
        *,
        attempt: int,
        result: str,
        base: str,
        candidate: str | None,
        detail: str,
        feedback: Feedback,
        conflicts: Sequence[str],
        hold: bool,
        now: float,
    ) -> State:
        """Record a conflict or a failed gate; requeue with feedback or hold. New state.

        If the handoff left ``gating`` meanwhile (cancelled), only the result is recorded."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO merges(handoff, attempt, result, base, candidate, detail, at)"
                " VALUES (?,?,?,?,?,?,?)",
                (name, attempt, result, base, candidate, detail, now),
            )
            current = State(self._row(c, name)["state"])
            if current != State.GATING:
                return current
            held_state = State.CONFLICT if result == "conflict" else State.FAILED
            self._set_state(
                c,
                name,
                held_state,
                now,
                detail=detail,
                conflicts=to_json(list(conflicts)) if conflicts else None,
                feedback=to_json(feedback.to_wire()),
            )
            if hold:
                return held_state
            return self._requeue(
                c, self._row(c, name), now, feedback=feedback.to_wire(), detail=detail
            )

    def merge_error(self, name: str, *, detail: str, now: float) -> None:
        """The merge itself failed (a git error): hold the handoff for a person."""
        with self._tx() as c:
            if self._row(c, name)["state"] == State.GATING:
                self._set_state(c, name, State.FAILED, now, detail=detail)

    def return_to_queue(self, name: str, *, now: float) -> None:
        """A merge attempt that could not finish (e.g. the daemon stopping) goes back."""
        with self._tx() as c:
            # A pending landing stays ``gating`` until reconcile_landings settles it: the
            # ref may have moved, and only from ``gating`` can it be recorded as merged.
            if (
                self._row(c, name)["state"] == State.GATING
                and self._pending_landing(c, name) is None
            ):
                self._set_state(c, name, State.REPORTED, now)

    def recover_gating(self, *, now: float) -> list[str]:
        """Put every ``gating`` handoff back to ``reported`` (the merge queue was cut short
        and will take them again); returns their names."""
        with self._tx() as c:
            names = [
                r[0]
                for r in c.execute(
                    "SELECT name FROM handoffs WHERE state = ?", (State.GATING,)
                ).fetchall()
                if self._pending_landing(c, r[0]) is None  # settled by reconcile_landings
            ]
            for name in names:
                self._set_state(c, name, State.REPORTED, now, detail="gating interrupted")
            return names

    def merged_commits(self) -> list[tuple[str, str]]:
        """(handoff, merge commit) of every merged handoff, in merge order."""
        rows = self._conn.execute(
            "SELECT name, merge_commit FROM handoffs WHERE state = ?"
            " AND merge_commit IS NOT NULL ORDER BY merged_at",
            (State.MERGED,),
        )
        return [(str(r[0]), str(r[1])) for r in rows.fetchall()]

    def pending_landings(self) -> list[tuple[str, int, str, str]]:
        """(handoff, attempt, base, candidate) of landings a crash left unresolved."""
        rows = self._conn.execute(
            "SELECT m.handoff, m.attempt, m.base, m.candidate FROM merges m"
            " WHERE m.result = 'landing'"
            " AND m.id = (SELECT MAX(id) FROM merges WHERE handoff = m.handoff)"
        ).fetchall()
        return [(r[0], int(r[1]), str(r[2]), str(r[3])) for r in rows]

    def gating_history(self, *, candidates: int = 20, decisions: int = 50) -> GatingHistory:
        """For the merge queue's ETAs: the total gate time of each of the last
        ``candidates`` candidates gated (newest first), and of the last ``decisions``
        decisions how many were gate failures (``refused``) out of ``decided``."""
        c = self._conn
        c.execute("BEGIN")  # deferred: one read snapshot, no write lock
        try:
            durations = [
                float(r[0])
                for r in c.execute(
                    "SELECT SUM(duration_s) FROM gate_runs"
                    " WHERE id > (SELECT COALESCE(MAX(id), 0) - ? FROM gate_runs)"
                    " GROUP BY candidate, attempt ORDER BY MAX(id) DESC LIMIT ?",
                    (candidates * 10, candidates),
                )
            ]
            results = [
                r[0]
                for r in c.execute(
                    "SELECT result FROM merges WHERE result IN ('merged', 'conflict',"
                    " 'gate_failed') ORDER BY id DESC LIMIT ?",
                    (decisions,),
                )
            ]
        finally:
            c.execute("COMMIT")
        return GatingHistory(
            candidate_s=tuple(durations),
            refused=results.count("gate_failed"),
            decided=len(results),
        )

    def merge_queue_heads(self) -> list[tuple[str, str]]:
        """(handoff, reported head) of the merge queue, in :meth:`merge_queue` order."""
        rows = self._conn.execute(
            "SELECT h.name, r.head FROM handoffs h JOIN reports r"
            " ON r.id = (SELECT MAX(id) FROM reports WHERE handoff = h.name)"
            " WHERE h.state IN (?, ?)"
            " ORDER BY h.state = ? DESC, h.priority_rank, h.report_seq",
            (*MERGE_QUEUE_STATES, State.GATING),
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    def merge_queue(self) -> list[str]:
        rows = self._conn.execute(
            "SELECT name FROM handoffs WHERE state IN (?, ?)"
            " ORDER BY state = ? DESC, priority_rank, report_seq",
            (*MERGE_QUEUE_STATES, State.GATING),
        )
        return [r[0] for r in rows]
