"""``python -m orchestrator.deathsig CMD ARGS...``: run CMD so that it, and every process it
starts, dies with the worker that started it, even when the worker is SIGKILLed. The
daemon starts its gates and its pool's workers the same way, with its own pid.

The generic worker runs agents through this small supervisor. The kernel's parent-death
signal (``PR_SET_PDEATHSIG``) reaches only a direct child, so the supervisor takes it and
kills its whole process group (the worker starts it as a group of its own): an agent's
shells and tools can never outlive the worker and keep writing into a worktree that the
next attempt of the handoff now owns. Orderly stops (the worker's SIGTERM to the group)
reach the agent directly; the supervisor just waits and hands back its exit status.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

PR_SET_PDEATHSIG = 1
PARENT_DIED = signal.SIGUSR2


def wrapper_argv(command: Sequence[str]) -> list[str]:
    """The argv that runs ``command`` under this supervisor.

    By file, isolated and without ``site`` (``-I -S``): it needs only the standard
    library, and skipping site-packages (an editable install's finder, and
    ``importlib.metadata`` for the package's version) makes it start in ~10 ms instead of
    ~120 ms, which every agent run and workspace setup paid."""
    return [sys.executable, "-I", "-S", __file__, *command]


def _kill_group(signum: int, frame: FrameType | None) -> None:
    os.killpg(0, signal.SIGKILL)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A handler, not SIG_IGN: an ignored signal would stay ignored in the agent."""


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m orchestrator.deathsig CMD [ARGS...]", file=sys.stderr)
        return 2
    # The worker says who it is: a worker killed before this process got going would
    # otherwise look like a parent (init) that is still alive.
    parent = int(os.environ.get("ORCHESTRATOR_WORKER_PID") or os.getppid())
    signal.signal(PARENT_DIED, _kill_group)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, PARENT_DIED, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the worker's process-group kill still covers orderly stops
    if os.getppid() != parent:
        return 1  # the worker died before the request took effect: run nothing
    signal.signal(signal.SIGTERM, _ignore)
    try:
        agent = subprocess.Popen(argv)
    except OSError as exc:
        print(f"cannot run {argv[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    status = agent.wait()
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
