"""What a lease directory and a gate checkout get besides the committed files (issue 13):
ports of their own (``[workspace] ports_per_lease``), untracked files copied from the
integration checkout (``copy_files``), and warm dependencies in the agent's directory
(``setup`` run by the worker, ``keep`` surviving the clean while the key matches).
Real daemon, real git, real workers and gate commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import git
from harness import (
    Conn,
    Daemon,
    control,
    handoff_doc,
    kill_group,
    start_worker,
    states,
    wait_for,
    write_config,
)

from orchestrator.config import MAX_SPECULATIVE_WINDOW, ConfigError, from_mapping
from orchestrator.git.copy_files import copy_untracked

pytestmark = pytest.mark.slow


def literal(text: str) -> str:
    assert "'''" not in text
    return "'''" + text + "'''"


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_handoffs(sock: Path, agent: str, log: Path, names: list[str], record: Path) -> None:
    control(sock, "handoff.submit", {"markdown": [handoff_doc(n) for n in names]})
    worker = start_worker(
        sock,
        agent,
        log,
        extra=["--max-handoffs", str(len(names))],
        env={"AGENT_RECORD": str(record)},
    )
    try:
        assert worker.wait(timeout=120) == 0, log.read_text()
        wait_for(lambda: all(states(sock)[n] == "merged" for n in names), f"{names} merged")
    finally:
        kill_group(worker)


# ------------------------------------------------------------------ ports


def test_live_leases_get_disjoint_port_ranges_even_across_a_restart(
    tmp_path: Path, repo: Path
) -> None:
    workspace = "[workspace]\nports_per_lease = 5\nport_base = 30000\n"
    config = write_config(tmp_path, repo, gates=workspace)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    conns: list[Conn] = []
    try:
        sock = daemon.socket
        control(sock, "handoff.submit", {"markdown": [handoff_doc(n) for n in "abc"]})

        def acquire(name: str) -> dict[str, Any]:
            conn = Conn(sock)
            conns.append(conn)
            conn.initialize("worker", name=name)
            lease = conn.request("lease.acquire", {"waitS": 5})["result"]["lease"]
            assert lease is not None
            return lease  # type: ignore[no-any-return]

        first, second = acquire("w1"), acquire("w2")
        daemon.stop()
        # Both leases outlive the daemon (and their connections): a new lease after the
        # restart must not get their ports.
        daemon = Daemon(config, tmp_path / "daemon.log").start()
        third = acquire("w3")
        ranges = [
            range(lease["portBase"], lease["portBase"] + lease["portCount"])
            for lease in (first, second, third)
        ]
        assert [len(r) for r in ranges] == [5, 5, 5]
        for i, one in enumerate(ranges):
            # Above the gate slots' ranges, and no port shared with another live lease.
            assert one.start >= 30000 + MAX_SPECULATIVE_WINDOW * 5
            for other in ranges[i + 1 :]:
                assert not set(one) & set(other), ranges
    finally:
        for conn in conns:
            conn.close()
        daemon.stop()


# ------------------------------------------------------------------ copy_files and ports

GATE = """
import json, os, pathlib, sys
env = pathlib.Path(".env")
with open(sys.argv[1], "a") as log:
    log.write(json.dumps({
        "port_base": os.environ.get("ORCHESTRATOR_PORT_BASE"),
        "port_count": os.environ.get("ORCHESTRATOR_PORT_COUNT"),
        "env_file": env.read_text() if env.exists() else None,
        "linked": os.path.lexists("linked.env"),
    }) + "\\n")
"""


def test_gate_and_agent_get_ports_of_their_own_and_the_env_file(
    tmp_path: Path, repo: Path
) -> None:
    (repo / ".gitignore").write_text(".env\nlinked.env\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore local files")
    # Untracked in the integration checkout: copied, and never through a symlink.
    (repo / ".env").write_text("SECRET=42\n")
    os.chmod(repo / ".env", 0o600)
    outside = tmp_path / "outside-secret"
    outside.write_text("not for agents\n")
    os.symlink(outside, repo / "linked.env")
    gate_log, record = tmp_path / "gate.log", tmp_path / "agent.jsonl"
    extra = f"""
