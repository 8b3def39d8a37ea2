"""A stand-in for the ``claude`` CLI, for ``orchestrator demo --mcp``.

``orchestrator worker --agent claude`` runs it exactly as it would run Claude Code (the
demo puts a ``claude`` script that starts this module first on the workers' PATH). It
checks the command line the recipe built, starts the MCP server the ``--mcp-config`` file
names with the MCP SDK's own stdio client (as Claude Code would), reads the handoff with
``get_handoff``, does the demo's scripted work (orchestrator.demo.agent) reporting
through ``report_progress`` and ``submit_report``, and prints ``stream-json`` events the
recipe turns into progress. Nothing goes through the ``$ORCHESTRATOR_*`` files.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread

from orchestrator.demo.agent import run_script
from orchestrator.handoff import template as handoff_model

# The flags the claude recipe must pass (orchestrator.agent.recipes._claude).
REQUIRED_FLAGS = ("-p", "--verbose", "--strict-mcp-config")
FEEDBACK_HEADING = "Feedback from the last attempt:\n"


def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def _server_params(argv: list[str]) -> Any:
    from mcp.client.stdio import StdioServerParameters

    missing = [flag for flag in REQUIRED_FLAGS if flag not in argv]
    if "--output-format" not in argv or argv[argv.index("--output-format") + 1] != "stream-json":
        missing.append("--output-format stream-json")
    if "--mcp-config" not in argv:
        missing.append("--mcp-config FILE")
    if missing:
        raise SystemExit(f"claude stand-in: the recipe did not pass {', '.join(missing)}")
    config = json.loads(Path(argv[argv.index("--mcp-config") + 1]).read_text(encoding="utf-8"))
    server = config["mcpServers"]["orchestrator"]
    return StdioServerParameters(command=server["command"], args=server["args"], env=server["env"])


def _text(result: Any) -> str:
    if result.is_error:
        raise RuntimeError(f"MCP tool failed: {result.content}")
    return "".join(getattr(block, "text", "") for block in result.content)


async def _main(argv: list[str]) -> int:
    from mcp.client.session import ClientSession
    from mcp.client.stdio import stdio_client

    params = _server_params(argv)
    sys.stdin.read()  # the prompt; the handoff itself comes from get_handoff
    _emit({"type": "system", "subtype": "init", "model": "demo stand-in"})
    turns = 0
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        found = _text(await session.call_tool("get_handoff", {}))
        body = found.split("\n\nWorktree: ", 1)[0]
        feedback = None
        if FEEDBACK_HEADING in found:
            feedback = json.loads(found.split(FEEDBACK_HEADING, 1)[1])
        doc = handoff_model.parse(body)

        async def call(tool: str, arguments: dict[str, Any]) -> str:
            nonlocal turns
            turns += 1
            # What Claude Code prints for a turn: a line of text, or the tool it calls.
            block: dict[str, Any] = (
                {"type": "text", "text": arguments["message"]}
                if tool == "report_progress"
                else {"type": "tool_use", "name": f"mcp__orchestrator__{tool}", "input": {}}
            )
            _emit({"type": "assistant", "message": {"content": [block]}})
            return _text(await session.call_tool(tool, arguments))

        def progress(percent: int, message: str) -> None:
            anyio.from_thread.run(call, "report_progress", {"percent": percent, "message": message})
            time.sleep(0.4)  # long enough for the demo's watcher to show it

        def report(done: handoff_model.Handoff, summary: str) -> None:
            phases = [
                {"name": p.name, "objectives": [{"text": o, "done": True} for o in p.objectives]}
                for p in done.phases
            ]
            metrics = [
                {"name": m.name, "result": f"done: {m.criteria}", "achieved": True}
                for m in done.success_metrics
            ]
            anyio.from_thread.run(
                call, "submit_report", {"summary": summary, "phases": phases, "metrics": metrics}
            )

        status = await anyio.to_thread.run_sync(
            partial(run_script, doc, feedback, progress=progress, report=report)
        )
    _emit({"type": "result", "subtype": "success", "is_error": status != 0, "num_turns": turns})
    return status


def main(argv: list[str]) -> int:
    """Act as ``claude ARGS...``."""
    return anyio.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
