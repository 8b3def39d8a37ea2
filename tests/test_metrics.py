"""The metrics collectors, the HTTP endpoint and the Prometheus/Grafana deploy files.

Everything runs for real: the endpoint is fetched over TCP, the exposition and the rule
files go through promtool, and the slow test points a real Prometheus server at the
endpoint. promtool and prometheus come from Debian's ``prometheus`` package; the tests that
need them are skipped (saying so) when they are not on PATH.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import Message
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.observe import http as http_module
from orchestrator.observe import metrics as metrics_module
from orchestrator.observe.metrics import (
    HANDOFF_STATES,
    MERGE_RESULTS,
    METHODS,
    Metrics,
    Readiness,
    gate_outcome,
    method_label,
    parse_listen,
    serve_http,
    wants_openmetrics,
)
from orchestrator.store.events import StoreSnapshot

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "config" / "prometheus" / "orchestrator-rules.yml"
ALERT_TESTS = ROOT / "config" / "prometheus" / "orchestrator-rules.test.yml"
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "config" / "grafana" / "orchestrator-dashboard.json"

# The names DESIGN.md promises, with the type each must be exported as (counter names as
# the text parser reports them, without the _total suffix).
DESIGN_METRICS = {
    "orchestrator_handoffs": "gauge",
    "orchestrator_workers_connected": "gauge",
    "orchestrator_leases_active": "gauge",
    "orchestrator_lease_expirations": "counter",
    "orchestrator_merges": "counter",
    "orchestrator_merge_queue_depth": "gauge",
    "orchestrator_gate_duration_seconds": "histogram",
    "orchestrator_handoff_cycle_seconds": "histogram",
    "orchestrator_protocol_errors": "counter",
    "orchestrator_build_info": "gauge",
}
# What an operator needs beyond DESIGN.md (issue 4).
OPERATOR_METRICS = {
    "orchestrator_handoff_oldest_age_seconds": "gauge",
    "orchestrator_merge_blocked": "gauge",
    "orchestrator_merge_queue_eta_seconds": "gauge",
    "orchestrator_metrics_refresh_failures": "counter",
    "orchestrator_lease_duration_seconds": "histogram",
    "orchestrator_heartbeat_lag_seconds": "histogram",
    "orchestrator_merge_queue_wait_seconds": "histogram",
    "orchestrator_gate_runs": "counter",
    "orchestrator_gate_cache_hits": "counter",
    "orchestrator_gate_retries": "counter",
    "orchestrator_handoff_attempts": "histogram",
    "orchestrator_handoff_state_duration_seconds": "histogram",
    "orchestrator_requests": "counter",
    "orchestrator_request_duration_seconds": "histogram",
    "orchestrator_integration_moved_outside": "counter",
}
EXPOSED_NAMES = (
    "orchestrator_handoffs",
    "orchestrator_workers_connected",
    "orchestrator_leases_active",
    "orchestrator_lease_expirations_total",
    "orchestrator_merges_total",
    "orchestrator_merge_queue_depth",
    "orchestrator_gate_duration_seconds",
    "orchestrator_handoff_cycle_seconds",
    "orchestrator_protocol_errors_total",
    "orchestrator_build_info",
    "orchestrator_handoff_oldest_age_seconds",
    "orchestrator_merge_blocked",
    "orchestrator_metrics_refresh_failures_total",
    "orchestrator_lease_duration_seconds",
    "orchestrator_heartbeat_lag_seconds",
    "orchestrator_merge_queue_wait_seconds",
    "orchestrator_gate_runs_total",
    "orchestrator_handoff_attempts",
    "orchestrator_handoff_state_duration_seconds",
    "orchestrator_requests_total",
    "orchestrator_request_duration_seconds",
    "orchestrator_integration_moved_outside_total",
)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not on PATH (install Debian's 'prometheus' package to run this)")
    return path


def exercised_metrics(version: str = "1.2.3-test") -> Metrics:
    """A Metrics object with every collector touched, so each has samples to lint."""
    m = Metrics(version)
    m.set_store_snapshot(
        StoreSnapshot(
            counts={"queued": 3, "leased": 2, "reported": 1, "merged": 7},
            leases_active=2,
            merge_queue_depth=1,
            oldest_s={"queued": 12.0, "leased": 30.0, "reported": 4.5},
        )
    )
    m.set_workers_connected(2)
    m.set_merge_blocked(False)
    m.set_merge_queue_eta(42.0)
    m.refresh_failed()
    m.integration_moved_outside()
    m.lease_started("L1")
    m.heartbeat("L1")
    m.lease_ended("L1", "reported")
    m.lease_started("L2")
    m.lease_expired("L2")
    for result in MERGE_RESULTS:
        m.merge_finished(result)
    m.report_accepted("h")
    m.merge_started("h")
    m.gate_finished("tests", 12.5, exit_status=1)
    m.gate_finished("lint", 0.3)
    m.gate_cache_hit("lint")
    m.gate_retried("tests")
    m.handoff_merged(3600.0, 2)
    m.start_state_clock(10, [("h", "queued", 100.0)])
    m.state_changes([(11, 130.0, "h", "leased"), (12, 190.0, "h", "reported")])
    m.request_received("lease.heartbeat")
    m.request_handled("lease.heartbeat", 0.002)
    m.protocol_error(-32600)
    m.protocol_error(-32001, "lease.heartbeat")
    return m


# --- HTTP helpers -------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes


# An explicit empty ProxyHandler: a proxy from the environment must not see these requests.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(
    url: str, method: str = "GET", data: bytes | None = None, headers: dict[str, str] | None = None
) -> Reply:
    request = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=10) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as err:
        with err:
            return Reply(err.code, err.headers, err.read())


async def fetch(
    port: int,
    path: str,
    method: str = "GET",
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    url = f"http://127.0.0.1:{port}{path}"
    return await anyio.to_thread.run_sync(partial(_http, url, method, data, headers))


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection and return everything until the server closes."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        chunks: list[bytes] = []
        with anyio.fail_after(10):
            while True:
                try:
                    chunks.append(await stream.receive())
                except anyio.EndOfStream:
                    break
    return b"".join(chunks)


@asynccontextmanager
async def endpoint(
    metrics: Metrics,
    ready: Readiness = lambda: True,
    listen: str = "127.0.0.1:0",
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> AsyncIterator[int]:
    async with anyio.create_task_group() as tg:
        port: int = await tg.start(
            partial(serve_http, listen, metrics, ready=ready, refresh=refresh)
        )
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


# --- Metrics ------------------------------------------------------------------------


def test_every_state_and_result_is_exported_from_the_start() -> None:
    m = Metrics("1.0.0")
    for state in HANDOFF_STATES:
        assert m.registry.get_sample_value("orchestrator_handoffs", {"state": state}) == 0
    for result in MERGE_RESULTS:
        assert m.registry.get_sample_value("orchestrator_merges_total", {"result": result}) == 0
    assert m.registry.get_sample_value("orchestrator_build_info", {"version": "1.0.0"}) == 1
    assert m.registry.get_sample_value("orchestrator_lease_expirations_total") == 0


def test_handoff_counts_are_a_full_snapshot() -> None:
    m = Metrics("1.0.0")
    m.set_handoff_counts({"queued": 4, "merged": 2, "archived": 1})
    assert m.registry.get_sample_value("orchestrator_handoffs", {"state": "queued"}) == 4
    assert m.registry.get_sample_value("orchestrator_handoffs", {"state": "archived"}) == 1
    m.set_handoff_counts({"merged": 3})
    assert m.registry.get_sample_value("orchestrator_handoffs", {"state": "queued"}) == 0
    assert m.registry.get_sample_value("orchestrator_handoffs", {"state": "merged"}) == 3
    # A state that left the snapshot is gone, not frozen at its last value.
    assert m.registry.get_sample_value("orchestrator_handoffs", {"state": "archived"}) is None


def test_collectors_record_events() -> None:
    m = exercised_metrics()
    get = m.registry.get_sample_value
    assert get("orchestrator_workers_connected") == 2
    assert get("orchestrator_leases_active") == 2
    assert get("orchestrator_lease_expirations_total") == 1
    assert get("orchestrator_merges_total", {"result": "gate_failed"}) == 1
    assert get("orchestrator_merge_queue_depth") == 1
    assert get("orchestrator_handoffs", {"state": "reported"}) == 1
    assert get("orchestrator_handoff_oldest_age_seconds", {"state": "leased"}) == 30
    assert get("orchestrator_handoff_oldest_age_seconds", {"state": "gating"}) == 0
    assert get("orchestrator_gate_duration_seconds_count", {"gate": "tests"}) == 1
    assert get("orchestrator_gate_duration_seconds_sum", {"gate": "lint"}) == 0.3
    assert get("orchestrator_gate_runs_total", {"gate": "tests", "outcome": "failed"}) == 1
    assert get("orchestrator_gate_runs_total", {"gate": "lint", "outcome": "passed"}) == 1
    assert get("orchestrator_handoff_cycle_seconds_bucket", {"le": "3600.0"}) == 1
    assert get("orchestrator_handoff_cycle_seconds_bucket", {"le": "1800.0"}) == 0
    assert get("orchestrator_handoff_attempts_sum") == 2
    assert get("orchestrator_handoff_state_duration_seconds_sum", {"state": "queued"}) == 30
    assert get("orchestrator_handoff_state_duration_seconds_sum", {"state": "leased"}) == 60
    assert get("orchestrator_handoff_state_duration_seconds_count", {"state": "gating"}) == 0
    assert get("orchestrator_lease_duration_seconds_count", {"outcome": "reported"}) == 1
    assert get("orchestrator_lease_duration_seconds_count", {"outcome": "expired"}) == 1
    assert get("orchestrator_lease_duration_seconds_count", {"outcome": "released"}) == 0
    assert get("orchestrator_heartbeat_lag_seconds_count") == 1
    assert get("orchestrator_merge_queue_wait_seconds_count") == 1
    assert get("orchestrator_requests_total", {"method": "lease.heartbeat"}) == 1
    assert get("orchestrator_request_duration_seconds_count", {"method": "lease.heartbeat"}) == 1
    labels = {"code": "-32600", "method": "none"}
    assert get("orchestrator_protocol_errors_total", labels) == 1
    labels = {"code": "-32001", "method": "lease.heartbeat"}
    assert get("orchestrator_protocol_errors_total", labels) == 1


def test_lease_and_queue_clocks_forget_what_ended() -> None:
    m = Metrics("1.0.0")
    get = m.registry.get_sample_value
    # A lease handed over before a restart: its first heartbeat only starts the clock,
    # its end is not observed (its start is unknown), and nothing is left behind.
    m.heartbeat("old")
    m.heartbeat("old")
    assert get("orchestrator_heartbeat_lag_seconds_count") == 1
    m.lease_ended("never-seen", "released")
    assert get("orchestrator_lease_duration_seconds_count", {"outcome": "released"}) == 0
    # A wait is observed once per report, not again when the candidate is rebuilt.
    m.report_accepted("h")
    m.merge_started("h")
    m.merge_started("h")
    assert get("orchestrator_merge_queue_wait_seconds_count") == 1
    with pytest.raises(ValueError, match="lease outcome"):
        m.lease_ended("x", "vanished")


def test_time_in_state_starts_at_the_clock_start_and_ends_at_merged() -> None:
    m = Metrics("1.0.0")
    get = m.registry.get_sample_value
    m.start_state_clock(5, [("old", "gating", 0.0)])
    assert m.state_cursor == 5
    m.state_changes(
        [
            (6, 1.0, "new", "waiting"),  # submitted: enters waiting, nothing left yet
            (7, 1.0, "new", "queued"),
            (8, 4.0, "old", "merged"),
            (9, 9.0, "new", "leased"),
        ]
    )
    assert m.state_cursor == 9
    assert get("orchestrator_handoff_state_duration_seconds_count", {"state": "waiting"}) == 1
    assert get("orchestrator_handoff_state_duration_seconds_sum", {"state": "waiting"}) == 0
    assert get("orchestrator_handoff_state_duration_seconds_sum", {"state": "queued"}) == 8
    assert get("orchestrator_handoff_state_duration_seconds_sum", {"state": "gating"}) == 4
    # Nothing leaves merged, so it has no series and is not remembered.
    assert get("orchestrator_handoff_state_duration_seconds_count", {"state": "merged"}) is None
    assert "old" not in m._states


def test_tracking_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "MAX_TRACKED", 3)
    m = Metrics("1.0.0")
    for i in range(10):
        m.lease_started(f"L{i}")
        m.report_accepted(f"h{i}")
    m.lease_ended("L0", "reported")  # long forgotten: not observed
    m.lease_ended("L9", "reported")
    m.merge_started("h0")
    m.merge_started("h9")
    get = m.registry.get_sample_value
    assert get("orchestrator_lease_duration_seconds_count", {"outcome": "reported"}) == 1
    assert get("orchestrator_merge_queue_wait_seconds_count") == 1


@pytest.mark.parametrize(
    ("exit_status", "timed_out", "outcome"),
    [
        (0, False, "passed"),
        (1, False, "failed"),
        (-9, False, "failed"),
        (None, True, "timed_out"),
        (127, False, "error"),
        (126, False, "error"),
    ],
)
def test_gate_outcomes(exit_status: int | None, timed_out: bool, outcome: str) -> None:
    assert gate_outcome(exit_status, timed_out) == outcome


def test_method_label_is_bounded() -> None:
    assert method_label("lease.heartbeat") == "lease.heartbeat"
    assert method_label("initialize") == "initialize"
    assert method_label("rm -rf /") == "other"
    assert method_label(None) == "none"
    m = Metrics("1.0.0")
    for i in range(100):
        m.request_received(f"made.up.{i}")
        m.protocol_error(-32601, f"made.up.{i}")
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    methods = {s.labels["method"] for s in families["orchestrator_requests"].samples}
    assert methods == {"other"}
    assert set(METHODS) >= {"other", "none", "lease.acquire", "status"}


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        ("", False),
        ("*/*", False),
        ("text/plain", False),
        ("application/openmetrics-text", True),
        ("application/openmetrics-text; version=1.0.0; charset=utf-8", True),
        # What Prometheus 2.x sends.
        (
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
            "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            True,
        ),
        ("text/plain;q=1, application/openmetrics-text;q=0.5", False),
        ("application/openmetrics-text;q=0", False),
        ("Application/OpenMetrics-Text;q=bogus", False),
    ],
)
def test_content_negotiation(accept: str, openmetrics: bool) -> None:
    assert wants_openmetrics(accept) is openmetrics


def test_unknown_merge_result_is_refused() -> None:
    m = Metrics("1.0.0")
    with pytest.raises(ValueError, match="merge result must be one of"):
        m.merge_finished("exploded")


def test_histogram_buckets_cover_the_documented_ranges() -> None:
    assert metrics_module.GATE_DURATION_BUCKETS[0] == 0.1
    assert metrics_module.GATE_DURATION_BUCKETS[-1] == 3600
    assert metrics_module.HANDOFF_CYCLE_BUCKETS[0] == 1
    assert metrics_module.HANDOFF_CYCLE_BUCKETS[-1] == 86400


def test_two_instances_in_one_process_do_not_clash() -> None:
    a, b = Metrics("a"), Metrics("b")
    a.lease_expired()
    assert a.registry.get_sample_value("orchestrator_lease_expirations_total") == 1
    assert b.registry.get_sample_value("orchestrator_lease_expirations_total") == 0


def test_render_has_every_design_metric_with_its_type() -> None:
    text = exercised_metrics().render().decode()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in {**DESIGN_METRICS, **OPERATOR_METRICS}.items():
        assert families.get(name) == kind, f"{name}: expected {kind}, got {families.get(name)}"
    # Counters and histograms carry no *_created gauges (see metrics._Registry).
    assert "_created" not in text


# --- parse_listen -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:0", ("localhost", 0)),
        ("metrics.example.org:9464", ("metrics.example.org", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:65535", ("::", 65535)),
    ],
)
def test_parse_listen_accepts(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("", "empty"),
        ("9464", "no port"),
        (":9464", "no host"),
        ("::1:9464", "brackets"),
        ("[::1]", "needs a port"),
        ("[::1]9464", "needs a port"),
        ("[::1:9464", "without a matching"),
        ("[localhost]:9464", "not an IPv6 address"),
        ("127.0.0.1:", "not a number"),
        ("127.0.0.1:http", "not a number"),
        ("127.0.0.1:-1", "not a number"),
        ("127.0.0.1:+1", "not a number"),
        ("127.0.0.1:\u0661\u0662", "not a number"),
        ("127.0.0.1:65536", "out of range"),
        ("bad host:9464", "neither an IP address nor a host name"),
        (" 127.0.0.1:9464", "whitespace"),
        ("localhost\n:9464", "neither an IP address nor a host name"),
        ("a" * 300 + ":9464", "neither an IP address nor a host name"),
    ],
)
def test_parse_listen_rejects(listen: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_listen(listen)


# --- the HTTP endpoint --------------------------------------------------------------


@pytest.mark.anyio
async def test_endpoint_serves_metrics_health_and_readiness() -> None:
    is_ready = False
    async with endpoint(exercised_metrics(), ready=lambda: is_ready) as port:
        reply = await fetch(port, "/metrics")
        assert reply.status == 200
        assert reply.headers["Content-Type"] == metrics_module.METRICS_CONTENT_TYPE
        assert reply.headers["Content-Length"] == str(len(reply.body))
        text = reply.body.decode()
        for name in EXPOSED_NAMES:
            assert re.search(rf"^{name}(_bucket)?[{{ ]", text, re.M), f"{name} missing"

        reply = await fetch(port, "/healthz")
        assert (reply.status, reply.body) == (200, b"ok\n")

        assert (await fetch(port, "/readyz")).status == 503
        is_ready = True
        assert (await fetch(port, "/readyz")).status == 200

        assert (await fetch(port, "/")).status == 404
        assert (await fetch(port, "/metrics/extra")).status == 404
        # The query string does not change the route.
        assert (await fetch(port, "/metrics?name[]=x")).status == 200


@pytest.mark.anyio
async def test_openmetrics_when_asked_for() -> None:
    async with endpoint(exercised_metrics()) as port:
        accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
        reply = await fetch(port, "/metrics", headers=accept)
        assert reply.status == 200
        assert reply.headers["Content-Type"] == metrics_module.OPENMETRICS_CONTENT_TYPE
        assert reply.headers["Vary"] == "Accept"
        text = reply.body.decode()
        assert text.endswith("# EOF\n")
        families = {f.name: f.type for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]
        for name, kind in {**DESIGN_METRICS, **OPERATOR_METRICS}.items():
            assert families.get(name) == kind, name
        plain = await fetch(port, "/metrics", headers={"Accept": "text/plain"})
        assert plain.headers["Content-Type"] == metrics_module.METRICS_CONTENT_TYPE
        assert "# EOF" not in plain.body.decode()


@pytest.mark.anyio
async def test_readiness_names_the_failed_check() -> None:
    checks = {"store": True, "socket": False, "merge_queue": True}
    async with endpoint(Metrics("1.0.0"), ready=lambda: checks) as port:
        reply = await fetch(port, "/readyz")
        assert reply.status == 503
        assert reply.body == b"not ready\nstore: ok\nsocket: NO\nmerge_queue: ok\n"
        checks["socket"] = True
        reply = await fetch(port, "/readyz")
        assert (reply.status, reply.body) == (
            200,
            b"ready\nstore: ok\nsocket: ok\nmerge_queue: ok\n",
        )


@pytest.mark.anyio
async def test_scrape_reads_gauges_first_and_survives_a_failed_read() -> None:
    m = Metrics("1.0.0")
    depth = 0
    fail = False

    async def refresh() -> None:
        await anyio.lowlevel.checkpoint()
        if fail:
            raise RuntimeError("database is locked")
        m.set_store_snapshot(
            StoreSnapshot(counts={"queued": depth}, leases_active=0, merge_queue_depth=depth)
        )

    def scraped(body: bytes, name: str) -> float | None:
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name:
                    return sample.value
        return None

    async with endpoint(m, refresh=refresh) as port:
        depth = 4
        body = (await fetch(port, "/metrics")).body
        assert scraped(body, "orchestrator_merge_queue_depth") == 4
        depth, fail = 9, True
        reply = await fetch(port, "/metrics")
        assert reply.status == 200  # a scrape with the last known values, not a gap
        assert scraped(reply.body, "orchestrator_merge_queue_depth") == 4
        assert scraped(reply.body, "orchestrator_metrics_refresh_failures_total") == 1
        fail = False
        body = (await fetch(port, "/metrics")).body
        assert scraped(body, "orchestrator_merge_queue_depth") == 9


@pytest.mark.anyio
async def test_endpoint_methods() -> None:
    async with endpoint(Metrics("1.0.0")) as port:
        reply = await fetch(port, "/metrics", method="POST", data=b"x" * 100_000)
        assert reply.status == 405
        assert reply.headers["Allow"] == "GET, HEAD"
        assert (await fetch(port, "/healthz", method="DELETE")).status == 405

        reply = await fetch(port, "/metrics", method="HEAD")
        assert reply.status == 200
        assert reply.body == b""
        assert int(reply.headers["Content-Length"]) > 0


@pytest.mark.anyio
async def test_endpoint_rejects_malformed_and_oversized_requests() -> None:
    async with endpoint(Metrics("1.0.0")) as port:
        reply = await raw_exchange(port, b"nonsense\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ")
        reply = await raw_exchange(port, b"GET /metrics SMTP/2\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ")
        huge = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * 20_000 + b"\r\n\r\n"
        reply = await raw_exchange(port, huge)
        assert reply.startswith(b"HTTP/1.1 431 ")
        # An absolute-form target and bare-LF line endings still work.
        reply = await raw_exchange(port, b"GET http://example.invalid/healthz HTTP/1.0\n\n")
        assert reply.startswith(b"HTTP/1.1 200 ")
        assert reply.endswith(b"\r\n\r\nok\n")
        assert b"Connection: close\r\n" in reply


@pytest.mark.anyio
async def test_slow_client_does_not_stall_others_and_is_timed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_module, "REQUEST_TIMEOUT_S", 0.5)
    async with endpoint(Metrics("1.0.0")) as port:
        async with await anyio.connect_tcp("127.0.0.1", port) as slow:
            await slow.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # head never finishes
            reply = await fetch(port, "/healthz")
            assert reply.status == 200
            chunks: list[bytes] = []
            with anyio.fail_after(10):
                while True:
                    try:
                        chunks.append(await slow.receive())
                    except anyio.EndOfStream:
                        break
            assert b"".join(chunks).startswith(b"HTTP/1.1 408 ")


@pytest.mark.anyio
async def test_connections_beyond_the_limit_are_refused_not_queued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_module, "MAX_CONNECTIONS", 2)
    async with endpoint(Metrics("1.0.0")) as port:
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(2)]
        try:
            assert (await fetch(port, "/healthz")).status == 503
        finally:
            for stream in idle:
                await stream.aclose()
        # The idle connections' slots come back once the server sees them close.
        with anyio.fail_after(10):
            while True:
                if (await fetch(port, "/healthz")).status == 200:
                    break
                await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_endpoint_on_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    async with endpoint(Metrics("1.0.0"), listen="[::1]:0") as port:
        reply = await anyio.to_thread.run_sync(_http, f"http://[::1]:{port}/healthz")
        assert reply.status == 200


@pytest.mark.anyio
async def test_serve_http_rejects_a_bad_listen_address() -> None:
    with pytest.raises(ValueError, match="no port"):
        await serve_http("127.0.0.1", Metrics("1.0.0"), ready=lambda: True)


# --- promtool -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_scraped_metrics_pass_promtool() -> None:
    promtool = need("promtool")
    async with endpoint(exercised_metrics()) as port:
        body = (await fetch(port, "/metrics")).body
    result = await anyio.run_process([promtool, "check", "metrics"], input=body, check=False)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output
    assert output.strip() == "", output


def test_alert_rules_pass_promtool() -> None:
    promtool = need("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_prometheus_config_passes_promtool() -> None:
    promtool = need("promtool")
    # rule_files are resolved relative to the config file, so this also loads the rules.
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_alert_rules_fire_when_they_should() -> None:
    """promtool's rule unit tests (config/prometheus/orchestrator-rules.test.yml): each
    alert fires in the situation it is meant for and stays quiet in a healthy one."""
    promtool = need("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ALERT_TESTS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = set(re.findall(r"^\s*- alert: (\w+)$", ALERTS.read_text(), re.M))
    tested = set(re.findall(r"^\s*alertname: (\w+)$", ALERT_TESTS.read_text(), re.M))
    assert rules and rules == tested, (rules - tested, tested - rules)


# --- the Grafana dashboard ----------------------------------------------------------


def dashboard_panels() -> Iterator[dict[str, Any]]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    yield from walk(json.loads(DASHBOARD.read_text())["panels"])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


# Grafana fills these in before a query reaches Prometheus; stand-ins that keep the
# expressions valid PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "5m",
    "$job": ".*",
    "$instance": ".*",
}


def as_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def test_dashboard_is_importable_and_covers_every_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["id"] is None  # import must create a dashboard, not overwrite one
    assert dashboard["uid"] and dashboard["title"]
    # Grafana's import asks for a Prometheus data source and puts its uid wherever the
    # file says ${DS_PROMETHEUS}; a hard-coded uid would point at someone else's.
    (ds_input,) = dashboard["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS"
    assert (ds_input["type"], ds_input["pluginId"]) == ("datasource", "prometheus")
    uids = set(re.findall(r'"uid": "([^"]*)"', DASHBOARD.read_text()))
    assert uids == {"${DS_PROMETHEUS}", "-- Grafana --", "orchestrator-overview"}, uids
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"

    panels = list(dashboard_panels())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"

    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Fleet overview", "Throughput", "Latency", "Failures"]

    exprs = "\n".join(dashboard_exprs())
    for name in EXPOSED_NAMES:
        assert name in exprs, f"no dashboard panel uses {name}"


# --- a real Prometheus server -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def prometheus_api(base: str, path: str, **params: str) -> dict[str, Any]:
    url = f"{base}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    reply = await anyio.to_thread.run_sync(_http, url)
    body: dict[str, Any] = json.loads(reply.body)
    return body


@pytest.mark.slow
@pytest.mark.anyio
async def test_real_prometheus_scrapes_the_endpoint_and_runs_every_query(
    tmp_path: Path,
) -> None:
    prometheus = need("prometheus")
    async with endpoint(exercised_metrics("7.7.7-test")) as port:
        prom_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            textwrap.dedent(
                f"""\
                global:
                  scrape_interval: 1s
                  evaluation_interval: 1s
                rule_files:
                  - {json.dumps(str(ALERTS))}
                scrape_configs:
                  - job_name: orchestrator
                    static_configs:
                      - targets: ["127.0.0.1:{port}"]
                """
            )
        )
        log_path = tmp_path / "prometheus.log"
        with log_path.open("wb") as log:
            process = await anyio.open_process(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{prom_port}"

        def log_tail() -> str:
            return log_path.read_text(errors="replace")[-4000:]

        try:
            # Bounded polling: Prometheus needs to start, scrape once and evaluate the
            # rules once; none of that has a completion signal to wait on.
            try:
                with anyio.fail_after(60):
                    while True:
                        if process.returncode is not None:
                            pytest.fail(f"prometheus exited early:\n{log_tail()}")
                        try:
                            built = await prometheus_api(
                                base, "query", query="orchestrator_build_info"
                            )
                            rules = await prometheus_api(base, "rules")
                        except (OSError, ValueError):
                            built = rules = {}
                        health = [
                            r.get("health")
                            for g in rules.get("data", {}).get("groups", [])
                            for r in g["rules"]
                        ]
                        if (
                            built.get("data", {}).get("result")
                            and health
                            and all(h == "ok" for h in health)
                        ):
                            break
                        await anyio.sleep(0.25)
            except TimeoutError:
                pytest.fail(f"prometheus never scraped the endpoint:\n{log_tail()}")

            (series,) = built["data"]["result"]
            assert series["metric"]["version"] == "7.7.7-test"
            assert series["metric"]["job"] == "orchestrator"
            assert series["value"][1] == "1"
            assert len(health) == len(ALERTS.read_text().split("- alert:")) - 1

            for expr in dashboard_exprs():
                answer = await prometheus_api(base, "query", query=as_promql(expr))
                assert answer["status"] == "success", (expr, answer.get("error"))
        finally:
            process.terminate()
            with anyio.move_on_after(15):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
