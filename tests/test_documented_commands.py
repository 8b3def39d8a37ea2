"""Every `orchestrator ...` command line that README and the sample config show is one the
CLI accepts, so a newcomer who copies one never meets a usage error.

The lines are read out of README's shell blocks and inline code, and out of the config
file's comments. Each is parsed by the CLI's own parser (placeholders such as NAME and
PATH filled in); the commands that need no daemon (`check-config`, `init` and every
`--help`) are run for real by tests/test_first_hour.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from orchestrator.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDERS = {"NAME": "handoff-1", "TEXT": "an answer", "PATH": "orchestrator.toml",
                "COMMAND": "./agent.sh", "PROMPT_FILE": "prompt.md"}


def _command_lines(text: str) -> list[str]:
    found: list[str] = []
    in_shell = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_shell = line.strip() in ("```sh", "```bash", "```console")
            continue
        if in_shell:
            found += [part for part in line.split(" / ")]
        found += re.findall(r"`(orchestrator [^`]+)`", line)
    commands = []
    for raw in found:
        raw = raw.split("  #")[0].split(" # ")[0].strip()
        raw = re.sub(r"^(sudo( -u \S+)? )", "", raw)
        if not raw.startswith("orchestrator ") or "..." in raw:
            continue
        commands.append(raw)
    return sorted(set(commands))


def _documented() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    config = "\n".join(
        line.lstrip("# ") for line in (ROOT / "config" / "orchestrator.toml").read_text(
            encoding="utf-8").splitlines()
    )
    return sorted(set(_command_lines(readme)) | set(_command_lines(config)))


def test_the_documents_show_commands() -> None:
    # A guard for the extraction itself: it finds the README's main steps.
    documented = _documented()
    for expected in ("orchestrator init", "orchestrator serve", "orchestrator status --watch",
                     "orchestrator check-config --config PATH"):
        assert expected in documented, documented
    assert len(documented) >= 15, documented


@pytest.mark.parametrize("command", _documented())
def test_a_documented_command_is_accepted_as_written(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [PLACEHOLDERS.get(word, word) for word in shlex.split(command)[1:]]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        said = capsys.readouterr().err
        # Prose names a command without its arguments ("see `orchestrator show`"): a
        # mention, fine as long as the command exists and only its arguments are missing.
        if len(argv) == 1 and "the following arguments are required" in said:
            return
        pytest.fail(f"`{command}` is refused by the CLI (exit {exc.code}):\n{said}")
    assert args.command, command
