"""An agent whose change breaks the repository's test (app.answer() must be 42)."""

from _common import HANDOFF, commit, write

write("src/app.py", "def answer():\n    return 41\n")
commit(f"{HANDOFF}: an innocent-looking change")
