"""An agent that records what its workspace gave it (ports, copied files, kept paths),
then does the good agent's work."""

import os
import sys
from pathlib import Path

from _common import HANDOFF, WORKTREE, commit, record, write

sys.stdin.read()
env_file = WORKTREE / ".env"
marker = WORKTREE / ".venv" / "marker"
record(
    port_base=os.environ.get("ORCHESTRATOR_PORT_BASE"),
    port_count=os.environ.get("ORCHESTRATOR_PORT_COUNT"),
    env_file=env_file.read_text() if env_file.exists() else None,
    env_file_mode=oct(env_file.stat().st_mode & 0o777) if env_file.exists() else None,
    venv=marker.read_text() if marker.exists() else None,
    lock=Path(WORKTREE / "deps.lock").read_text() if (WORKTREE / "deps.lock").exists() else None,
)
write(f"work/{HANDOFF}.txt", f"done for {HANDOFF}\n")
commit(f"{HANDOFF}: the work")
