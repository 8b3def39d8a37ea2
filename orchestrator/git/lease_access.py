"""Letting an agent's uid write its lease directory: POSIX ACLs, set by the daemon.

Why ACLs (and not a shared group, nor chown): a daemon running as its own service user
cannot chown, and a shared group needs every agent user and the daemon put in one group
and a umask that keeps group write on every file git writes, which is configuration the
operator must get right. An ACL entry naming the lease's uid, on every file and (as a
default entry, inherited by whatever git or the agent creates) on every directory, needs
neither: a uid admitted by ``daemon.allowed_uids`` can write and commit with plain git.
The daemon's own uid is in the default entries too, so it can always clean up what the
agent created. Files stay owned by the daemon, so nothing the agent creates can deny it.

The ACL is written with ``fsetxattr`` on a file descriptor opened with ``O_NOFOLLOW``
under a directory descriptor (``os.fwalk``): no symlink an agent planted is followed, so
no file outside the directory ever gets an entry for the agent.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

__all__ = ["AccessError", "ForeignFiles", "allow", "grant"]

_ACCESS = "system.posix_acl_access"
_DEFAULT = "system.posix_acl_default"
_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_UNDEFINED_ID = 0xFFFFFFFF


class AccessError(OSError):
    """The file system refused the ACL (mounted without ACL support?)."""


class ForeignFiles(RuntimeError):
    """The directory holds files of a uid that is neither the daemon's nor the grantee's
    (left by an earlier lease of another uid): it must not be handed over."""


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    # The kernel wants entries sorted by tag, then id.
    body = b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in sorted(entries))
    return struct.pack("<I", _VERSION) + body


def _access_acl(mode: int, uid: int) -> bytes:
    owner = (mode >> 6) & 7
    group = (mode >> 3) & 7
    # The agent gets what the owner (the daemon) has, e.g. no write on git's read-only
    # objects, which git never rewrites anyway.
    return _acl(
        [
            (_USER_OBJ, owner, _UNDEFINED_ID),
            (_USER, owner, uid),
            (_GROUP_OBJ, group, _UNDEFINED_ID),
            (_MASK, owner | group, _UNDEFINED_ID),
            (_OTHER, mode & 7, _UNDEFINED_ID),
        ]
    )


def _default_acl(uid: int, daemon_uid: int) -> bytes:
    entries = [
        (_USER_OBJ, 7, _UNDEFINED_ID),
        (_USER, 7, uid),
        (_GROUP_OBJ, 5, _UNDEFINED_ID),
        (_MASK, 7, _UNDEFINED_ID),
        (_OTHER, 5, _UNDEFINED_ID),
    ]
    if daemon_uid != uid:
        entries.append((_USER, 7, daemon_uid))
    return _acl(entries)


def _set(fd: int, mode: int, uid: int, default: bytes | None) -> None:
    try:
        os.setxattr(fd, _ACCESS, _access_acl(mode, uid))
        if default is not None:
            os.setxattr(fd, _DEFAULT, default)
    except OSError as exc:
        raise AccessError(
            exc.errno,
            f"cannot set an ACL ({exc.strerror}); lease directories for other uids need a "
            "file system with POSIX ACLs (ext4, xfs, btrfs, tmpfs mount them by default)",
        ) from exc


def grant(root: Path, uid: int) -> int:
    """Give ``uid`` the owner's access to everything under ``root`` (``root`` included),
    and make it inherited by whatever is created there later. Returns how many entries
    got an ACL. Symlinks are skipped (an ACL on one would land on its target).
    :class:`ForeignFiles` if something there belongs to a third uid."""
    daemon = os.geteuid()
    mine = (daemon, uid)
    default = _default_acl(uid, daemon)
    count = 0
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _set(top, os.fstat(top).st_mode, uid, default)
        count += 1
    finally:
        os.close(top)
    for _, dirs, files, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in dirs:
            fd = _open(name, dir_fd, directory=True)
            if fd is None:
                continue
            try:
                info = os.fstat(fd)
                if info.st_uid not in mine:
                    raise ForeignFiles(f"{root}: {name} belongs to uid {info.st_uid}")
                _set(fd, info.st_mode, uid, default)
                count += 1
            finally:
                os.close(fd)
        for name in files:
            fd = _open(name, dir_fd, directory=False)
            if fd is None:
                continue
            try:
                info = os.fstat(fd)
                if info.st_uid not in mine:
                    raise ForeignFiles(f"{root}: {name} belongs to uid {info.st_uid}")
                if stat.S_ISREG(info.st_mode):
                    _set(fd, info.st_mode, uid, None)
                    count += 1
            finally:
                os.close(fd)
    return count


def _open(name: str, dir_fd: int, *, directory: bool) -> int | None:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    if directory:
        flags |= os.O_DIRECTORY
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return None  # a symlink (ELOOP), a socket, or gone meanwhile


_GROUP = 0x08
_READ, _WRITE, _SEARCH = 4, 2, 1


def _parse(blob: bytes) -> dict[tuple[int, int], int]:
    entries: dict[tuple[int, int], int] = {}
    for at in range(4, len(blob) - 7, 8):
        tag, perm, ident = struct.unpack_from("<HHI", blob, at)
        entries[(tag, ident)] = perm
    return entries


def _from_mode(mode: int) -> dict[tuple[int, int], int]:
    return {
        (_USER_OBJ, _UNDEFINED_ID): (mode >> 6) & 7,
        (_GROUP_OBJ, _UNDEFINED_ID): (mode >> 3) & 7,
        (_OTHER, _UNDEFINED_ID): mode & 7,
    }


def _widened(
    entries: dict[tuple[int, int], int], names: list[tuple[int, int]], perm: int
) -> dict[tuple[int, int], int] | None:
    """``entries`` with ``perm`` added for every named (tag, id); None if nothing changes.
    The mask (the owning group's bits when there was none) is widened by ``perm``."""
    changed = dict(entries)
    for name in names:
        changed[name] = changed.get(name, 0) | perm
    mask = changed.get((_MASK, _UNDEFINED_ID), changed[(_GROUP_OBJ, _UNDEFINED_ID)])
    changed[(_MASK, _UNDEFINED_ID)] = mask | perm
    return None if changed == entries else changed


def _encode(entries: dict[tuple[int, int], int]) -> bytes:
    return _acl([(tag, perm, ident) for (tag, ident), perm in entries.items()])


def allow(
    target: int | Path,
    *,
    uids: tuple[int, ...] = (),
    gids: tuple[int, ...] = (),
    perm: int,
    inherit: bool = False,
) -> bool:
    """Add ``perm`` (``os.R_OK | os.X_OK`` style bits) for each of ``uids`` and ``gids`` to
    the access ACL of ``target`` (an open file descriptor, or a path that is not followed
    if it is a symlink), keeping every entry already there. ``inherit`` (directories): the
    same entries in the default ACL, so that files created there later get them whatever
    the creator's umask. Returns whether anything was written."""
    names = [(_USER, u) for u in uids] + [(_GROUP, g) for g in gids]
    if not names:
        return False
    info = os.stat(target, follow_symlinks=False) if isinstance(target, Path) else os.fstat(target)

    def get(attr: str) -> dict[tuple[int, int], int] | None:
        try:
            if isinstance(target, Path):
                return _parse(os.getxattr(target, attr, follow_symlinks=False))
            return _parse(os.getxattr(target, attr))
        except OSError:
            return None

    def put(attr: str, entries: dict[tuple[int, int], int]) -> None:
        try:
            if isinstance(target, Path):
                os.setxattr(target, attr, _encode(entries), follow_symlinks=False)
            else:
                os.setxattr(target, attr, _encode(entries))
        except OSError as exc:
            raise AccessError(exc.errno, f"cannot set an ACL on {target} ({exc.strerror})") from exc

    wrote = False
    access = _widened(get(_ACCESS) or _from_mode(info.st_mode), names, perm)
    if access is not None:
        put(_ACCESS, access)
        wrote = True
    if inherit and stat.S_ISDIR(info.st_mode):
        # Without a default ACL new files take the creator's umask; the base entries of
        # the one written here are the directory's own bits, which is what git's umask
        # gave before, give or take the named entries.
        default = _widened(get(_DEFAULT) or _from_mode(info.st_mode), names, perm)
        if default is not None:
            put(_DEFAULT, default)
            wrote = True
    return wrote
