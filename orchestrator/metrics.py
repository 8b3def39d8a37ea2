"""Prometheus collectors and the small HTTP endpoint that serves them.

The daemon updates a :class:`Metrics` object from its own tasks; :func:`serve_http` exposes
``/metrics``, ``/healthz`` and ``/readyz`` on ``[metrics] listen``. A scrape only reads
in-memory collectors, so it never touches SQLite, git or the disk.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import anyio.abc
import structlog
from anyio.abc import SocketAttribute
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from orchestrator.store import STATES

try:
    # prometheus-client >= 0.22 bumped CONTENT_TYPE_LATEST to the 1.0.0 text format, yet
    # generate_latest() still writes the 0.0.4 format that every Prometheus understands, and
    # the library's own HTTP handlers label it with this constant.
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as METRICS_CONTENT_TYPE
except ImportError:  # pragma: no cover - older prometheus-client, where LATEST meant 0.0.4
    from prometheus_client import CONTENT_TYPE_LATEST as METRICS_CONTENT_TYPE

__all__ = [
    "HANDOFF_STATES",
    "MERGE_RESULTS",
    "METRICS_CONTENT_TYPE",
    "Metrics",
    "parse_listen",
    "serve_http",
]

log = structlog.get_logger(__name__)

# The store owns the state machine; the gauge exports every one of its states.
HANDOFF_STATES = STATES
MERGE_RESULTS = ("merged", "conflict", "gate_failed")

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
    """

    def __init__(self, version: str) -> None:
        """Create every collector and export ``orchestrator_build_info{version}`` = 1."""
        self.registry: CollectorRegistry = _Registry(auto_describe=True)
        r = self.registry
        self._handoffs = Gauge(
            "orchestrator_handoffs",
            "Handoffs known to the daemon, by state.",
            ["state"],
            registry=r,
        )
        self._workers_connected = Gauge(
            "orchestrator_workers_connected",
            "Agent workers currently attached over the socket.",
            registry=r,
        )
        self._leases_active = Gauge(
            "orchestrator_leases_active",
            "Worktree leases currently held by workers.",
            registry=r,
        )
        self._lease_expirations = Counter(
            "orchestrator_lease_expirations",
            "Leases lost because the worker stopped heartbeating within the TTL.",
            registry=r,
        )
        self._merges = Counter(
            "orchestrator_merges",
            "Merge-queue candidates finished, by result.",
            ["result"],
            registry=r,
        )
        self._merge_queue_depth = Gauge(
            "orchestrator_merge_queue_depth",
            "Reported handoffs waiting in (or being processed by) the merge queue.",
            registry=r,
        )
        self._gate_duration = Histogram(
            "orchestrator_gate_duration_seconds",
            "Wall-clock time of one validation gate run on a merge candidate.",
            ["gate"],
            buckets=GATE_DURATION_BUCKETS,
            registry=r,
        )
        self._handoff_cycle = Histogram(
            "orchestrator_handoff_cycle_seconds",
            "Time from a handoff's submission to its merge into the integration branch.",
            buckets=HANDOFF_CYCLE_BUCKETS,
            registry=r,
        )
        self._protocol_errors = Counter(
            "orchestrator_protocol_errors",
            "JSON-RPC errors returned to socket clients, by error code.",
            ["code"],
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
        for result in MERGE_RESULTS:
            self._merges.labels(result=result)
        self._extra_states: set[str] = set()

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

    def set_workers_connected(self, n: int) -> None:
        """Set ``orchestrator_workers_connected``."""
        self._workers_connected.set(n)

    def set_leases_active(self, n: int) -> None:
        """Set ``orchestrator_leases_active``."""
        self._leases_active.set(n)

    def lease_expired(self) -> None:
        """Count one lease lost to its TTL (``orchestrator_lease_expirations_total``)."""
        self._lease_expirations.inc()

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

    def set_merge_queue_depth(self, n: int) -> None:
        """Set ``orchestrator_merge_queue_depth``."""
        self._merge_queue_depth.set(n)

    def gate_finished(self, gate: str, duration_s: float) -> None:
        """Observe one gate run (``orchestrator_gate_duration_seconds{gate}``)."""
        self._gate_duration.labels(gate=gate).observe(duration_s)

    def handoff_merged(self, cycle_s: float) -> None:
        """Observe a handoff's submitted-to-merged time (``orchestrator_handoff_cycle_seconds``)."""
        self._handoff_cycle.observe(cycle_s)

    def protocol_error(self, code: int) -> None:
        """Count a JSON-RPC error sent to clients (``orchestrator_protocol_errors_total{code}``)."""
        self._protocol_errors.labels(code=str(code)).inc()

    def render(self) -> bytes:
        """Return the Prometheus text exposition of every collector."""
        return generate_latest(self.registry)


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

# Limits that keep one misbehaving client from costing the others anything: a request head
# larger than this is refused, a connection gets this long to send its head, and beyond
# this many concurrent connections new ones are turned away at once instead of queueing
# behind slow ones.
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10.0
LINGER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    content_type: str = _TEXT
    extra_headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS[self.status]}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.extra_headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        return head if head_only else head + self.body


