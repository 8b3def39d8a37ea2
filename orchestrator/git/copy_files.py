"""``[workspace] copy_files``: untracked files (``.env``) copied into fresh checkouts.

Every lease directory and every gate checkout starts from exactly the committed files,
so the untracked ones a project needs to run (``.env``, local settings) are copied from
the integration repository's working tree (``repository.path``) after each checkout.

Both sides are walked one component at a time with ``O_NOFOLLOW``: a symlink anywhere on
the way (in the source, or one an agent left in its directory) is never followed, so no
file outside either tree is read or written. A source that is not a regular file is
skipped and said so; the copy lands under a temporary name and is renamed into place,
which replaces whatever was there (a symlink itself, never its target).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from orchestrator.git.untrusted import open_dir_nofollow, read_regular_nofollow, write_new_nofollow

# What the destination's own content in the way gives (a file or symlink where a directory
# goes, a directory where the file goes): the copy is skipped, not the checkout failed.
_BLOCKED_BY_CHECKOUT = frozenset({errno.ENOTDIR, errno.ELOOP, errno.EISDIR, errno.ENOTEMPTY})

# A file bigger than this is no .env: it is not copied.
MAX_COPY_BYTES = 16 << 20


class CopyError(OSError):
    """A configured file could not be put into the checkout."""


@dataclass(frozen=True)
class CopyResult:
    """What :func:`copy_untracked` did: the paths copied and those skipped, with why."""

    copied: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def copy_untracked(source_root: Path, dest_root: Path, paths: Sequence[str]) -> CopyResult:
    """Copy each of ``paths`` (relative, as config.py validated them) from
    ``source_root`` to ``dest_root``; one the checkout's own content is in the way of is
    skipped; :class:`CopyError` when one cannot be written otherwise."""
    copied: list[str] = []
    skipped: list[tuple[str, str]] = []
    for rel in paths:
        parts = PurePosixPath(rel).parts
        if not parts or any(p in ("", ".", "..") for p in parts) or rel.startswith("/"):
            skipped.append((rel, "not a plain relative path"))
            continue
        found = _read_source(source_root, parts)
        if isinstance(found, str):
            skipped.append((rel, found))
            continue
        data, mode = found
        try:
            _write_dest(dest_root, parts, data, mode)
        except OSError as exc:
            if exc.errno in _BLOCKED_BY_CHECKOUT:
                # The checkout's own content (a committed file where a directory goes, a
                # directory where the file goes) is in the way: the report check refuses
                # such a branch; failing the checkout would fail every lease of it.
                skipped.append((rel, f"the checkout's own content is in the way ({exc.strerror})"))
                continue
            raise CopyError(
                exc.errno,
                f"cannot copy {rel} (workspace.copy_files) into {dest_root}: {exc.strerror}",
            ) from exc
        copied.append(rel)
    return CopyResult(tuple(copied), tuple(skipped))


def _read_source(root: Path, parts: tuple[str, ...]) -> tuple[bytes, int] | str:
    """The file's bytes and mode, or why it is not copied."""
    try:
        fd = open_dir_nofollow(root)
    except OSError as exc:
        return f"{root} cannot be opened ({exc.strerror})"
    try:
        for name in parts[:-1]:
            try:
                inner = open_dir_nofollow(name, fd)
            except OSError:
                return f"{name} is missing, a symlink or no directory"
            os.close(fd)
            fd = inner
        try:
            info = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return "missing in repository.path"
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file (symlinks are never followed)"
        data = read_regular_nofollow(fd, parts[-1], MAX_COPY_BYTES)
        if data is None:
            return f"not a regular file of at most {MAX_COPY_BYTES} bytes"
        return data, info.st_mode
    finally:
        os.close(fd)


def _write_dest(root: Path, parts: tuple[str, ...], data: bytes, mode: int) -> None:
    fd = open_dir_nofollow(root)
    try:
        for name in parts[:-1]:
            try:
                inner = open_dir_nofollow(name, fd)
            except FileNotFoundError:
                os.mkdir(name, 0o770, dir_fd=fd)
                inner = open_dir_nofollow(name, fd)
            os.close(fd)
            fd = inner
        temp = f".{parts[-1]}.orchestrator-copy-{secrets.token_hex(4)}"
        # Group bits as the owner's: in a lease directory the agent's access comes from
        # an inherited ACL, which the group bits of the mode mask.
        owner = mode & 0o700
        write_new_nofollow(fd, temp, data, owner | (owner >> 3))
        try:
            os.rename(temp, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=fd)
            raise
    finally:
        os.close(fd)
