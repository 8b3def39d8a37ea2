"""The merge queue: one at a time, behind real gates, the integration branch never broken."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import git
from harness import (
    Daemon,
    control,
    handoff_doc,
    host_pids,
    kill_group,
    start_worker,
    states,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

# The repository's "test suite": app.answer() must be 42.
CHECK = (
    "import sys; sys.path.insert(0, 'src'); import app; "
    "assert app.answer() == 42, 'answer() is not 42'"
)


def gate(run: list[str], *, name: str = "tests", timeout_s: float = 60) -> str:
    argv = ", ".join(f'"{a}"' for a in run)
    return f'[[gates]]\nname = "{name}"\nrun = [{argv}]\ntimeout_s = {timeout_s}\n'


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def first_parents(repo: Path) -> list[str]:
    return git(repo, "rev-list", "--first-parent", "main").splitlines()


def passes_gate(repo: Path, commit: str, tmp_path: Path) -> bool:
    target = tmp_path / f"check-{commit[:12]}"
    target.mkdir()
    archive = subprocess.run(
        ["git", "archive", commit], cwd=repo, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x"], input=archive, cwd=target, check=True)
    return subprocess.run([sys.executable, "-c", CHECK], cwd=target).returncode == 0


def test_good_breaking_and_conflicting_handoffs(tmp_path: Path, repo: Path) -> None:
    config = write_config(
        tmp_path,
        repo,
        gates=gate([sys.executable, "-c", CHECK]),
        merge='on_conflict = "requeue"\non_gate_failure = "hold"',
    )
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    workers = []
    try:
        control(
            daemon.socket,
            "handoff.submit",
            {
                "markdown": [
                    handoff_doc("good-one", priority="HIGH", labels="good"),
                    handoff_doc("breaker", priority="MEDIUM", labels="breaks"),
                    handoff_doc("clash-a", priority="LOW", labels="conflict"),
                    handoff_doc("clash-b", priority="LOW", labels="conflict"),
                ]
            },
        )
        # Labels route each handoff to the worker whose scripted agent fits it.
        for label, agent in (
            ("good", "good.py"),
            ("breaks", "breaks_tests.py"),
            ("conflict", "conflict.py"),
        ):
            workers.append(
                start_worker(
                    daemon.socket,
                    agent,
                    tmp_path / f"{label}.log",
                    name=label,
                    extra=["--label", label],
                )
            )

        def settled() -> bool:
            s = states(daemon.socket)
            return s == {
                "good-one": "merged",
                "breaker": "failed",
                "clash-a": "merged",
                "clash-b": "merged",
            }

        wait_for(settled, "good and conflicting handoffs merged, the breaking one held")

        breaker = control(daemon.socket, "handoff.get", {"name": "breaker"})
        assert breaker["gates"][-1]["exitStatus"] != 0
        assert "answer() is not 42" in breaker["gates"][-1]["outputTail"]
        breaking_head = breaker["reports"][-1]["head"]
        assert (
            subprocess.run(
                ["git", "merge-base", "--is-ancestor", breaking_head, "main"], cwd=repo
            ).returncode
            == 1
        ), "the breaking commit reached main"

        clash = [control(daemon.socket, "handoff.get", {"name": n}) for n in ("clash-a", "clash-b")]
        second = next(r for r in clash if r["attempt"] == 2)
        assert second["conflicts"] == ["shared.txt"]
        assert [m["result"] for m in second["merges"]] == ["conflict", "merged"]
        assert second["leases"][-1]["attempt"] == 2
        shared = git(repo, "show", "main:shared.txt")
        assert "clash-a" in shared and "clash-b" in shared

        # Every first-parent commit of main passes the gate; one merge per handoff.
        history = first_parents(repo)
        assert len(history) == 4  # initial + good-one + clash-a + clash-b
        for commit in history:
            assert passes_gate(repo, commit, tmp_path), commit
        good = control(daemon.socket, "handoff.get", {"name": "good-one"})
        message = git(repo, "log", "-1", "--format=%B", good["mergeCommit"])
        assert "Handoff: good-one" in message and "Attempt: 1" in message
        assert "Gates: tests" in message
        assert good["mergeCommit"] in history

        status = control(daemon.socket, "status")
        assert status["integrationTip"] == history[0]
        assert status["mergeQueue"] == []

        # The rendered report carries the integration result.
        shown = subprocess.run(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "--socket",
                str(daemon.socket),
                "show",
                "good-one",
                "--markdown",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "## INTEGRATION RESULT" in shown.stdout
        assert good["mergeCommit"] in shown.stdout

        # A person can send the held breaker back: a new attempt with a fresh budget.
        control(daemon.socket, "handoff.retry", {"name": "breaker"})
        retried = control(daemon.socket, "handoff.get", {"name": "breaker"})
        assert retried["attempt"] == breaker["attempt"] + 1
    finally:
        for worker in workers:
            kill_group(worker)
        daemon.stop()


def test_gate_failure_requeues_with_feedback_and_the_repair_lands(
    tmp_path: Path, repo: Path
) -> None:
    config = write_config(tmp_path, repo, gates=gate([sys.executable, "-c", CHECK]))
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "repairs.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("mend")]})
        wait_for(lambda: states(daemon.socket)["mend"] == "merged", "the repaired handoff")
        record = control(daemon.socket, "handoff.get", {"name": "mend"})
        assert record["attempt"] == 2
        assert [m["result"] for m in record["merges"]] == ["gate_failed", "merged"]
        assert [g["exitStatus"] for g in record["gates"]] == [1, 0]
        assert git(repo, "show", "main:src/app.py").count("return 42") == 1
    finally:
        kill_group(worker)
        daemon.stop()


def test_hanging_gate_is_killed_with_its_children(tmp_path: Path, repo: Path) -> None:
    started = tmp_path / "started"
    hang = script(
        tmp_path,
        "hang.py",
        f"""
