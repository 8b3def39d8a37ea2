"""An agent that commits part of its work, then hangs until its worker is killed."""

import time

from _common import HANDOFF, commit, progress, write

write(f"partial/{HANDOFF}.txt", "half of the work\n")
commit(f"{HANDOFF}: partial work before dying")
progress(30, "partial work committed")
time.sleep(3600)
