"""Expected landing times for the handoffs in the merge queue.

A rolling train of window *w* lands, once full, about one candidate every T / w, where T is
how long gating one candidate takes: the handoff at position *k* (0 = the head) lands about
``T * (k // w + 1)`` from when the head started. Each refusal ahead of it costs everything
behind a rebuild, about one more T, so ``p * k * T`` is added for a refusal rate *p*. T and
*p* come from the recent history in the store (the median gating time of the last
candidates, the share of the last decisions that were gate failures), so the estimate
follows the gates as they get slower or flakier, and survives a restart.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

# The store reads it; the estimate is the one consumer (re-exported for it).
from orchestrator.store.sqlite import GatingHistory

__all__ = ["GatingHistory", "landing_etas"]


def landing_etas(
    queue: Sequence[str],
    history: GatingHistory,
    *,
    window: int,
    head_elapsed_s: float = 0.0,
    gated: bool = True,
) -> dict[str, float]:
    """Seconds from now until each handoff of ``queue`` (in landing order) is expected to
    land; empty when nothing has been gated yet to estimate from.

    ``head_elapsed_s`` is how long the head of the train has been gating already;
    ``gated`` is False when no gate is configured (landing is then only git's work)."""
    if not gated:
        return dict.fromkeys(queue, 0.0)
    if not history.candidate_s:
        return {}
    per_candidate = statistics.median(history.candidate_s)
    refusal_rate = history.refused / history.decided if history.decided else 0.0
    window = max(1, window)
    etas = {}
    for position, name in enumerate(queue):
        rounds = position // window + 1 + refusal_rate * position
        etas[name] = round(max(0.0, per_candidate * rounds - head_elapsed_s), 3)
    return etas
