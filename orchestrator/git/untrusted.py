"""Running git on, and writing files into, directories an agent can write.

An agent runs arbitrary code with its worker's uid, so anything in its lease directory
may be a trap laid for the daemon: a ``.git`` that is a symlink or a ``gitdir:`` file
pointing elsewhere, a ``core.fsmonitor`` / hook / filter command in ``.git/config``, a
symlink named like a file the daemon is about to write. The rules here:

* git the daemon runs there reads no configuration the agent can write: no system or
  global config (the daemon's user's ``~/.gitconfig`` may be shared with agents of the
  same uid), hooks and fsmonitor switched off on the command line, and the git
  directory named explicitly (never discovered by walking up from a working tree).
* files the daemon writes there are created with ``O_NOFOLLOW | O_EXCL`` relative to a
  directory file descriptor opened with ``O_NOFOLLOW``, so no symlink on the way is
  followed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "HARDENED_CONFIG",
    "hardened_env",
    "is_plain_dir",
    "open_dir_nofollow",
    "read_regular_nofollow",
    "write_new_nofollow",
]

# Command-line config wins over every file git reads, so these hold whatever a
# repository's own config says. hooksPath=/dev/null: no hook can run (git finds no
# executable under it); fsmonitor=false: no fsmonitor command, nor the builtin daemon;
# untrackedCache=false: no cache the agent wrote decides what is untracked;
# protocol.file.allow: fetching from a lease repository is a local-file transport.
HARDENED_CONFIG: tuple[str, ...] = (
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "core.untrackedCache=false",
    "-c",
    "core.sshCommand=false",
    "-c",
    "protocol.file.allow=always",
    "-c",
    "submodule.recurse=false",
    "-c",
    "gc.auto=0",
    "-c",
    "maintenance.auto=false",
    "-c",
    "transfer.fsckObjects=true",
)

# Inherited variables that would smuggle configuration into our git processes.
_CONFIG_ENV = ("GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT", "GIT_CONFIG", "GIT_EXEC_PATH")


def hardened_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` with no system or global git config, and none passed in by variables."""
    env = {
        k: v
        for k, v in base.items()
        if k not in _CONFIG_ENV and not k.startswith(("GIT_CONFIG_KEY_", "GIT_CONFIG_VALUE_"))
    }
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    env["GIT_CONFIG_GLOBAL"] = "/dev/null"
    env["GIT_ATTR_NOSYSTEM"] = "1"
    env["GIT_NO_REPLACE_OBJECTS"] = "1"
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GIT_PROTOCOL_FROM_USER"] = "0"
    env["GIT_ASKPASS"] = "/bin/false"
    env["SSH_ASKPASS"] = "/bin/false"
    return env


def is_plain_dir(path: Path) -> bool:
    """True if ``path`` itself (not what a symlink there names) is a directory."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def open_dir_nofollow(name: str | Path, dir_fd: int | None = None) -> int:
    """A file descriptor of the directory ``name``; OSError if it is a symlink or no dir."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def write_new_nofollow(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Create ``name`` in the directory ``dir_fd`` and write ``data``; never follows or
    reuses what is there already (FileExistsError if anything is)."""
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def read_regular_nofollow(dir_fd: int, name: str, limit: int) -> bytes | None:
    """The bytes of the regular file ``name`` in ``dir_fd``; None if it is missing, a
    symlink, not a regular file (a FIFO would block us), or larger than ``limit``."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
