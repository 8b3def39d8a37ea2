"""``[workspace] setup`` in a lease directory, run by the worker before the agent.

The daemon never runs a command in a directory an agent writes: what is there (a
``pyproject.toml``, a ``package.json`` with install scripts) is the agent's doing. So the
lease result carries ``setup`` (``command``, ``needed``, ``keep``, ``timeoutS``) and the
worker runs it, as itself (the agent's uid), in the worktree, with the agent's
environment. ``needed`` is false while the directory's kept paths were built for the
same cache key. When setup fails, the kept paths are removed (they may be half built),
so the next lease of the directory builds them again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import anyio

from orchestrator import deathsig
from orchestrator.protocol.lease_grant import LeaseGrant

# How much of a failed setup's output the release reason quotes.
TAIL_BYTES = 2000
TERM_GRACE_S = 5.0


@dataclass(frozen=True)
class SetupSpec:
    """The lease result's ``setup`` field."""

    command: tuple[str, ...]
    needed: bool
    keep: tuple[str, ...]
    timeout_s: float

    @classmethod
    def from_lease(cls, lease: LeaseGrant) -> SetupSpec | None:
        """The lease's setup, or None when it has none (an older daemon sends none)."""
        setup = lease.setup
        if setup is None:
            return None
        return cls(setup.command, setup.needed, setup.keep, setup.timeout_s)


@dataclass(frozen=True)
class SetupOutcome:
    """How a setup run ended: ``status`` 0 is success; ``tail``, the end of its output."""

    status: int
    tail: str
    timed_out: bool = False


async def run_setup(spec: SetupSpec, worktree: Path, env: dict[str, str]) -> SetupOutcome:
    """Run ``spec.command`` in ``worktree``; on failure remove the kept paths."""
    try:
        process = await anyio.open_process(
            deathsig.wrapper_argv(spec.command),
            cwd=worktree,
            env=env,
            stdin=-1,
            stdout=-1,
            stderr=-2,  # into stdout: one tail in the order it was written
            start_new_session=True,
        )
    except OSError as exc:
        remove_kept(worktree, spec.keep)
        return SetupOutcome(127, f"setup could not start: {exc}")
    assert process.stdin is not None and process.stdout is not None
    await process.stdin.aclose()
    output = bytearray()
    timed_out = False
    try:
        with anyio.move_on_after(spec.timeout_s) as scope:
            async for chunk in process.stdout:
                # The worker's log shows it whole; the lease's reason only the tail.
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                output += chunk
                del output[: max(0, len(output) - TAIL_BYTES)]
            await process.wait()
        timed_out = scope.cancelled_caught
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(process)
    status = process.returncode if process.returncode is not None else -1
    if timed_out and status == 0:
        status = -1
    if status != 0:
        remove_kept(worktree, spec.keep)
    return SetupOutcome(status, output.decode("utf-8", "replace"), timed_out)


async def _stop(process: Any) -> None:
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if process.returncode is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)
        with anyio.move_on_after(TERM_GRACE_S):
            await process.wait()
    # Whatever the command left running in its group goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


def remove_kept(worktree: Path, keep: tuple[str, ...]) -> None:
    """Delete the kept paths in ``worktree`` (a symlink itself, never what it names)."""
    for rel in keep:
        parts = PurePosixPath(rel).parts
        if not parts or any(p in ("", ".", "..") for p in parts) or rel.startswith("/"):
            continue
        target = worktree.joinpath(*parts)
        # No symlink on the way: nothing outside the worktree is touched.
        if any(worktree.joinpath(*parts[:i]).is_symlink() for i in range(1, len(parts))):
            continue
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            continue
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(target)
            else:
                target.unlink()
