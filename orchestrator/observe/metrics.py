"""Prometheus collectors and the small HTTP endpoint that serves them.

The daemon updates a :class:`Metrics` object from its own tasks as things happen (counters
and histograms). Gauges that mirror durable state (handoffs by state, the merge queue,
active leases) are not kept up to date by events, which could drift: :func:`serve_http`
calls a ``refresh`` coroutine before each scrape, which reads them from the store in a
worker thread and sets them with :meth:`Metrics.set_store_snapshot`. ``/metrics`` speaks
the Prometheus text format, or OpenMetrics when the ``Accept`` header asks for it.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping

import anyio
import anyio.abc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import (
    CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from orchestrator.observe import http, logs
from orchestrator.protocol.jsonrpc import CONTROL_METHODS, WORKER_METHODS
from orchestrator.store.events import StoreSnapshot
from orchestrator.store.states import LIVE_STATES, STATES, State

try:
    # prometheus-client >= 0.22 bumped CONTENT_TYPE_LATEST to the 1.0.0 text format, yet
    # generate_latest() still writes the 0.0.4 format that every Prometheus understands, and
    # the library's own HTTP handlers label it with this constant.
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as METRICS_CONTENT_TYPE
except ImportError:  # pragma: no cover - older prometheus-client, where LATEST meant 0.0.4
    from prometheus_client import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE

__all__ = [
    "GATE_OUTCOMES",
    "HANDOFF_STATES",
    "LEASE_OUTCOMES",
    "MERGE_RESULTS",
    "METHODS",
    "METRICS_CONTENT_TYPE",
    "OPENMETRICS_CONTENT_TYPE",
    "Metrics",
    "gate_outcome",
    "parse_listen",
    "serve_http",
]

log = logs.get("metrics")

# The store owns the state machine; the gauge exports every one of its states.
HANDOFF_STATES: tuple[str, ...] = STATES
MERGE_RESULTS = ("merged", "conflict", "gate_failed")
GATE_OUTCOMES = ("passed", "failed", "timed_out", "error")
# How a lease ended: the worker reported, gave it back, went silent, or a person cancelled.
LEASE_OUTCOMES = ("reported", "released", "expired", "cancelled")
# Every method of the protocol, plus "other" for anything a client may invent (the label
# must stay bounded whatever peers send) and "none" for frames that never got as far as
# naming a method (unparseable JSON, oversized, refused peers).
METHODS = ("initialize", *sorted(WORKER_METHODS | CONTROL_METHODS), "other", "none")
_KNOWN_METHODS = frozenset(METHODS) - {"other", "none"}

# Gates range from a lint run (a fraction of a second) to a full test suite capped by
# gates.timeout_s, so the buckets span 0.1 s to 1 h.
GATE_DURATION_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    900.0,
    1800.0,
    3600.0,
)
# A handoff's cycle (submitted to merged) includes queueing and agent time: 1 s to 1 day.
HANDOFF_CYCLE_BUCKETS = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    43200.0,
    86400.0,
)
# A lease lasts as long as an agent works on one attempt: seconds for a scripted agent,
# hours for a large change. Expired leases end after leases.ttl_s of silence on top.
LEASE_DURATION_BUCKETS = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
)
# The gap between two renewals of one lease: about leases.heartbeat_interval_s (default
# 15 s) when healthy; a gap near leases.ttl_s (default 60 s) means the lease nearly expired.
HEARTBEAT_LAG_BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    90.0,
    120.0,
    300.0,
)
# From a report to the merge queue taking the handoff up: nothing when the queue is idle,
# the gate time of everything ahead of it otherwise (minutes to hours).
MERGE_QUEUE_WAIT_BUCKETS = (
    0.01,
    0.1,
    0.5,
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
)
# Time in one state: none at all (failed on the way back to the queue), seconds (waiting
# for a worker, gating), hours (held for a person, a long agent run).
STATE_DURATION_BUCKETS = (
    0.01,
    0.1,
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    43200.0,
    86400.0,
)
# Attempts a merged handoff needed: leases.max_attempts defaults to 3, a person's retry
# adds a fresh budget on top.
ATTEMPT_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0)
# Handling one request takes a millisecond or so (a heartbeat is one SQLite commit), a
# report a little more (git checks); lease.acquire long-polls for up to 300 s.
REQUEST_DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
    30.0,
    60.0,
    300.0,
)
# How many leases the daemon remembers the start and last heartbeat of, for the lease
# duration and heartbeat lag histograms. Every lease it hands over is forgotten again
# when it ends; this only bounds the memory if some end were ever missed.
MAX_TRACKED = 10_000


def gate_outcome(exit_status: int | None, timed_out: bool) -> str:
    """The ``outcome`` label of a gate run.

    ``error`` is a gate that could not be run at all: the runner reports a command that
    failed to start as exit status 127, and a shell does the same for "command not found"
    (126: found but not executable). Any other non-zero status is the gate saying no.
    """
    if timed_out:
        return "timed_out"
    if exit_status == 0:
        return "passed"
    if exit_status in (126, 127):
        return "error"
    return "failed"


def method_label(method: str | None) -> str:
    """Bound the ``method`` label: a protocol method, ``other``, or ``none``."""
    if method is None:
        return "none"
    return method if method in _KNOWN_METHODS else "other"


class _Registry(CollectorRegistry):
    """A registry that leaves out the ``*_created`` samples of counters and histograms.

    In the text format those become extra gauges (one per series) that nothing here reads;
    prometheus_client only offers a process-wide switch to turn them off, and flipping
    global state from a library would surprise anything else in the process.
    """

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            if family.type in ("counter", "histogram", "summary"):
                created = family.name + "_created"
                family.samples = [s for s in family.samples if s.name != created]
            yield family


class Metrics:
    """All of the daemon's collectors.

    They live in a private :class:`~prometheus_client.CollectorRegistry` (``self.registry``),
    not the process-global one, so several daemons in one test process don't clash.
    Every method is cheap and safe to call from the event loop.
    """

    def __init__(self, version: str) -> None:
        """Create every collector and export ``orchestrator_build_info{version}`` = 1."""
        self.registry: CollectorRegistry = _Registry(auto_describe=True)
        r = self.registry
        # --- gauges mirrored from the store at scrape time ---
        self._handoffs = Gauge(
            "orchestrator_handoffs",
            "Handoffs known to the daemon, by state (read from the store at scrape time).",
            ["state"],
            registry=r,
        )
        self._oldest = Gauge(
            "orchestrator_handoff_oldest_age_seconds",
            "How long the longest-waiting handoff in each live state has been in it; 0 when "
            "the state is empty (read from the store at scrape time).",
            ["state"],
            registry=r,
        )
        self._needing_input = Gauge(
            "orchestrator_handoffs_needing_input",
            "Handoffs whose agent is waiting for a person to answer a question "
            "(`orchestrator answer NAME TEXT`; read from the store at scrape time).",
            registry=r,
        )
        self._oldest_question = Gauge(
            "orchestrator_question_oldest_age_seconds",
            "How long the longest-waiting question to a person has waited; 0 when none "
            "waits (read from the store at scrape time).",
            registry=r,
        )
        self._leases_active = Gauge(
            "orchestrator_leases_active",
            "Worktree leases currently held by workers (read from the store at scrape time).",
            registry=r,
        )
        self._merge_queue_depth = Gauge(
            "orchestrator_merge_queue_depth",
            "Reported handoffs waiting in (or being processed by) the merge queue "
            "(read from the store at scrape time).",
            registry=r,
        )
        self._merge_queue_eta = Gauge(
            "orchestrator_merge_queue_eta_seconds",
            "Expected seconds until the last handoff now in the merge queue lands, from "
            "recent gate times, refusals and the speculative window; 0 when the queue is "
            "empty or nothing has been gated yet (per handoff: etaS in handoff.get).",
            registry=r,
        )
        self._merge_blocked = Gauge(
            "orchestrator_merge_blocked",
            "1 while merging is held back (merge.paused, a dirty or locked checkout of the "
            "integration branch, a store that cannot be written), else 0.",
            registry=r,
        )
        self._workers_connected = Gauge(
            "orchestrator_workers_connected",
            "Agent workers currently attached over the socket.",
            registry=r,
        )
        self._refresh_failures = Counter(
            "orchestrator_metrics_refresh_failures",
            "Scrapes served with the previous gauge values because reading the store failed "
            "or took too long.",
            registry=r,
        )
        # --- leases ---
        self._integration_moved_outside = Counter(
            "orchestrator_integration_moved_outside",
            "Times the merge queue found the integration branch moved by something other "
            "than itself (an agent's update-ref, a person's push).",
            registry=r,
        )
        self._lease_expirations = Counter(
            "orchestrator_lease_expirations",
            "Leases lost because the worker stopped heartbeating within the TTL.",
            registry=r,
        )
        self._lease_duration = Histogram(
            "orchestrator_lease_duration_seconds",
            "Time from handing a lease to a worker until it ended, by how it ended.",
            ["outcome"],
            buckets=LEASE_DURATION_BUCKETS,
            registry=r,
        )
        self._heartbeat_lag = Histogram(
            "orchestrator_heartbeat_lag_seconds",
            "Time since the lease was last renewed (or handed over) when a heartbeat renews "
            "it; near leases.ttl_s means the lease nearly expired.",
            buckets=HEARTBEAT_LAG_BUCKETS,
            registry=r,
        )
        # --- merge queue and gates ---
        self._merges = Counter(
            "orchestrator_merges",
            "Merge-queue candidates finished, by result.",
            ["result"],
            registry=r,
        )
        self._merge_queue_wait = Histogram(
            "orchestrator_merge_queue_wait_seconds",
            "Time from a report being accepted until the merge queue takes the handoff up.",
            buckets=MERGE_QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self._gate_duration = Histogram(
            "orchestrator_gate_duration_seconds",
            "Wall-clock time of one validation gate run on a merge candidate.",
            ["gate"],
            buckets=GATE_DURATION_BUCKETS,
            registry=r,
        )
        self._gate_runs = Counter(
            "orchestrator_gate_runs",
            "Validation gate runs, by gate and outcome (passed, failed, timed_out, or error "
            "when the command could not be run).",
            ["gate", "outcome"],
            registry=r,
        )
        self._gate_retries = Counter(
            "orchestrator_gate_retries",
            "Failed gate runs tried again on a fresh checkout ([[gates]] retries), by gate.",
            ["gate"],
            registry=r,
        )
        self._gate_cache_hits = Counter(
            "orchestrator_gate_cache_hits",
            "Gate runs skipped because the same gate (argv, environment, timeout) already "
            "passed on the same tree, by gate.",
            ["gate"],
            registry=r,
        )
        self._handoff_cycle = Histogram(
            "orchestrator_handoff_cycle_seconds",
            "Time from a handoff's submission to its merge into the integration branch.",
            buckets=HANDOFF_CYCLE_BUCKETS,
            registry=r,
        )
        self._state_duration = Histogram(
            "orchestrator_handoff_state_duration_seconds",
            "Time a handoff spent in a state, observed when it left it (read from the store's "
            "event log at scrape time).",
            ["state"],
            buckets=STATE_DURATION_BUCKETS,
            registry=r,
        )
        self._attempts = Histogram(
            "orchestrator_handoff_attempts",
            "Attempts a handoff needed until it merged.",
            buckets=ATTEMPT_BUCKETS,
            registry=r,
        )
        # --- the socket protocol ---
        self._requests = Counter(
            "orchestrator_requests",
            "JSON-RPC messages received from socket clients, by method.",
            ["method"],
            registry=r,
        )
        self._request_duration = Histogram(
            "orchestrator_request_duration_seconds",
            "Time to handle one JSON-RPC request, by method (lease.acquire long-polls).",
            ["method"],
            buckets=REQUEST_DURATION_BUCKETS,
            registry=r,
        )
        self._protocol_errors = Counter(
            "orchestrator_protocol_errors",
            "JSON-RPC errors returned to socket clients, by error code and method.",
            ["code", "method"],
            registry=r,
        )
        self._build_info = Gauge(
            "orchestrator_build_info",
            "Always 1; the version label carries the running orchestrator version.",
            ["version"],
            registry=r,
        )
        self._build_info.labels(version=version).set(1)

        # Pre-create the known label values so dashboards and alert rules see 0 rather than
        # "no data" before the first event (and rate() has a starting point).
        for state in HANDOFF_STATES:
            self._handoffs.labels(state=state).set(0)
        for state in LIVE_STATES:
            self._oldest.labels(state=state).set(0)
        for result in MERGE_RESULTS:
            self._merges.labels(result=result)
        for outcome in LEASE_OUTCOMES:
            self._lease_duration.labels(outcome=outcome)
        for state in HANDOFF_STATES:
            if state != State.MERGED:
                self._state_duration.labels(state=state)
        self._extra_states: set[str] = set()
        # lease id -> [handed over, last renewed], in time.monotonic() seconds.
        self._leases: OrderedDict[str, list[float]] = OrderedDict()
        # handoff name -> when its report was accepted, for the merge-queue wait.
        self._reported: OrderedDict[str, float] = OrderedDict()
        # handoff name -> (state, entered at, wall clock), for the time in each state; and
        # the id of the last store event read. None until seeded at start-up.
        self._states: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.state_cursor: int | None = None

    # --- gauges ---------------------------------------------------------------------

    def set_handoff_counts(self, counts: Mapping[str, int]) -> None:
        """Set ``orchestrator_handoffs{state}`` from a full snapshot of counts by state.

        Every state in :data:`HANDOFF_STATES` is exported, as 0 when missing from ``counts``.
        A state outside that list is exported too, and dropped again once a later snapshot
        no longer mentions it, so a stale count never lingers.
        """
        for state in HANDOFF_STATES:
            self._handoffs.labels(state=state).set(counts.get(state, 0))
        extra = {state for state in counts if state not in HANDOFF_STATES}
        for state in self._extra_states - extra:
            self._handoffs.remove(state)
        for state in extra:
            self._handoffs.labels(state=state).set(counts[state])
        self._extra_states = extra

    def set_store_snapshot(self, snapshot: StoreSnapshot) -> None:
        """Set every gauge that mirrors the store from one consistent read of it."""
        self.set_handoff_counts(snapshot.counts)
        for state in LIVE_STATES:
            self._oldest.labels(state=state).set(max(0.0, snapshot.oldest_s.get(state, 0.0)))
        self._leases_active.set(snapshot.leases_active)
        self._merge_queue_depth.set(snapshot.merge_queue_depth)
        self._needing_input.set(snapshot.needing_input)
        self._oldest_question.set(max(0.0, snapshot.oldest_question_s))

    def set_merge_queue_eta(self, seconds: float) -> None:
        """Set ``orchestrator_merge_queue_eta_seconds`` (the queue's last handoff)."""
        self._merge_queue_eta.set(seconds)

    def set_workers_connected(self, n: int) -> None:
        """Set ``orchestrator_workers_connected``."""
        self._workers_connected.set(n)

    def set_merge_blocked(self, blocked: bool) -> None:
        """Set ``orchestrator_merge_blocked`` (1 while merging is held back)."""
        self._merge_blocked.set(1 if blocked else 0)

    def integration_moved_outside(self) -> None:
        """Count one outside move of the integration branch
        (``orchestrator_integration_moved_outside_total``)."""
        self._integration_moved_outside.inc()

    def refresh_failed(self) -> None:
        """Count a scrape served with stale gauges (``..._metrics_refresh_failures_total``)."""
        self._refresh_failures.inc()

    def start_state_clock(self, cursor: int, live: Iterable[tuple[str, str, float]]) -> None:
        """Start timing states from store event ``cursor`` on, knowing the ``live``
        handoffs' ``(name, state, since)``; earlier history is not replayed."""
        self.state_cursor = cursor
        self._states.clear()
        for name, state, since in live:
            self._states[name] = (state, since)

    def state_changes(self, changes: Iterable[tuple[int, float, str, str]]) -> None:
        """Observe the state each handoff left, for changes ``(event id, at, handoff, new
        state)`` in order (``orchestrator_handoff_state_duration_seconds{state}``)."""
        for event_id, at, name, state in changes:
            previous = self._states.pop(name, None)
            if previous is not None:
                left, since = previous
                self._state_duration.labels(state=left).observe(max(0.0, at - since))
            if state != State.MERGED:  # the only state nothing leaves
                self._states[name] = (state, at)
            self.state_cursor = event_id
        while len(self._states) > MAX_TRACKED:
            self._states.popitem(last=False)

    # --- leases ---------------------------------------------------------------------

    def lease_started(self, lease_id: str) -> None:
        """A lease was handed to a worker: start its duration and heartbeat clocks."""
        now = time.monotonic()
        self._leases[lease_id] = [now, now]
        while len(self._leases) > MAX_TRACKED:
            self._leases.popitem(last=False)

    def heartbeat(self, lease_id: str) -> None:
        """A heartbeat renewed ``lease_id``: observe the gap since the previous renewal.

        A lease handed over before a daemon restart has no previous renewal here; its
        first heartbeat only starts the clock."""
        now = time.monotonic()
        times = self._leases.get(lease_id)
        if times is None:
            self._leases[lease_id] = [now, now]
            return
        self._heartbeat_lag.observe(now - times[1])
        times[1] = now

    def lease_ended(self, lease_id: str, outcome: str) -> None:
        """A lease ended: observe its duration (``orchestrator_lease_duration_seconds``).

        ``outcome`` is one of :data:`LEASE_OUTCOMES`. A lease this process never saw start
        (handed over before a restart) is not observed, rather than observed wrongly.
        """
        if outcome not in LEASE_OUTCOMES:
            raise ValueError(f"lease outcome must be one of {LEASE_OUTCOMES}, got {outcome!r}")
        times = self._leases.pop(lease_id, None)
        if times is not None:
            self._lease_duration.labels(outcome=outcome).observe(time.monotonic() - times[0])

    def lease_expired(self, lease_id: str | None = None) -> None:
        """Count one lease lost to its TTL (``orchestrator_lease_expirations_total``) and,
        given its id, observe its duration with ``outcome="expired"``."""
        self._lease_expirations.inc()
        if lease_id is not None:
            self.lease_ended(lease_id, "expired")

    # --- merge queue and gates ------------------------------------------------------

    def report_accepted(self, handoff: str) -> None:
        """A completed report put ``handoff`` in the merge queue: start its wait clock."""
        self._reported[handoff] = time.monotonic()
        self._reported.move_to_end(handoff)
        while len(self._reported) > MAX_TRACKED:
            self._reported.popitem(last=False)

    def merge_started(self, handoff: str) -> None:
        """The merge queue took ``handoff`` up: observe how long it waited since its report.

        Only the first time per report: a candidate rebuilt (the branch moved, or a
        speculative candidate ahead of it failed) is still the same wait, already counted.
        """
        reported = self._reported.pop(handoff, None)
        if reported is not None:
            self._merge_queue_wait.observe(time.monotonic() - reported)

    def merge_finished(self, result: str) -> None:
        """Count one finished merge candidate (``orchestrator_merges_total{result}``).

        ``result`` must be one of :data:`MERGE_RESULTS`; anything else is a programming
        error and raises :class:`ValueError` rather than inventing a new series.
        """
        if result not in MERGE_RESULTS:
            raise ValueError(
                f"merge result must be one of {', '.join(MERGE_RESULTS)}, got {result!r}"
            )
        self._merges.labels(result=result).inc()

    def gate_finished(
        self, gate: str, duration_s: float, *, exit_status: int | None = 0, timed_out: bool = False
    ) -> str:
        """Observe one gate run (``orchestrator_gate_duration_seconds{gate}`` and
        ``orchestrator_gate_runs_total{gate,outcome}``); returns the outcome label."""
        outcome = gate_outcome(exit_status, timed_out)
        self._gate_duration.labels(gate=gate).observe(duration_s)
        self._gate_runs.labels(gate=gate, outcome=outcome).inc()
        return outcome

    def gate_retried(self, gate: str) -> None:
        """Count a failed gate run tried again (``orchestrator_gate_retries_total``)."""
        self._gate_retries.labels(gate=gate).inc()

    def gate_cache_hit(self, gate: str) -> None:
        """Count a gate pass reused from the cache (``orchestrator_gate_cache_hits_total``)."""
        self._gate_cache_hits.labels(gate=gate).inc()

    def handoff_merged(self, cycle_s: float, attempts: int | None = None) -> None:
        """Observe a merged handoff: its submitted-to-merged time
        (``orchestrator_handoff_cycle_seconds``) and, if given, the attempts it took."""
        self._handoff_cycle.observe(cycle_s)
        if attempts is not None:
            self._attempts.observe(attempts)

    # --- the socket protocol --------------------------------------------------------

    def request_received(self, method: str | None) -> None:
        """Count one message from a client (``orchestrator_requests_total{method}``)."""
        self._requests.labels(method=method_label(method)).inc()

    def request_handled(self, method: str, duration_s: float) -> None:
        """Observe one request's handling time (``orchestrator_request_duration_seconds``)."""
        self._request_duration.labels(method=method_label(method)).observe(duration_s)

    def protocol_error(self, code: int, method: str | None = None) -> None:
        """Count a JSON-RPC error sent to clients
        (``orchestrator_protocol_errors_total{code,method}``)."""
        self._protocol_errors.labels(code=str(code), method=method_label(method)).inc()

    # --- exposition -----------------------------------------------------------------

    def render(self) -> bytes:
        """Return the Prometheus text exposition (format 0.0.4) of every collector."""
        return generate_latest(self.registry)

    def render_openmetrics(self) -> bytes:
        """Return the OpenMetrics 1.0 exposition of every collector."""
        # The OpenMetrics module is not annotated in every supported prometheus-client.
        body: bytes = generate_openmetrics(self.registry)  # type: ignore[no-untyped-call,unused-ignore]
        return body


# --- listen address -----------------------------------------------------------------

_HOSTNAME_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_HOSTNAME_LABEL}(?:\.{_HOSTNAME_LABEL})*\.?", re.ASCII)


