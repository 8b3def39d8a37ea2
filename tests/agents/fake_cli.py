"""A stand-in for an agent CLI (claude, codex, gemini, opencode, goose, aider), run from a
script of that name on PATH: it records the argv, stdin and MCP config it was given,
starts the MCP server that config names (with the SDK's stdio client, as the CLI would)
and calls two of its tools, prints a recorded sample of the CLI's output, waits for the
test to let it go, commits a change and exits 0."""

import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

NAME = sys.argv[1]
ARGS = sys.argv[2:]
SAMPLES = Path(__file__).resolve().parents[1] / "recipes"


def after(flag: str) -> str:
    return ARGS[ARGS.index(flag) + 1]


def mcp_server() -> dict[str, Any] | None:
    """The orchestrator MCP server as this CLI's config describes it: command, args, env."""
    if NAME == "claude":
        config = json.loads(Path(after("--mcp-config")).read_text())
        server = config["mcpServers"]["orchestrator"]
        return {"command": server["command"], "args": server["args"], "env": server["env"]}
    if NAME == "codex":
        values = {}
        for i, arg in enumerate(ARGS):
            if arg == "-c":
                key, _, value = ARGS[i + 1].partition("=")
                values[key] = tomllib.loads(f"v = {value}")["v"]
        prefix = "mcp_servers.orchestrator."
        return {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
    if NAME == "gemini":
        config = json.loads(Path(os.environ["GEMINI_CLI_SYSTEM_SETTINGS_PATH"]).read_text())
        server = config["mcpServers"]["orchestrator"]
        return {"command": server["command"], "args": server["args"], "env": server["env"]}
    if NAME == "opencode":
        config = json.loads(Path(os.environ["OPENCODE_CONFIG"]).read_text())
        server = config["mcp"]["orchestrator"]
        assert server["type"] == "local" and server["enabled"] is True
        return {"command": server["command"][0], "args": server["command"][1:],
                "env": server["environment"]}
    if NAME == "goose":
        words = shlex.split(after("--with-extension"))
        env = {}
        while "=" in words[0] and not words[0].startswith("/"):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        return {"command": words[0], "args": words[1:], "env": env}
    return None


async def use_mcp(server: dict[str, Any]) -> dict[str, Any]:
    params = StdioServerParameters(
        command=server["command"], args=server["args"], env=server["env"]
    )
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            handoff = await session.call_tool("get_handoff", {})
            await session.call_tool(
                "report_progress", {"percent": 10, "phase": "Do it", "message": "via mcp"}
            )
    return {"handoff": getattr(handoff.content[0], "text", "")}


def main() -> None:
    record: dict[str, Any] = {"argv": ARGS, "cwd": os.getcwd()}
    record["stdin"] = sys.stdin.read()
    for key in ("GEMINI_CLI_SYSTEM_SETTINGS_PATH", "OPENCODE_CONFIG"):
        if key in os.environ:
            record[key] = os.environ[key]
            record[key + "_content"] = json.loads(Path(os.environ[key]).read_text())
    for flag in ("--mcp-config", "-i", "--message-file"):
        if flag in ARGS:
            path = Path(after(flag))
            record[flag] = path.read_text()
    server = mcp_server()
    record["server"] = server
    if server is not None:
        record["mcp"] = anyio.run(use_mcp, server)
    else:
        with open(os.environ["ORCHESTRATOR_PROGRESS_FILE"], "a") as out:
            out.write("40 editing\n")
    sample = SAMPLES / (f"{NAME}.jsonl" if NAME in ("claude", "codex", "gemini", "opencode")
                        else f"{NAME}.txt")
    sys.stdout.write(sample.read_text())
    sys.stdout.flush()
    release = Path(os.environ["FAKE_DIR"]) / f"{NAME}.release"
    deadline = time.monotonic() + 120
    while not release.exists():
        assert time.monotonic() < deadline, "the test never released the fake CLI"
        time.sleep(0.05)
    Path("work").mkdir(exist_ok=True)
    Path("work", f"{NAME}.txt").write_text(f"done by the fake {NAME}\n")
    git = ["git", "-c", "user.name=fake", "-c", "user.email=fake@test.invalid"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", f"fake {NAME}: the work"], check=True)
    Path(os.environ["FAKE_DIR"], f"{NAME}.json").write_text(json.dumps(record))


main()