[workspace]
copy_files = [".env", "linked.env", "config/missing.env"]
ports_per_lease = 10
port_base = 21000
[[gates]]
name = "probe"
run = ["{sys.executable}", "-c", {literal(GATE)}, "{gate_log}"]
"""
    config = write_config(tmp_path, repo, gates=extra)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    try:
        run_handoffs(daemon.socket, "probes_workspace.py", tmp_path / "w.log", ["one"], record)
    finally:
        daemon.stop()
    [seen] = records(record)
    assert seen["env_file"] == "SECRET=42\n"
    assert seen["env_file_mode"] in ("0o600", "0o640", "0o660")
    assert int(seen["port_count"]) == 10
    assert int(seen["port_base"]) >= 21000 + MAX_SPECULATIVE_WINDOW * 10
    [gate] = [json.loads(line) for line in gate_log.read_text().splitlines()]
    # Gate slot 0 has the first range; the agent's is above every gate slot's.
    assert gate == {
        "port_base": "21000",
        "port_count": "10",
        "env_file": "SECRET=42\n",
        "linked": False,
    }
    # The merged commit holds the agent's work, not the copied file.
    assert "one.txt" in git(repo, "ls-tree", "-r", "--name-only", "main")
    assert ".env" not in git(repo, "ls-tree", "-r", "--name-only", "main").split()


def test_copy_never_follows_a_symlink_on_either_side(tmp_path: Path) -> None:
    source, dest = tmp_path / "source", tmp_path / "dest"
    (source / "conf").mkdir(parents=True)
    dest.mkdir()
    (source / ".env").write_text("A=1\n")
    (source / "conf" / "local.env").write_text("B=2\n")
    secret = tmp_path / "secret"
    secret.write_text("secret\n")
    os.symlink(secret, source / "link.env")
    os.symlink(tmp_path, source / "up")
    # What an agent could leave in its directory: symlinks where the copies go.
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    os.symlink(victim, dest / ".env")
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    os.symlink(victim_dir, dest / "conf")

    # The checkout's own content in the way is skipped, said so, and never followed.
    blocked = copy_untracked(source, dest, ["conf/local.env"])
    assert blocked.copied == ()
    assert [path for path, _ in blocked.skipped] == ["conf/local.env"]
    assert list(victim_dir.iterdir()) == []

    result = copy_untracked(source, dest, [".env", "link.env", "up/secret", "gone.env"])
    assert result.copied == (".env",)
    assert {path for path, _ in result.skipped} == {"link.env", "up/secret", "gone.env"}
    assert victim.read_text() == "untouched\n"
    assert not (dest / ".env").is_symlink()
    assert (dest / ".env").read_text() == "A=1\n"
    assert not os.path.lexists(dest / "link.env")


def test_a_copy_the_checkouts_own_content_blocks_is_skipped(tmp_path: Path) -> None:
    """A committed file where a copy's directory goes, or a directory where the copy goes,
    skips that copy (with why) instead of failing the checkout, and with it every later
    lease of the handoff; the report check refuses such a branch anyway."""
    source, dest = tmp_path / "source", tmp_path / "dest"
    (source / "config").mkdir(parents=True)
    (source / "config" / "local.env").write_text("SECRET=1\n")
    (source / ".env").write_text("A=1\n")
    (dest / ".env" / "inner").mkdir(parents=True)  # a directory where the file goes
    (dest / "config").write_text("mine\n")  # a file where the directory goes
    result = copy_untracked(source, dest, ["config/local.env", ".env"])
    assert result.copied == ()
    why = dict(result.skipped)
    assert set(why) == {"config/local.env", ".env"}
    assert "in the way" in why["config/local.env"]
    assert (dest / "config").read_text() == "mine\n"
    assert (dest / ".env" / "inner").is_dir()


def test_workspace_config_errors_for_copy_files_and_ports(tmp_path: Path) -> None:
    def problems(workspace: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as bad:
            from_mapping(
                {"repository": {"path": str(tmp_path)}, "workspace": workspace},
                source="t.toml",
                base_dir=tmp_path,
            )
        return str(bad.value)

    for outside in ("../.env", "/etc/passwd", ".git/config", "."):
        assert "workspace.copy_files" in problems({"copy_files": [outside]})
        assert "must be a path inside the checkout" in problems({"copy_files": [outside]})
    assert "workspace.ports_per_lease must be from 0" in problems({"ports_per_lease": -1})
    assert "workspace.port_base must leave room" in problems({"port_base": 65400})
    assert "workspace.port_base" in problems({"port_base": 80})
    config = from_mapping(
        {"repository": {"path": str(tmp_path)}, "workspace": {"ports_per_lease": 0}},
        source="t.toml",
        base_dir=tmp_path,
    )
    assert config.workspace.ports_per_lease == 0


# ------------------------------------------------------------------ setup and keep in leases

SETUP = """
import os, pathlib, sys
lock = pathlib.Path("deps.lock").read_text()
venv = pathlib.Path(".venv")
assert not venv.exists(), "setup found a .venv kept from another key"
assert os.environ.get("ORCHESTRATOR_LEASE_ID"), "setup runs in the agent's environment"
venv.mkdir()
(venv / "marker").write_text(lock)
with open(sys.argv[1], "a") as log:
    log.write(lock)
