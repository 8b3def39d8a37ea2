"""Early conflict warnings: tell an agent its branch will conflict before it reports.

A worker's ``lease.heartbeat`` may carry ``head`` (its branch tip). The tip is merged,
tree only and in memory (nothing is written to the repository), with the integration tip
and with the reported head of each handoff ahead of it in the merge queue; conflicting
paths are sent to the worker as ``lease.warning``, once per new set of paths. The checks
run one at a time in a task of their own, fed by a small queue the heartbeat only drops
its request into: a heartbeat's reply never waits for git.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from orchestrator.blocking import Offload
from orchestrator.clock import SYSTEM_CLOCK, Clock
from orchestrator.git.workspace import GitError, Workspace
from orchestrator.handoff import template as handoff_model
from orchestrator.observe import logs
from orchestrator.store.sqlite import LeaseNotHeld, Store

log = logs.get("warnings")

HEAD_PATTERN = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# Requests waiting for a check; more are dropped (the next heartbeat asks again).
QUEUE_SIZE = 256
# Leases remembered (what was checked and sent); the oldest are forgotten first.
REMEMBERED_LEASES = 4096
# At most one fetch of a lease's unreported head from its repository in this many seconds.
PEEK_INTERVAL_S = 10.0


@dataclass(frozen=True)
class ConflictWarning:
    """What ``lease.warning`` says: ``paths`` would conflict with ``against`` (a handoff
    ahead in the merge queue, or the integration branch)."""

    lease_id: str
    paths: tuple[str, ...]
    against: str


@dataclass(frozen=True)
class _Request:
    lease_id: str
    token: int
    head: str
    send: Callable[[ConflictWarning], Awaitable[None]]


class EarlyWarnings:
    """Checks heads from heartbeats and sends each new conflict once."""

    def __init__(
        self,
        store: Store,
        workspace: Workspace,
        offload: Offload,
        integration_branch: str,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.store = store
        self.clock = clock
        self.workspace = workspace
        self.offload = offload
        self.integration_branch = integration_branch
        self._send: MemoryObjectSendStream[_Request]
        self._receive: MemoryObjectReceiveStream[_Request]
        self._send, self._receive = anyio.create_memory_object_stream[_Request](QUEUE_SIZE)
        # lease -> what its last check looked at (head, tip, queue), to skip a repeat.
        self._checked: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        # When a fetch of each lease's head last failed (monotonic): a worker sending a
        # new made-up head with every heartbeat gets one fetch a while.
        self._peeked: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        # lease -> every (against, paths) already sent.
        self._sent: OrderedDict[str, set[tuple[str, tuple[str, ...]]]] = OrderedDict()

    def note(
        self,
        lease_id: str,
        token: int,
        head: str,
        send: Callable[[ConflictWarning], Awaitable[None]],
    ) -> None:
        """A heartbeat named ``head``: check it soon (never blocks; dropped when busy)."""
        try:
            self._send.send_nowait(_Request(lease_id, token, head, send))
        except anyio.WouldBlock:
            log.debug("warning_check_dropped", lease=lease_id)

    async def run(self) -> None:
        """Check the heads noted, one at a time, for the daemon's lifetime."""
        async with self._receive:
            async for request in self._receive:
                try:
                    warnings = await self._check_request(request)
                    for warning in warnings:
                        await request.send(warning)
                except Exception:  # a warning is advice: its failure must not stop the daemon
                    log.exception("warning_check_failed", lease=request.lease_id)

    async def _check_request(self, request: _Request) -> list[ConflictWarning]:
        try:
            lease = await self.offload.db(
                self.store.lease, request.lease_id, request.token, now=self.clock.now()
            )
        except LeaseNotHeld:
            return []  # ended since the heartbeat: no one to warn
        return await self.check(request.lease_id, lease.handoff, request.head)

    async def check(self, lease_id: str, handoff: str, head: str) -> list[ConflictWarning]:
        """The warnings not sent yet for ``head`` of ``lease_id``'s branch."""
        tip = await self.offload.git(self.workspace.integration_tip)
        queue = [
            (name, queued_head)
            for name, queued_head in await self.offload.db(self.store.merge_queue_heads)
            if name != handoff
        ]
        key = (head, tip, tuple(queue))
        if self._checked.get(lease_id) == key:
            return []
        found: list[ConflictWarning] = []
        if not await self.offload.git(self.workspace.has_commit, head):
            # The head lives in the lease's own repository until it is reported. After a
            # fetch that did not bring it (a made-up head, a broken repository), that
            # lease waits PEEK_INTERVAL_S before the next (a later heartbeat tries again).
            last = self._peeked.get(lease_id)
            if last is not None and self.clock.monotonic() - float(last[0]) < PEEK_INTERVAL_S:
                return found
            branch = handoff_model.branch_name(handoff)
            try:
                have = await self.offload.git(self.workspace.peek_lease_head, handoff, branch, head)
            except GitError:
                have = False
            if not have:
                _remember(self._peeked, lease_id, (self.clock.monotonic(),))
                log.debug("warning_check_skipped", lease=lease_id, reason="head not in lease")
                return found
        _remember(self._checked, lease_id, key)
        for against, commit in [(self.integration_branch, tip), *queue]:
            try:
                paths = await self.offload.git(self.workspace.conflicting_paths, commit, head)
            except GitError as exc:
                # The head is not in the integration repository (yet): nothing to say.
                log.debug("warning_check_skipped", lease=lease_id, reason=str(exc))
                return found
            if not paths:
                continue
            sent = self._sent.setdefault(lease_id, set())
            self._sent.move_to_end(lease_id)
            if (against, paths) in sent:
                continue
            sent.add((against, paths))
            while len(self._sent) > REMEMBERED_LEASES:
                self._sent.popitem(last=False)
            found.append(ConflictWarning(lease_id, paths, against))
            log.info(
                "conflict_warning", lease=lease_id, handoff=handoff, against=against, paths=paths
            )
        return found


def _remember(table: OrderedDict[str, tuple[Any, ...]], key: str, value: tuple[Any, ...]) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > REMEMBERED_LEASES:
        table.popitem(last=False)
