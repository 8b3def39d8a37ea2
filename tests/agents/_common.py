"""What every scripted test agent shares: where it works and how it commits."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

WORKTREE = Path(os.environ["ORCHESTRATOR_WORKTREE"])
HANDOFF = os.environ["ORCHESTRATOR_HANDOFF"]


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=test agent", "-c", "user.email=agent@test.invalid", *args],
        cwd=WORKTREE,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def write(rel: str, text: str) -> None:
    path = WORKTREE / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def commit(message: str) -> None:
    git("add", "-A")
    git("commit", "-q", "-m", message)


def progress(percent: int, message: str) -> None:
    with open(os.environ["ORCHESTRATOR_PROGRESS_FILE"], "a") as f:
        f.write(f"{percent} {message}\n")


def record(**facts: object) -> None:
    """Append what this attempt saw to $AGENT_RECORD (a JSON line), for the test to check."""
    target = os.environ.get("AGENT_RECORD")
    if not target:
        return
    import json

    line = {
        "handoff": HANDOFF,
        "attempt": int(os.environ["ORCHESTRATOR_ATTEMPT"]),
        "base": os.environ.get("ORCHESTRATOR_BASE_COMMIT"),
        "integration": os.environ.get("ORCHESTRATOR_INTEGRATION_COMMIT"),
        "origin": git("rev-parse", "origin/main"),
        "head": git("rev-parse", "HEAD"),
        **facts,
    }
    with open(target, "a") as f:
        f.write(json.dumps(line) + "\n")
