"""Wire shapes of "Asking a person" (capability ``ask``): the question a lease asks, the
summary's ``needsInput``, and the answer delivered to its worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.protocol.jsonrpc import INVALID_PARAMS, RpcError, rfc3339

# Bounds that keep a question readable on a terminal and in a dashboard panel.
MAX_QUESTION_CHARS = 4000
MAX_CHOICES = 20
MAX_CHOICE_CHARS = 200
MAX_ANSWER_CHARS = 4000


@dataclass(frozen=True)
class Question:
    """What an agent asked a person: ``choices`` is None when the answer is free text."""

    question: str
    choices: tuple[str, ...] | None


@dataclass(frozen=True)
class OpenQuestion:
    """A question still waiting for its answer, on the handoff's live lease."""

    handoff: str
    lease_id: str
    question: Question
    asked_at: float


def question_from_wire(params: dict[str, Any]) -> Question:
    """The ``question``/``choices`` of a ``lease.ask``; bad input gets -32602 saying why."""
    text = params.get("question")
    if not isinstance(text, str) or not text.strip():
        raise RpcError(INVALID_PARAMS, 'invalid params: "question" must be a non-empty string')
    if len(text) > MAX_QUESTION_CHARS:
        raise RpcError(
            INVALID_PARAMS,
            f'invalid params: "question" is {len(text)} characters; at most '
            f"{MAX_QUESTION_CHARS} (put the details in a file in the worktree)",
        )
    raw = params.get("choices")
    if raw is None:
        return Question(text, None)
    if (
        not isinstance(raw, list)
        or not raw
        or len(raw) > MAX_CHOICES
        or not all(isinstance(c, str) and c.strip() and len(c) <= MAX_CHOICE_CHARS for c in raw)
    ):
        raise RpcError(
            INVALID_PARAMS,
            f'invalid params: "choices" must be a list of 1 to {MAX_CHOICES} non-empty strings '
            f"of at most {MAX_CHOICE_CHARS} characters, or left out for a free-text answer",
        )
    return Question(text, tuple(raw))


def answer_from_wire(params: dict[str, Any]) -> str:
    """The ``answer`` of a ``handoff.answer``."""
    answer = params.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        raise RpcError(INVALID_PARAMS, 'invalid params: "answer" must be a non-empty string')
    if len(answer) > MAX_ANSWER_CHARS:
        raise RpcError(
            INVALID_PARAMS, f'invalid params: "answer" is longer than {MAX_ANSWER_CHARS} characters'
        )
    return answer


def needs_input_to_wire(open_question: OpenQuestion | None) -> dict[str, Any] | None:
    """A summary's ``needsInput``: null when nobody is asked anything."""
    if open_question is None:
        return None
    return {
        "question": open_question.question.question,
        "choices": (
            list(open_question.question.choices)
            if open_question.question.choices is not None
            else None
        ),
        "askedAt": rfc3339(open_question.asked_at),
    }


def answered_to_wire(lease_id: str, answer: str) -> dict[str, Any]:
    """The params of the ``lease.answered`` notification."""
    return {"leaseId": lease_id, "answer": answer}
