"""Running git for the daemon: one function every part calls, its time limits, GitError.

Everything here is blocking and meant to run in a worker thread.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from orchestrator.git.untrusted import HARDENED_CONFIG, hardened_env

__all__ = ["GIT_TIMEOUT_S", "UNTRUSTED_GIT_TIMEOUT_S", "GitError", "run_git"]

# Variables that would point our git subprocesses at some other repository, index or
# object store (they are set, for instance, when the daemon is started from a git hook).
_GIT_LOCATION_ENV = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_QUARANTINE_PATH",
)


# No single git command the daemon runs should take this long, even on a huge checkout.
GIT_TIMEOUT_S = 1800.0
# For git reading a directory an agent can write: whatever it planted there (a FIFO that
# appears between our sweep and git's open, say) holds the daemon's one git lane for at
# most this long.
UNTRUSTED_GIT_TIMEOUT_S = 120.0


class GitError(RuntimeError):
    """A git operation failed; the message says what went wrong and what to do."""


def run_git(
    *args: str,
    cwd: Path,
    check: bool = True,
    optional_locks: bool = True,
    untrusted: bool = False,
    index: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run git. ``untrusted``: the command reads a directory an agent can write, so it
    runs with no hooks, no fsmonitor and no system or global config (see
    orchestrator.git.untrusted), and a shorter time limit. The integration
    repository's own hooks (its owner's) run as usual on commands that only touch it."""
    limit = UNTRUSTED_GIT_TIMEOUT_S if untrusted else GIT_TIMEOUT_S
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_ENV}
    if untrusted:
        env = hardened_env(env)
    env["LC_ALL"] = "C"
    env["GIT_TERMINAL_PROMPT"] = "0"
    if index is not None:
        env["GIT_INDEX_FILE"] = str(index)
    if not optional_locks:
        # Reading someone else's checkout must not take its index.lock, or their own
        # git commands could fail while we look.
        env["GIT_OPTIONAL_LOCKS"] = "0"
    try:
        result = subprocess.run(
            ["git", *(HARDENED_CONFIG if untrusted else ()), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            errors="surrogateescape",
            check=False,
            timeout=limit,
        )
    except FileNotFoundError as exc:
        raise GitError(
            f"cannot run git in {cwd}: {exc}; install git or fix the daemon's PATH"
        ) from exc
    except subprocess.TimeoutExpired:
        # Every lease and merge waits on the one git lane: a hung git must not stall
        # the daemon for good.
        raise GitError(
            f"`git {' '.join(args)}` in {cwd} did not finish within {limit:g} s "
            "(a stuck lock, a hook, or a network filesystem?)"
        ) from None
    if check and result.returncode != 0:
        raise GitError(
            f"`git {' '.join(args)}` failed in {cwd} (exit {result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result
