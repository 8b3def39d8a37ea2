"""An agent that leaves work behind and destroys its worktree's link to git."""

import os

from _common import WORKTREE, write

write("leftover.txt", "never reviewed\n")
os.remove(WORKTREE / ".git")
