"""Agents under their own uid (issue 12 item 2): a worker whose uid is in
``daemon.allowed_uids`` gets a lease repository it can write and commit in with plain git,
and nothing else it can write. Run as a real second user (``useradd``; tests run as root)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import git, make_repo
from harness import AGENTS, Daemon, control, handoff_doc, states, wait_for, write_config

from orchestrator.agent.worker import git_env_for_lease
from orchestrator.git.workspace import Workspace

pytestmark = pytest.mark.slow

AGENT_USER = "orch-agent"


def agent_user() -> pwd.struct_passwd:
    if os.getuid() != 0:
        pytest.skip("needs root to run an agent as a second user")
    try:
        return pwd.getpwnam(AGENT_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", AGENT_USER], check=True)
        return pwd.getpwnam(AGENT_USER)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A scratch directory the second user can reach. Not under pytest's tmp_path: every
    pytest session (another engineer's, on a shared machine) resets /tmp/pytest-of-<user>
    to 0700, which would lock the second user out mid-test."""
    path = Path(tempfile.mkdtemp(prefix="orchestrator-agent-uid-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_agent(user: pwd.struct_passwd, cwd: Path, env: dict[str, str], *argv: str) -> str:
    out = subprocess.run(
        list(argv), cwd=cwd, env=env, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
        capture_output=True, text=True, timeout=60,
    )
    if out.returncode != 0:
        raise AssertionError(f"{argv} failed as {user.pw_name}: {out.stderr}")
    return out.stdout.strip()


@pytest.fixture
def user() -> pwd.struct_passwd:
    return agent_user()


def test_a_second_user_commits_fetches_and_merges_with_plain_git(
    shared: Path, user: pwd.struct_passwd
) -> None:
    tmp_path = shared
    repo = make_repo(shared / "repo")
    ws = Workspace(repo, "main", tmp_path / "worktrees")
    tip = ws.integration_tip()
    ws.ensure_branch("handoff/a", tip)
    path = ws.checkout_for_lease("a", "handoff/a", integration=tip, owner_uid=user.pw_uid)
    home = tmp_path / "agent-home"
    home.mkdir()
    os.chown(home, user.pw_uid, user.pw_gid)
    env = git_env_for_lease(
        path,
        {"PATH": os.environ["PATH"], "HOME": str(home), "GIT_AUTHOR_NAME": "a",
         "GIT_AUTHOR_EMAIL": "a@x.invalid", "GIT_COMMITTER_NAME": "a",
         "GIT_COMMITTER_EMAIL": "a@x.invalid"},
        home,
        uid=user.pw_uid,
    )

    def agent_git(*args: str) -> str:
        return as_agent(user, path, env, "git", *args)

    assert agent_git("status", "--porcelain") == ""
    assert agent_git("symbolic-ref", "HEAD") == "refs/heads/handoff/a"
    (repo / "main.txt").write_text("main moved\n")  # the integration branch moves on
    git(repo, "add", "main.txt")
    git(repo, "commit", "-q", "-m", "main moves")
    as_agent(user, path, env, "sh", "-c", "mkdir -p work && echo hi > work/a.txt")
    agent_git("add", "-A")
    agent_git("commit", "-q", "-m", "agent work")
    agent_git("fetch", "-q", "origin")
    agent_git("merge", "-q", "--no-edit", "origin/main")
    head = agent_git("rev-parse", "HEAD")
    # it cannot push, nor write anything of the integration repository
    before = git(repo, "for-each-ref")
    with pytest.raises(AssertionError):
        agent_git("push", "origin", "HEAD:main")
    with pytest.raises(AssertionError):
        as_agent(user, path, env, "git", f"--git-dir={repo / '.git'}", "update-ref",
                 "refs/heads/main", head)
    with pytest.raises(AssertionError):
        as_agent(user, path, env, "sh", "-c", f"echo x > {ws.worktrees_dir / '.state' / 'x'}")
    assert git(repo, "for-each-ref") == before
    # a third user cannot even look in
    nobody = pwd.getpwnam("nobody")
    with pytest.raises(AssertionError):
        as_agent(nobody, shared, env, "ls", str(path))
    # the daemon takes the head, and the next lease of the same uid reuses the directory
    assert ws.import_lease_head("a", "handoff/a", head) == ""
    assert git(repo, "rev-parse", "handoff/a") == head
    ws.release_worktree("a")
    ws.ensure_branch("handoff/b", ws.integration_tip())
    b = ws.checkout_for_lease("b", "handoff/b", owner_uid=user.pw_uid)
    as_agent(user, b, git_env_for_lease(b, dict(env), home, uid=user.pw_uid), "git", "status")
    # a directory a uid had is never handed to another: the daemon's own uid gets a new one
    ws.release_worktree("b")
    c = ws.checkout_for_lease("c", "handoff/b")
    assert not any(p.owner() == AGENT_USER for p in c.rglob("*"))


# The worker is started as root, loads everything, then drops to the agent's uid: the
# venv's interpreter may live where a second user cannot run it (here under /root, 0700).
# Its agent runs under the system Python (the test agents need only the standard library).
WORKER_AS = r"""
import os, sys
uid, gid, home = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.environ["HOME"] = home  # before libgit2 starts: it looks for the global config there
from orchestrator import cli
import orchestrator.agent.worker, orchestrator.agent.client  # noqa: F401 (loaded as root)
os.setgroups([]); os.setgid(gid); os.setuid(uid)
os.chdir(home)
sys.executable = sys.argv[4]
sys.exit(cli.main(sys.argv[5:]))
"""


def start_worker_as(
    user: pwd.struct_passwd, home: Path, socket_path: Path, agent: str, log: Path,
    name: str, python: str, env: dict[str, str],
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER_AS, str(user.pw_uid), str(user.pw_gid), str(home), python,
         "--socket", str(socket_path), "worker", "--name", name, "--wait", "1", "--",
         python, str(AGENTS / agent)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, **env}, start_new_session=True,
    )


def test_a_conflict_is_repaired_by_an_agent_of_another_uid_and_lands(
    shared: Path, user: pwd.struct_passwd, stop_later: list[Daemon]
) -> None:
    tmp_path = shared
    repo = make_repo(shared / "repo")
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip(f"{python} is needed to run the test agent as {AGENT_USER}")
    extra = f'allowed_uids = [{user.pw_uid}]\nsocket_mode = "0666"'
    config = write_config(
        tmp_path, repo, extra=extra, merge='on_conflict = "requeue"',
        gates=f'[[gates]]\nname = "tests"\nrun = ["{sys.executable}", "-c", "pass"]\n',
    )
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    home = tmp_path / "agent-home"
    home.mkdir()
    os.chown(home, user.pw_uid, user.pw_gid)
    record = home / "record.jsonl"
    env = {"AGENT_RECORD": str(record), "PYTHONPATH": str(Path(__file__).parents[1])}
    workers = [
        start_worker_as(user, home, daemon.socket, "conflict.py", tmp_path / f"w{i}.log",
                        f"w{i}", python, env)
        for i in (1, 2)
    ]
    try:
        wait_for(lambda: len(control(daemon.socket, "status")["workers"]) == 2, "two workers")
        control(daemon.socket, "handoff.submit",
                {"markdown": [handoff_doc("clash-a"), handoff_doc("clash-b")]})
        wait_for(
            lambda: states(daemon.socket) == {"clash-a": "merged", "clash-b": "merged"},
            "both to land",
        )
    finally:
        for worker in workers:
            os.killpg(worker.pid, 9)
            worker.wait()
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    retry = next(r for r in lines if r["attempt"] == 2)
    landed_first = git(repo, "rev-list", "--first-parent", "main").splitlines()[1]
    assert retry["integration"] == retry["origin"] == landed_first
    assert landed_first in retry["feedback"]["detail"]
    merged = git(repo, "show", "main:shared.txt")
    assert "written by clash-a" in merged and "written by clash-b" in merged
    # the agent's commits were made as the second user, in its own repository
    worktree = tmp_path / "state" / "worktrees"
    assert not (worktree / retry["handoff"] / ".git").is_symlink()


def test_after_a_restart_a_directory_with_another_uids_files_is_not_handed_over(
    shared: Path, user: pwd.struct_passwd
) -> None:
    repo = make_repo(shared / "repo")
    ws = Workspace(repo, "main", shared / "worktrees")
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a", owner_uid=user.pw_uid)
    env = {"PATH": os.environ["PATH"], "HOME": str(shared)}
    # a directory of its own where git has one: a checkout by diff keeps directories
    as_agent(user, path, env, "sh", "-c", "mv src s && mkdir src && mv s/app.py src/ && rmdir s")
    assert (path / "src").stat().st_uid == user.pw_uid
    # the daemon restarts: it no longer remembers whom the directory was for
    ws = Workspace(repo, "main", shared / "worktrees")
    nobody = pwd.getpwnam("nobody").pw_uid
    again = ws.checkout_for_lease("a", "handoff/a", owner_uid=nobody)
    assert all(p.stat().st_uid != user.pw_uid for p in again.rglob("*") if not p.is_symlink())
