"""Monitoring end to end: a scripted run of a real daemon with real workers, then what
``/metrics`` says about it, what the logs say, and a real Prometheus running every query.

The run (one daemon, one gate, workers routed by label to scripted agents):

- ``solo``: a good agent, merged on its first attempt;
- ``mend``: fails the gate once, is repaired from the gate log, merged on attempt 2;
- ``clash-a`` / ``clash-b``: two agents working at once write the same file, so whichever
  lands second conflicts once, merges the integration branch in, and lands on attempt 2;
- ``fragile``: its worker is killed mid-work, the lease expires, and a good agent finishes
  it on attempt 2.

Plus two refused calls sent by hand: a heartbeat with the expired lease's token and an
unknown method. The counters must then say exactly that; the logs must carry the same
names and counts. Prometheus (Debian's ``prometheus`` package) is started before the run
when it is installed, so the rate panels see the run happen; without it, the tests that
need it are skipped and the rest still run.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import make_repo
from harness import (
    Conn,
    Daemon,
    control,
    handoff_doc,
    kill_group,
    start_worker,
    states,
    wait_for,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import ALERTS, DASHBOARD, as_promql, dashboard_panels

pytestmark = pytest.mark.slow

# The repository's "test suite", run as the gate: app.answer() must be 42.
CHECK = (
    "import sys; sys.path.insert(0, 'src'); import app; "
    "assert app.answer() == 42, 'answer() is not 42'"
)
EXPECTED_STATES = dict.fromkeys(("solo", "mend", "clash-a", "clash-b", "fragile"), "merged")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


class Prometheus:
    """A real Prometheus server on loopback, scraping one target every second."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(ALERTS))}\n"
            "scrape_configs:\n  - job_name: orchestrator\n    static_configs:\n"
            f'      - targets: ["{target}"]\n'
        )
        self.log = workdir / "prometheus.log"
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_for(self._ready, "prometheus to start")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited early:\n{self.log.read_text()[-4000:]}")
        try:
            return http_get(f"{self.base}/-/ready")[0] == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        body: dict[str, Any] = json.loads(http_get(url)[1])
        return body

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", (expr, answer.get("error"))
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Run:
    daemon: Daemon
    metrics_url: str
    workers: list[subprocess.Popen[bytes]]
    prometheus: Prometheus | None

    def scrape(self, accept: str = "text/plain") -> str:
        status, body = http_get(self.metrics_url, {"Accept": accept})
        assert status == 200
        return body.decode()

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        out = {}
        for family in text_string_to_metric_families(self.scrape()):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out


