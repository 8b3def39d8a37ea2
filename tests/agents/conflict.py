"""An agent that writes shared.txt (so two of them conflict). Given conflict feedback, it
merges the integration branch (origin/main in its own repository, at the lease's
integration commit) into its branch, keeps both versions, and commits."""

import json
import os
from pathlib import Path

from _common import HANDOFF, WORKTREE, commit, git, record, write

feedback_file = Path(os.environ["ORCHESTRATOR_FEEDBACK_FILE"])
feedback = json.loads(feedback_file.read_text()) if feedback_file.is_file() else None
record(feedback=feedback)
if feedback is not None:
    assert feedback["reason"] == "conflict", feedback
    assert "shared.txt" in feedback["log"], feedback
    integration = os.environ.get("ORCHESTRATOR_INTEGRATION_COMMIT")
    if integration:
        assert git("rev-parse", "origin/main") == integration, integration
    try:
        git("merge", "--no-edit", "origin/main")
    except Exception:
        ours = git("show", "HEAD:shared.txt")
        theirs = git("show", "origin/main:shared.txt")
        (WORKTREE / "shared.txt").write_text(theirs + "\n" + ours + "\n")
        git("add", "shared.txt")
        git("commit", "-q", "--no-edit")
else:
    write("shared.txt", f"line written by {HANDOFF}\n")
    commit(f"{HANDOFF}: write shared.txt")
