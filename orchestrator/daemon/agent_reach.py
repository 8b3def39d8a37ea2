"""What an agent under a uid of its own must reach, and nothing more, opened by the daemon.

An agent in ``daemon.allowed_uids`` / ``allowed_gids`` (orchestrator-worker@.service runs
them as ``orchestrator-agent``) needs to:

- connect to the socket (its mode, 0660, admits only the daemon's user and group);
- get to its lease directory: search (``x``, not list) on the state directory and on the
  worktrees folder, which stay 0750/0770 otherwise (the lease directory itself is granted
  per lease, ``orchestrator.git.lease_access.grant``);
- read the integration repository's git dir: ``git fetch origin`` in a lease reads it and
  the lease's ``objects/info/alternates`` borrows its objects. Read only: it gets ``r``
  on files and ``r-x`` on directories, and the same as default entries, so the objects
  and refs the daemon writes later (under its umask 0007) are readable to it too.

Everything else (the store, opened 0600 by ``orchestrator.store``, the lock, the gate
checkouts, other leases) keeps no entry for it and no bits for others. Entries are only
ever added: a uid removed from the config later is refused on the socket at once
(SO_PEERCRED), and keeps read access to the repository until the entries are removed by
hand (``setfacl -R -x u:UID``).
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.config import Config
from orchestrator.git import lease_access
from orchestrator.observe import logs

__all__ = ["open_to_agents"]

log = logs.get("agent_reach")


def agents_of(config: Config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The uids and gids to open paths to: the configured ones but the daemon's and root's
    (which need nothing), and the daemon's own group."""
    me = os.geteuid()
    uids = tuple(sorted({u for u in config.allowed_uids if u not in (0, me)}))
    gids = tuple(sorted({g for g in config.allowed_gids if g not in (0, os.getegid())}))
    return uids, gids


def open_to_agents(config: Config, git_dir: Path) -> int:
    """Give the admitted agents' uids and gids what they need of the socket, the state
    directory and ``git_dir`` (the integration repository's). Idempotent and cheap when
    done before (an entry already there is not written again). Returns how many files got
    an entry. A path the daemon does not own is logged and skipped: the operator has to
    open it (README, "Run as a service")."""
    uids, gids = agents_of(config)
    if not uids and not gids:
        return 0
    count = 0

    def allow(target: Path, perm: int, *, inherit: bool = False) -> None:
        nonlocal count
        try:
            if lease_access.allow(target, uids=uids, gids=gids, perm=perm, inherit=inherit):
                count += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning(
                "agent_path_not_opened",
                path=str(target),
                error=str(exc),
                detail="agents of allowed_uids/allowed_gids may be unable to reach it",
            )

    search = os.X_OK
    for directory in _chain(config.state_dir, config.worktrees_dir):
        allow(directory, search)
    allow(Path(config.socket), os.R_OK | os.W_OK)
    repository = git_dir.parent if git_dir.name == ".git" else git_dir
    allow(repository, search)
    count += _open_tree(git_dir, uids, gids)
    return count


def _chain(top: Path, bottom: Path) -> list[Path]:
    """``top`` and every directory from it down to ``bottom`` (just ``bottom`` when it is
    not under ``top``)."""
    top, bottom = top.absolute(), bottom.absolute()
    if bottom != top and top not in bottom.parents:
        return [bottom]
    chain = [bottom]
    while chain[-1] != top:
        chain.append(chain[-1].parent)
    return chain[::-1]


def _open_tree(root: Path, uids: tuple[int, ...], gids: tuple[int, ...]) -> int:
    """Read (and search) for the agents on everything under ``root``, inherited by what is
    created there later. Through descriptors opened O_NOFOLLOW: symlinks are skipped."""
    me = os.geteuid()
    count = 0
    read_dir = os.R_OK | os.X_OK
    try:
        top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        count += _set(top, uids, gids, read_dir, inherit=True, me=me)
    finally:
        os.close(top)
    for _, dirs, files, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name, perm, directory in [(d, read_dir, True) for d in dirs] + [
            (f, os.R_OK, False) for f in files
        ]:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
            if directory:
                flags |= os.O_DIRECTORY
            try:
                fd = os.open(name, flags, dir_fd=dir_fd)
            except OSError:
                continue  # a symlink, a socket, a file it cannot read, or gone meanwhile
            try:
                if _set(fd, uids, gids, perm, inherit=directory, me=me):
                    count += 1
            finally:
                os.close(fd)
    return count


def _set(
    fd: int, uids: tuple[int, ...], gids: tuple[int, ...], perm: int, *, inherit: bool, me: int
) -> bool:
    info = os.fstat(fd)
    if info.st_uid != me and me != 0:
        return False  # not the daemon's to change (a file the owner made by hand)
    try:
        return lease_access.allow(fd, uids=uids, gids=gids, perm=perm, inherit=inherit)
    except OSError as exc:
        log.warning("agent_path_not_opened", fd=fd, error=str(exc))
        return False
