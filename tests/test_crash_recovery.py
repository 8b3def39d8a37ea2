"""SIGKILL the daemon again and again while workers and gates run: after each restart it
carries on, and in the end every handoff is merged exactly once and main never broke."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import git
from harness import Daemon, control, handoff_doc, kill_group, start_worker, wait_for, write_config

pytestmark = pytest.mark.slow

CHECK = (
    "import sys; sys.path.insert(0, 'src'); import app; "
    "assert app.answer() == 42, 'answer() is not 42'"
)
NAMES = [f"crash-{i}" for i in range(10)]


def _states(daemon: Daemon) -> dict[str, str]:
    try:
        return {h["name"]: h["state"] for h in control(daemon.socket, "handoff.list")["handoffs"]}
    except (OSError, AssertionError):
        return {}


@pytest.mark.parametrize("seed", [2, 3, 7])
def test_repeated_sigkill_loses_nothing_and_merges_once(tmp_path: Path, repo: Path,
                                                        seed: int) -> None:
    rng = random.Random(seed)
    gates = f'[[gates]]\nname = "tests"\nrun = ["{sys.executable}", "-c", "{CHECK}"]\n'
    config = write_config(tmp_path, repo, gates=gates, ttl_s=5, heartbeat_s=0.3)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    control(daemon.socket, "handoff.submit",
            {"markdown": [handoff_doc(n, priority=rng.choice(["HIGH", "LOW"])) for n in NAMES]})
    workers = [start_worker(daemon.socket, "good.py", tmp_path / f"w{i}.log", name=f"w{i}")
               for i in range(2)]
    try:
        for _ in range(5):
            time.sleep(rng.uniform(0.2, 1.2))
            daemon.kill()
            daemon.start()
        wait_for(lambda: set(_states(daemon).values()) == {"merged"},
                 "every handoff merged after the crashes", timeout=180)
    finally:
        for worker in workers:
            kill_group(worker)
        daemon.stop()

    merges = git(repo, "log", "--first-parent", "--merges", "--format=%s", "main").splitlines()
    assert sorted(m.split(":")[0].removeprefix("Merge handoff ") for m in merges) == NAMES
    for commit in git(repo, "rev-list", "--first-parent", "main").splitlines():
        tree = tmp_path / f"check-{commit[:10]}"
        tree.mkdir()
        archive = subprocess.run(["git", "archive", commit], cwd=repo, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x"], input=archive, cwd=tree, check=True)
        assert subprocess.run([sys.executable, "-c", CHECK], cwd=tree).returncode == 0