import os, subprocess, sys, time
if os.environ["ORCHESTRATOR_HANDOFF"] == "stuck":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                              "hang-child"])
    open({str(started)!r}, "w").close()
    time.sleep(600)
""",
    )
    config = write_config(
        tmp_path,
        repo,
        gates=gate([sys.executable, hang], timeout_s=1),
        merge='on_gate_failure = "hold"',
    )
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(
            daemon.socket,
            "handoff.submit",
            {
                "markdown": [
                    handoff_doc("stuck", priority="HIGH"),
                    handoff_doc("after", priority="LOW"),
                ]
            },
        )
        wait_for(
            lambda: states(daemon.socket) == {"stuck": "failed", "after": "merged"},
            "the hanging gate to be killed and the next handoff to land",
        )
        record = control(daemon.socket, "handoff.get", {"name": "stuck"})
        assert record["gates"][0]["timedOut"] is True
        assert "timed out" in record["detail"]
        assert started.exists()
        # Found by their argv: in the gate's PID namespace their own pids mean nothing here.
        wait_for(lambda: not host_pids(hang) and not host_pids("hang-child"),
                 "the gate's processes to be gone")
    finally:
        kill_group(worker)
        daemon.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; it has no one to reap it only in odd setups.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_integration_branch_moved_while_gating_rebuilds_the_candidate(
    tmp_path: Path, repo: Path
) -> None:
    gating, moved = tmp_path / "gating", tmp_path / "moved"
    # The first gate run waits while a person lands a commit on main (a gate itself cannot:
    # the integration repository is read-only to it).
    mover = script(
        tmp_path,
        "mover.py",
        f"""
import time
from pathlib import Path
if not Path({str(gating)!r}).exists():
    Path({str(gating)!r}).write_text("x")
    deadline = time.monotonic() + 60
    while not Path({str(moved)!r}).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
""",
    )
    config = write_config(tmp_path, repo, gates=gate([sys.executable, mover]))
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("racer")]})
        wait_for(gating.exists, "the first gate run")
        (repo / "OUTSIDE.txt").write_text("landed by a person\n")
        git(repo, "add", "OUTSIDE.txt")
        git(repo, "commit", "-q", "-m", "a person's commit")
        moved.write_text("x")
        wait_for(lambda: states(daemon.socket)["racer"] == "merged", "the rebuilt candidate")
        record = control(daemon.socket, "handoff.get", {"name": "racer"})
        candidates = [g["candidate"] for g in record["gates"]]
        assert len(candidates) == 2 and candidates[0] != candidates[1]
        assert record["mergeCommit"] == candidates[1]
        subjects = git(repo, "log", "--first-parent", "--format=%s", "main").splitlines()
        assert subjects[0].startswith("Merge handoff racer")
        assert subjects[1] == "a person's commit"
        assert (repo / "work" / "racer.txt").exists()  # the clean checkout of main was updated
        assert git(repo, "status", "--porcelain") == ""
    finally:
        kill_group(worker)
        daemon.stop()


def test_dirty_checkout_of_the_integration_branch_blocks_merging(
    tmp_path: Path, repo: Path
) -> None:
    config = write_config(tmp_path, repo)
    (repo / "README.md").write_text("a person's unsaved edit\n")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("polite")]})
        blocked = wait_for(
            lambda: control(daemon.socket, "status")["mergeBlocked"], "the merge to be blocked"
        )
        assert "local changes" in blocked and str(repo) in blocked
        assert len(first_parents(repo)) == 1
        assert (repo / "README.md").read_text() == "a person's unsaved edit\n"
        assert any(e["event"] == "merge_blocked" for e in daemon.logs())
        git(repo, "checkout", "README.md")
        wait_for(lambda: states(daemon.socket)["polite"] == "merged", "the merge after cleanup")
        assert control(daemon.socket, "status")["mergeBlocked"] is None
    finally:
        kill_group(worker)
        daemon.stop()


def test_daemon_killed_during_a_gate_gates_again_and_merges_once(
    tmp_path: Path, repo: Path
) -> None:
    started = tmp_path / "gate-started"
    slow = script(
        tmp_path,
        "slow.py",
        f"""
