"""``python -m orchestrator.deathsig CMD ARGS...``: exec CMD so that the kernel kills it
when the process that started it dies, even by SIGKILL.

The generic worker runs agents through this, so an agent can never outlive its worker
and keep writing into a worktree that the next attempt of the handoff now owns.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m orchestrator.deathsig CMD [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the worker's process-group kill still covers orderly exits
    if os.getppid() != parent:
        return 1  # the parent died before the request took effect
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"cannot run agent {argv[0]!r}: {exc}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
