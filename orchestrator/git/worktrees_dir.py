"""The directory of the daemon's checkouts (``worktrees_dir``): its layout, keeping every
path inside it, and clearing out what agents and gates leave in it.

Layout of ``worktrees_dir``::

    <name>/          the repository leased to the handoff <name>
    .pool/<id>/      idle lease repositories
    .state/<key>/    the daemon's index of each of them (``L-<name>``, ``P-<id>``)
    .build/          git dirs being written, renamed into a lease when complete
    .trash/          what is being deleted (old ``.git`` dirs, discarded directories)
    .gate/           the gate worktree, detached at the candidate being validated
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.git.command import GitError

__all__ = [
    "BUILD_DIR",
    "GATE_DIR",
    "POOL_DIR",
    "STATE_DIR",
    "TRASH_DIR",
    "assert_inside",
    "is_inside",
    "listdir",
    "make_writable_and_retry",
    "remove_special_files",
]

POOL_DIR = ".pool"
GATE_DIR = ".gate"
# The daemon's own bookkeeping next to the lease directories (see checkout_for_lease).
STATE_DIR = ".state"
BUILD_DIR = ".build"
TRASH_DIR = ".trash"


def assert_inside(worktrees_dir: Path, path: Path) -> None:
    """Raise :class:`GitError` unless ``path`` resolves to somewhere under the (resolved)
    ``worktrees_dir``."""
    resolved = path.resolve()
    if resolved == worktrees_dir or worktrees_dir not in resolved.parents:
        raise GitError(
            f"refusing to touch {path}: it resolves to {resolved}, outside the "
            f"worktrees directory {worktrees_dir}"
        )


def is_inside(worktrees_dir: Path, path: Path) -> bool:
    """Whether ``path`` resolves to somewhere under ``worktrees_dir``."""
    try:
        assert_inside(worktrees_dir, path)
    except GitError:
        return False
    return True


_SPECIAL_FILE_TYPES = frozenset((stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK))


def remove_special_files(root: Path) -> list[str]:
    """Remove every FIFO, socket and device file under ``root`` (symlinks are not
    followed; a linked worktree's ``.git`` file stays); their paths, relative to ``root``.

    Left by code a gate or an agent ran, such a file where git reads (``.gitattributes``,
    ``.gitignore``, ``.git/packed-refs``) makes git block forever on open."""
    removed: list[str] = []
    # By directory fd, never by path: an agent that swaps a directory for a symlink while
    # we walk must not make us unlink a socket or FIFO elsewhere (the daemon's own socket).
    for directory, _dirs, files, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in files:
            try:
                mode = os.lstat(name, dir_fd=dir_fd).st_mode
            except FileNotFoundError:
                continue
            if stat.S_IFMT(mode) in _SPECIAL_FILE_TYPES:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dir_fd)
                removed.append(os.path.relpath(os.path.join(directory, name), root))
    return removed


def listdir(path: Path) -> list[str]:
    """The entries of ``path``, sorted; none when it does not exist."""
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def make_writable_and_retry(
    func: Callable[..., Any], target: str, _exc: Any
) -> None:  # pragma: no cover - only with read-only files (e.g. Go's module cache)
    """``shutil.rmtree``'s ``onerror``: make ``target`` and its directory writable (never
    through a symlink) and try ``func`` again."""
    parent = os.path.dirname(target)
    for p in (parent, target):
        if os.path.islink(p):
            continue  # chmod would follow it, to whatever file it names
        with contextlib.suppress(OSError):
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR | stat.S_IRUSR | stat.S_IXUSR)
    func(target)
