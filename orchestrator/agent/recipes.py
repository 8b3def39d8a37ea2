"""Recipes: how ``orchestrator worker --agent NAME`` runs each agent CLI on a lease.

A recipe writes the MCP config the CLI expects (so the CLI starts ``orchestrator mcp``
for this lease itself), builds the CLI's non-interactive command line with the handoff
as its prompt, and turns the CLI's structured output into progress. Extra arguments
given after ``--`` are appended to the CLI's own.

The table of recipes, with the exact command lines, is in README ("Attach a real agent")
and ``examples/agents/``.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.protocol.records import Feedback, Progress

SERVER_NAME = "orchestrator"
MAX_MESSAGE_CHARS = 200

MCP_PROMPT = """\
You are a coding agent working on one handoff, below, in the current directory (a git \
checkout of its branch). The "orchestrator" MCP server is yours for this handoff: call \
report_progress as you go, ask_person when you need a decision you cannot make, \
list_warnings before you finish, then commit your work with git and call submit_report \
with the phases, objectives and metrics of the handoff. Then stop.

"""
FILE_PROMPT = """\
You are a coding agent working on one handoff, below, in the current directory (a git \
checkout of its branch). Make the changes it asks for and commit them with git. Then stop.

"""


@dataclass(frozen=True)
class McpServerSpec:
    """How an agent CLI starts ``orchestrator mcp`` for this lease."""

    command: str
    args: tuple[str, ...]
    env: dict[str, str]

    @classmethod
    def for_channel(cls, socket_path: Path) -> McpServerSpec:
        """The same Python and orchestrator as the worker, pointed at this lease only.

        The channel is named on the command line and in the environment: some CLIs start
        MCP servers with only a few safe variables of their own environment."""
        env = {"ORCHESTRATOR_AGENT_SOCKET": str(socket_path)}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return cls(
            command=sys.executable,
            args=("-m", "orchestrator", "mcp", "--channel", str(socket_path)),
            env=env,
        )


@dataclass(frozen=True)
class Invocation:
    """What the worker runs for a recipe: argv, extra environment, stdin."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    stdin: str | None = None


@dataclass(frozen=True)
class RecipeContext:
    """What a recipe needs to know about the lease it runs on."""

    files: Path  # the lease's private directory (configs and prompt files go here)
    channel: Path  # the lease's channel socket
    body: str  # the handoff markdown
    feedback: Feedback | None
    extra_args: tuple[str, ...] = ()

    def prompt(self, preamble: str) -> str:
        text = preamble + self.body
        if self.feedback is not None:
            text += (
                "\n\nThis is a retry. Feedback from the last attempt "
                "(repair this rather than start over):\n"
                + json.dumps(self.feedback.to_wire(), indent=2)
            )
        return text


@dataclass(frozen=True)
class Recipe:
    """One agent CLI: how to invoke it and how to read its output."""

    name: str
    executable: str
    uses_mcp: bool
    build: Callable[[Recipe, RecipeContext], Invocation]
    # One line of the CLI's stdout as progress, or None when the line says nothing new.
    progress: Callable[[dict[str, Any]], Progress | None] | None

    def invocation(self, context: RecipeContext) -> Invocation:
        """The command line (and files it names) for this lease."""
        return self.build(self, context)


def _write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
    os.chmod(path, 0o600)
    return path


