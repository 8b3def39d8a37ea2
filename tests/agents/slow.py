"""A good agent that takes a few seconds first (longer than a short daemon.idle_timeout_s)."""

import sys
import time

from _common import HANDOFF, commit, progress, write

sys.stdin.read()
progress(10, "thinking")
time.sleep(3)
write(f"work/{HANDOFF}.txt", f"done slowly for {HANDOFF}\n")
commit(f"{HANDOFF}: the slow work")
progress(100, "done")
