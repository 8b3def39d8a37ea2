"""The chaos test's agent. A handoff whose name contains "-flaky" first commits a file the
gate rejects (the word BROKEN), then repairs it from the gate-failure feedback; every
other handoff does its work right away. Each writes only its own file, so none conflict."""

import json
import os
import random
import time
from pathlib import Path

from _common import HANDOFF, commit, git, progress, write

feedback_file = Path(os.environ["ORCHESTRATOR_FEEDBACK_FILE"])
repairing = feedback_file.is_file() and json.loads(feedback_file.read_text())["reason"] == (
    "gate_failed"
)
broken = "-flaky" in HANDOFF and not repairing
# A little think time (the same for a given handoff and attempt), so kills also catch
# agents mid-work, heartbeating.
time.sleep(random.Random(f"{HANDOFF}-{os.environ['ORCHESTRATOR_ATTEMPT']}").uniform(0.1, 0.6))
progress(50, "writing")
attempt = os.environ["ORCHESTRATOR_ATTEMPT"]
# The attempt number makes each attempt's commit differ: a later attempt (its lease
# expired while the daemon was down) must not find "nothing to do", which the worker
# would report as a failure.
write(f"work/{HANDOFF}.txt", f"{'BROKEN' if broken else 'done'}, attempt {attempt}\n")
if git("status", "--porcelain"):
    commit(f"{HANDOFF}: {'first try' if broken else 'the work'}")
progress(100, "done")