def _toml(value: Any) -> str:
    """A TOML value for ``codex -c``; JSON strings and string arrays are valid TOML."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _claude(recipe: Recipe, ctx: RecipeContext) -> Invocation:
    spec = McpServerSpec.for_channel(ctx.channel)
    config = _write_json(
        ctx.files / "claude-mcp.json",
        {
            "mcpServers": {
                SERVER_NAME: {
                    "type": "stdio",
                    "command": spec.command,
                    "args": list(spec.args),
                    "env": spec.env,
                }
            }
        },
    )
    argv = [
        recipe.executable,
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--mcp-config",
        str(config),
        "--strict-mcp-config",
        # Edits and this lease's MCP tools need no confirmation; nobody is at a terminal.
        "--permission-mode",
        "acceptEdits",
        "--allowedTools",
        f"mcp__{SERVER_NAME}",
        *ctx.extra_args,
    ]
    return Invocation(argv, stdin=ctx.prompt(MCP_PROMPT))


def _codex(recipe: Recipe, ctx: RecipeContext) -> Invocation:
    spec = McpServerSpec.for_channel(ctx.channel)
    prefix = f"mcp_servers.{SERVER_NAME}"
    argv = [
        recipe.executable,
        "exec",
        "--json",
        "--full-auto",
        "-c",
        f"{prefix}.command={_toml(spec.command)}",
        "-c",
        f"{prefix}.args={_toml(list(spec.args))}",
        "-c",
        f"{prefix}.env={_toml(spec.env)}",
        *ctx.extra_args,
        "-",  # the prompt from stdin
    ]
    return Invocation(argv, stdin=ctx.prompt(MCP_PROMPT))


def _gemini(recipe: Recipe, ctx: RecipeContext) -> Invocation:
    spec = McpServerSpec.for_channel(ctx.channel)
    # The system settings layer, given by path: nothing is written into the worktree
    # (where it would be committed) or the user's ~/.gemini.
    settings = _write_json(
        ctx.files / "gemini-settings.json",
        {
            "mcpServers": {
                SERVER_NAME: {
                    "command": spec.command,
                    "args": list(spec.args),
                    "env": spec.env,
                    "trust": True,
                }
            }
        },
    )
    argv = [
        recipe.executable,
        "--output-format",
        "stream-json",
        "--approval-mode",
        "auto_edit",
        *ctx.extra_args,
        "-p",
        ctx.prompt(MCP_PROMPT),
    ]
    return Invocation(argv, env={"GEMINI_CLI_SYSTEM_SETTINGS_PATH": str(settings)})


def _opencode(recipe: Recipe, ctx: RecipeContext) -> Invocation:
    spec = McpServerSpec.for_channel(ctx.channel)
    config = _write_json(
        ctx.files / "opencode.json",
        {
            "$schema": "https://opencode.ai/config.json",
            "mcp": {
                SERVER_NAME: {
                    "type": "local",
                    "command": [spec.command, *spec.args],
                    "environment": spec.env,
                    "enabled": True,
                }
            },
        },
    )
    argv = [recipe.executable, "run", "--format", "json", *ctx.extra_args, ctx.prompt(MCP_PROMPT)]
    return Invocation(argv, env={"OPENCODE_CONFIG": str(config)})


def _goose(recipe: Recipe, ctx: RecipeContext) -> Invocation:
    spec = McpServerSpec.for_channel(ctx.channel)
    prompt = ctx.files / "prompt.md"
    prompt.write_text(ctx.prompt(MCP_PROMPT), encoding="utf-8")
    extension = " ".join(
        [
            *(f"{key}={shlex.quote(value)}" for key, value in spec.env.items()),
            shlex.quote(spec.command),
            *(shlex.quote(arg) for arg in spec.args),
        ]
    )
    argv = [
        recipe.executable,
        "run",
        "--no-session",
        "--with-extension",
        extension,
        *ctx.extra_args,
        "-i",
        str(prompt),
    ]
    return Invocation(argv)


def _aider(recipe: Recipe, ctx: RecipeContext) -> Invocation:
    prompt = ctx.files / "prompt.md"
    prompt.write_text(ctx.prompt(FILE_PROMPT), encoding="utf-8")
    argv = [recipe.executable, "--yes-always", *ctx.extra_args, "--message-file", str(prompt)]
    return Invocation(argv)


def _short(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line[:MAX_MESSAGE_CHARS] or None


def _said(message: str) -> Progress:
    return Progress(percent=None, phase=None, message=message)


def _message(text: Any, phase: str | None = None) -> Progress | None:
    message = _short(text)
    if message is None:
        return None
    return Progress(percent=None, phase=phase, message=message)


def claude_progress(event: dict[str, Any]) -> Progress | None:
    """Claude Code ``stream-json``: system init, assistant/user messages, result."""
    kind = event.get("type")
    if kind == "system" and event.get("subtype") == "init":
        return _said(f"claude started ({event.get('model') or 'default model'})")
    if kind == "assistant":
        content = (event.get("message") or {}).get("content") or []
        for block in reversed(content):
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                return _message(f"tool {block.get('name')}: {_tool_input(block.get('input'))}")
            if block.get("type") == "text":
                return _message(block.get("text"))
        return None
    if kind == "result":
        verdict = "finished" if not event.get("is_error") else "failed"
        return _message(
            f"claude {verdict} ({event.get('subtype')}, {event.get('num_turns')} turns)"
        )
    return None


def codex_progress(event: dict[str, Any]) -> Progress | None:
    """Codex ``exec --json``: thread/turn lifecycle and items (commands, edits, messages)."""
    kind = event.get("type")
    if kind == "thread.started":
        return _said("codex started")
    if kind == "turn.failed":
        return _message(f"codex turn failed: {(event.get('error') or {}).get('message')}")
    if kind == "turn.completed":
        return _said("codex turn completed")
    if kind == "error":
        return _message(f"codex error: {event.get('message')}")
    if kind not in ("item.started", "item.completed"):
        return None
    item = event.get("item") or {}
    item_type = item.get("type") or item.get("item_type")
    if item_type == "command_execution":
        verb = "running" if kind == "item.started" else "ran"
        return _message(f"{verb} {item.get('command')}")
    if item_type == "file_change" and kind == "item.completed":
        paths = [c.get("path") for c in item.get("changes") or [] if isinstance(c, dict)]
        return _message("changed " + ", ".join(str(p) for p in paths[:5]))
    if item_type == "mcp_tool_call" and kind == "item.started":
        return _message(f"tool {item.get('server')}.{item.get('tool')}")
    if item_type == "agent_message" and kind == "item.completed":
        return _message(item.get("text"))
    if item_type == "todo_list":
        items = [i for i in item.get("items") or [] if isinstance(i, dict)]
        if items:
            done = sum(1 for i in items if i.get("completed"))
            return Progress(
                percent=round(100 * done / len(items)),
                phase=None,
                message=f"{done} of {len(items)} planned steps done",
            )
    return None


def gemini_progress(event: dict[str, Any]) -> Progress | None:
    """Gemini CLI ``stream-json``: init, message, tool_use, tool_result, error, result."""
    kind = event.get("type")
    if kind == "init":
        return _said(f"gemini started ({event.get('model') or 'default model'})")
    if kind == "message" and event.get("role") == "assistant":
        return _message(event.get("content"))
    if kind == "tool_use":
        return _message(f"tool {event.get('tool_name')}: {_tool_input(event.get('parameters'))}")
    if kind == "error":
        return _message(f"gemini error: {event.get('message')}")
    if kind == "result":
        return _message(f"gemini {event.get('status') or 'finished'}")
    return None


def opencode_progress(event: dict[str, Any]) -> Progress | None:
    """opencode ``run --format json``: step_start, text, tool_use, step_finish, error."""
    kind = event.get("type")
    part = event.get("part") or {}
    if kind == "step_start":
        return _said("opencode step started")
    if kind == "tool_use":
        state = part.get("state") or {}
        title = state.get("title") or _tool_input(state.get("input"))
        return _message(f"tool {part.get('tool')}: {title}")
    if kind == "text":
        return _message(part.get("text"))
    if kind == "step_finish":
        return _message(f"opencode step finished ({part.get('reason') or 'done'})")
    if kind == "error":
        error = event.get("error") or {}
        detail = (error.get("data") or {}).get("message") if isinstance(error, dict) else error
        return _message(f"opencode error: {detail or error}")
    return None


def _tool_input(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("command", "file_path", "path", "pattern", "description"):
            if isinstance(value.get(key), str):
                return str(value[key])
        return json.dumps(value)[:MAX_MESSAGE_CHARS]
    return str(value)


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe("claude", "claude", True, _claude, claude_progress),
        Recipe("codex", "codex", True, _codex, codex_progress),
        Recipe("gemini", "gemini", True, _gemini, gemini_progress),
        Recipe("opencode", "opencode", True, _opencode, opencode_progress),
        Recipe("goose", "goose", True, _goose, None),
        Recipe("aider", "aider", False, _aider, None),
    )
}


def recipe(name: str) -> Recipe:
    """The recipe called ``name``; a ValueError that lists the known ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(
            f"unknown agent {name!r}: use one of {', '.join(RECIPES)} "
            "(or give any command after --)"
        ) from None


def progress_of_line(found: Recipe, line: str) -> Progress | None:
    """One line of the CLI's stdout as progress: JSON events through the recipe's reader;
    other lines (banners, plain text) say nothing."""
    if found.progress is None:
        return None
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    return found.progress(event)


def names() -> Sequence[str]:
    """The recipe names, for the CLI's help."""
    return tuple(RECIPES)
