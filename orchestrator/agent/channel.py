"""The private channel between a worker and the MCP server its agent starts.

For each lease the worker listens on a Unix socket inside that lease's private directory
(mode 0700, so only the worker's uid can reach it) and names it in
``$ORCHESTRATOR_AGENT_SOCKET``. ``orchestrator mcp`` connects to it and can only do what
the worker does for *this* lease: it never sees the lease's token, and the socket goes
away with the lease. One JSON request per connection, one JSON reply, one line each::

    {"op": "handoff"}                      -> {"result": {...}}
    {"op": "progress", "percent": 40, ...} -> {"result": {}}
    {"op": "ask", "question": "...", "choices": [...]} -> {"result": {"answer": "..."}}
    {"op": "warnings"}                     -> {"result": {"warnings": [...]}}
    {"op": "report", "status": ..., "summary": ..., "phases": [...], "metrics": [...]}
                                           -> {"result": {"reportFile": ..., "markdown": ...}}

Errors come back as ``{"error": "what to fix"}``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from orchestrator.agent.asking import Asking
from orchestrator.handoff import template as handoff_model
from orchestrator.protocol.jsonrpc import RpcError
from orchestrator.protocol.lease_grant import LeaseGrant
from orchestrator.protocol.records import Progress

MAX_REQUEST_BYTES = 1024 * 1024
# A request is sent at once after connecting; a silent peer is dropped after this.
REQUEST_READ_TIMEOUT_S = 30.0
REPORT_STATUS_WORDS = {"completed": "COMPLETED", "failed": "FAILED", "blocked": "BLOCKED"}


class ChannelError(Exception):
    """A request the channel refuses; the message says what to fix."""


@dataclass
class LeaseChannel:
    """What the channel acts on: one lease, as the worker holds it."""

    lease: LeaseGrant
    asking: Asking
    call: Callable[[str, dict[str, Any]], Awaitable[Any]]
    progress_file: Path
    report_file: Path
    warnings: list[dict[str, Any]] = field(default_factory=list)

    async def serve(self, path: Path, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Listen on ``path`` until cancelled (the lease's run ends)."""
        listener = await anyio.create_unix_listener(path)
        os.chmod(path, 0o600)
        task_status.started()
        async with listener:
            await listener.serve(self._connection)

    async def _connection(self, stream: SocketStream) -> None:
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            line = b""
            with anyio.move_on_after(REQUEST_READ_TIMEOUT_S):
                try:
                    line = await reader.receive_until(b"\n", MAX_REQUEST_BYTES)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound):
                    return
            uid = _peer_uid(stream)
            if uid != os.getuid():
                # The directory's mode keeps others out; this holds even if an agent
                # loosened it: only the worker's own uid may act for its lease. (Refused
                # after reading the request, so the peer gets the reply, not a reset.)
                await _send(stream, {"error": f"uid {uid} may not use this lease's channel"})
                return
            if not line:
                return
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ChannelError("a request is one JSON object on one line")
                reply: dict[str, Any] = {"result": await self.handle(request)}
            except (ChannelError, ValueError) as exc:
                reply = {"error": str(exc)}
            except RpcError as exc:
                reply = {"error": f"the daemon refused: {exc.message}", "code": exc.code}
            await _send(stream, reply)

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request's result; raises :class:`ChannelError` for bad input."""
        op = request.get("op")
        if op == "handoff":
            return self._handoff()
        if op == "progress":
            return self._progress(request)
        if op == "ask":
            return await self._ask(request)
        if op == "warnings":
            return {"warnings": list(self.warnings)}
        if op == "report":
            return self._report(request)
        raise ChannelError(f"unknown op {op!r}: use handoff, progress, ask, warnings or report")

    def _handoff(self) -> dict[str, Any]:
        lease = self.lease
        feedback = lease.handoff.feedback
        return {
            "handoff": lease.handoff.to_wire(),
            "feedback": None if feedback is None else feedback.to_wire(),
            "worktree": lease.worktree,
            "branch": lease.branch,
            "baseCommit": lease.base_commit,
            "integrationCommit": lease.integration_commit,
            "attempt": lease.attempt,
        }

    def _progress(self, request: dict[str, Any]) -> dict[str, Any]:
        percent = request.get("percent")
        if percent is not None:
            if isinstance(percent, bool) or not isinstance(percent, (int, float)):
                raise ChannelError("percent must be a number from 0 to 100")
            if not 0 <= percent <= 100:
                raise ChannelError(f"percent must be from 0 to 100, not {percent}")
        texts: dict[str, str | None] = {}
        for key in ("phase", "message"):
            value = request.get(key)
            if value is not None and not isinstance(value, str):
                raise ChannelError(f"{key} must be a string")
            texts[key] = None if value is None else value[:2000]
        progress = Progress(percent=percent, phase=texts["phase"], message=texts["message"])
        said = {k: v for k, v in progress.to_wire().items() if v is not None}
        if not said:
            raise ChannelError("give at least one of percent, phase, message")
        # The heartbeat sends the progress file's last line (what was said, nothing more:
        # the worker lays it over what the agent CLI's output said).
        with self.progress_file.open("a", encoding="utf-8") as out:
            out.write(json.dumps(said, ensure_ascii=False) + "\n")
        return {}

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        question = request.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ChannelError("question must be a non-empty string")
        choices = request.get("choices")
        if choices is not None and not (
            isinstance(choices, list) and all(isinstance(c, str) for c in choices)
        ):
            raise ChannelError("choices must be a list of strings, or left out")
        await self.asking.ask(self.call, question, choices)
        return {"answer": await self.asking.wait()}

    def _report(self, request: dict[str, Any]) -> dict[str, Any]:
        markdown = render_report(self.lease.handoff.body, request)
        partial = self.report_file.with_name(self.report_file.name + ".partial")
        partial.write_text(markdown, encoding="utf-8")
        os.replace(partial, self.report_file)
        return {"reportFile": str(self.report_file), "markdown": markdown}


