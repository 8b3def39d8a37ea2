"""``orchestrator init``: a first config for the repository you are standing in.

It finds what it can (the repository's top folder, the branch checked out there, a test
command the project already declares) and says plainly what it guessed, so the file is a
starting point a person reads once, not a form to fill in.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pygit2

CONFIG_NAME = "orchestrator.toml"
STATE_DIR_NAME = ".orchestrator"
# Branch names tried, in order, when HEAD is detached or unborn.
FALLBACK_BRANCHES = ("main", "master", "trunk", "develop")


class InitError(Exception):
    """Why no config was written; the message says what to do instead."""


@dataclass(frozen=True)
class GateGuess:
    """A validation gate inferred from the project's files."""

    name: str
    run: tuple[str, ...]
    reason: str
    """What in the project suggested it, for the comment above the gate."""


@dataclass(frozen=True)
class StarterConfig:
    """What ``init`` wrote."""

    path: Path
    repository: Path
    branch: str
    state_dir: Path
    gate: GateGuess | None


def find_repository(start: Path) -> Path:
    """The top folder of the git checkout containing ``start``."""
    found = pygit2.discover_repository(str(start))
    if found is None:
        raise InitError(
            f"{start} is not inside a git repository; run orchestrator init in your "
            "project's checkout (or git init one first)"
        )
    repo = pygit2.Repository(found)
    if repo.is_bare or repo.workdir is None:
        raise InitError(f"{found} is a bare repository; run orchestrator init in a checkout")
    return Path(repo.workdir).resolve()


def find_branch(repository: Path) -> str:
    """The integration branch: the one checked out, else a conventional one that exists."""
    repo = pygit2.Repository(str(repository))
    if not repo.head_is_detached:
        # An unborn HEAD (no commit yet) still names its branch.
        target = repo.references["HEAD"].target
        if isinstance(target, str) and target.startswith("refs/heads/"):
            name = target.removeprefix("refs/heads/")
            if repo.lookup_branch(name) is not None:
                return name
            raise InitError(
                f"branch {name!r} has no commit yet; commit something first "
                "(the daemon merges onto an existing branch)"
            )
    for name in FALLBACK_BRANCHES:
        if repo.lookup_branch(name) is not None:
            return name
    raise InitError(
        "HEAD is detached and none of " + ", ".join(FALLBACK_BRANCHES) + " exists; "
        "check out the branch work should land on, then run orchestrator init again"
    )


def guess_gate(repository: Path) -> GateGuess | None:
    """The project's own test command, if its files declare one; ``None`` otherwise.

    A Makefile ``test`` target comes first: it is the project saying how it wants to be
    tested. Then the ecosystems' conventions.
    """
    makefile = next(
        (
            repository / n
            for n in ("GNUmakefile", "Makefile", "makefile")
            if (repository / n).is_file()
        ),
        None,
    )
    if makefile is not None and re.search(
        r"^test\s*:", makefile.read_text(encoding="utf-8", errors="replace"), re.MULTILINE
    ):
        return GateGuess("tests", ("make", "test"), f"{makefile.name} has a test target")
    package = repository / "package.json"
    if package.is_file():
        try:
            scripts = json.loads(package.read_text(encoding="utf-8")).get("scripts") or {}
        except (ValueError, AttributeError):
            scripts = {}
        if isinstance(scripts, dict) and "test" in scripts:
            return GateGuess("tests", ("npm", "test"), "package.json has a test script")
    if (repository / "Cargo.toml").is_file():
        return GateGuess("tests", ("cargo", "test"), "Cargo.toml (a Rust crate)")
    if (repository / "go.mod").is_file():
        return GateGuess("tests", ("go", "test", "./..."), "go.mod (a Go module)")
    if _looks_like_pytest(repository):
        return GateGuess("tests", ("python3", "-m", "pytest", "-q"), "Python tests found (pytest)")
    return None


