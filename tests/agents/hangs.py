"""An agent that never finishes (for cancellation and revocation)."""

import time

from _common import progress

progress(10, "thinking forever")
time.sleep(3600)
