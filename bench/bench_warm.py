"""Gate time per candidate on a Python project with a real dependency, with and without
``[workspace] keep`` (warm dependencies).

The generated project pins one dependency from the package index in ``requirements.lock``;
``setup`` makes a virtualenv and installs it, and the gate imports it and runs the
project's test. Each side gates the same candidates one after another in the daemon's
gate checkout (:meth:`Workspace.gate_checkout`), each candidate changing the project's
code but not its lock file:

- **baseline**: no ``keep``: the clean between candidates deletes ``.venv``, so every
  candidate pays for ``setup`` (a venv and a ``pip install``) before its gate;
- **ours**: ``keep = [".venv"]``, ``cache_key_files = ["requirements.lock"]``: setup runs
  for the first candidate only; later ones find the ``.venv`` kept under the same key.

Timed per candidate: checkout + clean, setup when it runs, the gate. The first candidate
of each side is left out of the median (both pay setup there). pip's own download cache
is used by both sides alike.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.config import WorkspaceConfig
from orchestrator.git.workspace import Workspace

from . import GIT_ENV, BenchConfig, BenchResult, git

DEPENDENCY = "iniconfig==2.0.0"
SETUP = [
    "sh",
    "-c",
    f'"{sys.executable}" -m venv .venv && .venv/bin/python -m pip install --quiet '
    "--disable-pip-version-check -r requirements.lock",
]
GATE = [".venv/bin/python", "-c", "import iniconfig, app; assert app.answer() == 42"]


def _project(path: Path, candidates: int) -> list[str]:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    (path / "requirements.lock").write_text(DEPENDENCY + "\n")
    (path / "app.py").write_text("def answer():\n    return 42\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "project")
    commits = []
    for i in range(candidates):
        git(path, "checkout", "-q", "-B", f"candidate-{i}", "main")
        (path / "app.py").write_text(f"def answer():\n    return 42  # candidate {i}\n")
        git(path, "commit", "-q", "-am", f"candidate {i}")
        commits.append(git(path, "rev-parse", "HEAD"))
    git(path, "checkout", "-q", "main")
    return commits


def _run(argv: list[str], cwd: Path) -> None:
    subprocess.run(
        argv, cwd=cwd, check=True, capture_output=True, env={**os.environ, **GIT_ENV}
    )


def _gate_times(ws: Workspace, commits: list[str], workspace: WorkspaceConfig) -> list[float]:
    times = []
    for commit in commits:
        t0 = time.perf_counter()
        key = ws.warm_key(commit, workspace) if workspace.keep else None
        checkout = ws.gate_checkout(commit, keep=workspace.keep, key=key)
        if key is None or ws.gate_warm_key(checkout) != key:
            _run(list(workspace.setup), checkout)
            if key is not None:
                ws.mark_gate_warm(checkout, key)
        _run(GATE, checkout)
        times.append(time.perf_counter() - t0)
    return times


def run(config: BenchConfig) -> list[BenchResult]:
    candidates = 1 + config.runs(5)
    repo = config.scratch / "warm-project"
    commits = _project(repo, candidates)
    cold = WorkspaceConfig(setup=tuple(SETUP))
    warm = WorkspaceConfig(
        setup=tuple(SETUP), keep=(".venv",), cache_key_files=("requirements.lock",)
    )
    cold_times = _gate_times(Workspace(repo, "main", config.scratch / "wt-cold"), commits, cold)
    warm_times = _gate_times(Workspace(repo, "main", config.scratch / "wt-warm"), commits, warm)
    return [
        BenchResult(
            name=f"gate per candidate, Python project with {DEPENDENCY}",
            ours="kept .venv (same lock file)",
            ours_s=statistics.median(warm_times[1:]),
            baseline="clean checkout + setup",
            baseline_s=statistics.median(cold_times[1:]),
            runs=candidates - 1,
        )
    ]