import os, time
from pathlib import Path
marker = Path({str(started)!r})
if not marker.exists():
    marker.write_text(str(os.getpid()))
    time.sleep(600)
""",
    )
    config = write_config(tmp_path, repo, gates=gate([sys.executable, slow], timeout_s=900))
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("survivor")]})
        wait_for(started.exists, "the gate to start")
        assert states(daemon.socket)["survivor"] == "gating"
        daemon.kill()
        for pid in host_pids(slow):  # orphaned by SIGKILL, if it outlived the daemon
            with contextlib.suppress(ProcessLookupError):  # or it died meanwhile
                os.kill(pid, 9)
        daemon.start()
        wait_for(lambda: states(daemon.socket)["survivor"] == "merged", "the merge after restart")
        record = control(daemon.socket, "handoff.get", {"name": "survivor"})
        assert [m["result"] for m in record["merges"]].count("merged") == 1
        assert len(record["gates"]) == 1  # the killed run was never recorded as a result
        merges = git(repo, "log", "--first-parent", "--merges", "--format=%s", "main")
        assert merges.splitlines() == [merges.splitlines()[0]]
        assert "survivor" in merges
        assert any(e["event"] == "gating_interrupted" for e in daemon.logs())
    finally:
        kill_group(worker)
        daemon.stop()


@pytest.mark.parametrize("strategy", ["squash", "ff-only"])
def test_other_strategies(tmp_path: Path, repo: Path, strategy: str) -> None:
    config = write_config(
        tmp_path, repo, gates=gate([sys.executable, "-c", CHECK]), merge=f'strategy = "{strategy}"'
    )
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("straight")]})
        wait_for(lambda: states(daemon.socket)["straight"] == "merged", f"the {strategy} merge")
        tip = git(repo, "rev-parse", "main")
        parents = git(repo, "rev-list", "--parents", "-n", "1", tip).split()[1:]
        assert len(parents) == 1
        branch_tip = git(repo, "rev-parse", "handoff/straight")
        if strategy == "ff-only":
            assert tip == branch_tip
        else:
            assert tip != branch_tip
            assert "Handoff: straight" in git(repo, "log", "-1", "--format=%B", tip)
        assert git(repo, "show", "main:work/straight.txt")
    finally:
        kill_group(worker)
        daemon.stop()


def _report_all_then_merge(tmp_path: Path, repo: Path, docs: list[str], agents: dict[str, str],
                           gates: str, merge: str) -> Daemon:
    """Have every handoff reported while merging is paused, then restart with ``merge``."""
    paused = Daemon(write_config(tmp_path, repo, merge="paused = true"),
                    tmp_path / "paused.log").start()
    control(paused.socket, "handoff.submit", {"markdown": docs})
    for label, agent in agents.items():
        worker = start_worker(paused.socket, agent, tmp_path / f"{label}.log", name=label,
                              extra=["--label", label, "--exit-when-idle"])
        assert worker.wait(timeout=120) == 0
    assert set(states(paused.socket).values()) == {"reported"}
    paused.stop()
    config = write_config(tmp_path, repo, gates=gates, merge=merge)
    return Daemon(config, tmp_path / "daemon.log").start()


def test_speculative_gating_runs_the_train_at_once_and_lands_in_order(
    tmp_path: Path, repo: Path
) -> None:
    started = tmp_path / "started"
    started.mkdir()
    barrier = script(tmp_path, "barrier.py", f"""
import os, sys, time
from pathlib import Path
here = Path({str(started)!r})
(here / os.environ["ORCHESTRATOR_HANDOFF"]).write_text(os.environ["ORCHESTRATOR_CANDIDATE"])
# Passes only if all three candidates are being gated at the same time.
deadline = time.monotonic() + 60
while len(list(here.iterdir())) < 3:
    if time.monotonic() > deadline:
        sys.exit("the other candidates were not gated alongside this one")
    time.sleep(0.05)
