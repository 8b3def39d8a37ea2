"""The store's refusals; each maps to one protocol error code (daemon.handlers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StoreError(Exception):
    """Base of the store's refusals; each maps to one protocol error code."""


class StateLocked(StoreError):
    """Another daemon holds the state directory."""


class StoreFull(StoreError):
    """The store could not write: its disk is full (or the file hit a size limit).

    Nothing was changed (the transaction rolled back). Reads still work, so the daemon
    keeps answering status and lookups and refuses only what would write."""

    # What a refused request's error data says (``{"reason": ...}``), and the log event.
    reason = "store_full"


class StoreBusy(StoreFull):
    """Another process has held the store's write lock for longer than the daemon waits.

    Waited out like a full disk: nothing was changed, reads still work, writes are refused
    until the lock is free again."""

    reason = "store_locked"


class StoreCorrupt(StoreError):
    """The store's file is not a readable SQLite database; start-up stops."""


class UnknownHandoff(StoreError):
    pass


class DuplicateHandoff(StoreError):
    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        super().__init__(
            "handoff name already submitted: "
            + ", ".join(self.names)
            + " (choose another name, or `orchestrator retry` the existing one)"
        )


class InvalidSubmission(StoreError):
    def __init__(self, problems: Sequence[dict[str, Any]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p.get("message")) for p in self.problems))


class LeaseNotHeld(StoreError):
    pass


class NothingAsked(StoreError):
    """``handoff.answer`` for a handoff whose agent is not waiting for an answer."""


class InvalidTransition(StoreError):
    pass
