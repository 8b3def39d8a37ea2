"""Gates run the agents' code: each gate sees exactly its candidate, can touch nothing but
its own checkout, and leaves no process behind (docs/security.md, the threat model)."""

from __future__ import annotations

import os
import signal
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


def _bwrap_usable() -> bool:
    try:
        return subprocess.run(
            ["bwrap", "--unshare-pid", "--bind", "/", "/", "--proc", "/proc", "true"],
            capture_output=True, timeout=30,
        ).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_bwrap = pytest.mark.skipif(
    not _bwrap_usable(), reason="bubblewrap is not installed or namespaces are not allowed here"
)

# On the planter's candidate the gate leaves two processes behind: one in a session of its
# own (setsid) and one double-forked (its parent exits, so it is orphaned). Both would keep
# rewriting the gate checkout with a good src/app.py, for a later breaking candidate's gate
# to pass on.
LINGER = """\
import os, sys, time
tag = sys.argv[1]
open(os.path.join(sys.argv[2], tag), "w").close()
while True:
    try:
        with open(f"src/.{tag}", "w") as f:
            f.write("def answer():\\n    return 42\\n")
        os.replace(f"src/.{tag}", "src/app.py")
    except OSError:
        pass
    time.sleep(0.01)
"""
LINGERING_GATE = """\
import os, subprocess, sys
marks = {marks!r}
if os.environ["ORCHESTRATOR_HANDOFF"] == "planter":
    linger = {linger!r}
    subprocess.Popen([sys.executable, "-c", linger, "linger-setsid", marks],
                     start_new_session=True)
    subprocess.Popen([sys.executable, "-c",
                      "import subprocess, sys; subprocess.Popen(sys.argv[1:])",
                      sys.executable, "-c", linger, "linger-double", marks])
    import time
    deadline = time.monotonic() + 30
    while len(os.listdir(marks)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
sys.path.insert(0, "src")
import app
assert app.answer() == 42, "answer() is not 42"
"""


