"""[workspace] keep / cache_key_files / setup: the gate checkout keeps named ignored paths
(a .venv) across candidates while the key files are unchanged, rebuilds them with setup
when they change, and cleans everything else as before. Real daemon, real git, real
gate commands."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import git
from harness import (
    Daemon,
    control,
    handoff_doc,
    kill_group,
    start_worker,
    states,
    wait_for,
    write_config,
)

from orchestrator.config import ConfigError, from_mapping

pytestmark = pytest.mark.slow

# Setup runs in lease directories too (by the worker, tests/test_lease_environment.py);
# only the gate checkout's runs are logged here.
SETUP = """
import os, pathlib, sys
lock = pathlib.Path("deps.lock").read_text()
venv = pathlib.Path(".venv")
assert not venv.exists(), "setup found a .venv kept from another key"
venv.mkdir()
(venv / "marker").write_text(lock)
if "ORCHESTRATOR_CANDIDATE" in os.environ:
    with open(sys.argv[1], "a") as log:
        log.write(lock)
"""
GATE = """
import pathlib, sys
marker = pathlib.Path(".venv/marker")
lock = pathlib.Path("deps.lock").read_text()
assert marker.exists(), "no .venv: setup did not run and nothing was kept"
assert marker.read_text() == lock, "a .venv built for another lock file"
assert not pathlib.Path("build").exists(), "an unkept leftover survived the clean"
pathlib.Path("build").mkdir()
(pathlib.Path("build") / "junk").write_text("x")
with open(sys.argv[1], "a") as log:
    log.write("gate saw " + marker.read_text())
"""


@pytest.fixture
def daemon(tmp_path: Path, repo: Path) -> Iterator[tuple[Daemon, Path, Path]]:
    (repo / "deps.lock").write_text("v1\n")
    git(repo, "add", "deps.lock")
    git(repo, "commit", "-q", "-m", "lock file")
    setup_log, gate_log = tmp_path / "setup.log", tmp_path / "gate.log"
    config = write_config(
        tmp_path, repo, gates=_toml_gates(setup_log, gate_log), merge='on_gate_failure = "hold"'
    )
    running = Daemon(config, tmp_path / "daemon.log").start()
    yield running, setup_log, gate_log
    running.stop()


def _toml_gates(setup_log: Path, gate_log: Path) -> str:
    def literal(text: str) -> str:
        assert "'''" not in text
        return "'''" + text + "'''"

    return f"""
[workspace]
setup = ["{sys.executable}", "-c", {literal(SETUP)}, "{setup_log}"]
keep = [".venv"]
cache_key_files = ["deps.lock"]
[[gates]]
name = "tests"
run = ["{sys.executable}", "-c", {literal(GATE)}, "{gate_log}"]
timeout_s = 120
"""


def test_kept_dependencies_survive_until_the_lock_file_changes(
    daemon: tuple[Daemon, Path, Path], tmp_path: Path
) -> None:
    running, setup_log, gate_log = daemon
    sock = running.socket
    log = tmp_path / "worker.log"

    def run(agent: str, *names: str) -> None:
        control(sock, "handoff.submit", {"markdown": [handoff_doc(n) for n in names]})
        worker = start_worker(sock, agent, log, extra=["--max-handoffs", str(len(names))])
        try:
            assert worker.wait(timeout=120) == 0, log.read_text()
            wait_for(
                lambda: all(states(sock)[n] in ("merged", "failed", "conflict") for n in names),
                f"{names} to be gated",
            )
        finally:
            kill_group(worker)
        got = {n: control(sock, "handoff.get", {"name": n}) for n in names}
        for name, record in got.items():
            assert record["state"] == "merged", (name, record["gates"])

    run("good.py", "first")
    run("good.py", "second")
    # Setup ran once: the second candidate's gate found the kept .venv (and no build/).
    assert setup_log.read_text() == "v1\n"
    assert gate_log.read_text() == "gate saw v1\ngate saw v1\n"
    second = control(sock, "handoff.get", {"name": "second"})
    assert [g["gate"] for g in second["gates"]] == ["tests"]
    first = control(sock, "handoff.get", {"name": "first"})
    assert [g["gate"] for g in first["gates"]] == ["setup", "tests"]

    run("bumps_lock.py", "bump")
    # A new key: everything cleaned, setup rebuilt the .venv for the new lock file.
    assert setup_log.read_text() == "v1\nv2 from bump\n"
    assert gate_log.read_text().endswith("gate saw v2 from bump\n")


def test_workspace_config_errors_say_what_to_fix(tmp_path: Path) -> None:
    def load(workspace: dict[str, Any]) -> None:
        from_mapping(
            {"repository": {"path": str(tmp_path)}, "workspace": workspace},
            source="t.toml",
            base_dir=tmp_path,
        )

    with pytest.raises(ConfigError) as bad:
        load({"keep": ["../outside"], "cache_key_files": ["uv.lock"]})
    assert "must be a path inside the checkout" in str(bad.value)
    with pytest.raises(ConfigError) as bad:
        load({"keep": [".venv"]})
    assert "workspace.keep needs workspace.cache_key_files" in str(bad.value)
    with pytest.raises(ConfigError) as bad:
        load({"setup": "uv sync"})
    assert "workspace.setup must be" in str(bad.value)
