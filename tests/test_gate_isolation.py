"""Gates run the agents' code: each gate sees exactly its candidate, can touch nothing but
its own checkout, and leaves no process behind (docs/security.md, the threat model)."""

from __future__ import annotations

import sys
from pathlib import Path

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

pytestmark = pytest.mark.slow


def _gate(tmp_path: Path, body: str, *, name: str = "tests") -> str:
    script = tmp_path / f"{name}.py"
    script.write_text(body)
    return f'[[gates]]\nname = "{name}"\nrun = ["{sys.executable}", "{script}"]\ntimeout_s = 60\n'


# The repository's suite is check.py ("answer() is 42"). The planter's candidate's test
# code also replaces the suite by one that always passes and hides it behind skip-worktree,
# for later candidates (which do not touch check.py) to inherit.
SUITE = """\
import sys
sys.path.insert(0, "src")
import app
assert app.answer() == 42, "answer() is not 42"
"""
PLANTING_GATE = """\
import os, subprocess, sys
if os.environ["ORCHESTRATOR_HANDOFF"] == "planter":
    subprocess.run(["git", "update-index", "--skip-worktree", "check.py"], check=True)
    with open("check.py", "w") as f:
        f.write("print('all good')\\n")
sys.exit(subprocess.run([sys.executable, "check.py"]).returncode)
"""


def test_a_skip_worktree_file_planted_by_one_gate_does_not_pass_the_next_candidate(
    tmp_path: Path, repo: Path
) -> None:
    (repo / "check.py").write_text(SUITE)
    git(repo, "add", "check.py")
    git(repo, "commit", "-q", "-m", "the suite")
    config = write_config(
        tmp_path, repo, gates=_gate(tmp_path, PLANTING_GATE),
        merge='on_gate_failure = "hold"\ngate_isolation = "processes"',
    )
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    workers = [
        start_worker(daemon.socket, "good.py", tmp_path / "good.log", name="good",
                     extra=["--label", "good"]),
        start_worker(daemon.socket, "breaks_tests.py", tmp_path / "bad.log", name="bad",
                     extra=["--label", "breaks"]),
    ]
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [
            handoff_doc("planter", labels="good"),
            handoff_doc("breaker", labels="breaks", deps="planter"),
        ]})
        wait_for(lambda: states(daemon.socket) == {"planter": "merged", "breaker": "failed"},
                 "the planter merged and the breaking candidate failed on its own files")
        record = control(daemon.socket, "handoff.get", {"name": "breaker"})
        assert record["gates"], record["detail"]
        assert "answer() is not 42" in record["gates"][-1]["outputTail"]
        assert "return 41" not in git(repo, "show", "main:src/app.py")
    finally:
        for worker in workers:
            kill_group(worker)
        daemon.stop()