""")
    docs = [handoff_doc("train-1", priority="HIGH", labels="good"),
            handoff_doc("train-2", priority="MEDIUM", labels="good"),
            handoff_doc("train-3", priority="LOW", labels="good")]
    daemon = _report_all_then_merge(
        tmp_path, repo, docs, {"good": "good.py"},
        gates=gate([sys.executable, barrier]), merge="speculative_window = 3",
    )
    try:
        wait_for(lambda: set(states(daemon.socket).values()) == {"merged"}, "the train")
        subjects = git(repo, "log", "--first-parent", "--format=%s", "main").splitlines()
        assert [s.split(":")[0] for s in subjects[:3]] == [
            "Merge handoff train-3", "Merge handoff train-2", "Merge handoff train-1"]
        # Each gated candidate is exactly the commit that landed, built on the one ahead.
        for name in ("train-1", "train-2", "train-3"):
            record = control(daemon.socket, "handoff.get", {"name": name})
            assert (started / name).read_text() == record["mergeCommit"]
            assert record["attempt"] == 1 and len(record["gates"]) == 1
        assert git(repo, "rev-parse", "main~1") == control(
            daemon.socket, "handoff.get", {"name": "train-2"})["mergeCommit"]
    finally:
        daemon.stop()


def test_speculation_after_a_failure_is_rebuilt_without_penalty(tmp_path: Path,
                                                                repo: Path) -> None:
    docs = [handoff_doc("first", priority="HIGH", labels="good"),
            handoff_doc("broken", priority="MEDIUM", labels="breaks"),
            handoff_doc("third", priority="LOW", labels="good2")]
    daemon = _report_all_then_merge(
        tmp_path, repo, docs,
        {"good": "good.py", "breaks": "breaks_tests.py", "good2": "good.py"},
        gates=gate([sys.executable, "-c", CHECK]),
        merge='speculative_window = 3\non_gate_failure = "hold"',
    )
    try:
        wait_for(lambda: states(daemon.socket) == {"first": "merged", "broken": "failed",
                                                   "third": "merged"},
                 "the good ones merged around the broken one")
        third = control(daemon.socket, "handoff.get", {"name": "third"})
        assert third["attempt"] == 1
        assert [m["result"] for m in third["merges"]] == ["merged"]
        broken = control(daemon.socket, "handoff.get", {"name": "broken"})
        broken_head = broken["reports"][-1]["head"]
        assert subprocess.run(["git", "merge-base", "--is-ancestor", broken_head, "main"],
                              cwd=repo).returncode == 1
        for commit in first_parents(repo):
            assert passes_gate(repo, commit, tmp_path), commit
    finally:
        daemon.stop()


@pytest.mark.parametrize("cache", [True, False])
def test_the_same_tree_is_gated_once(tmp_path: Path, repo: Path, cache: bool) -> None:
    # While the first gate runs, a person lands an empty commit on main (a gate itself
    # cannot: the repository is read-only in its sandbox): the branch moved, so the
    # candidate is rebuilt, a new commit with the very same tree. The counter, outside
    # the checkout, says how often the gate really ran.
    counter = tmp_path / "gate-runs"
    started, go = tmp_path / "first-gate-started", tmp_path / "go"
    gate_script = script(tmp_path, "count.py", f"""
import os, time
from pathlib import Path
counter = Path({str(counter)!r})
with counter.open("a") as f:
    f.write(os.environ["ORCHESTRATOR_CANDIDATE"] + "\\n")
if len(counter.read_text().splitlines()) == 1:
    Path({str(started)!r}).touch()
    deadline = time.monotonic() + 60
    while not Path({str(go)!r}).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
