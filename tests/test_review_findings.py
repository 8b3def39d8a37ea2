"""Hostile review: holes found in the merged code, each a test that fails without its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Conn, control, handoff_doc
from test_identity import _agent, _worker_calls, daemon  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def test_lease_ask_is_bound_to_the_uid_that_acquired_the_lease(
    daemon: tuple[object, Path],  # noqa: F811
) -> None:
    _, sock = daemon
    control(sock, "handoff.submit", {"markdown": [handoff_doc("asked")]})
    holder = Conn(sock)
    try:
        holder.initialize("worker", name="w")
        lease = holder.request("lease.acquire", {"waitS": 30})["result"]["lease"]
        ident = {"leaseId": lease["id"], "token": lease["token"]}
        agent = _agent()
        replies = _worker_calls(
            sock, agent.pw_uid, agent.pw_gid, "w",
            [["lease.ask", {**ident, "question": "forged: merge without tests?",
                            "choices": ["yes", "no"]}]],
        )
        # Every other lease method refuses another uid with -32001 (test_identity.py).
        assert replies[1] is not None and replies[1].get("error", {}).get("code") == -32001, (
            replies)
    finally:
        holder.close()


# The gate runs the repository's own check through a runner that setup installs in the
# kept .venv (as `.venv/bin/pytest` would be): realistic for [workspace] keep.
_SETUP = (
    "import pathlib; v = pathlib.Path('.venv'); v.mkdir(); (v / 'runner.py').write_text("
    "'import subprocess, sys\\nsys.exit(subprocess.call([sys.executable, \"check.py\"]))\\n')"
)
_CHECK = "import sys\nsys.path.insert(0, 'src')\nimport app\nassert app.answer() == 42\n"


def test_a_refused_candidate_cannot_make_a_later_broken_one_pass(
    tmp_path: Path, repo: Path
) -> None:
    import sys

    from conftest import git
    from harness import Daemon, kill_group, start_worker, states, wait_for, write_config

    (repo / "deps.lock").write_text("v1\n")
    (repo / "check.py").write_text(_CHECK)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "check and lock")
    gates = f"""
[workspace]
setup = ["{sys.executable}", "-c", '''{_SETUP}''']
keep = [".venv"]
cache_key_files = ["deps.lock"]
[[gates]]
name = "tests"
run = ["{sys.executable}", ".venv/runner.py"]
timeout_s = 120
"""
    config = write_config(tmp_path, repo, gates=gates, merge='on_gate_failure = "hold"')
    running = Daemon(config, tmp_path / "daemon.log").start()
    sock = running.socket
    log = tmp_path / "worker.log"

    def run(agent: str, name: str) -> str:
        control(sock, "handoff.submit", {"markdown": [handoff_doc(name)]})
        worker = start_worker(sock, agent, log, extra=["--max-handoffs", "1"])
        try:
            assert worker.wait(timeout=120) == 0, log.read_text()
            wait_for(lambda: states(sock)[name] in ("merged", "failed", "conflict", "held"),
                     f"{name} to be gated")
        finally:
            kill_group(worker)
        return states(sock)[name]

    try:
        assert run("good.py", "warm") == "merged"  # setup builds the kept .venv
        assert run("review_poisons_kept.py", "poison") != "merged"  # refused
        # A change that breaks check.py's assertion must not pass the gate.
        assert run("breaks_tests.py", "broken") != "merged", (
            control(sock, "handoff.get", {"name": "broken"})["gates"])
    finally:
        running.stop()


def test_a_fifo_in_a_lease_git_dir_does_not_wedge_other_workers(
    tmp_path: Path, repo: Path
) -> None:
    import contextlib
    import os
    import signal
    import time

    from harness import Daemon, host_pids, write_config

    config = write_config(tmp_path, repo, merge="paused = true")
    running = Daemon(config, tmp_path / "daemon.log").start()
    sock = running.socket
    fifo = None
    holder, other = Conn(sock), Conn(sock)
    try:
        control(sock, "handoff.submit", {"markdown": [handoff_doc("a"), handoff_doc("b")]})
        holder.initialize("worker", name="attacker")
        lease = holder.request("lease.acquire", {"waitS": 30})["result"]["lease"]
        fifo = Path(lease["worktree"]) / ".git" / "packed-refs"
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo)  # what the agent, which writes its lease directory, can do
        reply = holder.request(
            "lease.heartbeat", {"leaseId": lease["id"], "token": lease["token"], "head": "ab" * 20}
        )
        assert "result" in reply, reply
        other.initialize("worker", name="victim")
        other.sock.settimeout(20)
        try:
            got = other.request("lease.acquire", {"waitS": 0})
        except TimeoutError:
            got = None
        assert got is not None and got["result"]["lease"] is not None, (
            "another worker's lease.acquire waited on the attacker's hung git fetch")
    finally:
        holder.close()
        other.close()
        # The hung git (a child of the daemon, reading the FIFO) is ended by its pid, so
        # the daemon can stop and nothing is left behind.
        def hung() -> list[int]:
            return host_pids(str(tmp_path / "state" / "worktrees" / "a" / ".git"))

        for _ in range(50):  # a heartbeat queued meanwhile may start another fetch
            pids = hung()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not pids:
                break
            time.sleep(0.1)
        if fifo is not None:
            fifo.unlink(missing_ok=True)
        running.stop()


def test_a_gate_cannot_leave_a_fifo_that_wedges_the_next_checkout(
    tmp_path: Path, repo: Path
) -> None:
    import contextlib
    import os
    import signal
    import sys
    import time

    from conftest import git
    from harness import Daemon, host_pids, kill_group, start_worker, states, wait_for, write_config

    (repo / "check.py").write_text("pass\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "check")
    gates = f"""