def _peer_uid(stream: SocketStream) -> int:
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    creds = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def _send(stream: SocketStream, reply: dict[str, Any]) -> None:
    try:
        await stream.send(json.dumps(reply, ensure_ascii=False).encode() + b"\n")
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


def render_report(body: str, fields: dict[str, Any]) -> str:
    """The completed handoff document from structured fields, in the template.

    ``fields``: ``status`` (completed, failed or blocked), ``summary``, ``phases`` (each
    ``{"name", "done", "objectives": [{"text", "done"} or "text"]}``) and ``metrics``
    (each ``{"name", "result", "achieved"}``)."""
    status = fields.get("status") or "completed"
    if status not in REPORT_STATUS_WORDS:
        raise ChannelError("status must be completed, failed or blocked")
    summary = fields.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        raise ChannelError("summary must be a non-empty string: what was done, in a sentence")
    phases = []
    for raw in _list(fields, "phases"):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ChannelError('each phase needs a "name" (and "objectives")')
        objectives = []
        for item in raw.get("objectives") or []:
            if isinstance(item, str):
                objectives.append(handoff_model.CompletedObjective(item, True))
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                objectives.append(
                    handoff_model.CompletedObjective(item["text"], bool(item.get("done", True)))
                )
            else:
                raise ChannelError('each objective is a string or {"text", "done"}')
        done = raw.get("done")
        phases.append(
            handoff_model.CompletedPhase(
                raw["name"],
                bool(done) if done is not None else all(o.done for o in objectives),
                tuple(objectives),
            )
        )
    metrics = []
    for raw in _list(fields, "metrics"):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ChannelError('each metric needs a "name", a "result" and "achieved"')
        metrics.append(
            handoff_model.MetricResult(
                raw["name"], str(raw.get("result") or ""), bool(raw.get("achieved"))
            )
        )
    spec = handoff_model.parse(body)
    done = handoff_model.complete(
        spec,
        summary=summary,
        phases=phases,
        metrics=metrics,
        status=REPORT_STATUS_WORDS[status],
    )
    return handoff_model.render(done)


def _list(fields: dict[str, Any], key: str) -> list[Any]:
    value = fields.get(key) or []
    if not isinstance(value, list):
        raise ChannelError(f"{key} must be a list")
    return value


async def request(path: Path | str, message: dict[str, Any], *, timeout_s: float | None) -> Any:
    """One request to the channel at ``path``; its result, or ChannelError."""
    with anyio.fail_after(timeout_s):
        stream = await anyio.connect_unix(str(path))
        async with stream:
            await stream.send(json.dumps(message, ensure_ascii=False).encode() + b"\n")
            reader = BufferedByteReceiveStream(stream)
            line = await reader.receive_until(b"\n", 64 * MAX_REQUEST_BYTES)
    reply = json.loads(line)
    if "error" in reply:
        raise ChannelError(str(reply["error"]))
    return reply.get("result")
