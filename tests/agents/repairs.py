"""Breaks the test on its first attempt; repairs it from the gate log on the next."""

import json
import os
from pathlib import Path

from _common import HANDOFF, commit, git, record, write

feedback_file = Path(os.environ["ORCHESTRATOR_FEEDBACK_FILE"])
if feedback_file.is_file():
    feedback = json.loads(feedback_file.read_text())
    assert feedback["reason"] == "gate_failed", feedback
    # Its own change alone: the branch against where it forked from the integration tip.
    record(feedback=feedback, own_change=git("diff", "--name-only", "origin/main...HEAD"))
    write("src/app.py", "def answer():\n    return 42\n\n\ndef extra():\n    return 1\n")
    commit(f"{HANDOFF}: repaired after: {feedback['detail'][:40]}")
else:
    record()
    write("src/app.py", "def answer():\n    return 41\n\n\ndef extra():\n    return 1\n")
    commit(f"{HANDOFF}: first try")