failures = pathlib.Path(sys.argv[2])
if failures.exists() and failures.read_text().strip():
    left = int(failures.read_text())
    failures.write_text(str(left - 1))
    if left > 0:
        sys.exit("setup failed on purpose")
"""


def _setup_daemon(tmp_path: Path, repo: Path, failures: int = 0) -> tuple[Daemon, Path]:
    (repo / ".gitignore").write_text(".venv\n")
    (repo / "deps.lock").write_text("v1\n")
    git(repo, "add", ".gitignore", "deps.lock")
    git(repo, "commit", "-q", "-m", "lock file")
    setup_log, failing = tmp_path / "setup.log", tmp_path / "failures"
    failing.write_text(str(failures) if failures else "")
    extra = f"""
[workspace]
setup = ["{sys.executable}", "-c", {literal(SETUP)}, "{setup_log}", "{failing}"]
keep = [".venv"]
cache_key_files = ["deps.lock"]
"""
    config = write_config(tmp_path, repo, gates=extra)
    return Daemon(config, tmp_path / "daemon.log").start(), setup_log


def test_kept_paths_of_a_lease_directory_survive_until_the_lock_file_changes(
    tmp_path: Path, repo: Path
) -> None:
    daemon, setup_log = _setup_daemon(tmp_path, repo)
    record, log = tmp_path / "agent.jsonl", tmp_path / "w.log"
    worktrees = tmp_path / "state" / "worktrees"
    try:
        sock = daemon.socket

        def run(agent: str, name: str) -> None:
            run_handoffs(sock, agent, log, [name], record)
            # Back in the pool, for the next lease to reuse.
            wait_for(lambda: not (worktrees / name).exists(), f"{name} released")

        run("probes_workspace.py", "first")
        run("probes_workspace.py", "second")
        # The worker ran setup once; the second lease found the kept .venv.
        assert setup_log.read_text() == "v1\n"
        run("bumps_lock.py", "bump")
        run("probes_workspace.py", "third")
    finally:
        daemon.stop()
    # A new key: the directory was cleaned whole and setup rebuilt .venv for it.
    assert setup_log.read_text() == "v1\nv2 from bump\n"
    seen = {r["handoff"]: r for r in records(record)}
    assert seen["first"]["venv"] == "v1\n"
    assert seen["second"]["venv"] == "v1\n"
    assert seen["third"]["venv"] == seen["third"]["lock"] == "v2 from bump\n"
    assert ".venv" not in git(repo, "ls-tree", "-r", "--name-only", "main")


def test_failed_setup_gives_the_lease_back_and_is_run_again(tmp_path: Path, repo: Path) -> None:
    daemon, setup_log = _setup_daemon(tmp_path, repo, failures=1)
    record = tmp_path / "agent.jsonl"
    try:
        sock = daemon.socket
        control(sock, "handoff.submit", {"markdown": [handoff_doc("flaky")]})
        worker = start_worker(
            sock,
            "probes_workspace.py",
            tmp_path / "w.log",
            extra=["--max-handoffs", "2"],
            env={"AGENT_RECORD": str(record)},
        )
        try:
            wait_for(lambda: states(sock)["flaky"] == "merged", "flaky merged")
        finally:
            kill_group(worker)
        got = control(sock, "handoff.get", {"name": "flaky"})
    finally:
        daemon.stop()
    # The half-built .venv of the failed run was removed, so the retry built it again.
    assert setup_log.read_text() == "v1\nv1\n"
    [seen] = records(record)
    assert seen["attempt"] == 2 and seen["venv"] == "v1\n"
    assert got["attempt"] == 2
    assert "workspace_setup_failed" in (tmp_path / "w.log").read_text()


# ------------------------------------------------------------------ an agent of its own uid

UID_SETUP = """
import os, pathlib, sys
pathlib.Path(".venv").mkdir()
with open(sys.argv[1], "a") as log:
    log.write(f"{os.getuid()}\\n")