def gate_config() -> str:
    argv = ", ".join(json.dumps(a) for a in (sys.executable, "-c", CHECK))
    return f'[[gates]]\nname = "tests"\nrun = [{argv}]\ntimeout_s = 120\n'


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The scripted run, once for the module; the daemon stays up for the tests to read."""
    tmp = tmp_path_factory.mktemp("monitoring")
    repo = make_repo(tmp / "repo")
    metrics_port = free_port()
    config = write_config(
        tmp,
        repo,
        gates=gate_config(),
        ttl_s=1.5,
        heartbeat_s=0.3,
        merge='on_conflict = "requeue"\non_gate_failure = "requeue"',
        metrics=f"127.0.0.1:{metrics_port}",
    )
    binary = shutil.which("prometheus")
    prometheus = (
        Prometheus(binary, tmp, f"127.0.0.1:{metrics_port}") if binary is not None else None
    )
    daemon = Daemon(config, tmp / "daemon.log").start()
    workers: list[subprocess.Popen[bytes]] = []
    try:
        if prometheus is not None:
            # Prometheus takes a few seconds to start scraping a new target; the rate panels
            # need it to see the run from the start.
            wait_for(lambda: prometheus.query("up == 1"), "prometheus to scrape the daemon")
        sock = daemon.socket
        control(
            sock,
            "handoff.submit",
            {
                "markdown": [
                    handoff_doc("solo", labels="good"),
                    handoff_doc("mend", labels="repairs"),
                    handoff_doc("clash-a", labels="conflict"),
                    handoff_doc("clash-b", labels="conflict"),
                    handoff_doc("fragile", labels="fragile"),
                ]
            },
        )
        # Two conflict workers take clash-a and clash-b at once, from the same base.
        for name, agent, label in (
            ("good", "good.py", "good"),
            ("repairs", "repairs.py", "repairs"),
            ("conflict-1", "conflict.py", "conflict"),
            ("conflict-2", "conflict.py", "conflict"),
        ):
            log = tmp / f"{name}.log"
            workers.append(start_worker(sock, agent, log, name=name, extra=["--label", label]))
        dying = start_worker(
            sock, "dies.py", tmp / "dies.log", name="dies", extra=["--label", "fragile"]
        )

        def partial_committed() -> bool:
            record = control(sock, "handoff.get", {"name": "fragile"})
            return (record["progress"] or {}).get("message") == "partial work committed"

        wait_for(partial_committed, "the dying agent to commit part of its work")
        first_lease = control(sock, "handoff.get", {"name": "fragile"})["leases"][0]
        kill_group(dying)

        def requeued() -> bool:
            record = control(sock, "handoff.get", {"name": "fragile"})
            return bool(record["state"] == "queued" and record["attempt"] == 2)

        wait_for(requeued, "the dead worker's lease to expire")
        # Two refused calls: a stale fencing token, and a method nobody defined.
        conn = Conn(sock)
        conn.initialize("worker", "late")
        stale = {"leaseId": first_lease["id"], "token": 1}  # any token: the lease has ended
        assert conn.request("lease.heartbeat", stale)["error"]["code"] == -32001
        assert conn.request("no.such.method")["error"]["code"] == -32601
        conn.close()
        workers.append(
            start_worker(
                sock, "good.py", tmp / "rescue.log", name="rescue", extra=["--label", "fragile"]
            )
        )
        wait_for(lambda: states(sock) == EXPECTED_STATES, "every handoff to merge")
        result = Run(daemon, f"http://127.0.0.1:{metrics_port}/metrics", workers, prometheus)

        def counted() -> bool:
            # The store says "merged" a moment before the merge queue counts and logs it.
            merged = ("orchestrator_merges_total", frozenset({("result", "merged")}))
            return result.samples().get(merged) == len(EXPECTED_STATES)

        wait_for(counted, "the last merge to be counted")
        yield result
    finally:
        for worker in workers:
            kill_group(worker)
        daemon.stop()
        if prometheus is not None:
            prometheus.stop()


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_say_exactly_what_happened(run: Run) -> None:
    s = run.samples()

    def get(name: str, **labels: str) -> float | None:
        return value(s, name, **labels)

    # Merge results: 5 merged, the failed gate, the conflict.
    assert get("orchestrator_merges_total", result="merged") == 5
    assert get("orchestrator_merges_total", result="gate_failed") == 1
    assert get("orchestrator_merges_total", result="conflict") == 1
    # Gated candidates: the conflicting one never got a candidate, so 6 gate runs.
    assert get("orchestrator_gate_runs_total", gate="tests", outcome="passed") == 5
    assert get("orchestrator_gate_runs_total", gate="tests", outcome="failed") == 1
    assert get("orchestrator_gate_runs_total", gate="tests", outcome="timed_out") is None
    assert get("orchestrator_gate_duration_seconds_count", gate="tests") == 6
    # One expired lease; 7 reports (solo 1, mend 2, clash 3, fragile 1), each a lease that
    # ended "reported", and each waited in the merge queue once.
    assert get("orchestrator_lease_expirations_total") == 1
    assert get("orchestrator_lease_duration_seconds_count", outcome="expired") == 1
    assert get("orchestrator_lease_duration_seconds_count", outcome="reported") == 7
    assert get("orchestrator_lease_duration_seconds_count", outcome="released") == 0
    assert get("orchestrator_lease_duration_seconds_count", outcome="cancelled") == 0
    assert get("orchestrator_merge_queue_wait_seconds_count") == 7
    assert get("orchestrator_requests_total", method="handoff.report") == 7
    assert get("orchestrator_requests_total", method="handoff.submit") == 1
    assert get("orchestrator_requests_total", method="lease.release") is None
    # 5 merged: attempts 1 (solo), 2 (mend), 1 and 2 (the clash pair), 2 (fragile).
    assert get("orchestrator_handoff_cycle_seconds_count") == 5
    assert get("orchestrator_handoff_attempts_count") == 5
    assert get("orchestrator_handoff_attempts_sum") == 8
    assert get("orchestrator_handoff_attempts_bucket", le="1.0") == 2
    # Time in each state, from the store's event log: 5 submissions released at once, 8
    # grants (solo 1, mend 2, clash 3, fragile 2) and 8 lease ends (7 reports, 1 expiry),
    # 7 candidates taken up and decided, one gate failure and one conflict on the way back.
    left = {
        state: get("orchestrator_handoff_state_duration_seconds_count", state=state)
        for state in ("waiting", "queued", "leased", "reported", "gating", "failed", "conflict")
    }
    assert left == {
        "waiting": 5,
        "queued": 8,
        "leased": 8,
        "reported": 7,
        "gating": 7,
        "failed": 1,
        "conflict": 1,
    }
    # Exactly the two refused calls, by code and method (an unknown one is "other").
    errors = {
        (dict(labels)["code"], dict(labels)["method"]): v
        for (name, labels), v in s.items()
        if name == "orchestrator_protocol_errors_total"
    }
    assert errors == {("-32001", "lease.heartbeat"): 1, ("-32601", "other"): 1}
    assert get("orchestrator_requests_total", method="other") == 1
    # Heartbeats renewed leases; their gaps are near heartbeat_interval_s (0.3 s), but only
    # the count is certain here.
    lag_count = get("orchestrator_heartbeat_lag_seconds_count")
    assert lag_count is not None and lag_count > 0
    assert (get("orchestrator_request_duration_seconds_count", method="lease.heartbeat") or 0) > 0
    # Store-backed gauges: everything merged, nothing held or queued.
    assert get("orchestrator_handoffs", state="merged") == 5
    for state in ("queued", "waiting", "leased", "reported", "gating", "failed", "conflict"):
        assert get("orchestrator_handoffs", state=state) == 0, state
        if state in ("queued", "waiting", "leased", "reported", "gating"):
            assert get("orchestrator_handoff_oldest_age_seconds", state=state) == 0, state
    assert get("orchestrator_leases_active") == 0
    assert get("orchestrator_merge_queue_depth") == 0
    assert get("orchestrator_merge_blocked") == 0
    assert get("orchestrator_workers_connected") == len(run.workers)
    assert get("orchestrator_metrics_refresh_failures_total") == 0


def test_log_events_carry_the_metric_names_and_the_same_counts(run: Run) -> None:
    s = run.samples()
    logged: Counter[tuple[str, ...]] = Counter()
    for event in run.daemon.logs():
        metric = event.get("metric")
        if metric == "orchestrator_merges_total":
            logged[(metric, event["result"])] += 1
        elif metric == "orchestrator_gate_runs_total":
            logged[(metric, event["gate"], event["outcome"])] += 1
        elif metric == "orchestrator_lease_expirations_total":
            logged[(metric,)] += 1
            assert (event["worker"], event["handoff"]) == ("dies", "fragile"), event
        elif metric == "orchestrator_protocol_errors_total":
            logged[(metric, str(event["code"]), event["method"])] += 1
    assert logged == {
        ("orchestrator_merges_total", "merged"): value(
            s, "orchestrator_merges_total", result="merged"
        ),
        ("orchestrator_merges_total", "gate_failed"): 1,
        ("orchestrator_merges_total", "conflict"): 1,
        ("orchestrator_gate_runs_total", "tests", "passed"): 5,
        ("orchestrator_gate_runs_total", "tests", "failed"): 1,
        ("orchestrator_lease_expirations_total",): 1,
        # request_refused logs the method as sent; the metric folds unknown ones to "other".
        ("orchestrator_protocol_errors_total", "-32001", "lease.heartbeat"): 1,
        ("orchestrator_protocol_errors_total", "-32601", "no.such.method"): 1,
    }


def test_live_output_passes_promtool(run: Run) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (install Debian's 'prometheus' package to run this)")
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=run.scrape().encode(),
        capture_output=True,
        check=False,
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and output.strip() == "", output


def test_readiness_of_the_running_daemon(run: Run) -> None:
    status, body = http_get(run.metrics_url.replace("/metrics", "/readyz"))
    assert (status, body) == (200, b"ready\ndaemon: ok\nstore: ok\nsocket: ok\nmerge_queue: ok\n")


def test_prometheus_scrapes_the_daemon_and_every_query_runs(run: Run) -> None:
    prometheus = run.prometheus
    if prometheus is None:
        pytest.skip("prometheus not on PATH (install Debian's 'prometheus' package to run this)")

    def scraped_the_end() -> bool:
        # The final state, and at least two samples of every series (a rate needs two; a
        # series appears with the first event of its kind, some late in the run).
        merged = prometheus.query('sum(orchestrator_merges_total{result="merged"})')
        # Scraped series only: ALERTS* come from rule evaluation, and a pending alert that
        # cleared at once (a worker between two connections) leaves a single sample.
        series = prometheus.query('{job="orchestrator", __name__!~"ALERTS.*"}[5m]')
        young = [s["metric"] for s in series if len(s["values"]) < 2]
        return bool(merged) and merged[0]["value"][1] == "5" and not young

    wait_for(scraped_the_end, "prometheus to scrape the finished run")
    # Prometheus asks for OpenMetrics first; the scrape of that is healthy.
    (target,) = prometheus.api("targets")["data"]["activeTargets"]
    assert target["health"] == "up", target

    # Every dashboard query is valid PromQL over exported series and, after this run,
    # returns data. The rate windows cover the whole run.
    variables = {"$__rate_interval": "5m", "$__range": "10m"}
    for panel in dashboard_panels():
        for target_ in panel.get("targets", []):
            expr = target_["expr"]
            for name, replacement in variables.items():
                expr = expr.replace(name, replacement)
            result = prometheus.query(as_promql(expr))
            assert result, f"no data for panel {panel['title']!r}: {expr}"

    # The job and instance drop-downs: Grafana's label_values(selector, label) asks the
    # label values API, which must offer this daemon's.
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = as_promql(match[1]), match[2]
        answer = prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert answer["status"] == "success" and answer["data"], (variable["name"], answer)

    # Every alert rule's expression evaluates; Prometheus itself loaded them all healthy.
    def rules_evaluated() -> list[dict[str, Any]]:
        groups = prometheus.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else []

    rules = wait_for(rules_evaluated, "prometheus to evaluate every rule")
    assert len(rules) == len(ALERTS.read_text().split("- alert:")) - 1
    for rule in rules:
        prometheus.query(rule["query"])
    # A healthy finished run: nothing fires (OrchestratorDown would need 2 minutes).
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert firing == [], firing
