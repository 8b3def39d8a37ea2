"""Chaos: SIGKILL the daemon at random moments while four workers and a gate run 30
handoffs, restart it each time, and check that nothing was lost, nothing landed twice and
nothing landed unchecked.

The kill schedule comes from a seeded ``random.Random``, so a failing seed can be rerun.
Half of the kills are aimed: they wait until some handoff is ``gating`` (the riskiest
stretch: candidate built, gates running, ref about to move) and strike a random moment
later. The other half strike at a random moment, whatever is going on.

Size and seeds come from the environment, so ``make test`` runs one short seed and
``make chaos`` the long version (see docs/reliability.md)::

    CHAOS_SEEDS="1 2 3" CHAOS_KILLS=20 CHAOS_HANDOFFS=30 pytest tests/test_chaos.py
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import git
from harness import Daemon, control, handoff_doc, kill_group, start_worker, wait_for, write_config

pytestmark = pytest.mark.slow

SEEDS = [int(s) for s in os.environ.get("CHAOS_SEEDS", "1").split()]
KILLS = int(os.environ.get("CHAOS_KILLS", "10"))
HANDOFFS = int(os.environ.get("CHAOS_HANDOFFS", "30"))
WORKERS = int(os.environ.get("CHAOS_WORKERS", "4"))

# The gate: the sample's answer() is intact and no handoff's file says BROKEN (what the
# chaos agent writes on a "-flaky" handoff's first attempt).
GATE = """\
import pathlib, sys
sys.path.insert(0, "src")
import app
assert app.answer() == 42, "answer() is not 42"
bad = [p.name for p in pathlib.Path("work").glob("*.txt") if "BROKEN" in p.read_text()]
assert not bad, f"broken work: {bad}"
"""


def _names(rng: random.Random) -> list[str]:
    # Every fifth handoff is flaky: it fails its gate once and repairs from the feedback.
    return [f"chaos-{i:02d}{'-flaky' if i % 5 == 3 else ''}" for i in range(HANDOFFS)]


def _tail(daemon: Daemon, lines: int = 40) -> str:
    return "\n".join(daemon.log_path.read_text(errors="replace").splitlines()[-lines:])


def _states(daemon: Daemon) -> dict[str, str]:
    try:
        return {h["name"]: h["state"] for h in control(daemon.socket, "handoff.list")["handoffs"]}
    except (OSError, AssertionError, ValueError):
        return {}  # the daemon is between a kill and its restart


# "batch": the rolling train of 3 with batches of up to 4, bisected when one fails.
MODES = {"one": "", "batch": "speculative_window = 3\nmax_batch = 4"}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("seed", SEEDS)
def test_chaos_sigkill_loses_nothing_lands_once_and_lands_only_gated(
    tmp_path: Path, repo: Path, seed: int, mode: str
) -> None:
    rng = random.Random(seed)
    gate_script = tmp_path / "gate.py"
    gate_script.write_text(GATE)
    gates = f'[[gates]]\nname = "check"\nrun = ["{sys.executable}", "{gate_script}"]\n'
    # max_attempts is generous: a lease may expire while the daemon is down (that costs
    # an attempt by design); the flaky handoffs spend one more on their failed gate.
    config = write_config(tmp_path, repo, gates=gates, ttl_s=5, heartbeat_s=0.3,
                          max_attempts=8, merge=MODES[mode])
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    names = _names(rng)
    docs = []
    for i, name in enumerate(names):
        # A few dependency chains, so "waiting" handoffs must be released across crashes.
        deps = names[i - 1] if i % 7 == 6 else "none"
        docs.append(handoff_doc(name, priority=rng.choice(["HIGH", "MEDIUM", "LOW"]), deps=deps))
    # Submitted in three waves, the later ones between kills, so submissions meet restarts
    # too.
    waves = [docs[w * len(docs) // 3 : (w + 1) * len(docs) // 3] for w in range(3)]
    control(daemon.socket, "handoff.submit", {"markdown": waves[0]})
    workers = [
        start_worker(daemon.socket, "chaos.py", tmp_path / f"w{i}.log", name=f"w{i}")
        for i in range(WORKERS)
    ]
    kills = aimed = during_work = 0
    try:
        while kills < KILLS:
            if rng.random() < 0.5:
                aimed += 1
                # Aimed: some handoff is mid-gate (if the work is not all done already).
                wait_for(
                    lambda: "gating" in _states(daemon).values()
                    or set(_states(daemon).values()) == {"merged"},
                    "a handoff to be gating",
                )
                time.sleep(rng.uniform(0.0, 0.4))
            else:
                time.sleep(rng.uniform(0.05, 0.8))
            # Counted as "during the work" if anything was still short of merged.
            during_work += set(_states(daemon).values()) != {"merged"}
            # Only our kills may end it: a daemon that died by itself is a failure.
            assert daemon.process is not None and daemon.process.poll() is None, (
                f"the daemon died by itself (exit {daemon.process.returncode}) after {kills} "
                f"kills (seed {seed}):\n{_tail(daemon)}"
            )
            daemon.kill()
            kills += 1
            daemon.start()
            for wave in (1, 2):
                # Early in the schedule: the work is quick, and the pipeline should stay full
                # for most of the kills.
                if kills == max(1, wave * KILLS // 5):
                    control(daemon.socket, "handoff.submit", {"markdown": waves[wave]})
        wait_for(
            lambda: set(_states(daemon).values()) == {"merged"},
            f"every handoff merged after {kills} kills (seed {seed})",
            timeout=300,
        )
        status = control(daemon.socket, "status")
    finally:
        for worker in workers:
            kill_group(worker)
        daemon.stop()

    # The kills did strike while there was work in flight (not after it was all done).
    # (Most of them: a long schedule may outlast the work, which is quick.)
    assert during_work >= min(KILLS, 10) * 2 // 3, (
        f"only {during_work} of {kills} kills hit work in flight"
    )

    # Nothing lost: every submitted handoff is there and merged, with its work on main.
    assert sorted(_names(random.Random(seed))) == sorted(names)
    assert status["counts"]["merged"] == HANDOFFS, status["counts"]
    for name in names:
        assert git(repo, "show", f"main:work/{name}.txt").startswith("done"), name

    # Each merged exactly once: one merge commit per handoff on the first-parent line.
    subjects = git(repo, "log", "--first-parent", "--merges", "--format=%s", "main").splitlines()
    landed = [s.split(":")[0].removeprefix("Merge handoff ") for s in subjects]
    assert sorted(landed) == sorted(names), sorted(landed)

    db = sqlite3.connect(tmp_path / "state" / "orchestrator.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        merged_rows = dict(
            db.execute("SELECT handoff, COUNT(*) FROM merges WHERE result = 'merged' GROUP BY 1")
        )
        assert merged_rows == dict.fromkeys(names, 1), merged_rows
        # The store's merge commit for each handoff is the one on main.
        first_parent = git(repo, "rev-list", "--first-parent", "main").splitlines()
        for name, commit in db.execute("SELECT name, merge_commit FROM handoffs"):
            assert commit in first_parent, (name, commit)
        # Every first-parent commit (but the initial one) passed every gate, as recorded.
        passed = {
            row[0]
            for row in db.execute(
                "SELECT candidate FROM gate_runs WHERE gate = 'check' AND exit_status = 0"
                " AND timed_out = 0"
            )
        }
        # A pass counts for its tree: the gate cache reuses it for a rebuilt candidate of
        # the same tree (after a restart, say) without running or recording it again.
        passed_trees = set(git(repo, "show", "-s", "--format=%T", *passed).split())

        def gated(commit: str) -> bool:
            return git(repo, "show", "-s", "--format=%T", commit) in passed_trees

        # In a batch, a commit was gated as part of its batch: the batch's tip, at most
        # N-1 commits later on the first-parent line, passed.
        for index, commit in enumerate(first_parent[:-1]):
            trailer = git(repo, "log", "-1", "--format=%(trailers:key=Gated,valueonly)", commit)
            size = int(trailer.split()[4].rstrip(":")) if trailer.startswith("in a batch") else 1
            later = first_parent[max(0, index - size + 1) : index + 1]
            assert any(gated(c) for c in later), (
                f"{commit} is on main but neither it nor its batch passed the gate")
        # The flaky handoffs did fail their gate once, as their script meant.
        failed = {row[0] for row in db.execute(
            "SELECT handoff FROM merges WHERE result = 'gate_failed'")}
        assert {n for n in names if "-flaky" in n} <= failed
        # No lease left open.
        open_leases = db.execute("SELECT id, handoff FROM leases WHERE ended_at IS NULL").fetchall()
        assert open_leases == []
    finally:
        db.close()

    # ... and the gate's verdict holds when rerun on each of those commits.
    for commit in first_parent[:-1]:
        tree = tmp_path / f"check-{commit[:10]}"
        tree.mkdir()
        archive = subprocess.run(
            ["git", "archive", commit], cwd=repo, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x"], input=archive, cwd=tree, check=True)
        assert subprocess.run([sys.executable, str(gate_script)], cwd=tree).returncode == 0

    # No orphaned worktree: only the pool and the gate checkouts remain under worktrees/,
    # and every worktree git knows of still exists.
    worktrees = tmp_path / "state" / "worktrees"
    leftovers = [p.name for p in worktrees.iterdir() if not p.name.startswith(".")]
    assert leftovers == [], f"worktrees left behind by merged handoffs: {leftovers}"
    listing = git(repo, "worktree", "list", "--porcelain").split("\n\n")
    assert not [w for w in listing if "prunable" in w], listing

    # The figures for docs/reliability.md: what the restarts had to repair.
    logged = Counter(str(e.get("event")) for e in daemon.logs())
    recovery = {k: v for k, v in logged.items() if k.startswith("reconcile_") or k in (
        "gating_interrupted", "merge_recovered", "landing_not_done", "lease_expired",
        "checkout_update_finished")}
    figures = {"seed": seed, "kills": kills, "handoffs": HANDOFFS, "aimed_at_gating": aimed,
               "during_work": during_work, **recovery}
    print(json.dumps(figures, sort_keys=True))