def _looks_like_pytest(repository: Path) -> bool:
    if (repository / "pytest.ini").is_file() or (repository / "conftest.py").is_file():
        return True
    pyproject = repository / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            data = {}
        if "pytest" in data.get("tool", {}):
            return True
    tests = repository / "tests"
    return tests.is_dir() and any(tests.glob("test_*.py"))


def render(repository: Path, branch: str, gate: GateGuess | None) -> str:
    """The text of the starter config."""
    lines = [
        "# orchestrator configuration, written by `orchestrator init`.",
        "# Every key is described in config/orchestrator.toml of the orchestrator sources.",
        "# Check it with: orchestrator check-config --config PATH",
        "",
        "[repository]",
        f"path = {_toml_string(str(repository))}",
        "# The branch checked out when init ran; completed work lands here.",
        f"integration_branch = {_toml_string(branch)}",
        "",
        "[daemon]",
        "# The store, the agents' worktrees and the socket, beside this file",
        "# (relative paths are taken from this file's folder).",
        f"state_dir = {_toml_string(STATE_DIR_NAME)}",
        "",
        "[metrics]",
        "# /metrics for Prometheus and the live page at http://127.0.0.1:9464/",
        'listen = "127.0.0.1:9464"',
        "",
    ]
    if gate is None:
        lines += [
            "# No test command found. A gate is a command that must pass before a merge:",
            "# [[gates]]",
            '# name = "tests"',
            '# run = ["make", "test"]',
            "# timeout_s = 900",
        ]
    else:
        lines += [
            f"# GUESSED from the project ({gate.reason}): check that it is the command",
            "# that must pass before work lands, and that it passes on a clean checkout.",
            "[[gates]]",
            f"name = {_toml_string(gate.name)}",
            "run = [" + ", ".join(_toml_string(arg) for arg in gate.run) + "]",
            "timeout_s = 900",
        ]
    return "\n".join(lines) + "\n"


def _toml_string(value: str) -> str:
    # JSON string syntax is a subset of TOML's basic strings for everything json.dumps
    # writes with ensure_ascii (escapes \uXXXX, \", \\, \n ...).
    return json.dumps(value, ensure_ascii=True)


def write_starter_config(start: Path, *, force: bool = False) -> StarterConfig:
    """Write ``orchestrator.toml`` at the top of the repository containing ``start``.

    Refuses (:class:`InitError`) to replace an existing file unless ``force``. The state
    folder is listed in the checkout's ``.git/info/exclude`` so it never shows up as an
    untracked change.
    """
    repository = find_repository(start)
    branch = find_branch(repository)
    gate = guess_gate(repository)
    path = repository / CONFIG_NAME
    if path.exists() and not force:
        raise InitError(f"{path} already exists; pass --force to replace it")
    path.write_text(render(repository, branch, gate), encoding="utf-8")
    _exclude_state_dir(repository)
    return StarterConfig(path, repository, branch, repository / STATE_DIR_NAME, gate)


def _exclude_state_dir(repository: Path) -> None:
    repo = pygit2.Repository(str(repository))
    exclude = Path(repo.path) / "info" / "exclude"
    pattern = f"/{STATE_DIR_NAME}/"
    existing = exclude.read_text(encoding="utf-8") if exclude.is_file() else ""
    if pattern in existing.splitlines():
        return
    exclude.parent.mkdir(parents=True, exist_ok=True)
    prefix = "" if not existing or existing.endswith("\n") else "\n"
    with exclude.open("a", encoding="utf-8") as out:
        out.write(f"{prefix}# orchestrator's state (orchestrator init)\n{pattern}\n")


def next_commands(result: StarterConfig, cwd: Path) -> list[str]:
    """The three commands that take a newcomer from this file to merged work."""
    config = (
        "" if result.path.parent == cwd.resolve() else f" --config {shlex.quote(str(result.path))}"
    )
    return [
        f"orchestrator serve{config}",
        f"orchestrator worker{config} -- ./my-agent.sh",
        f"orchestrator submit{config} my-handoff.md",
    ]
