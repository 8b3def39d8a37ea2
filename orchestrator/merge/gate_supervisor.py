"""``python -m orchestrator.merge.gate_supervisor CMD ARGS...``: run one gate so that no
process it started outlives it, ``setsid`` and double-forked ones included.

A gate runs the agents' code, and that code can leave its process group (``setsid``) or
orphan a grandchild (a double fork) to keep running after the gate ends, rewriting the
next candidate's checkout. A process group kill misses both. This supervisor is a *child
subreaper* (``PR_SET_CHILD_SUBREAPER``): every orphan among its descendants is re-parented
to it instead of to init, so the whole tree stays below it. When the gate command exits,
when the daemon sends ``END_NOW`` (timeout, cancellation), or when the daemon dies
(``PR_SET_PDEATHSIG``), it SIGKILLs every descendant, reaps them, and exits. Under
bubblewrap the PID namespace does the same job a second time: its init dies with the
sandbox, and the kernel kills everything inside.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from types import FrameType

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PARENT_DIED = signal.SIGUSR2
# Sent by the daemon: end the gate and everything it started, now.
END_NOW = signal.SIGUSR1
# A tree that keeps forking while it is being killed gets this many sweeps.
MAX_SWEEPS = 500


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (by parent pid, from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses: fields follow the last ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 2 or fields[0] == b"Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    queue = [root]
    while queue:
        for child in children.get(queue.pop(), ()):
            found.append(child)
            queue.append(child)
    return found


def _reap() -> dict[int, int]:
    statuses: dict[int, int] = {}
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return statuses
        if pid == 0:
            return statuses
        statuses[pid] = status


def end_all() -> None:
    """SIGKILL every descendant until none is left; orphans come back to us to be reaped."""
    me = os.getpid()
    for _ in range(MAX_SWEEPS):
        pids = descendants(me)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.001)
        _reap()
    _reap()


def _end_now(signum: int, frame: FrameType | None) -> None:
    end_all()
    os._exit(128 + signum)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A handler, not SIG_IGN: an ignored signal would stay ignored in the gate."""


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m orchestrator.merge.gate_supervisor CMD [ARGS...]", file=sys.stderr)
        return 2
    parent = int(os.environ.get("ORCHESTRATOR_WORKER_PID") or os.getppid())
    signal.signal(PARENT_DIED, _end_now)
    signal.signal(END_NOW, _end_now)
    _prctl(PR_SET_PDEATHSIG, PARENT_DIED)
    if not _prctl(PR_SET_CHILD_SUBREAPER, 1):
        print("gate supervisor: cannot become a child subreaper here", file=sys.stderr)
    if os.getppid() != parent:
        return 1  # the daemon died before the request took effect: run nothing
    # The daemon's SIGTERM to the group is for the gate; the supervisor waits for it.
    signal.signal(signal.SIGTERM, _ignore)
    try:
        gate = os.posix_spawnp(argv[0], argv, dict(os.environ))
    except OSError as exc:
        print(f"cannot run {argv[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    while True:
        try:
            pid, status = os.waitpid(-1, 0)  # reaps adopted orphans as they die, too
        except ChildProcessError:
            status = 0
            break
        if pid == gate:
            break
    end_all()
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
