"""Review: an agent whose test suite (run by the gate) leaves a FIFO named .gitattributes
in the gate checkout; the daemon's next checkout there reads it and blocks."""

from _common import HANDOFF, commit, write

write("check.py", "import os\nos.mkfifo('.gitattributes')\n")
write(f"work/{HANDOFF}.txt", "x\n")
commit(f"{HANDOFF}: a test suite that leaves a FIFO behind")
