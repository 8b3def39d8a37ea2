"""What a person watching the daemon wants to know, as one typed record.

The live page (``observe.page``) and ``orchestrator status --watch`` (``observe.watch``)
show the same :class:`Board`. It is built from the control API's own results (``status``,
``handoff.list`` and ``handoff.get`` of the few recent outcomes), so the two views, the
CLI and any other client never disagree: the daemon builds it from the same store reads
its handlers answer with, the terminal view from the replies over the socket.

Every string here that an agent or a handoff's author wrote (titles, progress phases and
messages, questions, summaries, gate output) is raw: each view escapes it for its medium.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.store.states import BLOCKED_DETAIL, OUTCOME_STATES, State

__all__ = [
    "OUTCOME_STATES",
    "RECENT_OUTCOMES",
    "Board",
    "LeaseView",
    "Outcome",
    "Question",
    "QueueEntry",
    "RecentRecords",
    "build_board",
    "recent_outcome_names",
]

# How many of them a view shows (each costs one handoff.get).
RECENT_OUTCOMES = 8
# How much of a failed gate's output a view shows.
GATE_TAIL_LINES = 20
BLOCKED_PREFIX = BLOCKED_DETAIL


@dataclass(frozen=True)
class QueueEntry:
    """A handoff in the merge queue, in the order it will be merged."""

    name: str
    title: str
    state: str
    """``gating`` (being merged now) or ``reported`` (waiting its turn)."""
    eta_s: float | None
    """Estimated seconds until it lands, from recent gate times; None when unknown."""


@dataclass(frozen=True)
class LeaseView:
    """A lease held by a worker, with the agent's last progress."""

    handoff: str
    title: str
    worker: str
    attempt: int
    percent: float | None
    phase: str | None
    message: str | None
    age_s: float | None
    """Seconds since the lease was granted."""


@dataclass(frozen=True)
class Question:
    """A handoff waiting for a person, and what it asks."""

    handoff: str
    title: str
    question: str
    choices: tuple[str, ...]
    age_s: float | None


@dataclass(frozen=True)
class Outcome:
    """A recent merge or failure."""

    handoff: str
    title: str
    state: str
    age_s: float | None
    detail: str
    merge_commit: str | None
    failed_gate: str | None
    gate_tail: str
    """The last lines of the last failed gate's output ("" when none failed)."""


@dataclass(frozen=True)
class Board:
    """Everything both live views show."""

    integration_branch: str
    integration_tip: str
    counts: Mapping[str, int]
    workers: int
    merge_blocked: str | None
    queue: tuple[QueueEntry, ...]
    pending: tuple[QueueEntry, ...]
    """Handoffs not started yet: ``queued`` for a worker or ``waiting`` on dependencies."""
    leases: tuple[LeaseView, ...]
    questions: tuple[Question, ...]
    outcomes: tuple[Outcome, ...]


def recent_outcome_names(
    handoffs: Sequence[Mapping[str, Any]], limit: int = RECENT_OUTCOMES
) -> list[str]:
    """The names of the ``limit`` most recently finished handoffs, newest first."""
    done = [h for h in handoffs if h.get("state") in OUTCOME_STATES]
    done.sort(key=lambda h: str(h.get("updatedAt") or ""), reverse=True)
    return [str(h["name"]) for h in done[:limit]]


