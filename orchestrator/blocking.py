"""Runs the blocking parts (SQLite, libgit2) in worker threads, off the event loop.

Each resource has a capacity limiter of one: the store's connection and the repository
handle are each used by one thread at a time, and a heartbeat never waits behind a
checkout because the two never share a limiter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

import anyio

P = ParamSpec("P")
T = TypeVar("T")


class Offload:
    """Two single-lane limiters: one for the store, one for git."""

    def __init__(self) -> None:
        self._db = anyio.CapacityLimiter(1)
        self._git = anyio.CapacityLimiter(1)

    async def db(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store call in a thread; the call itself is one transaction."""
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self._db)

    async def git(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a repository call in a thread, one at a time."""
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self._git)
