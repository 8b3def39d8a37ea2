"""The deployment's agent user (issue 12 item 2): with the daemon's umask of the systemd
unit (0007) and its state directory 0750, an agent whose uid is in ``daemon.allowed_uids``
reaches its lease, the socket and the integration repository's objects, including ones
the daemon writes later, and not the store or anything else in the state directory.
Run as a real second user (``useradd``; tests run as root)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import git, make_repo
from harness import Daemon, wait_for, write_config

from orchestrator.agent.worker import git_env_for_lease
from orchestrator.config import Config
from orchestrator.daemon.agent_reach import open_to_agents
from orchestrator.git.workspace import Workspace
from orchestrator.store.sqlite import Store

AGENT_USER = "orch-agent"


def agent_user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.skip("needs root to run an agent as a second user")
    try:
        return pwd.getpwnam(AGENT_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", AGENT_USER], check=True)
        return pwd.getpwnam(AGENT_USER)


def run_as(user: pwd.struct_passwd, cwd: Path, env: dict[str, str], *argv: str) -> tuple[int, str]:
    out = subprocess.run(
        list(argv), cwd=cwd, env=env, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
        capture_output=True, text=True, timeout=60,
    )
    return out.returncode, (out.stdout + out.stderr).strip()


@pytest.fixture
def umask_0007() -> Iterator[None]:
    """The daemon's UMask= in systemd/orchestrator.service."""
    old = os.umask(0o007)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def shared() -> Iterator[Path]:
    """Not under tmp_path: other pytest sessions reset /tmp/pytest-of-root to 0700."""
    path = Path(tempfile.mkdtemp(prefix="orchestrator-agent-reach-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_store_file_is_not_readable_by_others(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        store = Store.open(tmp_path / "orchestrator.sqlite3")
        store.close()
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "orchestrator.sqlite3").stat().st_mode)
    assert mode & 0o077 == 0, oct(mode)
    # one left world-readable by an older version loses that at the next start
    (tmp_path / "orchestrator.sqlite3").chmod(0o664)
    Store.open(tmp_path / "orchestrator.sqlite3").close()
    assert stat.S_IMODE((tmp_path / "orchestrator.sqlite3").stat().st_mode) & 0o007 == 0


def test_an_admitted_agent_reaches_its_lease_and_the_repository_not_the_store(
    shared: Path, umask_0007: None
) -> None:
    user = agent_user()
    state = shared / "state"
    state.mkdir(mode=0o750)  # StateDirectoryMode=0750
    run = shared / "run"
    run.mkdir()
    run.chmod(0o755)  # RuntimeDirectory= (and the socket unit) make it 0755
    repo = make_repo(shared / "project")  # under the daemon's umask: nothing for others
    config = Config(
        source="test", repository_path=repo, state_dir=state, socket=run / "orchestrator.sock",
        allowed_uids=(user.pw_uid,),
    )
    store = Store.open(config.database)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(config.socket))
    config.socket.chmod(0o660)
    listener.listen(4)
    try:
        ws = Workspace(repo, "main", config.worktrees_dir)
        assert open_to_agents(config, ws.git_dir) > 0
        ws.ensure_branch("handoff/a", ws.integration_tip())
        path = ws.checkout_for_lease("a", "handoff/a", owner_uid=user.pw_uid)
        # The daemon lands something later: new objects and refs, under its umask.
        (repo / "later.txt").write_text("landed after the grant\n")
        git(repo, "add", "later.txt")
        git(repo, "commit", "-q", "-m", "later")
        later = git(repo, "rev-parse", "HEAD").strip()
        home = shared / "agent-home"
        home.mkdir()
        os.chown(home, user.pw_uid, user.pw_gid)
        env = git_env_for_lease(
            path, {"PATH": os.environ["PATH"], "HOME": str(home)}, home, uid=user.pw_uid
        )
        os.chown(home / "gitconfig", user.pw_uid, user.pw_gid)  # the worker writes it itself

        def agent(*argv: str) -> str:
            rc, out = run_as(user, home, env, *argv)
            assert rc == 0, f"{argv} as {user.pw_name}: {out}"
            return out

        def refused(*argv: str) -> None:
            rc, out = run_as(user, home, env, *argv)
            assert rc != 0, f"{argv} as {user.pw_name} was allowed: {out}"

        agent("git", "-C", str(path), "status", "--porcelain")
        agent("git", "-C", str(path), "fetch", "-q", "origin")
        assert agent("git", "-C", str(path), "rev-parse", "origin/main") == later
        assert agent("git", "-C", str(path), "cat-file", "-p", f"{later}:later.txt") == (
            "landed after the grant"
        )
        connect = (
            "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
        )
        agent("/usr/bin/python3", "-c", connect, str(config.socket))
        # and nothing else
        refused("cat", str(config.database))
        refused("ls", str(state))
        refused("ls", str(config.worktrees_dir))
        refused("touch", str(state / "probe"))
        refused("touch", str(config.worktrees_dir / "probe"))
        refused("touch", str(ws.git_dir / "refs" / "heads" / "probe"))
        refused("git", f"--git-dir={ws.git_dir}", "update-ref", "refs/heads/main", "HEAD~1")
        assert git(repo, "rev-parse", "main").strip() == later
        refused("ls", str(ws.gate_path))
    finally:
        listener.close()
        store.close()


def test_a_reload_that_admits_a_uid_opens_the_paths_to_it(
    shared: Path, umask_0007: None
) -> None:
    """The running daemon (under the unit's umask) opens the state directory, the socket
    and the repository to a uid that `systemctl reload` adds to allowed_uids."""
    user = agent_user()
    repo = make_repo(shared / "project")
    state = shared / "state"
    state.mkdir(mode=0o750)
    config = write_config(shared, repo)
    daemon = Daemon(config, shared / "daemon.log").start()
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent"}
    git_read = ("git", f"--git-dir={repo / '.git'}", "-c", "safe.directory=*", "cat-file",
                "-e", "main^{tree}")
    try:
        assert run_as(user, shared, env, "stat", str(state / "worktrees"))[0] != 0
        assert run_as(user, shared, env, *git_read)[0] != 0
        config.write_text(config.read_text().replace(
            "[daemon]\n", f"[daemon]\nallowed_uids = [{user.pw_uid}]\n"))
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "config_reloaded" for e in daemon.logs()),
                 "the reload")
        rc, out = run_as(user, shared, env, "stat", str(state / "worktrees"))
        assert rc == 0, out
        rc, out = run_as(user, shared, env, *git_read)
        assert rc == 0, out
        connect = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
        rc, out = run_as(user, shared, env, "/usr/bin/python3", "-c", connect,
                         str(daemon.socket))
        assert rc == 0, out
        assert run_as(user, shared, env, "cat", str(state / "orchestrator.sqlite3"))[0] != 0
        assert run_as(user, shared, env, "ls", str(state))[0] != 0
    finally:
        daemon.stop()