[[gates]]
name = "tests"
run = ["{sys.executable}", "check.py"]
timeout_s = 60
"""
    running = Daemon(write_config(tmp_path, repo, gates=gates), tmp_path / "daemon.log").start()
    sock = running.socket
    log = tmp_path / "worker.log"
    gate_dir = str(tmp_path / "state" / "worktrees" / ".gate")
    try:
        control(sock, "handoff.submit", {"markdown": [handoff_doc("fifo")]})
        worker = start_worker(sock, "review_fifo_gate.py", log, extra=["--max-handoffs", "1"])
        try:
            assert worker.wait(timeout=120) == 0, log.read_text()
        finally:
            kill_group(worker)
        wait_for(lambda: states(sock)["fifo"] == "merged", "the FIFO-leaving handoff to land")
        control(sock, "handoff.submit", {"markdown": [handoff_doc("next")]})
        worker = start_worker(sock, "good.py", log, extra=["--max-handoffs", "1"])
        try:
            assert worker.wait(timeout=120) == 0, log.read_text()
        finally:
            kill_group(worker)
        decided = ("merged", "failed", "conflict", "held")
        try:
            wait_for(lambda: states(sock)["next"] in decided, "next to be gated", timeout=30)
        except AssertionError:
            hung = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[-120:]
                    for p in host_pids(gate_dir) if p != running.process.pid]
            pytest.fail(f"the daemon's checkout of the next candidate hangs: {hung}")
    finally:
        for _ in range(50):
            pids = [p for p in host_pids(gate_dir) if p != running.process.pid]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not pids:
                break
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(gate_dir, ".gitattributes"))
        running.stop()


STORE_WRITER = r"""
import os, shutil, sqlite3, sys, tempfile
os.setgroups([int(sys.argv[3])]); os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[2]))
copy = os.path.join(tempfile.mkdtemp(), "store")
for suffix in ("", "-wal"):  # what the group may read: the store and its write-ahead log
    if os.path.exists(sys.argv[1] + suffix):
        shutil.copyfile(sys.argv[1] + suffix, copy + suffix)
conn = sqlite3.connect(copy)
print(conn.execute("SELECT id, token FROM leases").fetchall())
"""


def test_an_agent_in_the_service_group_cannot_read_the_store(
    tmp_path: Path, repo: Path
) -> None:
    import grp
    import os
    import subprocess
    import sys

    from harness import Daemon, write_config

    if os.getuid() != 0:
        pytest.skip("needs root to create a group and a second user")
    group = "orch-review-svc"
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", group], check=True)
        gid = grp.getgrnam(group).gr_gid
    agent = _agent()
    # As systemd makes it for the unit: the service's group owns the state directory (its
    # files inherit the group here through setgid, as the daemon's primary group does there).
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 0, gid)
    state.chmod(0o2750)
    for parent in state.parents:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o001)
    config = write_config(tmp_path, repo, extra=f"allowed_gids = [{gid}]", merge="paused = true")
    old = os.umask(0o007)  # the unit's UMask=
    try:
        running = Daemon(config, tmp_path / "daemon.log").start()
    finally:
        os.umask(old)
    holder = Conn(running.socket)
    try:
        control(running.socket, "handoff.submit", {"markdown": [handoff_doc("secret")]})
        holder.initialize("worker", name="w")
        lease = holder.request("lease.acquire", {"waitS": 30})["result"]["lease"]
        done = subprocess.run(
            [sys.executable, "-c", STORE_WRITER, str(state / "orchestrator.sqlite3"),
             str(agent.pw_uid), str(gid)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert lease["id"] not in done.stdout, (
            f"an agent in the service group read every lease's id and token: {done.stdout}")
    finally:
        holder.close()
        running.stop()
