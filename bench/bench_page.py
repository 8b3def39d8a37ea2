"""What one frame of the live page (and ``status --watch``) costs the store.

The page redraws every second and its reads share the store's one lane with heartbeats
and reports, so a frame must stay cheap however long the daemon's history is. Ours is the
daemon's read (``Daemon._board``: live handoffs state by state, the recent outcomes by an
index walk, each outcome's record once per change) plus the render, on a store of 10,000
handoffs in a daemon-like mix; the baseline is the obvious read the control API allows
(every summary, as ``handoff.list`` returns them, then ``handoff.get`` of the recent
outcomes) on the same store, and the same read on a store of 10 handoffs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.observe.board import (
    OUTCOME_STATES,
    RECENT_OUTCOMES,
    RecentRecords,
    build_board,
    recent_outcome_names,
)
from orchestrator.observe.page import render_page
from orchestrator.store.sqlite import Store
from orchestrator.store.states import LIVE_STATES

from . import BenchConfig, BenchResult
from .bench_daemon import SlowdownResult
from .bench_metrics import build_store


def _status(store: Store, now: float) -> dict[str, Any]:
    leases = store.active_leases(now=now)
    return {
        "counts": store.counts(),
        "workers": [],
        "leases": [
            {"handoff": x.handoff, "worker": x.worker, "attempt": x.attempt}
            for x in leases
        ],
        "mergeQueue": store.merge_queue(),
        "integrationBranch": "main",
        "integrationTip": "0" * 40,
    }


def ours(store: Store) -> Callable[[], str]:
    records = RecentRecords()

    def frame() -> str:
        now = time.time()
        live = [h.to_wire() for state in LIVE_STATES for h in store.summaries(state)]
        recent = [h.to_wire() for h in store.recent_summaries(OUTCOME_STATES, RECENT_OUTCOMES)]
        fetched = {name: store.detail(name).to_wire() for name in records.stale(recent)}
        board = build_board(
            _status(store, now), live + recent, records.records(recent, fetched), now=now
        )
        return render_page(board)

    return frame


def naive(store: Store) -> Callable[[], str]:
    def frame() -> str:
        now = time.time()
        handoffs = [h.to_wire() for h in store.summaries()]
        details = [store.detail(n).to_wire() for n in recent_outcome_names(handoffs)]
        return render_page(build_board(_status(store, now), handoffs, details, now=now))

    return frame


def _median(fn: Callable[[], str], runs: int) -> float:
    fn()  # warm-up: page cache, and the records cache of ours
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(config: BenchConfig) -> list[BenchResult]:
    runs = config.runs(15)
    big = build_store(config.scratch / "page-big.sqlite3", 10_000)
    small = build_store(config.scratch / "page-small.sqlite3", 10)
    try:
        ours_big = _median(ours(big), runs)
        naive_big = _median(naive(big), runs)
        ours_small = _median(ours(small), runs)
    finally:
        big.close()
        small.close()
    return [
        BenchResult(
            "page frame, 10,000 handoffs",
            "live + recent reads",
            ours_big,
            "every summary",
            naive_big,
            runs,
        ),
        SlowdownResult(
            "page frame, 10,000 vs 10 handoffs",
            "10,000 handoffs",
            ours_big,
            "10 handoffs",
            ours_small,
            runs,
        ),
    ]


if __name__ == "__main__":  # pragma: no cover - a quick look without the runner
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        for r in run(BenchConfig(files=0, scratch=Path(scratch))):
            print(f"{r.name}: {r.ours_s * 1000:.1f} ms vs {r.baseline_s * 1000:.1f} ms")
