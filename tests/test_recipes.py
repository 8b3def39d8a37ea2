"""`orchestrator worker --agent NAME`: each recipe against a stand-in executable named like
the real CLI, on PATH. The stand-in records the argv and MCP config it was given, starts
the MCP server that config names and calls its tools (so the config really works), and
prints a recorded sample of the CLI's output (tests/recipes/, written from each CLI's
documentation), from which the worker derives progress."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import git, make_repo
from harness import Daemon, control, handoff_doc, kill_group, wait_for, write_config

from orchestrator.agent.recipes import RECIPES, progress_of_line

pytest.importorskip("mcp", reason="the MCP SDK is the optional extra orchestrator[mcp]")

pytestmark = pytest.mark.slow

FAKE = Path(__file__).parent / "agents" / "fake_cli.py"
SAMPLES = Path(__file__).parent / "recipes"
MCP_PROGRESS = {"percent": 10, "phase": "Do it"}
# What each CLI's recorded output turns into, on top of what the agent said over MCP.
EXPECTED_PROGRESS = {
    "claude": {**MCP_PROGRESS, "message": "claude finished (success, 3 turns)"},
    "codex": {**MCP_PROGRESS, "message": "codex turn completed"},
    "gemini": {**MCP_PROGRESS, "message": "gemini success"},
    "opencode": {**MCP_PROGRESS, "message": "opencode step finished (stop)"},
    # No structured output: only what the agent reported (over MCP, or in the file).
    "goose": {**MCP_PROGRESS, "message": "via mcp"},
    "aider": {"percent": 40, "phase": None, "message": "editing"},
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("recipes")
    repo = make_repo(base / "repo")
    running = Daemon(write_config(base, repo, merge="paused = true"), base / "daemon.log")
    running.start()
    yield running
    running.stop()


def _bin(tmp_path: Path, name: str) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    script = directory / name
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" {name} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return directory


def _summary(daemon: Daemon, name: str) -> dict[str, Any]:
    return next(
        h for h in control(daemon.socket, "handoff.list")["handoffs"] if h["name"] == name
    )


@pytest.mark.parametrize("agent", list(RECIPES))
def test_recipe_runs_its_cli_with_the_leases_mcp_config(
    daemon: Daemon, tmp_path: Path, agent: str
) -> None:
    handoff = f"r-{agent}"
    control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc(handoff)]})
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    env = {
        **os.environ,
        "PATH": f"{_bin(tmp_path, agent)}{os.pathsep}{os.environ['PATH']}",
        "FAKE_DIR": str(fake_dir),
    }
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--socket", str(daemon.socket), "worker",
         "--name", f"w-{agent}", "--wait", "1", "--max-handoffs", "1", "--agent", agent,
         "--", "--model", "the-best"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, start_new_session=True,
    )
    try:
        expected = EXPECTED_PROGRESS[agent]
        wait_for(
            lambda: _summary(daemon, handoff)["progress"] == expected
            or (worker.poll() is not None and pytest.fail(log.read_text())),
            f"{agent}'s progress {expected}",
        )
        (fake_dir / f"{agent}.release").touch()
        assert worker.wait(timeout=120) == 0, log.read_text()
    finally:
        kill_group(worker)
    record = json.loads((fake_dir / f"{agent}.json").read_text())
    argv = record["argv"]
    got = control(daemon.socket, "handoff.get", {"name": handoff})
    assert got["state"] == "reported", got
    assert record["cwd"] == got["leases"][-1]["worktree"]
    head = git(Path(record["cwd"]), "rev-parse", "HEAD")
    assert got["reports"][-1]["head"] == head
    # The user's extra arguments reach the CLI.
    assert argv[argv.index("--model") + 1] == "the-best"
    CHECKS[agent](record, argv)
    if RECIPES[agent].uses_mcp:
        server = record["server"]
        assert server["command"] == sys.executable
        assert server["args"][:3] == ["-m", "orchestrator", "mcp"]
        channel = server["args"][server["args"].index("--channel") + 1]
        assert server["env"]["ORCHESTRATOR_AGENT_SOCKET"] == channel
        # The channel was this lease's, and went away with it.
        assert not os.path.exists(channel)
        assert f"# HANDOFF: {handoff}" in record["mcp"]["handoff"]
    else:
        assert record["server"] is None


def _prompt_has_handoff(text: str, name: str = "") -> None:
    assert "You are a coding agent working on one handoff" in text
    assert "# HANDOFF: r-" in text


def _check_claude(record: dict[str, Any], argv: list[str]) -> None:
    assert argv[:5] == ["-p", "--output-format", "stream-json", "--verbose", "--mcp-config"]
    assert "--strict-mcp-config" in argv
    config = json.loads(record["--mcp-config"])
    assert list(config["mcpServers"]) == ["orchestrator"]
    assert config["mcpServers"]["orchestrator"]["type"] == "stdio"
    _prompt_has_handoff(record["stdin"])
    assert "submit_report" in record["stdin"]


def _check_codex(record: dict[str, Any], argv: list[str]) -> None:
    assert argv[:3] == ["exec", "--json", "--full-auto"]
    assert argv[-1] == "-"
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "-c"]
    keys = sorted(o.partition("=")[0] for o in overrides)
    assert keys == ["mcp_servers.orchestrator.args", "mcp_servers.orchestrator.command",
                    "mcp_servers.orchestrator.env"]
    for override in overrides:  # each value is TOML, as codex parses it
        tomllib.loads(f"v = {override.partition('=')[2]}")
    _prompt_has_handoff(record["stdin"])


def _check_gemini(record: dict[str, Any], argv: list[str]) -> None:
    assert argv[:2] == ["--output-format", "stream-json"]
    assert argv[-2] == "-p"
    _prompt_has_handoff(argv[-1])
    settings = record["GEMINI_CLI_SYSTEM_SETTINGS_PATH_content"]
    assert settings["mcpServers"]["orchestrator"]["trust"] is True
    # Not in the worktree, where it would be committed.
    assert not record["GEMINI_CLI_SYSTEM_SETTINGS_PATH"].startswith(record["cwd"])


def _check_opencode(record: dict[str, Any], argv: list[str]) -> None:
    assert argv[:3] == ["run", "--format", "json"]
    _prompt_has_handoff(argv[-1])
    config = record["OPENCODE_CONFIG_content"]
    assert config["$schema"] == "https://opencode.ai/config.json"
    assert not record["OPENCODE_CONFIG"].startswith(record["cwd"])


def _check_goose(record: dict[str, Any], argv: list[str]) -> None:
    assert argv[:3] == ["run", "--no-session", "--with-extension"]
    assert argv[-2] == "-i"
    _prompt_has_handoff(record["-i"])


def _check_aider(record: dict[str, Any], argv: list[str]) -> None:
    assert argv[0] == "--yes-always"
    assert argv[-2] == "--message-file"
    assert "submit_report" not in record["--message-file"]
    _prompt_has_handoff(record["--message-file"])


CHECKS = {
    "claude": _check_claude,
    "codex": _check_codex,
    "gemini": _check_gemini,
    "opencode": _check_opencode,
    "goose": _check_goose,
    "aider": _check_aider,
}


@pytest.mark.parametrize("agent", ["claude", "codex", "gemini", "opencode"])
def test_every_line_of_the_recorded_output_parses(agent: str) -> None:
    lines = (SAMPLES / f"{agent}.jsonl").read_text().splitlines()
    derived = [progress_of_line(RECIPES[agent], line) for line in lines]
    assert derived[0] is not None and "started" in (derived[0].message or "")
    assert sum(p is not None for p in derived) >= 3
    # Banners and other non-JSON lines say nothing.
    assert progress_of_line(RECIPES[agent], "Loaded cached credentials.") is None


def test_an_unknown_agent_or_a_missing_cli_is_refused_with_what_to_do(tmp_path: Path) -> None:
    def worker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", "--socket", str(tmp_path / "s"), "worker",
             *args], capture_output=True, text=True, timeout=60,
            env={**os.environ, "PATH": "/usr/bin:/bin"},
        )

    unknown = worker("--agent", "cursor")
    assert unknown.returncode == 2 and "claude, codex, gemini" in unknown.stderr
    missing = worker("--agent", "claude")
    assert missing.returncode == 2 and "'claude' is not on PATH" in missing.stderr
