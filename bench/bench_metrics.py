"""What a scrape of ``/metrics`` costs as the store grows: 10 handoffs against 10,000.

A scrape reads the store-backed gauges (handoffs by state, the oldest handoff of each live
state, active leases, the merge queue, state changes since the last scrape) from SQLite in
the store's worker thread, then renders every series in a thread. The gauges are computed
from the store's truth at scrape time, so the question is whether that stays cheap with a
long history. Every side is the real endpoint (``serve_http`` with the daemon's refresh),
scraped over loopback TCP by a client in another process, like Prometheus:

- **baseline**: a store holding 10 handoffs, all queued (a new daemon);
- **ours**: 10,000 handoffs as after months of use: almost all merged (each with its
  ended lease), a few dozen live ones in every state, 20 leases held;
- **backlog**: 10,000 handoffs all queued, the worst case for the oldest-handoff gauge.

The ratio is ours / baseline, a slow-down: 1.00x means the store's size costs a scrape
nothing. A third row compares the 10,000-handoff scrape with rendering the same registry
alone (no store read, no HTTP), the floor. While scraping, a task on the endpoint's event
loop measures how late its 1 ms sleeps wake up: how long a scrape holds the loop.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from orchestrator.blocking import Offload
from orchestrator.observe.metrics import Metrics, serve_http
from orchestrator.protocol.records import Report
from orchestrator.store.events import StoreSnapshot
from orchestrator.store.sqlite import NewHandoff, Store

from . import BenchConfig, BenchResult

SMALL = 10
LARGE = 10_000
# Handoffs left in a live state in the large store (the rest are merged or held).
LIVE = {"queued": 40, "waiting": 20, "reported": 10}
LEASED = 20
HELD = {"failed": 30, "conflict": 10, "cancelled": 20}
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# The scraper runs in its own process, like Prometheus: its Python work must not show up as
# the endpoint's time or hold the GIL the endpoint's event loop needs. One URL per line
# in, "seconds bytes" per line out.
CLIENT = """
import sys, time, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
for line in sys.stdin:
    t0 = time.perf_counter()
    with opener.open(line.strip(), timeout=30) as response:
        size = len(response.read())
    print(time.perf_counter() - t0, size, flush=True)
