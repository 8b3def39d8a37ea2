"""The handoff states and their groups: the one definition of that vocabulary.

A leaf module (it imports nothing from the package) so that the store, the merge queue,
the daemon, the observers and the CLI can all name states without importing each other.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Where a handoff stands (PROTOCOL.md, "Handoff states"). A ``StrEnum``: each member
    is its wire text, so it compares equal to, and is stored and sent as, that string."""

    QUEUED = "queued"
    WAITING = "waiting"  # dependencies not merged yet
    LEASED = "leased"
    REPORTED = "reported"  # in the merge queue
    GATING = "gating"
    MERGED = "merged"
    CONFLICT = "conflict"
    FAILED = "failed"
    CANCELLED = "cancelled"


# In protocol order: ``status`` counts and the metrics export every state in this order.
STATES: tuple[State, ...] = tuple(State)
# Not finished yet: still moving towards merged or an outcome.
LIVE_STATES: tuple[State, ...] = (
    State.QUEUED,
    State.WAITING,
    State.LEASED,
    State.REPORTED,
    State.GATING,
)
# Outcomes a person may give a fresh attempt (``handoff.retry``).
RETRYABLE_STATES: tuple[State, ...] = (State.FAILED, State.CONFLICT, State.CANCELLED)
# The merge queue: reported handoffs waiting for it and the ones it is gating.
MERGE_QUEUE_STATES: tuple[State, ...] = (State.REPORTED, State.GATING)
# Handoffs that have finished, for better or worse: the "recent merges and failures"
# of the live page and the watch view.
OUTCOME_STATES: tuple[State, ...] = (State.MERGED, State.FAILED, State.CONFLICT)
# How a ``failed`` handoff's detail starts when its agent reported ``blocked``: the views
# show those as waiting for a person.
BLOCKED_DETAIL = "the agent is blocked and needs a person: "


def parse_state(text: str) -> State:
    """``text`` as a :class:`State`; a ValueError naming the known states otherwise."""
    try:
        return State(text)
    except ValueError:
        raise ValueError(f"unknown handoff state {text!r}; one of {', '.join(STATES)}") from None
