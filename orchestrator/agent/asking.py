"""An agent's question to a person, on the worker's side of ``lease.ask``.

The worker asks on the agent's behalf (from the question file or the MCP channel) and
gets the answer either as the ``lease.answered`` notification or, after a reconnect, in a
heartbeat result: :class:`Asking` takes whichever comes first and drops the other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from orchestrator.protocol.jsonrpc import RpcError

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]
# How often the worker looks for a question file the agent wrote.
QUESTION_POLL_S = 0.2


class Asking:
    """One lease's question in flight and its answer."""

    def __init__(self, lease_id: str, token: int, answer_file: Path) -> None:
        self.lease_id = lease_id
        self.token = token
        self.answer_file = answer_file
        self.pending = False
        self.answer: str | None = None
        self._answered = anyio.Event()

    async def ask(self, call: Call, question: str, choices: list[str] | None) -> None:
        """Send ``lease.ask``; the answer arrives later through :meth:`answered`."""
        # Pending before the request: a person may answer before its reply is read.
        self.pending = True
        self.answer = None
        self._answered = anyio.Event()
        self.answer_file.unlink(missing_ok=True)
        params: dict[str, Any] = {"leaseId": self.lease_id, "token": self.token}
        params["question"] = question
        if choices is not None:
            params["choices"] = choices
        try:
            await call("lease.ask", params)
        except BaseException:
            self.pending = False
            raise

    def answered(self, answer: str) -> None:
        """The answer came (notification or heartbeat); a second copy is ignored."""
        if not self.pending:
            return
        self.pending = False
        self.answer = answer
        # Written whole then renamed: an agent polling the file never reads half of it.
        partial = self.answer_file.with_name(self.answer_file.name + ".partial")
        partial.write_text(answer, encoding="utf-8")
        os.replace(partial, self.answer_file)
        self._answered.set()

    async def wait(self) -> str:
        """Block until the question asked last is answered."""
        await self._answered.wait()
        assert self.answer is not None
        return self.answer


def read_question_file(path: Path) -> tuple[str, list[str] | None] | None:
    """The agent's question: a JSON object ``{"question", "choices"}`` or plain text."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    stripped = text.strip()
    if not stripped:
        return None
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except ValueError:
            return stripped, None
        if isinstance(value, dict) and isinstance(value.get("question"), str):
            choices = value.get("choices")
            if isinstance(choices, list):
                return value["question"], [str(c) for c in choices]
            return value["question"], None
    return stripped, None


async def watch_question_file(path: Path, asking: Asking, call: Call, bound: Any) -> None:
    """Ask each question the agent writes to ``$ORCHESTRATOR_QUESTION_FILE``.

    The file is taken (renamed away) before asking, so each question is asked once; the
    answer appears in ``$ORCHESTRATOR_ANSWER_FILE``."""
    taken = path.with_name(path.name + ".asked")
    while True:
        await anyio.sleep(QUESTION_POLL_S)
        try:
            os.replace(path, taken)
        except OSError:
            continue
        found = read_question_file(taken)
        if found is None:
            continue
        question, choices = found
        try:
            await asking.ask(call, question, choices)
            bound.info("question_asked", source="file")
        except RpcError as exc:
            # Say so where the agent looks: next to its question.
            path.with_name(path.name + ".error").write_text(exc.message, encoding="utf-8")
            bound.warning("question_refused", code=exc.code, error=exc.message)
