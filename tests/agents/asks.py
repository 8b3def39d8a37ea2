"""An agent that asks a person through the file interface: it writes its question to
$ORCHESTRATOR_QUESTION_FILE, waits for $ORCHESTRATOR_ANSWER_FILE, and commits the answer."""

import json
import os
import time
from pathlib import Path

from _common import HANDOFF, commit, write

question = Path(os.environ["ORCHESTRATOR_QUESTION_FILE"])
answer = Path(os.environ["ORCHESTRATOR_ANSWER_FILE"])
partial = question.with_name("question.partial")
partial.write_text(json.dumps({"question": "Which colour?", "choices": ["red", "blue"]}))
os.replace(partial, question)
deadline = time.monotonic() + 120
while not answer.exists():
    assert time.monotonic() < deadline, "no answer came"
    time.sleep(0.05)
write(f"work/{HANDOFF}.txt", f"the person said {answer.read_text()}\n")
commit(f"{HANDOFF}: as the person said")