def parse_listen(listen: str) -> tuple[str, int]:
    """Split a ``"host:port"`` listen address into ``(host, port)``.

    IPv6 addresses go in brackets (``"[::1]:9464"``) and come back without them. Port 0
    asks the OS to pick a free port. Raises :class:`ValueError` naming what is wrong. The
    empty string (endpoint off) is the caller's business and is rejected here.
    """
    where = f"metrics listen address {listen!r}"
    if not listen:
        raise ValueError(f"{where} is empty; expected host:port, e.g. 127.0.0.1:9464")
    if listen != listen.strip():
        raise ValueError(f"{where} has surrounding whitespace")
    if listen.startswith("["):
        end = listen.find("]")
        if end == -1:
            raise ValueError(f"{where} has '[' without a matching ']'")
        host, rest = listen[1:end], listen[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"{where} needs a port after the bracketed address, e.g. [::1]:9464")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{where}: {host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = listen.rpartition(":")
        if not sep:
            raise ValueError(f"{where} has no port; expected host:port, e.g. 127.0.0.1:9464")
        if ":" in host:
            raise ValueError(f"{where}: put an IPv6 address in brackets, e.g. [::1]:9464")
        if not host:
            # Serving on every interface should be a visible decision, not a shorthand.
            raise ValueError(
                f"{where} has no host; use 0.0.0.0:PORT or [::]:PORT to listen on all interfaces"
            )
        if not _is_ipv4(host) and not (len(host) <= 253 and _HOSTNAME_RE.fullmatch(host)):
            raise ValueError(f"{where}: {host!r} is neither an IP address nor a host name")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{where}: port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{where}: port {port} is out of range 0-65535")
    return host, port


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


# --- HTTP endpoint ------------------------------------------------------------------

# How long a scrape waits for the store before serving the previous gauge values.
REFRESH_TIMEOUT_S = 5.0


Readiness = Callable[[], "bool | Mapping[str, bool]"]
"""``/readyz``'s check: a bool, or named checks (``{"store": True, ...}``) all of which
must hold; the body then says which one failed."""


class _Routes:
    """``/metrics``, ``/healthz`` and ``/readyz`` for :func:`orchestrator.observe.http.serve`."""

    def __init__(
        self,
        metrics: Metrics,
        ready: Readiness,
        refresh: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._refresh = refresh
        self._refreshing: anyio.Event | None = None

    def table(self) -> dict[str, http.Route]:
        return {"/metrics": self._scrape, "/healthz": self._health, "/readyz": self._readiness}

    async def _health(self, request: http.Request) -> http.Response:
        # Being able to answer at all is the liveness signal: the event loop is running.
        return http.Response(200, b"ok\n")

    async def _scrape(self, request: http.Request) -> http.Response:
        await self._refresh_gauges()
        openmetrics = wants_openmetrics(request.accept)
        render = self._metrics.render_openmetrics if openmetrics else self._metrics.render
        try:
            # In a thread: the exposition of every series is plain CPU work, and the event
            # loop keeps answering heartbeats meanwhile.
            body = await anyio.to_thread.run_sync(render)
        except Exception as exc:
            log.warning("metrics_render_failed", error=repr(exc))
            return http.Response(500, b"rendering metrics failed\n")
        content_type = OPENMETRICS_CONTENT_TYPE if openmetrics else METRICS_CONTENT_TYPE
        return http.Response(200, body, content_type, extra_headers=(("Vary", "Accept"),))

    async def _refresh_gauges(self) -> None:
        """Bring the store-backed gauges up to date, once for any number of concurrent
        scrapes; on failure or timeout the scrape goes on with the previous values."""
        if self._refresh is None:
            return
        if self._refreshing is not None:
            # Another scrape is reading the store right now: its result is fresh enough.
            await self._refreshing.wait()
            return
        self._refreshing = done = anyio.Event()
        try:
            with anyio.fail_after(REFRESH_TIMEOUT_S):
                await self._refresh()
        except Exception as exc:
            self._metrics.refresh_failed()
            log.warning("metrics_store_read_failed", error=repr(exc))
        finally:
            self._refreshing = None
            done.set()

    async def _readiness(self, request: http.Request) -> http.Response:
        try:
            verdict = self._ready()
        except Exception as exc:
            log.warning("readiness_check_failed", error=repr(exc))
            return http.Response(503, f"not ready: the check failed: {exc!r}\n".encode())
        checks = {"ready": verdict} if isinstance(verdict, bool) else dict(verdict)
        if all(checks.values()):
            lines = ["ready", *(f"{name}: ok" for name in checks if name != "ready")]
            return http.Response(200, ("\n".join(lines) + "\n").encode())
        lines = ["not ready", *(f"{n}: {'ok' if ok else 'NO'}" for n, ok in checks.items())]
        return http.Response(503, ("\n".join(lines) + "\n").encode())


def wants_openmetrics(accept: str) -> bool:
    """Whether an ``Accept`` header prefers OpenMetrics to the Prometheus text format.

    OpenMetrics is served when ``application/openmetrics-text`` is acceptable (q > 0) and
    ranked at least as high as ``text/plain``; anything else, including no header or
    ``*/*``, gets the text format every Prometheus understands.
    """
    best = {"application/openmetrics-text": 0.0, "text/plain": 0.0}
    for entry in accept.split(","):
        media, *params = (part.strip() for part in entry.split(";"))
        media = media.lower()
        if media not in best:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        best[media] = max(best[media], q)
    return 0 < best["application/openmetrics-text"] >= best["text/plain"]


async def serve_http(
    listen: str,
    metrics: Metrics,
    *,
    ready: Readiness,
    refresh: Callable[[], Awaitable[None]] | None = None,
    routes: Mapping[str, http.Route] | None = None,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``listen`` until cancelled.

    ``listen`` is ``"host:port"`` (``"[::1]:9464"`` for IPv6; port 0 picks a free port).
    ``/metrics`` first awaits ``refresh()`` (at most one at a time; concurrent scrapes
    share it) so store-backed gauges are current, then answers in OpenMetrics if the
    ``Accept`` header asks for it, else in the Prometheus text format. ``/healthz`` answers
    200 while the event loop runs; ``/readyz`` answers 200 when ``ready()`` holds (a bool,
    or a mapping of named checks that must all hold), else 503 naming the failed checks.
    ``routes`` adds more paths on the same listener, under the same limits (the live
    page). Other paths get 404 and methods other than GET (or HEAD) get 405. Each connection
    carries one request and is closed after the response. Calls
    ``task_status.started(port)`` with the bound port once the socket is listening.
    """
    host, port = parse_listen(listen)
    table = {**(routes or {}), **_Routes(metrics, ready, refresh).table()}
    await http.serve(host, port, table, task_status=task_status)