class _RequestError(Exception):
    def __init__(self, response: _Response) -> None:
        super().__init__(response.status)
        self.response = response


class _Handler:
    def __init__(self, metrics: Metrics, ready: Callable[[], bool]) -> None:
        self._metrics = metrics
        self._ready = ready
        self._slots = anyio.CapacityLimiter(MAX_CONNECTIONS)

    async def __call__(self, stream: anyio.abc.SocketStream) -> None:
        # Nothing a client does may escape: listener.serve() runs this in the endpoint's
        # task group, and an exception there would take the whole endpoint down.
        try:
            async with stream:
                try:
                    self._slots.acquire_nowait()
                except anyio.WouldBlock:
                    await self._send(stream, _Response(503, b"too many connections\n"), False)
                    return
                try:
                    await self._serve_one(stream)
                finally:
                    self._slots.release()
        except Exception as exc:
            log.debug("metrics connection ended with an error", error=repr(exc))

    async def _serve_one(self, stream: anyio.abc.SocketStream) -> None:
        head_only = False
        try:
            with anyio.fail_after(REQUEST_TIMEOUT_S):
                head = await _read_head(stream)
            method, path = _parse_request_line(head)
            head_only = method == "HEAD"
            response = self._route(method, path)
        except _RequestError as exc:
            response = exc.response
        except TimeoutError:
            response = _Response(408, b"request timeout\n")
        except anyio.EndOfStream:
            return  # the client left before finishing its request; nobody to answer
        await self._send(stream, response, head_only)

    def _route(self, method: str, path: str) -> _Response:
        if path not in ("/metrics", "/healthz", "/readyz"):
            return _Response(404, b"not found\n")
        if method not in ("GET", "HEAD"):
            return _Response(405, b"method not allowed\n", extra_headers=(("Allow", "GET, HEAD"),))
        if path == "/metrics":
            try:
                body = self._metrics.render()
            except Exception as exc:
                log.warning("rendering metrics failed", error=repr(exc))
                return _Response(500, b"rendering metrics failed\n")
            return _Response(200, body, METRICS_CONTENT_TYPE)
        if path == "/healthz":
            # Being able to answer at all is the liveness signal: the event loop is running.
            return _Response(200, b"ok\n")
        try:
            is_ready = self._ready()
        except Exception as exc:
            log.warning("readiness check failed", error=repr(exc))
            is_ready = False
        if is_ready:
            return _Response(200, b"ready\n")
        return _Response(503, b"not ready\n")

    @staticmethod
    async def _send(stream: anyio.abc.SocketStream, response: _Response, head_only: bool) -> None:
        with anyio.move_on_after(SEND_TIMEOUT_S):
            await stream.send(response.encode(head_only=head_only))
            # Half-close, then drain briefly: closing with unread input (say, a POST body)
            # makes the kernel send RST, which can destroy the response before it is read.
            await stream.send_eof()
            with anyio.move_on_after(LINGER_TIMEOUT_S):
                drained = 0
                while drained < 65536:
                    drained += len(await stream.receive())


async def _read_head(stream: anyio.abc.SocketStream) -> bytes:
    buf = b""
    while True:
        try:
            chunk = await stream.receive(4096)
        except anyio.EndOfStream:
            if buf:
                raise _RequestError(_Response(400, b"incomplete request\n")) from None
            raise
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end == -1:
            end = buf.find(b"\n\n")  # tolerate bare-LF clients such as hand-typed netcat
        if end != -1:
            if end > MAX_REQUEST_HEAD:
                break
            return buf[:end]
        if len(buf) > MAX_REQUEST_HEAD:
            break
    raise _RequestError(_Response(431, b"request head too large\n"))


def _parse_request_line(head: bytes) -> tuple[str, str]:
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise _RequestError(_Response(400, b"malformed request line\n")) from None
    if not version.startswith("HTTP/1.") or not method.isalpha():
        raise _RequestError(_Response(400, b"malformed request line\n"))
    # Absolute-form targets ("http://host/metrics") are legal; the query string is ignored.
    path = urlsplit(target).path if "://" in target else target.split("?", 1)[0]
    return method, path


async def serve_http(
    listen: str,
    metrics: Metrics,
    *,
    ready: Callable[[], bool],
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``listen`` until cancelled.

    ``listen`` is ``"host:port"`` (``"[::1]:9464"`` for IPv6; port 0 picks a free port).
    ``/healthz`` answers 200 while the event loop runs; ``/readyz`` answers 200 when
    ``ready()`` is true, else 503. Other paths get 404 and methods other than GET (or HEAD)
    get 405. Each connection carries one request and is closed after the response. Calls
    ``task_status.started(port)`` with the bound port once the socket is listening.
    """
    host, port = parse_listen(listen)
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound_port = listener.extra(SocketAttribute.local_port)
        log.info("metrics endpoint listening", host=host, port=bound_port)
        task_status.started(bound_port)
        await listener.serve(_Handler(metrics, ready))
