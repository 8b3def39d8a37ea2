"""The pieces of systemd's service protocol we speak: sd_notify, the watchdog and socket
activation.

Implemented directly (a datagram to ``$NOTIFY_SOCKET``, file descriptors from
``$LISTEN_FDS``) rather than through a binding: each is a dozen lines and works the same
without libsystemd installed.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Mapping

__all__ = [
    "LISTEN_FDS_START",
    "child_environment",
    "listen_socket",
    "monotonic_usec",
    "notify",
    "watchdog_interval_s",
]

# sd_listen_fds(3): passed descriptors start at 3, after stdin, stdout and stderr.
LISTEN_FDS_START = 3


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd; False when not run under it.

    ``$NOTIFY_SOCKET`` may name a path or, with a leading ``@``, an abstract socket.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


# What systemd tells the service alone; a child that saw these could speak for the service
# (sd_notify's unset_environment does the same for the process itself).
_SERVICE_ONLY = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)


def child_environment(*overlays: Mapping[str, str]) -> dict[str, str]:
    """This process's environment for a gate or a worker: without systemd's service-only
    variables (so agent code cannot send READY=1 or WATCHDOG=1 for the daemon), plus
    ``overlays`` in order."""
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_ONLY}
    for overlay in overlays:
        env.update(overlay)
    return env


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, as ``RELOADING=1`` wants in ``MONOTONIC_USEC``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd asked for (``WATCHDOG_USEC``), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        interval = int(usec) / 1_000_000 / 2
    except ValueError:
        return None
    return interval if interval > 0 else None


def listen_socket() -> socket.socket | None:
    """The listening Unix stream socket systemd passed us (``orchestrator.socket``), if any.

    Follows sd_listen_fds(3): the descriptors are ours only when ``$LISTEN_PID`` is this
    process. The variables are removed either way, so agents and gates started later do
    not mistake the descriptors for their own. Descriptors that are not a listening
    ``AF_UNIX`` stream socket are closed: the daemon has no use for them, and leaving them
    open would leak them into every child.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count:
        return None
    try:
        n = int(count)
    except ValueError:
        return None
    found: socket.socket | None = None
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + n):
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                raise ValueError
            sock = socket.socket(fileno=fd)
        except (OSError, ValueError):
            _close_quietly(fd)
            continue
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if found is None and sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            if listening:
                sock.set_inheritable(False)
                found = sock
                continue
        sock.close()
    return found


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