"""


def test_setup_runs_as_the_agents_uid_and_it_can_read_the_copied_env_file() -> None:
    # The second-user machinery of tests/test_agent_uid.py (useradd, a worker that drops
    # to that uid, a scratch directory it can reach).
    import shutil
    import tempfile

    from conftest import make_repo
    from test_agent_uid import agent_user, start_worker_as

    user = agent_user()
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip(f"{python} is needed to run the test agent as a second user")
    shared = Path(tempfile.mkdtemp(prefix="orchestrator-lease-env-"))
    shared.chmod(0o755)
    daemon: Daemon | None = None
    try:
        repo = make_repo(shared / "repo")
        (repo / ".gitignore").write_text(".env\n.venv\n")
        git(repo, "add", ".gitignore")
        git(repo, "commit", "-q", "-m", "ignore local files")
        (repo / ".env").write_text("SECRET=42\n")
        os.chmod(repo / ".env", 0o600)
        home = shared / "agent-home"
        home.mkdir()
        os.chown(home, user.pw_uid, user.pw_gid)
        setup_log, record = home / "setup.log", home / "record.jsonl"
        extra = f"""
[workspace]
setup = ["{python}", "-c", {literal(UID_SETUP)}, "{setup_log}"]
keep = [".venv"]
cache_key_files = [".gitignore"]
copy_files = [".env"]
"""
        config = write_config(
            shared,
            repo,
            extra=f'allowed_uids = [{user.pw_uid}]\nsocket_mode = "0666"',
            gates=extra,
        )
        daemon = Daemon(config, shared / "daemon.log").start()
        env = {"AGENT_RECORD": str(record), "PYTHONPATH": str(Path(__file__).parents[1])}
        worker = start_worker_as(
            user, home, daemon.socket, "probes_workspace.py", shared / "w.log", "w", python, env
        )
        try:
            control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("mine")]})
            wait_for(lambda: states(daemon.socket)["mine"] == "merged", "mine merged")
        finally:
            os.killpg(worker.pid, 9)
            worker.wait()
        # Setup ran once, as the agent's uid (never the daemon's), before the agent, which
        # read the .env the daemon copied (0600 in repository.path, root's).
        assert setup_log.read_text() == f"{user.pw_uid}\n"
        [seen] = records(record)
        assert seen["env_file"] == "SECRET=42\n"
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(shared, ignore_errors=True)


def test_a_range_comes_free_when_its_lease_ends_and_ports_can_be_off(tmp_path: Path) -> None:
    from orchestrator.config import WorkspaceConfig
    from orchestrator.daemon.ports import PortLedger, gate_range

    ws = WorkspaceConfig(ports_per_lease=4, port_base=40000)
    ledger = PortLedger(tmp_path)
    a = ledger.assign("a", ws, ["a"])
    b = ledger.assign("b", ws, ["a", "b"])
    assert a is not None and b is not None and not a.overlaps(b)
    assert ledger.assign("a", ws, ["a", "b"]) == a  # asked again: the same range
    # "a" ended: its range goes to the next lease; "b" keeps its own.
    c = PortLedger(tmp_path).assign("c", ws, ["b", "c"])
    assert c == a
    first_gate = gate_range(ws, 0)
    assert first_gate is not None and first_gate.base == 40000
    off = WorkspaceConfig(ports_per_lease=0)
    assert PortLedger(tmp_path).assign("d", off, ["d"]) is None
    assert gate_range(off, 0) is None
