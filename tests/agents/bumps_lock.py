"""An agent that changes the dependency lock file (so kept dependencies must be rebuilt)."""

from _common import HANDOFF, commit, write

write("deps.lock", f"v2 from {HANDOFF}\n")
commit(f"{HANDOFF}: bump the dependencies")
