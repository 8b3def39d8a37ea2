"""Deletes its own worktree on its first attempt (and exits 1); works normally after."""

import os
import shutil
import sys

from _common import HANDOFF, WORKTREE, commit, write

if os.environ["ORCHESTRATOR_ATTEMPT"] == "1":
    shutil.rmtree(WORKTREE)
    sys.exit(1)
write(f"work/{HANDOFF}.txt", "done after the worktree was deleted once\n")
commit(f"{HANDOFF}: the work")