""")
    config = write_config(tmp_path, repo, gates=gate([sys.executable, gate_script]),
                          merge=f"gate_cache = {'true' if cache else 'false'}")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("twice")]})
        wait_for(started.exists, "the first gate run")
        git(repo, "-c", "user.name=p", "-c", "user.email=p@x", "commit", "-q",
            "--allow-empty", "-m", "an empty commit")
        go.touch()
        wait_for(lambda: states(daemon.socket)["twice"] == "merged", "the rebuilt candidate")
        record = control(daemon.socket, "handoff.get", {"name": "twice"})
        gated = counter.read_text().split()
        first = gated[0]
        assert record["mergeCommit"] != first
        assert git(repo, "rev-parse", f"{first}^{{tree}}") == git(
            repo, "rev-parse", f"{record['mergeCommit']}^{{tree}}")
        cached = [e for e in daemon.logs() if e["event"] == "gate_cached"]
        if cache:
            assert gated == [first], "the same tree was gated twice"
            assert len(record["gates"]) == 1
            assert [e["passed_on"] for e in cached] == [first]
            assert cached[0]["candidate"] == record["mergeCommit"]
        else:
            assert gated == [first, record["mergeCommit"]]
            assert cached == []
        subjects = git(repo, "log", "--first-parent", "--format=%s", "main").splitlines()
        assert subjects[:2] == [subjects[0], "an empty commit"]
        assert subjects[0].startswith("Merge handoff twice")
    finally:
        kill_group(worker)
        daemon.stop()


def test_a_store_from_before_the_gate_cache_gains_it(tmp_path: Path) -> None:
    import sqlite3

    from orchestrator.store.sqlite import Store

    path = tmp_path / "old.sqlite3"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE gate_cache")  # as a store written before the table existed
    conn.commit()
    conn.close()
    store = Store.open(path)
    try:
        assert store.cached_gate_pass("t" * 40, "k") is None
        store.submit([], max_attempts=1, now=1.0)
    finally:
        store.close()


def _scrape(port: int) -> str:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


@pytest.mark.parametrize("retries", [1, 0])
def test_a_flaky_gate_is_retried_on_a_fresh_checkout(tmp_path: Path, repo: Path,
                                                       retries: int) -> None:
    import socket

    counter = tmp_path / "gate-runs"
    flaky = script(tmp_path, "flaky.py", f"""
import sys
from pathlib import Path
counter = Path({str(counter)!r})
runs = len(counter.read_text().splitlines()) if counter.exists() else 0
with counter.open("a") as f:
    f.write("run\\n")
if Path("leftover.txt").exists():
    sys.exit("the retry ran on the failed run's leftovers")
if runs == 0:
    Path("leftover.txt").write_text("left behind by a failed run\\n")
    sys.exit("flaky: fails the first time only")
""")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(
        tmp_path, repo, metrics=f"127.0.0.1:{port}", merge='on_gate_failure = "hold"',
        gates=gate([sys.executable, flaky]) + f"retries = {retries}\n",
    )
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("flake")]})
        want = "merged" if retries else "failed"
        wait_for(lambda: states(daemon.socket)["flake"] == want, f"the handoff {want}")
        record = control(daemon.socket, "handoff.get", {"name": "flake"})
        text = _scrape(port)
        if retries:
            assert [g["exitStatus"] for g in record["gates"]] == [1, 0]
            assert record["gates"][0]["candidate"] == record["gates"][1]["candidate"]
            assert 'orchestrator_gate_retries_total{gate="tests"} 1.0' in text
            assert [e["retry"] for e in daemon.logs() if e["event"] == "gate_retry"] == [1]
        else:
            assert [g["exitStatus"] for g in record["gates"]] == [1]
            assert 'orchestrator_gate_retries_total{gate="tests"}' not in text
            assert len(first_parents(repo)) == 1
    finally:
        kill_group(worker)
        daemon.stop()


def test_gate_retries_are_checked(tmp_path: Path, repo: Path) -> None:
    from orchestrator.config import ConfigError, load

    ok = write_config(tmp_path, repo, gates=gate(["true"]) + "retries = 2\n")
    assert load(ok).gates[0].retries == 2
    for bad in ("-1", "11", "true", "1.5"):
        config = write_config(tmp_path, repo, gates=gate(["true"]) + f"retries = {bad}\n")
        with pytest.raises(ConfigError, match="retries must be a whole number from 0 to 10"):
            load(config)


def test_the_rolling_window_starts_the_next_candidate_when_the_head_lands(
    tmp_path: Path, repo: Path
) -> None:
    # Window 2, three handoffs: roll-2's gate passes only once roll-3's gate has started,
    # which happens only if roll-3 joins the train as soon as roll-1 has landed. A train
    # that waited to empty would gate roll-3 after roll-2, and roll-2 would fail.
    started = tmp_path / "started"
    started.mkdir()
    gate_script = script(tmp_path, "rolling.py", f"""
import os, sys, time
from pathlib import Path
here = Path({str(started)!r})
name = os.environ["ORCHESTRATOR_HANDOFF"]
(here / name).write_text(os.environ["ORCHESTRATOR_CANDIDATE"])
if name == "roll-2":
    deadline = time.monotonic() + 30
    while not (here / "roll-3").exists():
        if time.monotonic() > deadline:
            sys.exit("roll-3 was not gated while roll-2 was")
        time.sleep(0.05)
