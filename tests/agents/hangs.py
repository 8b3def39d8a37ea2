"""An agent that never finishes, with a child process of its own (for cancellation,
revocation and a worker killed outright)."""

import subprocess
import sys
import time

from _common import progress

subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)  # hangs-child"])
progress(10, "thinking forever")
time.sleep(3600)