@pytest.mark.parametrize("isolation", [
    pytest.param("auto", marks=needs_bwrap),  # a PID namespace
    "processes",  # the fallback: the supervisor as a child subreaper
])
def test_setsid_and_double_forked_gate_processes_die_when_the_gate_ends(
    tmp_path: Path, repo: Path, isolation: str
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    body = LINGERING_GATE.format(marks=str(marks), linger=LINGER)
    config = write_config(
        tmp_path, repo, gates=_gate(tmp_path, body),
        merge=f'on_gate_failure = "hold"\ngate_isolation = "{isolation}"',
    )
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    workers = [
        start_worker(daemon.socket, "good.py", tmp_path / "good.log", name="good",
                     extra=["--label", "good"]),
    ]
    try:
        control(daemon.socket, "handoff.submit",
                {"markdown": [handoff_doc("planter", labels="good")]})
        wait_for(lambda: states(daemon.socket) == {"planter": "merged"}, "the planter merged")
        assert sorted(p.name for p in marks.iterdir()) == ["linger-double", "linger-setsid"]
        wait_for(lambda: not host_pids("linger-"), "the gate's lingering processes to be gone")
        mode = control(daemon.socket, "status")["gateIsolation"]
        assert mode["mode"] == ("bwrap" if isolation == "auto" else "processes")
        assert mode["namespaces"] is (isolation == "auto")
        events = [e for e in daemon.logs() if e["event"] == "gate_isolation"]
        assert events and events[0]["mode"] == mode["mode"]
        shown = subprocess.run(
            [sys.executable, "-m", "orchestrator", "--socket", str(daemon.socket), "status"],
            capture_output=True, text=True, timeout=60,
        )
        assert ("GATES NOT SANDBOXED" in shown.stdout) is (isolation == "processes"), shown
        # And so the next candidate is judged on its own files.
        workers.append(start_worker(daemon.socket, "breaks_tests.py", tmp_path / "bad.log",
                                    name="bad", extra=["--label", "breaks"]))
        control(daemon.socket, "handoff.submit",
                {"markdown": [handoff_doc("breaker", labels="breaks")]})
        wait_for(lambda: states(daemon.socket)["breaker"] == "failed", "the breaker to fail")
    finally:
        for worker in workers:
            kill_group(worker)
        daemon.stop()
        for pid in host_pids("linger-"):
            os.kill(pid, signal.SIGKILL)


# The gate tries every way at the daemon's things: a ref and a file in the integration
# repository, the store, and the daemon's socket. It reports what worked and passes.
ESCAPING_GATE = """\
import os, socket, subprocess
repo, state = {repo!r}, {state!r}
done = []
r = subprocess.run(["git", "-C", repo, "update-ref", "refs/heads/pwned", "HEAD"],
                   capture_output=True)
if r.returncode == 0:
    done.append("update-ref")
r = subprocess.run(["git", "update-ref", "refs/heads/pwned-too", "HEAD"], capture_output=True)
if r.returncode == 0:
    done.append("update-ref from the checkout")
for path in (os.path.join(repo, ".git", "PWNED"), os.path.join(repo, "PWNED"),
             os.path.join(state, "worktrees", "PWNED")):
    try:
        open(path, "w").write("x")
        done.append(path)
    except OSError:
        pass
try:
    with open(os.path.join(state, "orchestrator.sqlite3"), "r+b") as f:
        f.seek(0, 2)
        f.write(b"PWNED")
    done.append("store")
except OSError:
    pass
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(state, "d.sock"))
    done.append("socket")
except OSError:
    pass
open("gate-wrote-its-checkout", "w").write("fine")
print("ESCAPED:", done)
"""


# A bwrap that refuses PID namespaces, as under the shipped systemd unit
# (RestrictNamespaces=user mnt): the fences must hold without one.
NO_PID_NAMESPACE_BWRAP = """#!/bin/sh
for arg in "$@"; do
  if [ "$arg" = --unshare-pid ]; then
    echo "bwrap: Creating new namespace failed: Operation not permitted" >&2; exit 1
  fi
done
exec /usr/bin/bwrap "$@"
"""


@needs_bwrap
@pytest.mark.parametrize("pid_namespace", [True, False], ids=["pid-namespace", "no-pid-namespace"])
def test_a_gate_cannot_write_the_integration_repository_the_store_or_reach_the_socket(
    tmp_path: Path, repo: Path, pid_namespace: bool
) -> None:
    state = tmp_path / "state"
    body = ESCAPING_GATE.format(repo=str(repo), state=str(state))
    config = write_config(tmp_path, repo, gates=_gate(tmp_path, body))
    env = None
    if not pid_namespace:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "bwrap").write_text(NO_PID_NAMESPACE_BWRAP)
        (bin_dir / "bwrap").chmod(0o755)
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    daemon = Daemon(config, tmp_path / "daemon.log", env=env).start()
    worker = start_worker(daemon.socket, "good.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("escaper")]})
        wait_for(lambda: states(daemon.socket) == {"escaper": "merged"}, "the escaper merged")
        isolation = control(daemon.socket, "status")["gateIsolation"]
        assert isolation["mode"] == "bwrap", isolation
        assert ("without a PID namespace" in isolation["detail"]) is not pid_namespace
        record = control(daemon.socket, "handoff.get", {"name": "escaper"})
        assert "ESCAPED: []" in record["gates"][0]["outputTail"], record["gates"][0]
    finally:
        kill_group(worker)
        daemon.stop()
    assert "pwned" not in git(repo, "for-each-ref", "--format=%(refname)")
    assert not (repo / ".git" / "PWNED").exists() and not (repo / "PWNED").exists()
    assert not (state / "worktrees" / "PWNED").exists()
    assert b"PWNED" not in (state / "orchestrator.sqlite3").read_bytes()


def test_without_working_namespaces_auto_falls_back_and_says_why(tmp_path: Path) -> None:
    from orchestrator.merge.gates import GateFences, detect_isolation

    fences = GateFences(read_only=(tmp_path,), hidden=())
    broken = tmp_path / "bwrap"
    broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\n"
                      "exit 1\n")
    broken.chmod(0o755)
    for mode in ("auto", "bwrap"):
        found = detect_isolation(mode, fences, tmp_path, bwrap=str(broken))
        assert (found.mode, found.namespaces) == ("processes", False)
        assert "No permissions to create new namespace" in found.detail
        assert found.prefix(tmp_path) == []
    assert not detect_isolation("processes", fences, tmp_path).namespaces


def test_an_unknown_gate_isolation_is_a_config_error(tmp_path: Path, repo: Path) -> None:
    from orchestrator import config as config_file

    path = write_config(tmp_path, repo, merge='gate_isolation = "chroot"')
    with pytest.raises(config_file.ConfigError, match=r"merge\.gate_isolation must be one of"):
        config_file.load(path)
