"""orchestrator.git.workspace against real git repositories (no mocks)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import GIT_ENV, git

from orchestrator.git.workspace import (
    GitError,
    IntegrationTreeDirty,
    MergeBackend,
    MergeResult,
    Workspace,
)

BACKENDS: list[MergeBackend] = ["pygit2", "git", "auto"]


# ----------------------------------------------------------------------------- helpers


def commit_files(
    repo: Path, branch: str, files: dict[str, str | None], message: str, *, parent: str = ""
) -> str:
    """Commit ``files`` (None deletes) on top of ``branch`` (or ``parent``) with git plumbing.

    No checkout is touched, so the main working tree stays exactly as the test left it.
    """
    index = repo.parent / f"tmp-index-{os.getpid()}"
    env = {**os.environ, **GIT_ENV, "GIT_INDEX_FILE": str(index)}

    def run(*args: str, stdin: str | None = None) -> str:
        out = subprocess.run(
            ["git", *args],
            cwd=repo,
            env=env,
            input=stdin,
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    start = parent or run("rev-parse", "--verify", "-q", f"refs/heads/{branch}")
    try:
        run("read-tree", start)
        for path, content in files.items():
            if content is None:
                run("update-index", "--force-remove", path)
            else:
                blob = run("hash-object", "-w", "--stdin", stdin=content)
                run("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
        tree = run("write-tree")
        sha = run("commit-tree", tree, "-p", start, "-m", message)
    finally:
        index.unlink(missing_ok=True)
    run("update-ref", f"refs/heads/{branch}", sha)
    return sha


def tree_files(path: Path) -> dict[str, str]:
    """Every file under ``path`` except git's own, relative path -> content."""
    out: dict[str, str] = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if rel == ".git" or rel.startswith(".git/"):
            continue
        if p.is_file() and not p.is_symlink():
            out[rel] = p.read_text()
    return out


def commit_tree_files(repo: Path, rev: str) -> dict[str, str]:
    names = git(repo, "ls-tree", "-r", "--name-only", rev).splitlines()
    return {n: git_raw(repo, "show", f"{rev}:{n}") for n in names}


def git_raw(cwd: Path, *args: str) -> str:
    """Like conftest.git but without stripping (file contents keep their newline)."""
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


def admin_dir(worktree: Path) -> Path:
    """The git dir of a worktree: its own ``.git`` (a lease repository) or the admin dir
    its ``.git`` file names (the gate worktree)."""
    if (worktree / ".git").is_dir():
        return worktree / ".git"
    text = (worktree / ".git").read_text()
    return Path(text.split(":", 1)[1].strip())


def assert_own_repository(path: Path, repo: Path) -> None:
    """``path`` is a repository of its own that borrows the objects of ``repo``."""
    assert (path / ".git").is_dir() and not (path / ".git").is_symlink()
    assert git(path, "rev-parse", "--absolute-git-dir") == str(path / ".git")
    assert git(path, "rev-parse", "--git-common-dir") in (".git", str(path / ".git"))
    alternates = (path / ".git" / "objects" / "info" / "alternates").read_text().split()
    assert alternates == [str(Path(git(repo, "rev-parse", "--absolute-git-dir")) / "objects")]
    assert path not in registered(repo)