""")
    docs = [handoff_doc("roll-1", priority="HIGH", labels="good"),
            handoff_doc("roll-2", priority="MEDIUM", labels="good"),
            handoff_doc("roll-3", priority="LOW", labels="good")]
    daemon = _report_all_then_merge(
        tmp_path, repo, docs, {"good": "good.py"},
        gates=gate([sys.executable, gate_script]),
        merge='speculative_window = 2\non_gate_failure = "hold"',
    )
    try:
        wait_for(lambda: set(states(daemon.socket).values()) - {"gating", "reported"},
                 "the train to decide")
        wait_for(lambda: set(states(daemon.socket).values()) == {"merged"}, "all three merged")
        subjects = git(repo, "log", "--first-parent", "--format=%s", "main").splitlines()
        assert [s.split(":")[0] for s in subjects[:3]] == [
            "Merge handoff roll-3", "Merge handoff roll-2", "Merge handoff roll-1"]
        for name in ("roll-1", "roll-2", "roll-3"):
            record = control(daemon.socket, "handoff.get", {"name": name})
            assert (started / name).read_text() == record["mergeCommit"]
            assert len(record["gates"]) == 1
    finally:
        daemon.stop()


def test_the_rolling_window_with_failures_interleaved_lands_only_what_passed(
    tmp_path: Path, repo: Path
) -> None:
    # Failures at positions 1, 4 and 6 of 8, gates of uneven length so that candidates
    # finish out of order: the failed ones never land, the others land once each, in order.
    slow_check = script(tmp_path, "check.py", f"""
import os, time
name = os.environ["ORCHESTRATOR_HANDOFF"]
time.sleep((sum(map(ord, name)) % 4) * 0.15)
exec({CHECK!r})
""")
    order = ["b1", "g1", "g2", "b2", "g3", "b3", "g4", "g5"]
    priority = {"b1": "HIGH", "g1": "HIGH", "g2": "HIGH", "b2": "MEDIUM", "g3": "MEDIUM",
                "b3": "LOW", "g4": "LOW", "g5": "LOW"}
    docs = [handoff_doc(n, priority=priority[n], labels="breaks" if n[0] == "b" else "good")
            for n in order]
    # The breakers report first, so within each priority they are ahead of the good ones.
    daemon = _report_all_then_merge(
        tmp_path, repo, docs, {"breaks": "breaks_tests.py", "good": "good.py"},
        gates=gate([sys.executable, slow_check]),
        merge='speculative_window = 4\non_gate_failure = "hold"',
    )
    try:
        want = {n: "failed" if n[0] == "b" else "merged" for n in order}
        wait_for(lambda: states(daemon.socket) == want, "the good ones merged, the others held")
        goods = [n for n in order if n[0] == "g"]
        records = {n: control(daemon.socket, "handoff.get", {"name": n}) for n in order}
        history = first_parents(repo)
        # One first-parent commit per merged handoff, in queue order, each the one gated.
        assert history[: len(goods)][::-1] == [records[n]["mergeCommit"] for n in goods]
        assert len(history) == len(goods) + 1
        for name in goods:
            assert records[name]["attempt"] == 1
            assert [m["result"] for m in records[name]["merges"]] == ["merged"]
            gated = [g["candidate"] for g in records[name]["gates"] if g["exitStatus"] == 0]
            assert records[name]["mergeCommit"] in gated
        for commit in history:
            assert passes_gate(repo, commit, tmp_path), commit
        for name in order:
            if name[0] == "b":
                head = records[name]["reports"][-1]["head"]
                assert subprocess.run(["git", "merge-base", "--is-ancestor", head, "main"],
                                      cwd=repo).returncode == 1, f"{name} reached main"
                assert [m["result"] for m in records[name]["merges"]][-1] == "gate_failed"
        events = [e["event"] for e in daemon.logs()]
        assert "speculation_discarded" in events  # the window really ran ahead of failures
    finally:
        daemon.stop()


def test_landing_etas_follow_the_position_the_window_and_refusals() -> None:
    from orchestrator.merge.eta import GatingHistory, landing_etas

    history = GatingHistory(candidate_s=(10.0, 30.0, 10.0), refused=0, decided=4)
    queue = ["a", "b", "c", "d", "e"]
    assert landing_etas(queue, history, window=1) == {
        "a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0, "e": 50.0}
    # Window 2: two land per gate time; the head's elapsed time counts down.
    assert landing_etas(queue, history, window=2, head_elapsed_s=4.0) == {
        "a": 6.0, "b": 6.0, "c": 16.0, "d": 16.0, "e": 26.0}
    # One refusal in four decisions: each handoff ahead costs a quarter of a rebuild.
    flaky = GatingHistory(candidate_s=(10.0,), refused=1, decided=4)
    assert landing_etas(["a", "b", "c"], flaky, window=1) == {"a": 10.0, "b": 22.5, "c": 35.0}
    assert landing_etas(queue, GatingHistory((), 0, 0), window=1) == {}
    assert landing_etas(["a"], GatingHistory((), 0, 0), window=1, gated=False) == {"a": 0.0}


def test_queued_handoffs_carry_an_eta_in_get_status_and_metrics(tmp_path: Path,
                                                               repo: Path) -> None:
    import socket

    from orchestrator.store.sqlite import Store

    release = tmp_path / "release"
    hold = script(tmp_path, "hold.py", f"""