class RecentRecords:
    """The ``handoff.get`` records of the recent outcomes, each fetched once per change.

    A finished handoff's record only changes along with its ``updatedAt``, so a view that
    redraws every second asks the store for a record again only when that moved; the
    cost per frame stays the same however long each record's history is.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[str, Mapping[str, Any]]] = {}

    def stale(self, recent: Sequence[Mapping[str, Any]]) -> list[str]:
        """Which of the ``recent`` summaries need their record (re)read."""
        return [
            str(h["name"])
            for h in recent
            if self._cache.get(str(h["name"]), ("", {}))[0] != str(h.get("updatedAt") or "")
        ]

    def records(
        self, recent: Sequence[Mapping[str, Any]], fetched: Mapping[str, Mapping[str, Any]]
    ) -> list[Mapping[str, Any]]:
        """The records of ``recent`` in order, from ``fetched`` or the cache; forgets the
        others."""
        cache: dict[str, tuple[str, Mapping[str, Any]]] = {}
        for h in recent:
            name = str(h["name"])
            if name in fetched:
                cache[name] = (str(h.get("updatedAt") or ""), fetched[name])
            elif name in self._cache:
                cache[name] = self._cache[name]
        self._cache = cache
        return [record for _, record in cache.values()]


def build_board(
    status: Mapping[str, Any],
    handoffs: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]],
    *,
    now: float,
) -> Board:
    """The board from a ``status`` result, ``handoff.list``'s handoffs and the
    ``handoff.get`` records of :func:`recent_outcome_names`."""
    by_name = {str(h["name"]): h for h in handoffs}

    def title(name: str) -> str:
        return str(by_name.get(name, {}).get("title") or "")

    leases = []
    for lease in status.get("leases") or []:
        name = str(lease["handoff"])
        progress = by_name.get(name, {}).get("progress") or {}
        percent = progress.get("percent")
        leases.append(
            LeaseView(
                handoff=name,
                title=title(name),
                worker=str(lease.get("worker") or ""),
                attempt=int(lease.get("attempt") or 1),
                percent=float(percent) if isinstance(percent, (int, float)) else None,
                phase=_text(progress.get("phase")),
                message=_text(progress.get("message")),
                age_s=_age(lease.get("grantedAt"), now),
            )
        )

    questions = []
    for h in handoffs:
        asked = h.get("needsInput")
        if isinstance(asked, Mapping) and asked.get("question"):
            questions.append(
                Question(
                    handoff=str(h["name"]),
                    title=str(h.get("title") or ""),
                    question=str(asked["question"]),
                    choices=tuple(str(c) for c in asked.get("choices") or ()),
                    age_s=_age(asked.get("askedAt"), now),
                )
            )

    outcomes = []
    for record in records:
        detail = str(record.get("detail") or "")
        if record.get("state") == State.FAILED and detail.startswith(BLOCKED_PREFIX):
            # A blocked report is the agent asking a person, in the only way v1 had.
            questions.append(
                Question(
                    handoff=str(record["name"]),
                    title=str(record.get("title") or ""),
                    question=detail.removeprefix(BLOCKED_PREFIX),
                    choices=(),
                    age_s=_age(record.get("updatedAt"), now),
                )
            )
        failed = [
            g for g in record.get("gates") or [] if g.get("exitStatus") != 0 or g.get("timedOut")
        ]
        last_failed = failed[-1] if failed else None
        tail = ""
        if last_failed is not None:
            tail = "\n".join(
                str(last_failed.get("outputTail") or "").splitlines()[-GATE_TAIL_LINES:]
            )
        outcomes.append(
            Outcome(
                handoff=str(record["name"]),
                title=str(record.get("title") or ""),
                state=str(record.get("state") or ""),
                age_s=_age(record.get("updatedAt"), now),
                detail=detail,
                merge_commit=_text(record.get("mergeCommit")),
                failed_gate=str(last_failed["gate"]) if last_failed else None,
                gate_tail=tail,
            )
        )

    per_merge = _gate_seconds_per_merge(records)
    queue = tuple(
        QueueEntry(
            name=str(name),
            title=title(str(name)),
            state=str(by_name.get(str(name), {}).get("state") or State.REPORTED),
            eta_s=None if per_merge is None else per_merge * (position + 1),
        )
        for position, name in enumerate(status.get("mergeQueue") or [])
    )
    return Board(
        integration_branch=str(status.get("integrationBranch") or ""),
        integration_tip=str(status.get("integrationTip") or ""),
        counts=dict(status.get("counts") or {}),
        workers=len(status.get("workers") or []),
        merge_blocked=_text(status.get("mergeBlocked")),
        queue=queue,
        pending=tuple(
            QueueEntry(str(h["name"]), str(h.get("title") or ""), str(h["state"]), None)
            for h in handoffs
            if h.get("state") in (State.QUEUED, State.WAITING)
        ),
        leases=tuple(leases),
        questions=tuple(questions),
        outcomes=tuple(outcomes),
    )


def _gate_seconds_per_merge(records: Sequence[Mapping[str, Any]]) -> float | None:
    """The median gate time of a recent merge (every gate of its merged attempt), the
    basis of the queue's ETAs; None with no merge to learn from."""
    totals = []
    for record in records:
        if record.get("state") != State.MERGED:
            continue
        attempt = record.get("attempt")
        runs = [g for g in record.get("gates") or [] if g.get("attempt") == attempt]
        if runs:
            totals.append(sum(float(g.get("durationS") or 0.0) for g in runs))
    return statistics.median(totals) if totals else None


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _age(stamp: Any, now: float) -> float | None:
    if not isinstance(stamp, str) or not stamp:
        return None
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, now - moment.timestamp())


def format_age(seconds: float | None) -> str:
    """``42 s``, ``3 min``, ``2 h 5 min``, ``3 d``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    hours = int(minutes // 60)
    if hours < 48:
        return f"{hours} h {int(minutes % 60)} min"
    return f"{hours // 24} d"
