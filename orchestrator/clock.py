"""The daemon's one source of time, injectable so tests can move it by hand.

Wall time (``now``) stamps the store's records and lease expiries; monotonic time
(``monotonic``) measures durations that a wall-clock step must not distort (watchdog,
peek throttling, long-poll deadlines).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Where the daemon's parts read the time."""

    def now(self) -> float:
        """Wall time, seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back, for durations only."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        """``time.time()``."""
        return time.time()

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()


SYSTEM_CLOCK: Clock = SystemClock()
