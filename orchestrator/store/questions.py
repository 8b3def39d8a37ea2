"""The questions table: what an agent asked a person, and its answer."""

from __future__ import annotations

from orchestrator.protocol.asking import Question
from orchestrator.store.connection import StoreConnection, to_json
from orchestrator.store.errors import NothingAsked


class QuestionTable(StoreConnection):
    """Asking a person (capability "ask") and delivering the answer."""

    def ask(
        self,
        lease_id: str,
        token: int,
        question: Question,
        *,
        now: float,
        worker: str | None,
        uid: int | None = None,
    ) -> str:
        """Record the lease's question (replacing one it asked before); the handoff's name."""
        with self._tx() as c:
            row = self._held(c, lease_id, token, now, worker, uid)
            c.execute(
                "UPDATE questions SET closed_at = ? WHERE lease_id = ? AND closed_at IS NULL",
                (now, lease_id),
            )
            c.execute(
                "INSERT INTO questions(handoff, lease_id, question, choices, asked_at)"
                " VALUES (?,?,?,?,?)",
                (
                    row["handoff"],
                    lease_id,
                    question.question,
                    to_json(list(question.choices)) if question.choices is not None else None,
                    now,
                ),
            )
            self._event(c, now, row["handoff"], "asked", lease=lease_id, question=question.question)
            return str(row["handoff"])

    def answer(self, name: str, answer: str, *, now: float) -> str:
        """Answer the handoff's open question; the lease to tell. Raises
        :class:`UnknownHandoff` or :class:`NothingAsked`."""
        with self._tx() as c:
            self._row(c, name)
            found = self._open_questions(c, name)
            if not found:
                raise NothingAsked(
                    f"handoff {name!r} is not waiting for an answer (nothing was asked, it was "
                    "already answered, or its lease ended); see `orchestrator status`"
                )
            lease_id = found[0][1].lease_id
            c.execute(
                "UPDATE questions SET answer = ?, closed_at = ? WHERE id = ?",
                (answer, now, found[0][0]),
            )
            self._event(c, now, name, "answered", lease=lease_id, answer=answer)
            return lease_id

    def mark_answer_delivered(self, lease_id: str, *, now: float) -> None:
        """The worker has the answer (the notification went out)."""
        with self._tx() as c:
            c.execute(
                "UPDATE questions SET delivered_at = ? WHERE lease_id = ? AND answer IS NOT NULL"
                " AND delivered_at IS NULL",
                (now, lease_id),
            )

    def take_answer(self, lease_id: str, *, now: float) -> str | None:
        """An answer its worker has not had yet (it was disconnected), marked delivered."""
        # Asked on every heartbeat: a read first, so the usual "nothing" takes no write lock.
        if (
            self._conn.execute(
                "SELECT 1 FROM questions WHERE lease_id = ? AND answer IS NOT NULL"
                " AND delivered_at IS NULL LIMIT 1",
                (lease_id,),
            ).fetchone()
            is None
        ):
            return None
        with self._tx() as c:
            row = c.execute(
                "SELECT id, answer FROM questions WHERE lease_id = ? AND answer IS NOT NULL"
                " AND delivered_at IS NULL ORDER BY id DESC LIMIT 1",
                (lease_id,),
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE questions SET delivered_at = ? WHERE lease_id = ? AND answer IS NOT NULL"
                " AND delivered_at IS NULL",
                (now, lease_id),
            )
            return str(row["answer"])
