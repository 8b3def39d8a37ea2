"""Durable state in SQLite (WAL): handoffs, leases, reports, gate runs, merges and events.

Every method is one transaction, so a state change is either wholly on disk or not at all;
a reply that says "accepted" is sent only after the transaction committed with
``synchronous=FULL``. Methods are blocking: the daemon calls them from a worker thread, one
at a time (the store's connection is not shared concurrently), which also makes each
read-modify-write here atomic with respect to every other.

The state machine of a handoff::

    waiting -> queued -> leased -> reported -> gating -> merged
                  ^         |                     |
                  +---------+ (expired/released)  +-> conflict / failed -> queued (requeue)
    any live state -> cancelled;  failed/conflict/cancelled -> queued (retry)
"""

from __future__ import annotations

# The one class users see, made of one part per table family (store/handoffs.py,
# leases.py, merges.py, questions.py, events.py) over the shared connection
# (connection.py); everything this module used to define is importable from it still.
from orchestrator.store.connection import (
    CONTENDED_LOCK_WAIT_S,
    END_REASONS,
    WRITE_LOCK_WAIT_S,
    StoreConnection,
    lock_state_dir,
)
from orchestrator.store.errors import (
    DuplicateHandoff,
    InvalidSubmission,
    InvalidTransition,
    LeaseNotHeld,
    NothingAsked,
    StateLocked,
    StoreBusy,
    StoreCorrupt,
    StoreError,
    StoreFull,
    UnknownHandoff,
)
from orchestrator.store.events import EventLog
from orchestrator.store.handoffs import HandoffTable, NewHandoff
from orchestrator.store.leases import PREPARE_GRACE_S, Expired, Grant, LeaseTable, new_lease_id
from orchestrator.store.merges import CachedGatePass, GatingHistory, MergeJob, MergeTable
from orchestrator.store.questions import QuestionTable
from orchestrator.store.schema import SCHEMA, SCHEMA_VERSION
from orchestrator.store.states import LIVE_STATES, RETRYABLE_STATES, STATES, State

__all__ = [
    "CONTENDED_LOCK_WAIT_S",
    "END_REASONS",
    "LIVE_STATES",
    "PREPARE_GRACE_S",
    "RETRYABLE_STATES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STATES",
    "WRITE_LOCK_WAIT_S",
    "CachedGatePass",
    "DuplicateHandoff",
    "Expired",
    "GatingHistory",
    "Grant",
    "InvalidSubmission",
    "InvalidTransition",
    "LeaseNotHeld",
    "MergeJob",
    "NewHandoff",
    "NothingAsked",
    "State",
    "StateLocked",
    "Store",
    "StoreBusy",
    "StoreConnection",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "UnknownHandoff",
    "lock_state_dir",
    "new_lease_id",
]


class Store(HandoffTable, LeaseTable, MergeTable, QuestionTable, EventLog):
    """The SQLite store. Open with :meth:`open`; close with :meth:`close`."""
