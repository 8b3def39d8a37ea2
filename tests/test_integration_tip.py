"""Every lease knows the integration tip (issue 16, PROTOCOL.md "integration-tip"):
``integrationCommit``, ``origin/<integration branch>`` in the lease's repository, a
read-only ``git fetch origin``, and conflict feedback that names the commit and paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

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

from orchestrator.git.workspace import Workspace

CHECK = (
    "import sys; sys.path.insert(0, 'src'); import app; "
    "assert app.answer() == 42, 'answer() is not 42'"
)


def gate(code: str) -> str:
    return f'[[gates]]\nname = "tests"\nrun = ["{sys.executable}", "-c", "{code}"]\n'


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ the lease repository


def test_origin_is_the_integration_tip_fetchable_but_not_pushable(
    repo: Path, tmp_path: Path
) -> None:
    ws = Workspace(repo, "main", tmp_path / "worktrees")
    tip = ws.integration_tip()
    ws.ensure_branch("handoff/a", tip)
    path = ws.checkout_for_lease("a", "handoff/a", integration=tip)
    assert git(path, "rev-parse", "origin/main") == tip
    # the integration branch moves on; `git fetch origin` in the lease sees it
    (repo / "new.txt").write_text("n\n")
    git(repo, "add", "new.txt")
    git(repo, "commit", "-q", "-m", "moved on")
    newer = git(repo, "rev-parse", "main")
    git(path, "fetch", "-q", "origin")
    assert git(path, "rev-parse", "origin/main") == newer
    git(path, "merge", "-q", "--no-edit", "origin/main")
    # pushing goes nowhere
    for push in (["push", "origin", "HEAD:main"], ["push", "origin", "HEAD:refs/heads/x"]):
        result = subprocess.run(["git", *push], cwd=path, capture_output=True, text=True)
        assert result.returncode != 0
    assert git(repo, "rev-parse", "main") == newer
    assert "refs/heads/x" not in git(repo, "for-each-ref")


# ------------------------------------------------------------------ through the daemon


def test_conflict_feedback_names_the_integration_commit_and_the_agent_repairs_it(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    record_file = tmp_path / "record.jsonl"
    config = write_config(tmp_path, repo, gates=gate("pass"), merge='on_conflict = "requeue"')
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    workers = [
        start_worker(
            daemon.socket,
            "conflict.py",
            tmp_path / f"w{i}.log",
            name=f"w{i}",
            env={"AGENT_RECORD": str(record_file)},
        )
        for i in (1, 2)
    ]
    try:
        # Both are leased before either lands (two idle workers), so both start from the
        # same tip and write the same line.
        wait_for(lambda: len(control(daemon.socket, "status")["workers"]) == 2, "two workers")
        control(
            daemon.socket,
            "handoff.submit",
            {"markdown": [handoff_doc("clash-a"), handoff_doc("clash-b")]},
        )
        wait_for(
            lambda: states(daemon.socket) == {"clash-a": "merged", "clash-b": "merged"},
            "both to land",
        )
    finally:
        for worker in workers:
            kill_group(worker)
    details = [control(daemon.socket, "handoff.get", {"name": n}) for n in ("clash-a", "clash-b")]
    second = next(d for d in details if d["attempt"] == 2)
    first_try = second["merges"][0]
    assert first_try["result"] == "conflict"
    # the integration commit it conflicted with: the other handoff's merge, in full
    landed_first = git(repo, "rev-list", "--first-parent", "main").splitlines()[1]
    assert landed_first in first_try["detail"], first_try
    assert "shared.txt" in first_try["detail"] and "origin/main" in first_try["detail"]
    # the retry's lease had origin/main at that commit, and its base was its own branch
    retry = next(
        r for r in records(record_file) if r["handoff"] == second["name"] and r["attempt"] == 2
    )
    assert retry["integration"] == retry["origin"] == landed_first
    assert landed_first in retry["feedback"]["detail"]
    first = next(
        r for r in records(record_file) if r["handoff"] == second["name"] and r["attempt"] == 1
    )
    assert first["integration"] == first["base"]  # a first attempt starts at the tip
    assert retry["base"] != retry["integration"]  # a retry starts at its own commits
    # the integration branch's history holds both handoffs' work
    log = git(repo, "log", "--format=%s", "main")
    assert "clash-a: write shared.txt" in log and "clash-b: write shared.txt" in log
    shared = git(repo, "show", "main:shared.txt")
    assert "written by clash-a" in shared and "written by clash-b" in shared


def test_a_gate_failure_retry_sees_its_own_change_against_origin_main(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    record_file = tmp_path / "record.jsonl"
    config = write_config(
        tmp_path, repo, gates=gate(CHECK), merge='on_gate_failure = "hold"'
    )
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    env = {"AGENT_RECORD": str(record_file)}
    fixer = start_worker(
        daemon.socket, "repairs.py", tmp_path / "r.log", name="r", extra=["--label", "r"],
        env=env,
    )
    good = start_worker(
        daemon.socket, "good.py", tmp_path / "g.log", name="g", extra=["--label", "g"]
    )
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("fix", labels="r")]})
        wait_for(lambda: states(daemon.socket)["fix"] == "failed", "the gate to fail fix")
        # meanwhile the integration branch moves on
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("other", labels="g")]})
        wait_for(lambda: states(daemon.socket)["other"] == "merged", "other to land")
        control(daemon.socket, "handoff.retry", {"name": "fix"})
        wait_for(lambda: states(daemon.socket)["fix"] == "merged", "the repaired fix to land")
    finally:
        kill_group(fixer)
        kill_group(good)
    first, retry = records(record_file)
    assert first["attempt"] == 1 and first["base"] == first["integration"] == first["origin"]
    tip_when_retried = git(repo, "rev-list", "--first-parent", "main").splitlines()[1]
    assert retry["integration"] == retry["origin"] == tip_when_retried
    detail = control(daemon.socket, "handoff.get", {"name": "fix"})
    assert retry["base"] == detail["reports"][0]["head"]  # the branch with attempt 1
    assert retry["own_change"] == "src/app.py"  # not the other handoff's file