def registered(repo: Path) -> list[Path]:
    out = git(repo, "worktree", "list", "--porcelain")
    return [
        Path(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("worktree ")
    ]


@pytest.fixture
def wts(tmp_path: Path) -> Path:
    return tmp_path / "worktrees"


@pytest.fixture
def ws(repo: Path, wts: Path) -> Workspace:
    return Workspace(repo, "main", wts)


@pytest.fixture
def big_repo(repo: Path) -> Path:
    """The sample repo plus enough files that 'untouched' files are meaningful."""
    for i in range(30):
        (repo / "lib" / f"m{i // 10}").mkdir(parents=True, exist_ok=True)
        (repo / "lib" / f"m{i // 10}" / f"f{i}.py").write_text(f"X = {i}\n")
    (repo / ".gitignore").write_text("*.log\nbuild/\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "more files")
    return repo


# ----------------------------------------------------------------------------- opening


def test_open_rejects_non_repository(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(GitError, match="not a git repository"):
        Workspace(plain, "main", tmp_path / "w")


def test_open_rejects_missing_branch(repo: Path, wts: Path) -> None:
    with pytest.raises(GitError, match="'trunk' does not exist"):
        Workspace(repo, "trunk", wts)


def test_open_creates_worktrees_dir(repo: Path, tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "wts"
    ws = Workspace(repo, "main", target)
    assert target.is_dir()
    assert ws.worktrees_dir == target.resolve()
    assert ws.pool_size() == 0


def test_open_bare_repository(repo: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(bare))
    ws = Workspace(bare, "main", tmp_path / "bw")
    assert ws.integration_tip() == git(repo, "rev-parse", "main")
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    assert (path / "src" / "app.py").is_file()


# ----------------------------------------------------------------------------- refs


def test_branch_tip_and_ensure_branch(repo: Path, ws: Workspace) -> None:
    main = git(repo, "rev-parse", "main")
    assert ws.integration_tip() == main
    assert ws.branch_tip("handoff/a") is None
    assert ws.ensure_branch("handoff/a", "main") == main
    assert git(repo, "rev-parse", "refs/heads/handoff/a") == main
    later = commit_files(repo, "main", {"x.txt": "x\n"}, "later")
    # an existing branch keeps its commits: it is not moved to the new start
    assert ws.ensure_branch("handoff/a", later) == main
    assert ws.ensure_branch("handoff/b", later) == later
    assert ws.branch_tip("main") == later


def test_ensure_branch_errors(ws: Workspace) -> None:
    with pytest.raises(GitError, match="not a valid branch name"):
        ws.ensure_branch("bad..name", "main")
    with pytest.raises(GitError, match="not a valid branch name"):
        ws.branch_tip("-x")
    with pytest.raises(GitError, match="does not name a commit"):
        ws.ensure_branch("handoff/a", "no-such-rev")


def test_is_ancestor_and_commits_between(repo: Path, ws: Workspace) -> None:
    base = ws.integration_tip()
    ws.ensure_branch("handoff/a", base)
    c1 = commit_files(repo, "handoff/a", {"a.txt": "1\n"}, "first change\n\nbody")
    c2 = commit_files(repo, "handoff/a", {"a.txt": "2\n"}, "second change")
    assert ws.is_ancestor(base, c2)
    assert ws.is_ancestor(c2, c2)
    assert not ws.is_ancestor(c2, base)
    assert ws.commits_between(base, c2) == [(c2, "second change"), (c1, "first change")]
    assert ws.commits_between(base, "handoff/a", limit=1) == [(c2, "second change")]
    assert ws.commits_between(c2, base) == []
    with pytest.raises(GitError):
        ws.is_ancestor("nope", base)
    with pytest.raises(GitError):
        ws.commits_between(base, "0" * 40)
    # Many at once, in one walk: what the tip holds, nothing it does not.
    ws.ensure_branch("handoff/b", base)
    other = commit_files(repo, "handoff/b", {"b.txt": "b\n"}, "elsewhere")
    assert ws.reachable([base, c1, c2, other], c2) == {base, c1, c2}
    assert ws.reachable([], c2) == set()


# ----------------------------------------------------------------------------- leases


def test_fresh_lease_when_pool_is_empty(repo: Path, ws: Workspace, wts: Path) -> None:
    tip = ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    assert path == wts.resolve() / "a"
    assert git(path, "symbolic-ref", "HEAD") == "refs/heads/handoff/a"
    assert ws.head_of(path) == tip
    assert ws.dirty_paths(path) == []
    assert tree_files(path) == commit_tree_files(repo, tip)
    assert_own_repository(path, repo)
    assert git(path, "rev-parse", "origin/main") == git(repo, "rev-parse", "main")


def test_pool_reuse_moves_by_diff(big_repo: Path, ws: Workspace, wts: Path) -> None:
    repo = big_repo
    ws.ensure_branch("handoff/a", "main")
    ws.ensure_branch("handoff/b", "main")
    commit_files(repo, "handoff/b", {"lib/m0/f1.py": "X = 'b'\n", "new/b.txt": "b\n"}, "b")
    commit_files(repo, "handoff/b", {"lib/m2/f25.py": None}, "b deletes")
    a = ws.checkout_for_lease("a", "handoff/a")
    slot_inode = a.stat().st_ino
    untouched = a / "lib" / "m1" / "f12.py"
    before = untouched.stat()
    n_worktrees = len(registered(repo))

    ws.release_worktree("a")
    assert not a.exists()
    assert ws.pool_size() == 1
    b = ws.checkout_for_lease("b", "handoff/b")

    assert b == wts.resolve() / "b"
    assert b.stat().st_ino == slot_inode  # the same directory, renamed
    assert len(registered(repo)) == n_worktrees  # no new worktree was created
    assert ws.pool_size() == 0
    after = (b / "lib" / "m1" / "f12.py").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (b / "lib" / "m0" / "f1.py").read_text() == "X = 'b'\n"
    assert not (b / "lib" / "m2" / "f25.py").exists()
    assert git(b, "symbolic-ref", "HEAD") == "refs/heads/handoff/b"
    assert tree_files(b) == commit_tree_files(repo, "handoff/b")
    assert ws.dirty_paths(b) == []
    assert_own_repository(b, repo)
    assert git(b, "rev-parse", "--show-toplevel") == str(b)


def test_continue_existing_branch_with_earlier_commits(repo: Path, ws: Workspace) -> None:
    base = ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    (path / "work.txt").write_text("attempt 1\n")
    git(path, "add", "work.txt")
    git(path, "commit", "-q", "-m", "attempt 1")
    earlier = git(path, "rev-parse", "HEAD")
    assert ws.branch_tip("handoff/a") == base  # the lease's branch is its own...
    assert ws.import_lease_head("a", "handoff/a", earlier) == ""  # ...until reported
    assert git(repo, "rev-parse", "refs/orchestrator/leases/a") == earlier
    ws.release_worktree("a")
    # the next attempt (even under another worktree name) starts from those commits
    path2 = ws.checkout_for_lease("a-retry", "handoff/a")
    assert ws.branch_tip("handoff/a") == earlier
    assert ws.head_of(path2) == earlier
    assert (path2 / "work.txt").read_text() == "attempt 1\n"
    assert ws.commits_between(base, "handoff/a") == [(earlier, "attempt 1")]


def test_untracked_and_ignored_removed_on_reuse(big_repo: Path, ws: Workspace) -> None:
    ws.ensure_branch("handoff/a", "main")
    ws.ensure_branch("handoff/b", "main")
    path = ws.checkout_for_lease("a", "handoff/a")

    def litter(p: Path) -> None:
        (p / "scratch.txt").write_text("untracked\n")
        (p / "debug.log").write_text("ignored\n")
        (p / "build" / "deep").mkdir(parents=True)
        (p / "build" / "deep" / "out.o").write_text("ignored dir\n")
        (p / "README.md").write_text("modified\n")
        (p / "lib" / "m0" / "f0.py").unlink()
        (p / "staged.txt").write_text("staged\n")
        git(p, "add", "staged.txt")

    # same name again (an earlier attempt's directory)
    litter(path)
    again = ws.checkout_for_lease("a", "handoff/a")
    assert again == path
    assert tree_files(again) == commit_tree_files(big_repo, "handoff/a")
    assert ws.dirty_paths(again) == []

    # through the pool
    litter(path)
    ws.release_worktree("a")
    b = ws.checkout_for_lease("b", "handoff/b")
    assert tree_files(b) == commit_tree_files(big_repo, "handoff/b")
    assert git(b, "status", "--porcelain", "--ignored") == ""


def test_reuse_when_the_tree_differs_a_lot(repo: Path, ws: Workspace) -> None:
    ws.ensure_branch("handoff/a", "main")
    # on b: a file becomes a directory, a directory becomes a file, many new files
    files: dict[str, str | None] = {"README.md": None, "README.md/inner.txt": "now a dir\n"}
    files.update({"src/app.py": None, "src": "now a file\n"})
    files.update({f"gen/{i}.txt": f"{i}\n" for i in range(50)})
    ws.ensure_branch("handoff/b", "main")
    commit_files(repo, "handoff/b", files, "reshape")
    a = ws.checkout_for_lease("a", "handoff/a")
    # untracked things exactly where b needs to write
    (a / "gen").mkdir()
    (a / "gen" / "3.txt").write_text("in the way\n")
    (a / "src" / "extra.py").write_text("untracked in a dir that becomes a file\n")
    ws.release_worktree("a")
    b = ws.checkout_for_lease("b", "handoff/b")
    assert tree_files(b) == commit_tree_files(repo, "handoff/b")
    assert ws.dirty_paths(b) == []
    # and back again
    ws.release_worktree("b")
    a2 = ws.checkout_for_lease("a2", "handoff/a")
    assert tree_files(a2) == commit_tree_files(repo, "handoff/a")


def test_release_puts_the_directory_in_the_pool(repo: Path, ws: Workspace, wts: Path) -> None:
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    # the lease's checkout is in its own repository: ours does not hold the branch
    git(repo, "branch", "-D", "handoff/a")
    ws.release_worktree("a")
    assert not path.exists()
    (slot,) = (wts / ".pool").iterdir()
    assert (slot / "README.md").is_file()
    ws.release_worktree("a")  # already released: no error
    ws.release_worktree("never-leased")


def test_release_after_branch_was_deleted(repo: Path, ws: Workspace) -> None:
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    git(repo, "update-ref", "-d", "refs/heads/handoff/a")
    ws.release_worktree("a")
    assert not path.exists()
    assert ws.pool_size() == 1


def test_branch_cannot_be_leased_twice(ws: Workspace) -> None:
    ws.ensure_branch("handoff/a", "main")
    ws.checkout_for_lease("a", "handoff/a")
    with pytest.raises(GitError, match="already checked out"):
        ws.checkout_for_lease("b", "handoff/a")  # pool empty
    assert not (ws.worktrees_dir / "b").exists()
    ws.warm_pool(1)
    with pytest.raises(GitError, match="already checked out"):
        ws.checkout_for_lease("b", "handoff/a")
    # the pooled worktree it had taken went back to the pool
    assert ws.pool_size() == 1
    assert not (ws.worktrees_dir / "b").exists()
    ws.release_worktree("a")
    ws.checkout_for_lease("b", "handoff/a")


def test_lease_argument_checks(ws: Workspace, wts: Path, tmp_path: Path) -> None:
    ws.ensure_branch("handoff/a", "main")
    with pytest.raises(GitError, match="does not exist"):
        ws.checkout_for_lease("a", "handoff/missing")
    with pytest.raises(GitError, match="integration branch"):
        ws.checkout_for_lease("a", "main")
    for bad in ["", ".", "..", "../escape", "a/b", ".pool", ".gate", "-rf"]:
        with pytest.raises(GitError, match="invalid worktree name"):
            ws.checkout_for_lease(bad, "handoff/a")
        with pytest.raises(GitError, match="invalid worktree name"):
            ws.release_worktree(bad)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (wts / "sneaky").symlink_to(elsewhere)
    with pytest.raises(GitError, match="outside the worktrees directory"):
        ws.checkout_for_lease("sneaky", "handoff/a")
    assert elsewhere.is_dir()
    # a link planted in the pool is dropped, never followed
    (elsewhere / "keep.txt").write_text("k\n")
    (wts / ".pool" / "planted").symlink_to(elsewhere)
    ws.checkout_for_lease("a", "handoff/a")
    assert not (wts / ".pool" / "planted").exists()
    assert (elsewhere / "keep.txt").read_text() == "k\n"


def test_warm_pool(repo: Path, ws: Workspace) -> None:
    assert ws.warm_pool(2) == 2
    assert ws.pool_size() == 2
    assert ws.warm_pool(2) == 0
    ws.ensure_branch("handoff/a", "main")
    n = len(registered(repo))
    path = ws.checkout_for_lease("a", "handoff/a")
    assert len(registered(repo)) == n
    assert ws.pool_size() == 1
    assert git(path, "symbolic-ref", "HEAD") == "refs/heads/handoff/a"


# ----------------------------------------------------------------------------- inspection


def test_dirty_paths(repo: Path, ws: Workspace) -> None:
    (repo / ".gitignore").write_text("*.log\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore logs")
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    assert ws.dirty_paths(path) == []
    (path / "README.md").write_text("changed\n")
    (path / "new dir").mkdir()
    (path / "new dir" / "n.txt").write_text("new\n")
    (path / "ignored.log").write_text("x\n")
    (path / "staged.py").write_text("s\n")
    git(path, "add", "staged.py")
    (path / "src" / "app.py").unlink()
    assert ws.dirty_paths(path) == ["README.md", "new dir/n.txt", "src/app.py", "staged.py"]
    # works on any checkout, e.g. the main one
    (repo / "untracked.txt").write_text("u\n")
    assert ws.dirty_paths(repo) == ["untracked.txt"]
    with pytest.raises(GitError, match="not a git working tree"):
        ws.dirty_paths(path / "src")


def test_head_of(repo: Path, ws: Workspace, tmp_path: Path) -> None:
    assert ws.head_of(repo) == git(repo, "rev-parse", "HEAD")
    c = ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    assert ws.head_of(path) == c
    new = tmp_path / "empty"
    git(tmp_path, "init", "-q", str(new))
    assert ws.head_of(new) is None  # unborn
    with pytest.raises(GitError):
        ws.head_of(path / "src")  # a plain directory inside a worktree


# ----------------------------------------------------------------------------- merging


def diverge(repo: Path, ws: Workspace, *, conflict: bool) -> tuple[str, str]:
    """handoff/x changes one file while main changes another (or the same) file."""
    base = ws.integration_tip()
    ws.ensure_branch("handoff/x", base)
    theirs = commit_files(repo, "handoff/x", {"src/app.py": "def answer():\n    return 43\n"}, "x")
    main_change = {"src/app.py": "def answer():\n    return 41\n"} if conflict else {}
    ours = commit_files(repo, "main", {"NEWS": "news\n", **main_change}, "main moved")
    return ours, theirs


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_candidate_merge(repo: Path, wts: Path, backend: MergeBackend) -> None:
    ws = Workspace(repo, "main", wts, merge_backend=backend)
    worktree_before = tree_files(repo)
    ours, theirs = diverge(repo, ws, conflict=False)
    result = ws.merge_candidate(
        "handoff/x",
        strategy="merge",
        message="Merge handoff x",
        author_name="Merger",
        author_email="m@example.invalid",
    )
    assert result.base == ours and result.conflicts == () and result.candidate
    cand = result.candidate
    assert git(repo, "rev-parse", f"{cand}^1", f"{cand}^2").split() == [ours, theirs]
    assert git(repo, "log", "-1", "--format=%an <%ae>|%s", cand) == (
        "Merger <m@example.invalid>|Merge handoff x"
    )
    files = commit_tree_files(repo, cand)
    assert files["NEWS"] == "news\n" and "return 43" in files["src/app.py"]
    # built in memory: no branch moved, no checkout touched, no branch contains it
    assert ws.integration_tip() == ours and ws.branch_tip("handoff/x") == theirs
    assert tree_files(repo) == worktree_before
    assert git(repo, "branch", "--contains", cand) == ""


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_candidate_squash(repo: Path, wts: Path, backend: MergeBackend) -> None:
    ws = Workspace(repo, "main", wts, merge_backend=backend)
    ours, _ = diverge(repo, ws, conflict=False)
    commit_files(repo, "handoff/x", {"more.txt": "more\n"}, "x2")
    result = ws.merge_candidate("handoff/x", strategy="squash", message="Squash x")
    assert result.candidate and result.base == ours
    assert git(repo, "rev-list", "--parents", "-n1", result.candidate).split()[1:] == [ours]
    files = commit_tree_files(repo, result.candidate)
    assert files["more.txt"] == "more\n" and "return 43" in files["src/app.py"]
    assert files["NEWS"] == "news\n"
    assert git(repo, "log", "-1", "--format=%an", result.candidate) == "orchestrator"


def test_backends_build_the_same_tree(repo: Path, wts: Path) -> None:
    ws = Workspace(repo, "main", wts)
    diverge(repo, ws, conflict=False)
    commit_files(repo, "handoff/x", {"docs/a.md": "a\n", "README.md": None}, "x2")
    trees = set()
    for backend in ("pygit2", "git"):
        result = Workspace(repo, "main", wts, merge_backend=backend).merge_candidate(
            "handoff/x", strategy="squash", message="m"
        )
        assert result.candidate
        trees.add(git(repo, "rev-parse", f"{result.candidate}^{{tree}}"))
    assert len(trees) == 1
    with pytest.raises(ValueError, match="merge_backend"):
        Workspace(repo, "main", wts, merge_backend="svn")  # type: ignore[arg-type]
    # "auto" times both on real merges, then keeps one; results stay the same throughout
    auto = Workspace(repo, "main", wts)
    assert auto.merge_backend == "auto"
    for _ in range(3):
        result = auto.merge_candidate("handoff/x", strategy="squash", message="m")
        assert result.candidate
        assert git(repo, "rev-parse", f"{result.candidate}^{{tree}}") in trees
    chosen: str = auto.merge_backend
    assert chosen in ("pygit2", "git")


def test_merge_candidate_ff_only(repo: Path, ws: Workspace) -> None:
    ws.ensure_branch("handoff/x", "main")
    theirs = commit_files(repo, "handoff/x", {"a.txt": "a\n"}, "a")
    result = ws.merge_candidate("handoff/x", strategy="ff-only", message="unused")
    assert result == MergeResult(theirs, (), ws.integration_tip())
    commit_files(repo, "main", {"b.txt": "b\n"}, "main moved")
    result = ws.merge_candidate("handoff/x", strategy="ff-only", message="unused")
    assert result.candidate is None and result.conflicts == ()
    assert result.detail.startswith("not a fast-forward")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["merge", "squash", "ff-only"])
def test_merge_candidate_conflicts(
    repo: Path, wts: Path, backend: MergeBackend, strategy: str
) -> None:
    ws = Workspace(repo, "main", wts, merge_backend=backend)
    ours, _ = diverge(repo, ws, conflict=True)
    commit_files(repo, "handoff/x", {"NEWS": "theirs\n", "zz.txt": "z\n"}, "x2")
    result = ws.merge_candidate("handoff/x", strategy=strategy, message="m")
    assert result.candidate is None and result.base == ours
    if strategy == "ff-only":
        assert result.conflicts == () and result.detail.startswith("not a fast-forward")
    else:
        assert result.conflicts == ("NEWS", "src/app.py")
    assert ws.integration_tip() == ours


@pytest.mark.parametrize("strategy", ["merge", "squash", "ff-only"])
def test_merge_candidate_already_merged(repo: Path, ws: Workspace, strategy: str) -> None:
    ws.ensure_branch("handoff/x", "main")  # at the tip
    result = ws.merge_candidate("handoff/x", strategy=strategy, message="m")
    assert (result.candidate, result.detail) == (None, "already merged")
    commit_files(repo, "main", {"later": "l\n"}, "later")  # branch is now an ancestor
    result = ws.merge_candidate("handoff/x", strategy=strategy, message="m")
    assert (result.candidate, result.detail) == (None, "already merged")


def test_squash_with_no_net_change(repo: Path, ws: Workspace) -> None:
    ws.ensure_branch("handoff/x", "main")
    commit_files(repo, "handoff/x", {"NEWS": "n\n"}, "x")
    commit_files(repo, "main", {"NEWS": "n\n"}, "same change on main")
    result = ws.merge_candidate("handoff/x", strategy="squash", message="m")
    assert (result.candidate, result.conflicts, result.detail) == (None, (), "already merged")


def test_merge_candidate_errors_and_unrelated(repo: Path, ws: Workspace) -> None:
    with pytest.raises(GitError, match="does not exist"):
        ws.merge_candidate("handoff/none", strategy="merge", message="m")
    ws.ensure_branch("handoff/x", "main")
    with pytest.raises(ValueError, match="unknown merge strategy"):
        ws.merge_candidate("handoff/x", strategy="rebase", message="m")
    tree = git(repo, "mktree", "--missing")  # empty tree
    orphan = git(repo, "commit-tree", tree, "-m", "orphan")
    git(repo, "update-ref", "refs/heads/handoff/orphan", orphan)
    result = ws.merge_candidate("handoff/orphan", strategy="merge", message="m")
    assert result.candidate is None and result.detail.startswith("unrelated histories")


# ----------------------------------------------------------------------------- advancing


def test_advance_updates_the_clean_main_checkout(repo: Path, ws: Workspace) -> None:
    old, _ = diverge(repo, ws, conflict=False)
    # diverge() moved main behind the checkout's back; bring the checkout along first
    git(repo, "reset", "-q", "--hard", old)
    (repo / "notes.txt").write_text("the user's untracked file\n")
    result = ws.merge_candidate("handoff/x", strategy="merge", message="Merge x")
    assert result.candidate
    assert ws.advance_integration(old, result.candidate, "orchestrator: merge x")
    assert ws.integration_tip() == result.candidate
    assert git(repo, "rev-parse", "HEAD") == result.candidate
    assert "return 43" in (repo / "src" / "app.py").read_text()
    assert git(repo, "status", "--porcelain") == "?? notes.txt"
    assert (repo / "notes.txt").read_text() == "the user's untracked file\n"
    assert git(repo, "reflog", "-1", "--format=%gs", "refs/heads/main") == "orchestrator: merge x"


def test_advance_cas_fails_when_the_branch_moved(repo: Path, ws: Workspace) -> None:
    old = ws.integration_tip()
    ws.ensure_branch("handoff/x", old)
    theirs = commit_files(repo, "handoff/x", {"a.txt": "a\n"}, "a")
    moved = commit_files(repo, "main", {"b.txt": "b\n"}, "someone else")
    assert ws.advance_integration(old, theirs, "m") is False
    assert ws.integration_tip() == moved
    assert not (repo / "a.txt").exists()


def test_advance_refuses_when_main_checkout_has_local_edits(repo: Path, ws: Workspace) -> None:
    old = ws.integration_tip()
    ws.ensure_branch("handoff/x", old)
    theirs = commit_files(repo, "handoff/x", {"src/app.py": "changed\n"}, "a")
    (repo / "README.md").write_text("user edit\n")
    with pytest.raises(IntegrationTreeDirty) as info:
        ws.advance_integration(old, theirs, "m")
    assert info.value.path == repo and info.value.changes == ("README.md",)
    assert "Commit or stash" in str(info.value)
    assert ws.integration_tip() == old
    assert (repo / "README.md").read_text() == "user edit\n"
    # staged changes count too
    git(repo, "add", "README.md")
    with pytest.raises(IntegrationTreeDirty):
        ws.advance_integration(old, theirs, "m")
    assert ws.integration_tip() == old


def test_advance_refuses_to_overwrite_untracked_files(repo: Path, ws: Workspace) -> None:
    old = ws.integration_tip()
    ws.ensure_branch("handoff/x", old)
    theirs = commit_files(repo, "handoff/x", {"config.ini": "tracked\n"}, "add config")
    (repo / "config.ini").write_text("the user's own\n")
    with pytest.raises(IntegrationTreeDirty) as info:
        ws.advance_integration(old, theirs, "m")
    assert info.value.changes == ("config.ini",)
    assert ws.integration_tip() == old
    assert (repo / "config.ini").read_text() == "the user's own\n"


def test_advance_updates_linked_worktree_on_the_branch(repo: Path, ws: Workspace) -> None:
    git(repo, "checkout", "-q", "-b", "dev")
    linked = repo.parent / "linked-main"
    git(repo, "worktree", "add", "-q", str(linked), "main")
    old = ws.integration_tip()
    ws.ensure_branch("handoff/x", old)
    theirs = commit_files(repo, "handoff/x", {"src/app.py": "v2\n", "README.md": None}, "x")
    assert ws.advance_integration(old, theirs, "ff")
    assert (linked / "src" / "app.py").read_text() == "v2\n"
    assert not (linked / "README.md").exists()
    assert git(linked, "status", "--porcelain") == ""
    # the main checkout is on dev and must not have been touched
    assert (repo / "README.md").read_text() == "sample\n"
    assert git(repo, "status", "--porcelain") == ""


def test_advance_in_bare_repository(repo: Path, tmp_path: Path) -> None:
    bare = tmp_path / "b.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(bare))
    ws = Workspace(bare, "main", tmp_path / "bw")
    old = ws.integration_tip()
    ws.ensure_branch("handoff/x", old)
    theirs = commit_files(bare, "handoff/x", {"a.txt": "a\n"}, "a")
    assert ws.advance_integration(old, theirs, "ff")
    assert ws.integration_tip() == theirs


# ----------------------------------------------------------------------------- gate


def test_gate_checkout_moves_by_diff_and_cleans(big_repo: Path, ws: Workspace) -> None:
    repo = big_repo
    c1 = ws.integration_tip()
    c2 = commit_files(repo, "main", {"lib/m0/f0.py": "X = 'two'\n", "NEW": "n\n"}, "c2")
    gate = ws.gate_checkout(c1)
    assert gate == ws.worktrees_dir / ".gate"
    assert git(gate, "rev-parse", "HEAD") == c1
    assert git(gate, "rev-parse", "--abbrev-ref", "HEAD") == "HEAD"  # detached
    inode = gate.stat().st_ino
    untouched = (gate / "lib" / "m2" / "f22.py").stat()
    # leftovers of a gate run
    (gate / "build").mkdir()
    (gate / "build" / "artifact.bin").write_text("stale\n")
    (gate / "pytest.log").write_text("log\n")
    (gate / "__pycache__").mkdir()
    (gate / "lib" / "m1" / "f10.py").write_text("tampered\n")

    again = ws.gate_checkout(c2)
    assert again == gate and gate.stat().st_ino == inode
    assert git(gate, "rev-parse", "HEAD") == c2
    assert tree_files(gate) == commit_tree_files(repo, c2)
    assert git(gate, "status", "--porcelain", "--ignored") == ""
    after = (gate / "lib" / "m2" / "f22.py").stat()
    assert (after.st_ino, after.st_mtime_ns) == (untouched.st_ino, untouched.st_mtime_ns)
    # the gate never holds a branch, so it never blocks one
    assert ws.pool_size() == 0
    with pytest.raises(GitError):
        ws.gate_checkout("not-a-commit")
    # more gate worktrees, for speculative candidates gated side by side
    second = ws.gate_checkout(c1, slot=1)
    assert second != gate and git(second, "rev-parse", "HEAD") == c1
    assert git(gate, "rev-parse", "HEAD") == c2


# ----------------------------------------------------------------------------- recovery


def test_stale_index_lock_in_owned_worktrees(repo: Path, ws: Workspace) -> None:
    ws.ensure_branch("handoff/a", "main")
    ws.ensure_branch("handoff/b", "main")
    commit_files(repo, "handoff/b", {"b.txt": "b\n"}, "b")
    path = ws.checkout_for_lease("a", "handoff/a")
    lock = admin_dir(path) / "index.lock"
    lock.write_text("")  # left by an agent's git that was killed
    with pytest.raises(subprocess.CalledProcessError):
        git(path, "add", "-A")
    assert ws.checkout_for_lease("a", "handoff/a") == path
    assert not lock.exists()  # the lease got a new .git
    # the same in a pooled slot
    ws.release_worktree("a")
    slot_admin = admin_dir(next((ws.worktrees_dir / ".pool").iterdir()))
    (slot_admin / "index.lock").write_text("")
    (slot_admin / "HEAD.lock").write_text("")
    b = ws.checkout_for_lease("b", "handoff/b")
    assert (b / "b.txt").read_text() == "b\n"
    # and in the gate
    gate = ws.gate_checkout("main")
    (admin_dir(gate) / "index.lock").write_text("")
    assert ws.gate_checkout("handoff/b") == gate
    assert (gate / "b.txt").exists()


def test_interrupted_merge_state_is_cleared(repo: Path, ws: Workspace) -> None:
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    admin = admin_dir(path)
    (admin / "MERGE_HEAD").write_text(git(repo, "rev-parse", "main") + "\n")
    (admin / "rebase-merge").mkdir()
    (admin / "rebase-merge" / "head-name").write_text("refs/heads/handoff/a\n")
    ws.checkout_for_lease("a", "handoff/a")
    assert not (admin / "MERGE_HEAD").exists()
    assert not (admin / "rebase-merge").exists()


def test_worktree_whose_metadata_was_pruned(repo: Path, ws: Workspace) -> None:
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    (path / "leftover.txt").write_text("x\n")
    shutil.rmtree(admin_dir(path))  # e.g. an agent deleted its .git
    again = ws.checkout_for_lease("a", "handoff/a")
    assert again == path
    assert_own_repository(again, repo)
    assert git(again, "symbolic-ref", "HEAD") == "refs/heads/handoff/a"
    assert not (again / "leftover.txt").exists()
    # a pooled slot without its .git gets a new one when it is handed out
    ws.release_worktree("a")
    (slot,) = (ws.worktrees_dir / ".pool").iterdir()
    shutil.rmtree(admin_dir(slot))
    assert ws.pool_size() == 1
    b = ws.checkout_for_lease("b", "handoff/a")
    assert (b / "README.md").exists()
    assert_own_repository(b, repo)


def test_worktree_directory_deleted_behind_our_back(repo: Path, ws: Workspace) -> None:
    ws.ensure_branch("handoff/a", "main")
    path = ws.checkout_for_lease("a", "handoff/a")
    shutil.rmtree(path)  # its registration still says handoff/a is checked out there
    again = ws.checkout_for_lease("a2", "handoff/a")
    assert (again / "README.md").exists()
    assert path not in registered(repo)
    gate = ws.gate_checkout("main")
    shutil.rmtree(gate)
    assert ws.gate_checkout("main") == gate and (gate / "README.md").exists()


def test_half_moved_pool_slot_is_repaired(repo: Path, ws: Workspace, wts: Path) -> None:
    ws.ensure_branch("handoff/a", "main")
    ws.ensure_branch("handoff/b", "main")
    ws.ensure_branch("handoff/c", "main")
    a = ws.checkout_for_lease("a", "handoff/a")
    inode = a.stat().st_ino
    # crash in release_worktree between renaming the directory and the daemon's index
    slot = wts / ".pool" / "crashed"
    os.rename(a, slot)
    b = ws.checkout_for_lease("b", "handoff/b")
    assert b.stat().st_ino == inode
    assert git(b, "symbolic-ref", "HEAD") == "refs/heads/handoff/b"
    assert tree_files(b) == commit_tree_files(repo, "handoff/b")
    assert ws.dirty_paths(b) == []
    # releasing again after such a crash keeps the slot
    ws.release_worktree("b")
    assert ws.pool_size() == 1
    # crash in checkout_for_lease between the two renames
    (slot,) = (wts / ".pool").iterdir()
    os.rename(slot, wts / "c")
    c = ws.checkout_for_lease("c", "handoff/c")
    assert c.stat().st_ino == inode
    assert git(c, "symbolic-ref", "HEAD") == "refs/heads/handoff/c"
    assert_own_repository(c, repo)
    ws.recover()
    assert sorted(p.name for p in (wts / ".state").iterdir()) == ["L-c"]
