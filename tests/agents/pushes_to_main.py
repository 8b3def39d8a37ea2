"""A hostile agent: breaks the suite (answer() becomes 41), commits, and moves the
integration branch to its commit itself (a push straight to main), then reports."""

import os
import subprocess

from _common import HANDOFF, WORKTREE, commit, write

write("src/app.py", "def answer():\n    return 41\n")
commit(f"{HANDOFF}: straight to main")
subprocess.run(
    ["git", "push", "-q", "--receive-pack=git -c receive.denyCurrentBranch=ignore receive-pack",
     os.environ["HOSTILE_TARGET_REPO"], "HEAD:refs/heads/main"],
    cwd=WORKTREE, check=True,
)
