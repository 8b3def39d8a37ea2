"""``orchestrator mcp``: a stdio MCP server an agent CLI starts for the lease it works on.

It acts for exactly one lease, the one whose worker started the agent: it talks only to
that worker's private channel (``$ORCHESTRATOR_AGENT_SOCKET``, see
:mod:`orchestrator.agent.channel`) and never holds a lease id's token, so it cannot act
for any other lease. Its tools: read the handoff and feedback, report progress, ask a
person and wait for the answer, list early conflict warnings, and submit the completed
report as structured fields (rendered in the handoff template by the worker).

Needs the official MCP Python SDK: ``pip install 'orchestrator[mcp]'``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from orchestrator.agent import channel
from orchestrator.protocol.lease_grant import LeasedHandoff

SOCKET_ENV = "ORCHESTRATOR_AGENT_SOCKET"
# Quick requests; asking a person has no limit (the person may take hours).
REQUEST_TIMEOUT_S = 30.0

INSTRUCTIONS = """\
You are working on one orchestrator handoff, in the current git worktree.
Start with get_handoff (the task, and feedback from an earlier attempt if any).
Call report_progress as you go. If you cannot go on without a decision, ask_person and
wait for the answer. Check list_warnings before you finish: another change may conflict.
Commit your work, then call submit_report with what you did; then exit."""


class Objective(BaseModel):
    """One objective of a phase, and whether it was met."""

    text: str
    done: bool = True


class PhaseResult(BaseModel):
    """One phase of the plan, as completed."""

    name: str = Field(description="the phase's name, as in the handoff's plan")
    done: bool | None = Field(default=None, description="default: all objectives done")
    objectives: list[Objective] = Field(default_factory=list)


class MetricResult(BaseModel):
    """One success metric and what was measured."""

    name: str = Field(description='the metric\'s name, e.g. "Phase 1" or "Overall"')
    result: str = Field(description="what was observed or measured")
    achieved: bool


def build_server(socket_path: Path) -> Any:
    """The MCP server whose tools act through the lease channel at ``socket_path``."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    server = MCPServer(name="orchestrator", instructions=INSTRUCTIONS)

    async def ask_worker(message: dict[str, Any], timeout_s: float | None) -> Any:
        try:
            return await channel.request(socket_path, message, timeout_s=timeout_s)
        except channel.ChannelError as exc:
            raise ToolError(str(exc)) from exc
        except OSError as exc:
            raise ToolError(
                f"the orchestrator worker for this lease is gone ({exc}); stop working"
            ) from exc

    @server.tool()
    async def get_handoff() -> str:
        """The handoff to work on (its markdown), where to work, and feedback from an
        earlier attempt (a failed gate's log or a conflict) if there is any."""
        found = await ask_worker({"op": "handoff"}, REQUEST_TIMEOUT_S)
        try:
            handoff = LeasedHandoff.from_wire(found["handoff"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ToolError(f"the worker sent a handoff this server cannot read: {exc}") from exc
        parts = [
            handoff.body,
            f"Worktree: {found['worktree']} (branch {found['branch']}, attempt {found['attempt']})",
        ]
        if handoff.feedback is not None:
            parts.append(
                "Feedback from the last attempt:\n" + json.dumps(handoff.feedback.to_wire())
            )
        return "\n\n".join(parts)

    @server.tool()
    async def report_progress(
        percent: float | None = None, phase: str | None = None, message: str | None = None
    ) -> str:
        """Say how far the work is: percent (0-100), the phase you are in, a short message."""
        await ask_worker(
            {"op": "progress", "percent": percent, "phase": phase, "message": message},
            REQUEST_TIMEOUT_S,
        )
        return "progress recorded"

    @server.tool()
    async def ask_person(question: str, choices: list[str] | None = None) -> str:
        """Ask a person a question and wait for the answer (it may take a while). Give
        choices when the answer is one of a few options. Returns the answer."""
        found = await ask_worker(
            {"op": "ask", "question": question, "choices": choices}, timeout_s=None
        )
        return str(found["answer"])

    @server.tool()
    async def list_warnings() -> str:
        """Early conflict warnings: paths your branch would conflict on, and with what.
        An empty list means none so far."""
        found = await ask_worker({"op": "warnings"}, REQUEST_TIMEOUT_S)
        return json.dumps(found["warnings"])

    @server.tool()
    async def submit_report(
        summary: str,
        phases: list[PhaseResult],
        metrics: list[MetricResult],
        status: Literal["completed", "failed", "blocked"] = "completed",
    ) -> str:
        """The completed report: a one-sentence summary, each phase with its objectives,
        each success metric with its result. Commit your work first; the report is sent
        when you exit. Returns the completed handoff document."""
        found = await ask_worker(
            {
                "op": "report",
                "status": status,
                "summary": summary,
                "phases": [p.model_dump() for p in phases],
                "metrics": [m.model_dump() for m in metrics],
            },
            REQUEST_TIMEOUT_S,
        )
        return str(found["markdown"])

    return server


def main(socket_path: str | None = None) -> int:
    """Run the server on stdio until the agent closes it."""
    path = socket_path or os.environ.get(SOCKET_ENV)
    if not path:
        print(
            f"error: orchestrator mcp serves one lease: run it from an agent started by "
            f"`orchestrator worker` (which sets ${SOCKET_ENV}), or pass --channel",
            file=sys.stderr,
        )
        return 2
    try:
        server = build_server(Path(path))
    except ImportError:
        print(
            "error: orchestrator mcp needs the MCP SDK: pip install 'orchestrator[mcp]'",
            file=sys.stderr,
        )
        return 2
    server.run("stdio")
    return 0
