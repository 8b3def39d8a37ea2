"""A good agent: adds a file named after its handoff and commits it (or, with
AGENT_LEAVE_UNCOMMITTED=1, leaves it for the worker to commit)."""

import os
import sys

from _common import HANDOFF, commit, progress, write

body = sys.stdin.read()
assert f"# HANDOFF: {HANDOFF}" in body, "the handoff arrives on stdin"
progress(50, "writing")
write(f"work/{HANDOFF}.txt", f"done by the good agent for {HANDOFF}\n")
if not os.environ.get("AGENT_LEAVE_UNCOMMITTED"):
    commit(f"{HANDOFF}: the work")
progress(100, "done")
