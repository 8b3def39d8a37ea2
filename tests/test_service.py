"""The daemon as a service: systemd notifications and the metrics a running daemon serves."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from harness import Daemon, control, handoff_doc, kill_group, start_worker, wait_for, write_config

pytestmark = pytest.mark.slow


def test_sd_notify_ready_watchdog_and_stopping(tmp_path: Path, repo: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(60)
    env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"}
    daemon = Daemon(write_config(tmp_path, repo), tmp_path / "daemon.log", env=env).start()
    try:
        messages: list[str] = []

        def received(word: str) -> bool:
            while not any(word in m for m in messages):
                messages.append(listener.recv(4096).decode())
            return True

        received("READY=1")
        assert any(f"STATUS=serving on {daemon.socket}" in m for m in messages)
        received("WATCHDOG=1")
    finally:
        daemon.stop()
    received("STOPPING=1")
    listener.close()


def test_a_running_daemon_serves_its_metrics(tmp_path: Path, repo: Path) -> None:
    gates = f'[[gates]]\nname = "tests"\nrun = ["{sys.executable}", "-c", "pass"]\n'
    config = write_config(tmp_path, repo, gates=gates, metrics="127.0.0.1:0")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        port = next(e["metrics_port"] for e in daemon.logs() if e["event"] == "daemon_ready")
        base = f"http://127.0.0.1:{port}"
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("measured")]})
        wait_for(lambda: control(daemon.socket, "handoff.get", {"name": "measured"})["state"]
                 == "merged", "the merge")

        def scrape() -> str:
            with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
                return response.read().decode()

        def settled() -> str | None:
            text = scrape()
            return text if 'orchestrator_handoffs{state="merged"} 1.0' in text else None

        text = wait_for(settled, "the gauges to catch up")
        assert 'orchestrator_merges_total{result="merged"} 1.0' in text
        assert "orchestrator_workers_connected 1.0" in text
        assert "orchestrator_leases_active 0.0" in text
        assert "orchestrator_merge_queue_depth 0.0" in text
        assert 'orchestrator_gate_duration_seconds_count{gate="tests"} 1.0' in text
        assert "orchestrator_handoff_cycle_seconds_count 1.0" in text
        assert "orchestrator_build_info{version=" in text
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(base + path, timeout=10) as response:
                assert response.status == 200
        if shutil.which("promtool"):
            check = subprocess.run(["promtool", "check", "metrics"], input=text,
                                   capture_output=True, text=True, timeout=60)
            assert check.returncode == 0, check.stdout + check.stderr
    finally:
        kill_group(worker)
        daemon.stop()


def test_a_busy_metrics_port_is_a_clear_start_up_error(tmp_path: Path, repo: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path, repo, metrics=f"127.0.0.1:{port}")
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator", "--config", str(config), "serve"],
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
    assert 'set it to ""' in result.stderr