"""


@dataclass(frozen=True)
class SlowdownResult(BenchResult):
    """``ratio`` is ours / baseline: 1.0 means no slower."""

    ratio_label: ClassVar[str] = "slow-down"
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.ours_s / self.baseline_s if self.baseline_s > 0 else float("inf")


def _handoff(i: int) -> NewHandoff:
    name = f"handoff-{i:05d}"
    body = f"# HANDOFF: {name} - PENDING\n\n" + "A realistic body of a few hundred bytes. " * 20
    return NewHandoff(
        name=name,
        title=f"work item {i}",
        priority=("HIGH", "MEDIUM", "LOW")[i % 3],
        dependencies=(),
        labels=(),
        body=body,
        wire={"name": name, "title": f"work item {i}", "body": body},
    )


def build_store(path: Path, total: int, *, backlog: bool = False) -> Store:
    """A store of ``total`` handoffs with a daemon-like mix of states.

    Set-up shortcut: the history (merged and held handoffs, their ended leases) is written
    with plain SQL, since taking 10,000 handoffs through the real lease/report/merge calls
    one fsynced transaction at a time would take minutes and measure nothing more. The
    live part (leases held, reports waiting) goes through the store's own methods.
    """
    store = Store.open(path)
    now = time.time()
    store.submit([_handoff(i) for i in range(total)], max_attempts=3, now=now - 86400)
    live = sum(LIVE.values()) + LEASED
    if backlog or total <= live + sum(HELD.values()):
        return store  # everything queued: a young daemon, or a backlog with no workers
    conn = store._conn  # set-up only; see the docstring
    history = total - live
    held = [s for s, n in HELD.items() for _ in range(n)]
    names = [f"handoff-{i:05d}" for i in range(total)]
    with conn:
        for i, name in enumerate(names[:history]):
            state = held[i] if i < len(held) else "merged"
            at = now - 86400 + i
            conn.execute(
                "UPDATE handoffs SET state = ?, updated_at = ?, merged_at = ? WHERE name = ?",
                (state, at, at if state == "merged" else None, name),
            )
            conn.execute(
                "INSERT INTO leases(id, token, handoff, worker, attempt, granted_at, expires_at,"
                " ended_at, end_reason) VALUES (?,?,?,?,1,?,?,?,'reported')",
                (f"old-{i}", 1_000_000 + i, name, "w", at - 60, at + 60, at),
            )
        rest = names[history:]
        waiting = rest[: LIVE["waiting"]]
        for name in waiting:
            conn.execute("UPDATE handoffs SET state = 'waiting' WHERE name = ?", (name,))
    # The live part, through the store's API: leases granted, some reported.
    reported = LIVE["reported"]
    for k in range(LEASED + reported):
        grant = store.grant(worker=f"w{k}", labels=(), ttl_s=3600, now=now)
        if grant is None:
            break
        store.set_lease_workspace(
            grant.lease_id, base_commit="0" * 40, worktree="/x", branch="b", expires_at=now + 3600
        )
        if k < reported:
            store.accept_report(
                grant.lease_id,
                grant.token,
                report=Report(status="completed", head="1" * 40, summary="done"),
                head="1" * 40,
                now=now,
            )
    return store


def _get(url: str) -> bytes:
    with _OPENER.open(url, timeout=30) as response:
        body: bytes = response.read()
        return body


@dataclass
class _Side:
    store: Store
    metrics: Metrics
    offload: Offload
    url: str = ""
    scrape_s: list[float] = dataclasses.field(default_factory=list)
    render_s: list[float] = dataclasses.field(default_factory=list)
    stall_s: float = 0.0
    body: bytes = b""

    async def refresh(self) -> None:
        # What the daemon does before each scrape (orchestrator/service.py).
        cursor = self.metrics.state_cursor or 0

        def read() -> tuple[StoreSnapshot, list[tuple[int, float, str, str]]]:
            return self.store.metrics_snapshot(now=time.time()), self.store.state_changes(cursor)

        snapshot, changes = await self.offload.db(read)
        self.metrics.set_store_snapshot(snapshot)
        self.metrics.state_changes(changes)


async def _measure(sides: list[_Side], runs: int) -> None:
    """Scrape each side ``runs`` times, interleaved (the order flips every round, so
    neither side always goes first); record scrape and render times and loop stalls."""
    current: _Side | None = None
    async with anyio.create_task_group() as tg:
        for side in sides:
            port: int = await tg.start(
                lambda task_status, side=side: serve_http(
                    "127.0.0.1:0",
                    side.metrics,
                    ready=lambda: True,
                    refresh=side.refresh,
                    task_status=task_status,
                )
            )
            side.url = f"http://127.0.0.1:{port}/metrics"
            await anyio.to_thread.run_sync(_get, side.url)  # warm-up: page cache, first render

        async def watch_loop() -> None:
            # How late a 1 ms sleep wakes up is how long something else held the loop.
            while True:
                t0 = time.perf_counter()
                await anyio.sleep(0.001)
                late = time.perf_counter() - t0 - 0.001
                if current is not None:
                    current.stall_s = max(current.stall_s, late)

        gc.collect()  # the set-up's garbage is not the endpoint's
        tg.start_soon(watch_loop)
        async with await anyio.open_process([sys.executable, "-c", CLIENT]) as client:
            assert client.stdin is not None and client.stdout is not None
            replies = BufferedByteReceiveStream(client.stdout)
            for i in range(runs):
                for side in sides if i % 2 == 0 else reversed(sides):
                    current = side
                    await client.stdin.send(side.url.encode() + b"\n")
                    seconds, _ = (await replies.receive_until(b"\n", 200)).split()
                    side.scrape_s.append(float(seconds))
                    current = None
                    t0 = time.perf_counter()
                    side.metrics.render()
                    side.render_s.append(time.perf_counter() - t0)
            await client.stdin.aclose()
        for side in sides:
            side.body = await anyio.to_thread.run_sync(_get, side.url)
        tg.cancel_scope.cancel()


def _gauge(body: bytes, series: str) -> float:
    for line in body.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rpartition(" ")[2])
    raise AssertionError(f"{series} missing from the scrape")


def run(config: BenchConfig) -> list[BenchResult]:
    """Scrape a 10-handoff store and a 10,000-handoff store; report the slow-down."""
    runs = config.runs(200)
    sides = []
    for total, backlog in ((SMALL, False), (LARGE, False), (LARGE, True)):
        directory = config.scratch / f"metrics-{total}-{backlog}"
        directory.mkdir(parents=True, exist_ok=True)
        store = build_store(directory / "state.db", total, backlog=backlog)
        side = _Side(store, Metrics("b"), Offload())
        side.metrics.start_state_clock(*store.state_clock_start())
        sides.append(side)
    try:
        anyio.run(_measure, sides, runs)
    finally:
        for side in sides:
            side.store.close()
    small, large, queue = sides
    # The scrape must say what the store holds, or the timing means nothing.
    merged = _gauge(large.body, 'orchestrator_handoffs{state="merged"}')
    queued = _gauge(large.body, 'orchestrator_handoffs{state="queued"}')
    held = _gauge(large.body, "orchestrator_leases_active")
    assert merged == LARGE - sum(LIVE.values()) - LEASED - sum(HELD.values()), merged
    assert (queued, held) == (LIVE["queued"], LEASED), (queued, held)
    assert _gauge(small.body, 'orchestrator_handoffs{state="queued"}') == SMALL
    assert _gauge(queue.body, 'orchestrator_handoffs{state="queued"}') == LARGE
    note = (
        f"The {LARGE}-handoff store: {merged:.0f} merged (each with an ended lease), "
        f"{queued:.0f} queued, {held:.0f} leases held, {sum(HELD.values())} held for a person; "
        f"{len(large.body)} bytes per scrape. Slowest scrape {max(large.scrape_s) * 1000:.1f} ms "
        f"({max(small.scrape_s) * 1000:.1f} ms with {SMALL}, {max(queue.scrape_s) * 1000:.1f} ms "
        f"with {LARGE} queued); the longest the event loop was held during a scrape: "
        f"{large.stall_s * 1000:.1f} ms ({small.stall_s * 1000:.1f} ms with {SMALL}, "
        f"{queue.stall_s * 1000:.1f} ms with {LARGE} queued)."
    )
    base = SlowdownResult(
        name=f"`GET /metrics`, median of {runs}",
        ours=f"{LARGE} handoffs in the store",
        ours_s=statistics.median(large.scrape_s),
        baseline=f"{SMALL} handoffs",
        baseline_s=statistics.median(small.scrape_s),
        runs=runs,
    )
    return [
        base,
        dataclasses.replace(
            base,
            ours=f"{LARGE} handoffs, all queued (a backlog)",
            ours_s=statistics.median(queue.scrape_s),
        ),
        dataclasses.replace(
            base,
            name=f"`GET /metrics` ({LARGE} handoffs), median of {runs}",
            ours="scrape: store read + render + HTTP",
            baseline="render alone (no store read, no HTTP)",
            baseline_s=statistics.median(large.render_s),
            note=note,
        ),
    ]