import time
from pathlib import Path
deadline = time.monotonic() + 120
while not Path({str(release)!r}).exists() and time.monotonic() < deadline:
    time.sleep(0.05)
""")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = write_config(tmp_path, repo, gates=gate([sys.executable, hold]),
                          metrics=f"127.0.0.1:{port}")
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    worker = None
    try:
        # History to estimate from: three candidates that each took 600 s to gate (a
        # slow gate is faked through the store; waiting for one would take too long).
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("old")]})
        control(daemon.socket, "handoff.cancel", {"name": "old"})
        store = Store.open(tmp_path / "state" / "orchestrator.sqlite3")
        try:
            for i in range(3):
                store.record_gate("old", attempt=1, candidate=f"{i:040x}", gate="tests",
                                  exit_status=0, timed_out=False, duration_s=600.0,
                                  output_tail="", started_at=1.0)
        finally:
            store.close()
        names = ["q1", "q2", "q3"]
        priorities = ["HIGH", "MEDIUM", "LOW"]
        control(daemon.socket, "handoff.submit", {"markdown": [
            handoff_doc(n, priority=p) for n, p in zip(names, priorities, strict=True)]})
        worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
        wait_for(lambda: [states(daemon.socket)[n] for n in names]
                 == ["gating", "reported", "reported"], "q1 gating, the others waiting")
        etas = [control(daemon.socket, "handoff.get", {"name": n})["etaS"] for n in names]
        assert 0 < etas[0] <= 600
        assert etas[1] - etas[0] == pytest.approx(600, abs=1)
        assert etas[2] - etas[1] == pytest.approx(600, abs=1)
        status = control(daemon.socket, "status")
        assert list(status["mergeQueueEtaS"]) == names
        assert status["mergeQueueEtaS"]["q3"] == pytest.approx(etas[2], abs=60)
        gauge = [line for line in _scrape(port).splitlines()
                 if line.startswith("orchestrator_merge_queue_eta_seconds ")]
        assert len(gauge) == 1 and float(gauge[0].split()[1]) == pytest.approx(etas[2], abs=60)
        shown = subprocess.run(
            [sys.executable, "-m", "orchestrator", "--socket", str(daemon.socket), "show", "q2"],
            capture_output=True, text=True, timeout=60)
        assert "expected to land in ~" in shown.stdout
        release.write_text("go")
        wait_for(lambda: all(states(daemon.socket)[n] == "merged" for n in names), "merged")
        assert control(daemon.socket, "handoff.get", {"name": "q3"})["etaS"] is None
        assert control(daemon.socket, "status")["mergeQueueEtaS"] == {}
    finally:
        if worker is not None:
            kill_group(worker)
        daemon.stop()


def _counting_check(tmp_path: Path, counter: Path) -> str:
    """The CHECK gate, also appending the candidate and its batch to ``counter``."""
    return script(tmp_path, "counting.py", f"""
import os
with open({str(counter)!r}, "a") as f:
    f.write(os.environ["ORCHESTRATOR_CANDIDATE"] + " "
            + os.environ.get("ORCHESTRATOR_BATCH", os.environ["ORCHESTRATOR_HANDOFF"]) + "\\n")
