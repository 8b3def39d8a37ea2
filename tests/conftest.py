"""Shared fixtures: every test drives real git repositories made in tmp_path."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Daemon

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.invalid",
    "GIT_COMMITTER_NAME": "Test Committer",
    "GIT_COMMITTER_EMAIL": "committer@example.invalid",
}


# The fast layer (marker ``fast``) lives in these files only: ``pytest -m fast`` then need
# not import every other test module (the MCP SDK alone takes seconds on a loaded machine).
FAST_FILES = "test_fast_*.py"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Under exactly ``-m fast``, skip the test modules that hold no fast test."""
    if config.getoption("markexpr") != "fast" or not collection_path.is_file():
        return None
    name = collection_path.name
    if name.startswith("test_") and name.endswith(".py") and not collection_path.match(FAST_FILES):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A ``fast`` test outside ``test_fast_*.py`` would be skipped by ``-m fast``: refuse it."""
    misplaced = [
        item.nodeid
        for item in items
        if item.get_closest_marker("fast") is not None and not item.path.match(FAST_FILES)
    ]
    if misplaced:
        raise pytest.UsageError(
            f"tests marked fast must live in tests/{FAST_FILES} (see conftest.py): "
            + ", ".join(misplaced)
        )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _git_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    yield


def git(cwd: Path, *args: str) -> str:
    """Run a real git command and return its stdout (stripped)."""
    env = {**os.environ, **GIT_ENV}
    out = subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A real repository on branch main with one commit holding a small file tree."""
    return make_repo(tmp_path / "repo")


def make_repo(path: Path) -> Path:
    """Create the ``repo`` fixture's repository at ``path``."""
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("sample\n")
    (path / "src").mkdir()
    (path / "src" / "app.py").write_text("def answer():\n    return 42\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    return path


@pytest.fixture
def stop_later() -> Iterator[list[Daemon]]:
    """Daemons a test started, stopped at its end whatever happened."""
    daemons: list[Daemon] = []
    yield daemons
    for daemon in daemons:
        daemon.stop()
