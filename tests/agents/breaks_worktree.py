"""An agent that leaves work behind and destroys its worktree's git directory."""

import shutil

from _common import WORKTREE, write

write("leftover.txt", "never reviewed\n")
shutil.rmtree(WORKTREE / ".git")
