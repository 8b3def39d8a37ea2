"""A lease's worktree is a repository of its own, and the git the daemon runs on it is the
daemon's own (issue 12, items 3 and 4). Each test plays an agent that attacks the daemon
through its lease directory; each fails without the defence it names."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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

from orchestrator.git import gate_checkouts
from orchestrator.git.workspace import Workspace


@pytest.fixture
def ws(repo: Path, tmp_path: Path) -> Workspace:
    return Workspace(repo, "main", tmp_path / "worktrees")


def snapshot(repo: Path) -> tuple[str, str, list[str]]:
    """What an agent must not be able to change in the integration repository."""
    refs = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    hooks = sorted(os.listdir(repo / ".git" / "hooks"))
    return refs, (repo / ".git" / "config").read_text(), hooks


def commit_in(path: Path, rel: str, text: str, message: str) -> str:
    (path / rel).write_text(text)
    git(path, "add", rel)
    git(path, "commit", "-q", "-m", message)
    return git(path, "rev-parse", "HEAD")


def trap(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A marker file and a shell command that creates it: run means the daemon ran it."""
    marker = tmp_path / f"ran-{name}"
    return marker, f"touch {marker}"


# ------------------------------------------------------------- a repository per lease


def test_moving_refs_and_config_in_a_lease_changes_nothing_outside(
    repo: Path, ws: Workspace
) -> None:
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    before = snapshot(repo)
    head = commit_in(path, "evil.txt", "x\n", "evil")
    # what a hostile agent did in issue 12: move main from its worktree, then report
    git(path, "update-ref", "refs/heads/main", head)
    git(path, "branch", "-f", "handoff/other", head)
    git(path, "tag", "v-evil", head)
    git(path, "config", "user.name", "evil")
    (path / ".git" / "hooks").mkdir(exist_ok=True)
    (path / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\nexit 1\n")
    assert snapshot(repo) == before
    # the daemon takes the head into a namespace of its own, and the branch it tracks
    assert ws.import_lease_head("a", "handoff/a", head) == ""
    assert git(repo, "rev-parse", "refs/orchestrator/leases/a") == head
    assert git(repo, "rev-parse", "handoff/a") == head
    assert git(repo, "rev-parse", "main") == before[0].split("refs/heads/main ")[1].split()[0]
    assert "refs/tags/v-evil" not in git(repo, "for-each-ref")


def test_a_report_must_name_the_head_of_the_lease_branch(repo: Path, ws: Workspace) -> None:
    base = ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    head = commit_in(path, "w.txt", "1\n", "one")
    reason = ws.import_lease_head("a", "handoff/a", base)
    assert "is not the tip of handoff/a" in reason
    assert git(repo, "rev-parse", "handoff/a") == base  # nothing moved
    (path / "w.txt").write_text("2\n")
    assert "uncommitted changes (w.txt)" in ws.import_lease_head("a", "handoff/a", head)
    git(path, "checkout", "-q", "w.txt")
    git(path, "branch", "-m", "handoff/a", "renamed")
    assert "could not take handoff/a" in ws.import_lease_head("a", "handoff/a", head)


def test_a_lease_git_dir_pointing_elsewhere_is_discarded_never_followed(
    repo: Path, ws: Workspace, tmp_path: Path
) -> None:
    ws.ensure_branch("handoff/a", "main")
    ws.ensure_branch("handoff/b", "main")
    victim = tmp_path / "victim"
    git(tmp_path, "init", "-q", "-b", "main", str(victim))
    (victim / "precious.txt").write_text("keep\n")
    git(victim, "add", "-A")
    git(victim, "commit", "-q", "-m", "precious")
    (victim / "untracked.txt").write_text("keep too\n")
    victim_refs = git(victim, "for-each-ref")
    for how in ("gitdir-file", "symlink"):
        path = ws.checkout_for_lease("a", "handoff/a")
        git(path, "rm", "-rfq", "src")
        os.system(f"rm -rf {path / '.git'}")
        if how == "gitdir-file":
            (path / ".git").write_text(f"gitdir: {victim / '.git'}\n")
        else:
            (path / ".git").symlink_to(victim / ".git")
        head = git(victim, "rev-parse", "HEAD")
        assert "broken" in ws.import_lease_head("a", "handoff/a", head)
        ws.release_worktree("a")
        assert not path.exists() and ws.pool_size() == 0  # discarded, not pooled
        b = ws.checkout_for_lease("b", "handoff/b")
        assert (b / ".git").is_dir() and (b / "src" / "app.py").is_file()
        ws.release_worktree("b")
        assert (victim / "precious.txt").read_text() == "keep\n"
        assert (victim / "untracked.txt").read_text() == "keep too\n"
        assert git(victim, "for-each-ref") == victim_refs
        assert git(victim, "status", "--porcelain") == "?? untracked.txt"


def test_a_lease_directory_with_broken_modes_is_replaced(repo: Path, ws: Workspace) -> None:
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    old = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        path.chmod(0o000)
        again = ws.checkout_for_lease("a", "handoff/a")
        assert again == path
        assert os.fstat(old).st_nlink == 0  # the old directory was deleted, not reused
    finally:
        os.close(old)
    assert path.stat().st_mode & 0o777 == 0o700  # its uid only (ACLs for another)
    assert (path / "README.md").read_text() == "sample\n"


# ------------------------------------------------------------- git the daemon runs is its own


def arm(path: Path, tmp_path: Path) -> dict[str, Path]:
    """Every way an agent's repository can make git run a command of its choosing."""
    markers: dict[str, Path] = {}
    marker, cmd = trap(tmp_path, "fsmonitor")
    markers["fsmonitor"] = marker
    git(path, "config", "core.fsmonitor", f"{cmd}; echo")
    git(path, "config", "core.fsmonitorHookVersion", "1")
    marker, cmd = trap(tmp_path, "filter")
    markers["filter"] = marker
    git(path, "config", "filter.evil.clean", f"sh -c '{cmd}; cat'")
    git(path, "config", "filter.evil.smudge", f"sh -c '{cmd}; cat'")
    git(path, "config", "filter.evil.required", "true")
    (path / ".git" / "info").mkdir(exist_ok=True)
    (path / ".git" / "info" / "attributes").write_text("* filter=evil\n")
    (path / ".git" / "hooks").mkdir(exist_ok=True)
    for hook in ("post-checkout", "reference-transaction", "pre-auto-gc", "post-index-change"):
        marker, cmd = trap(tmp_path, hook)
        markers[hook] = marker
        hook_file = path / ".git" / "hooks" / hook
        hook_file.write_text(f"#!/bin/sh\n{cmd}\n")
        hook_file.chmod(0o755)
    marker, cmd = trap(tmp_path, "hooks-path")
    markers["hooks-path"] = marker
    other_hooks = tmp_path / "agent-hooks"
    other_hooks.mkdir(exist_ok=True)
    for hook in ("post-checkout", "reference-transaction"):
        (other_hooks / hook).write_text(f"#!/bin/sh\n{cmd}\n")
        (other_hooks / hook).chmod(0o755)
    git(path, "config", "core.hooksPath", str(other_hooks))
    return markers


def test_the_daemon_never_runs_what_a_lease_repository_configures(
    repo: Path, ws: Workspace, tmp_path: Path
) -> None:
    ws.ensure_branch("handoff/a", "main")
    ws.ensure_branch("handoff/b", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    head = commit_in(path, "work.txt", "w\n", "work")
    markers = arm(path, tmp_path)
    (path / "README.md").write_text("sample\n")  # same content, new stat: worth a look
    for marker in markers.values():
        marker.unlink(missing_ok=True)  # the agent's own git ran some while arming
    assert ws.import_lease_head("a", "handoff/a", head) == ""  # fetch + status
    ws.checkout_for_lease("a", "handoff/a")  # the retry's checkout reuses the directory
    ws.release_worktree("a")
    ws.checkout_for_lease("b", "handoff/b")  # and the pool
    ran = sorted(name for name, marker in markers.items() if marker.exists())
    assert ran == []


def test_a_global_git_config_does_not_reach_lease_repositories(
    repo: Path, ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon's user's ~/.gitconfig is writable by an agent running as that user.
    marker, cmd = trap(tmp_path, "global")
    home = tmp_path / "home"
    home.mkdir()
    (home / "attributes").write_text("* filter=evil\n")
    (home / ".gitconfig").write_text(
        f"[core]\n\tattributesFile = {home / 'attributes'}\n"
        f"[filter \"evil\"]\n\tclean = \"sh -c '{cmd}; cat'\"\n"
    )
    monkeypatch.setenv("HOME", str(home))
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    head = commit_in(path, "work.txt", "w\n", "work")
    marker.unlink(missing_ok=True)
    (path / "README.md").write_text("sample\n")
    assert ws.import_lease_head("a", "handoff/a", head) == ""
    ws.checkout_for_lease("a", "handoff/a")
    assert not marker.exists()


def test_a_lease_git_file_naming_an_armed_git_dir_is_never_run(
    repo: Path, ws: Workspace, tmp_path: Path
) -> None:
    # issue 12: the agent repointed .git at a git dir it built, with core.fsmonitor set,
    # and the daemon's own `git status` on report ran it.
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    head = commit_in(path, "work.txt", "w\n", "work")
    built = tmp_path / "built"
    git(tmp_path, "clone", "-q", "--shared", "--no-checkout", str(path), str(built))
    markers = arm(built, tmp_path)
    os.system(f"rm -rf {path / '.git'}")
    (path / ".git").write_text(f"gitdir: {built / '.git'}\n")
    for marker in markers.values():
        marker.unlink(missing_ok=True)
    assert "broken" in ws.import_lease_head("a", "handoff/a", head)
    ws.release_worktree("a")
    ws.checkout_for_lease("a", "handoff/a")
    assert sorted(name for name, marker in markers.items() if marker.exists()) == []


def test_a_symlink_named_like_a_daemon_temp_file_is_never_written_through(
    repo: Path, ws: Workspace, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("untouched\n")
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    for name in (".git.orchestrator-tmp", ".git/HEAD.orchestrator-tmp", ".git/index.lock"):
        (path / name).symlink_to(outside)
    ws.import_lease_head("a", "handoff/a", git(path, "rev-parse", "HEAD"))
    ws.release_worktree("a")
    ws.checkout_for_lease("a", "handoff/a")
    # the gate worktree's .git file is rewritten by the daemon when it is re-linked
    gate = ws.gate_checkout("main")
    (gate / ".git.orchestrator-tmp").symlink_to(outside)
    gate_checkouts._write_atomic(gate / ".git", (gate / ".git").read_text())
    assert outside.read_text() == "untouched\n"
    assert (gate / ".git.orchestrator-tmp").is_symlink()


# ------------------------------------------------------------- through the daemon


def test_an_agent_that_moves_main_from_its_lease_gets_gated_like_anyone(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    gates = (
        "[[gates]]\nname = \"tests\"\n"
        f"run = [\"{sys.executable}\", \"-c\", "
        "\"import pathlib, sys; sys.exit(pathlib.Path('evil.txt').exists())\"]\n"
    )
    daemon = Daemon(write_config(tmp_path, repo, gates=gates, max_attempts=1),
                    tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    before = git(repo, "rev-parse", "main")
    worker = start_worker(daemon.socket, "moves_main.py", tmp_path / "w.log")
    try:
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc("sneaky")]})
        wait_for(lambda: states(daemon.socket)["sneaky"] == "failed", "the gate to fail it")
    finally:
        kill_group(worker)
    assert git(repo, "rev-parse", "main") == before
    detail = control(daemon.socket, "handoff.get", {"name": "sneaky"})
    assert detail["gates"] and detail["gates"][-1]["exitStatus"] != 0


def test_initialize_lists_the_isolation_capabilities(
    tmp_path: Path, repo: Path, stop_later: list[Daemon]
) -> None:
    daemon = Daemon(write_config(tmp_path, repo), tmp_path / "daemon.log").start()
    stop_later.append(daemon)
    conn = Conn(daemon.socket)
    try:
        result = conn.initialize("control")
    finally:
        conn.close()
    assert {"isolated-worktree", "integration-tip"} <= set(result["capabilities"])



def test_an_unreported_attempt_keeps_its_commits_for_the_next(repo: Path, ws: Workspace) -> None:
    base = ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    partial = commit_in(path, "part.txt", "1\n", "partial")  # then the worker dies
    again = ws.checkout_for_lease("a", "handoff/a")
    assert git(again, "rev-parse", "HEAD") == partial
    assert ws.branch_tip("handoff/a") == partial
    # history that does not build on the branch is not taken
    git(again, "checkout", "-q", "--orphan", "other")
    git(again, "commit", "-q", "-m", "unrelated")
    git(again, "branch", "-f", "handoff/a", "other")
    ws.checkout_for_lease("a", "handoff/a")
    assert ws.branch_tip("handoff/a") == partial != base


def test_the_integration_repository_identity_reaches_lease_repositories(
    repo: Path, tmp_path: Path
) -> None:
    git(repo, "config", "user.name", "Project Bot")
    git(repo, "config", "user.email", "bot@project.invalid")
    ws = Workspace(repo, "main", tmp_path / "worktrees")
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    assert git(path, "config", "--local", "user.name") == "Project Bot"
    assert git(path, "config", "--local", "user.email") == "bot@project.invalid"


def test_a_git_dir_nested_in_the_lease_git_dir_does_not_redirect_the_fetch(
    repo: Path, ws: Workspace, tmp_path: Path
) -> None:
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    head = commit_in(path, "w.txt", "w\n", "work")
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(path), str(other))
    (path / ".git" / ".git").write_text(f"gitdir: {other / '.git'}\n")
    assert ".git/.git exists" in ws.import_lease_head("a", "handoff/a", head)


def test_gate_checkouts_run_no_fsmonitor_or_hook_gate_code_could_set(
    repo: Path, ws: Workspace, tmp_path: Path
) -> None:
    # Gate code runs as the daemon's uid (until gates are sandboxed) and can write the
    # repository's config and hooks; the daemon's git on the gate worktree ignores both.
    gate = ws.gate_checkout("main")
    marker, cmd = trap(tmp_path, "gate")
    git(repo, "config", "core.fsmonitor", f"{cmd}; echo")
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text(f"#!/bin/sh\n{cmd}\n")
    hook.chmod(0o755)
    (gate / "README.md").write_text("sample\n")
    marker.unlink(missing_ok=True)
    ws.gate_checkout("main")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("rel", "tracked", "setting"),
    [
        (".venv/bin/python", ".venv", "keep"),  # under a kept path
        ("config", "config", "copy_files"),  # a file where copy_files needs a directory
        ("config/local.env", "config/local.env", "copy_files"),  # the copied file itself
    ],
)
def test_a_report_tracking_a_copied_or_kept_path_is_refused(
    repo: Path, ws: Workspace, rel: str, tracked: str, setting: str
) -> None:
    """A branch that commits what the daemon puts in place untracked would land over the
    operator's file in repository.path (and its gates never saw it)."""
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    (path / rel).parent.mkdir(parents=True, exist_ok=True)
    (path / rel).write_text("agent\n")
    git(path, "add", "-f", rel)
    git(path, "commit", "-q", "-m", "track it")
    head = git(path, "rev-parse", "HEAD")
    reason = ws.import_lease_head(
        "a", "handoff/a", head, copy_files=["config/local.env"], keep=[".venv"]
    )
    assert f"the branch tracks {tracked}, where [workspace] {setting}" in reason
    assert f"git rm -r --cached {tracked}" in reason
    assert git(repo, "rev-parse", "handoff/a") != head  # nothing moved
    git(path, "rm", "-q", "-r", "--cached", tracked)
    git(path, "commit", "-q", "-m", "untrack it")
    fixed = git(path, "rev-parse", "HEAD")
    assert (
        ws.import_lease_head(
            "a",
            "handoff/a",
            fixed,
            untracked_ok=["config/local.env", ".venv", "config"],
            copy_files=["config/local.env"],
            keep=[".venv"],
        )
        == ""
    )


def test_a_path_the_integration_branch_tracks_is_the_projects_own(
    repo: Path, ws: Workspace
) -> None:
    """copy_files naming a file the project itself commits refuses no report changing it:
    landing it writes no untracked file of the operator's."""
    (repo / "settings.env").write_text("A=1\n")
    git(repo, "add", "settings.env")
    git(repo, "commit", "-q", "-m", "project settings")
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    head = commit_in(path, "settings.env", "A=2\n", "change settings")
    assert ws.import_lease_head("a", "handoff/a", head, copy_files=["settings.env"]) == ""
