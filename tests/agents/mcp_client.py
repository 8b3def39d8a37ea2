"""An agent that works only through `orchestrator mcp`, driven by the MCP SDK's own stdio
client: it starts the server itself (as an agent CLI does from its MCP config), reads its
handoff, reports progress, asks a person, checks warnings, commits and submits its report
as structured fields. What each tool returned goes to $MCP_AGENT_RECORD (JSON)."""

import json
import os
import sys
from typing import Any

import anyio
from _common import HANDOFF, commit, write
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

RECORD = os.environ["MCP_AGENT_RECORD"] + f".{HANDOFF}.json"


def text(result: Any) -> str:
    assert not result.is_error, result
    return "".join(block.text for block in result.content if block.type == "text")


async def main() -> dict[str, Any]:
    record: dict[str, Any] = {"socket": os.environ["ORCHESTRATOR_AGENT_SOCKET"]}
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "orchestrator", "mcp", "--channel", os.environ["ORCHESTRATOR_AGENT_SOCKET"]],
        # The SDK passes only a safe minimum of the environment: the code under test.
        env={"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    async with stdio_client(server) as (read, write_stream):
        async with ClientSession(read, write_stream) as session:
            await session.initialize()
            record["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
            record["handoff"] = text(await session.call_tool("get_handoff", {}))
            text(await session.call_tool(
                "report_progress", {"percent": 30, "phase": "Do it", "message": "thinking"}
            ))
            bad = await session.call_tool("report_progress", {"percent": 300})
            said = getattr(bad.content[0], "text", "")
            record["bad_progress"] = {"is_error": bad.is_error, "text": said}
            record["answer"] = text(await session.call_tool(
                "ask_person", {"question": "Tabs or spaces?", "choices": ["tabs", "spaces"]}
            ))
            record["warnings"] = json.loads(text(await session.call_tool("list_warnings", {})))
            write(f"work/{HANDOFF}.txt", f"indented with {record['answer']}\n")
            commit(f"{HANDOFF}: indented as asked")
            text(await session.call_tool(
                "report_progress", {"percent": 90, "message": "committed"}
            ))
            record["report"] = text(await session.call_tool("submit_report", {
                "summary": f"Indented with {record['answer']}, as the person said.",
                "phases": [{"name": "Do it", "objectives": [
                    {"text": f"Make the change for {HANDOFF}", "done": True}]}],
                "metrics": [{"name": "Overall", "result": "the tests pass", "achieved": True}],
            }))
    return record


with open(RECORD, "w") as out:
    json.dump(anyio.run(main), out)