exec({CHECK!r})
""")


def test_a_batch_is_gated_once_and_lands_one_commit_per_handoff(tmp_path: Path,
                                                                 repo: Path) -> None:
    counter = tmp_path / "gate-runs"
    names = [f"batch-{i}" for i in range(1, 5)]
    docs = [handoff_doc(n, labels="good") for n in names]
    daemon = _report_all_then_merge(
        tmp_path, repo, docs, {"good": "good.py"},
        gates=gate([sys.executable, _counting_check(tmp_path, counter)]),
        merge="max_batch = 4",
    )
    try:
        wait_for(lambda: set(states(daemon.socket).values()) == {"merged"}, "the batch")
        runs = counter.read_text().splitlines()
        assert runs == [f"{git(repo, 'rev-parse', 'main')} {' '.join(names)}"]
        history = first_parents(repo)
        assert len(history) == 5
        records = [control(daemon.socket, "handoff.get", {"name": n}) for n in names]
        assert [r["mergeCommit"] for r in records] == history[:4][::-1]
        for record in records:
            message = git(repo, "log", "-1", "--format=%B", record["mergeCommit"])
            assert f"Gated: in a batch of 4: {', '.join(names)}" in message
            assert [g["candidate"] for g in record["gates"]] == [history[0]]
    finally:
        daemon.stop()


def test_a_failed_batch_is_bisected_the_culprit_refused_the_rest_landed(
    tmp_path: Path, repo: Path
) -> None:
    counter = tmp_path / "gate-runs"
    order = ["p1", "p2", "p3", "bad", "p4", "p5"]
    docs = [handoff_doc(n, priority="HIGH" if n in ("p1", "p2", "p3") else "LOW",
                        labels="breaks" if n == "bad" else "good") for n in order]
    # Breakers report first within a priority: HIGH p1 p2 p3, then LOW bad p4 p5.
    daemon = _report_all_then_merge(
        tmp_path, repo, docs, {"breaks": "breaks_tests.py", "good": "good.py"},
        gates=gate([sys.executable, _counting_check(tmp_path, counter)]),
        merge='max_batch = 8\nspeculative_window = 2\non_gate_failure = "hold"',
    )
    try:
        want = {n: "failed" if n == "bad" else "merged" for n in order}
        wait_for(lambda: states(daemon.socket) == want, "the culprit found and refused")
        bad = control(daemon.socket, "handoff.get", {"name": "bad"})
        assert bad["attempt"] == 1 and [m["result"] for m in bad["merges"]] == ["gate_failed"]
        assert "answer() is not 42" in bad["feedback"]["log"]
        assert subprocess.run(["git", "merge-base", "--is-ancestor", bad["reports"][-1]["head"],
                               "main"], cwd=repo).returncode == 1
        goods = [n for n in order if n != "bad"]
        records = {n: control(daemon.socket, "handoff.get", {"name": n}) for n in goods}
        history = first_parents(repo)
        assert len(history) == len(goods) + 1
        assert history[: len(goods)][::-1] == [records[n]["mergeCommit"] for n in goods]
        # Every commit on the first-parent line passes, and each landing's tip was gated.
        gated = {line.split()[0]: line.split()[1:] for line in counter.read_text().splitlines()}
        for commit in history:
            assert passes_gate(repo, commit, tmp_path), commit
        landed_tips = {records[n]["mergeCommit"] for n in goods
                       if "Gated: alone" in git(repo, "log", "-1", "--format=%B",
                                                 records[n]["mergeCommit"])}
        assert landed_tips <= set(gated)
        assert history[0] in gated
        assert gated[next(c for c, b in gated.items() if b == ["bad"])] == ["bad"]
        assert any(e["event"] == "batch_failed" for e in daemon.logs())
    finally:
        daemon.stop()


def test_a_failed_batch_is_split_in_as_many_parts_as_gate_slots(
    tmp_path: Path, repo: Path
) -> None:
    # 8 in one batch, 4 slots: the failed batch comes back as 4 parts of 2, gated side by
    # side (not halves, then quarters); the culprit is still refused alone, the rest land,
    # and every landed tip was gated.
    counter = tmp_path / "gate-runs"
    order = ["q1", "q2", "q3", "q4", "q5", "bad", "q6", "q7"]
    docs = [handoff_doc(n, priority="HIGH" if n != "bad" else "LOW",
                        labels="breaks" if n == "bad" else "good") for n in order]
    daemon = _report_all_then_merge(
        tmp_path, repo, docs, {"breaks": "breaks_tests.py", "good": "good.py"},
        gates=gate([sys.executable, _counting_check(tmp_path, counter)]),
        merge='max_batch = 8\nspeculative_window = 4\non_gate_failure = "hold"',
    )
    try:
        want = {n: "failed" if n == "bad" else "merged" for n in order}
        wait_for(lambda: states(daemon.socket) == want, "the culprit found and refused")
        failed = [e for e in daemon.logs() if e["event"] == "batch_failed"]
        assert failed and len(failed[0]["batch"]) == 8
        assert failed[0]["detail"] == "bisecting: batches of 2 next"
        gated = {line.split()[0]: line.split()[1:] for line in counter.read_text().splitlines()}
        assert [b for b in gated.values() if len(b) == 2]  # the parts of 2 were gated
        history = first_parents(repo)
        for commit in history:
            assert passes_gate(repo, commit, tmp_path), commit
        goods = [n for n in order if n != "bad"]
        tips = {control(daemon.socket, "handoff.get", {"name": n})["mergeCommit"] for n in goods}
        assert history[0] in gated and history[0] in tips
    finally:
        daemon.stop()
