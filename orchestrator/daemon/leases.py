"""Leases: grant (with the worktree prepared), renew, release, expire, revoke.

The store decides *which* handoff a worker gets (dependencies merged, priority, then
submission order, labels) and issues the fencing token in the same transaction; this
module adds the parts that are not SQL: long-polling, preparing the worktree, expiry on a
clock, and telling a worker its lease was revoked.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from orchestrator.blocking import Offload
from orchestrator.config import Config
from orchestrator.daemon.ports import PortLedger, PortRange
from orchestrator.daemon.server import Session
from orchestrator.git.copy_files import copy_untracked
from orchestrator.git.workspace import Workspace
from orchestrator.handoff import template as handoff_model
from orchestrator.observe import logs
from orchestrator.observe.metrics import Metrics
from orchestrator.protocol.jsonrpc import INTERNAL_ERROR, RpcError, rfc3339
from orchestrator.store.sqlite import Grant, Store, StoreFull

log = logs.get("leases")


class _QueuedProbe:
    """The queued handoffs' label sets, read once after a wake-up for every long-poll."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.labels: set[frozenset[str]] | None = None  # None: the read failed


class LeaseManager:
    """Owns the dispatch wake-ups and the map of which session holds which lease."""

    def __init__(
        self,
        config: Config,
        store: Store,
        workspace: Workspace,
        offload: Offload,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.store = store
        self.workspace = workspace
        self.offload = offload
        self.metrics = metrics
        self._changed = anyio.Event()
        self._probe: _QueuedProbe | None = None
        self._holders: dict[str, Session] = {}
        self.stopping = False
        self.ports = PortLedger(config.state_dir)

    def wake(self) -> None:
        """Something may have become dispatchable: wake every long-polling acquire."""
        self._changed.set()
        self._changed = anyio.Event()
        self._probe = None  # what is queued is read afresh after every change

    def track(self, lease_id: str, session: Session) -> None:
        """Remember which connection to notify if this lease is revoked."""
        self._holders[lease_id] = session

    def forget(self, lease_id: str) -> None:
        self._holders.pop(lease_id, None)

    async def acquire(self, session: Session, wait_s: float) -> dict[str, Any] | None:
        """Long-poll up to ``wait_s`` for a handoff; returns the protocol's lease object."""
        deadline = time.monotonic() + wait_s
        woken = False
        while True:
            if self.stopping:
                return None
            changed = self._changed
            # After a wake-up, every long-poll looks at one shared read of what is queued
            # and tries a grant (a write transaction) only when something may fit it:
            # a report or a landing wakes all of them, and 500 idle workers each taking
            # the store's one lane queued every heartbeat behind them.
            if not woken or await self._may_grant(session):
                grant = await self.offload.db(
                    self.store.grant,
                    worker=session.worker_name,
                    uid=session.uid,
                    labels=session.labels,
                    ttl_s=self.config.lease_ttl_s,
                    now=time.time(),
                )
                if grant is not None:
                    break
            woken = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with anyio.move_on_after(remaining):
                await changed.wait()
        try:
            return await self._prepare(session, grant)
        except BaseException as exc:
            # The worker will never hear of this lease (its connection went away, or git
            # failed): give the handoff straight back rather than waiting out the TTL.
            with anyio.CancelScope(shield=True):
                await self.offload.db(
                    self.store.abandon_grant,
                    grant.lease_id,
                    reason=f"lease could not be handed over ({type(exc).__name__}: {exc})",
                    now=time.time(),
                )
                self.wake()
            if isinstance(exc, Exception) and not isinstance(exc, RpcError):
                log.exception(
                    "worktree_prepare_failed", handoff=grant.handoff, lease=grant.lease_id
                )
                raise RpcError(
                    INTERNAL_ERROR,
                    f"could not prepare the worktree for {grant.handoff}: {exc}",
                ) from exc
            raise

    async def _may_grant(self, session: Session) -> bool:
        """Whether a handoff queued since the last wake-up may be leased to ``session``."""
        probe = self._probe
        if probe is None:
            probe = self._probe = _QueuedProbe()
            try:
                probe.labels = await self.offload.db(self.store.queued_label_sets)
            finally:
                probe.done.set()
        else:
            await probe.done.wait()
        if probe.labels is None:
            return True  # no answer: let the grant itself decide
        mine = set(session.labels)
        return any(labels <= mine for labels in probe.labels)

    async def _prepare(self, session: Session, grant: Grant) -> dict[str, Any]:
        branch = handoff_model.branch_name(grant.handoff)

        workspace = self.config.workspace

        def prepare() -> tuple[str, str, str, bool]:
            # A branch from an earlier attempt is kept as it is: its commits are the work
            # done so far. A new branch starts at the integration tip, which holds every
            # dependency, since a handoff is dispatched only once they are merged.
            tip = self.workspace.integration_tip()
            base = self.workspace.ensure_branch(branch, tip)
            # The lease's repository gets origin/<integration branch> at this same tip.
            # It is made writable for the worker's uid (SO_PEERCRED), when not the daemon's.
            path = self.workspace.checkout_for_lease(
                grant.handoff, branch, integration=tip, owner_uid=session.uid, warm_up=workspace
            )
            copied = copy_untracked(self.workspace.repo_path, path, workspace.copy_files)
            for rel, why in copied.skipped:
                log.warning("copy_file_skipped", handoff=grant.handoff, path=rel, reason=why)
            # Without setup, what the agent builds in the kept paths serves the next lease.
            warm = bool(workspace.keep or workspace.setup)
            needed = warm and self.workspace.lease_warm_up(grant.handoff, workspace)
            # Commits an unreported attempt left in its directory were taken just now.
            return self.workspace.branch_tip(branch) or base, tip, str(path), needed

        base, integration, worktree, setup_needed = await self.offload.git(prepare)

        def assign_ports() -> PortRange | None:
            live = [row["id"] for row in self.store.open_leases()]
            return self.ports.assign(grant.lease_id, self.config.workspace, live)

        ports = await self.offload.db(assign_ports)
        expires = time.time() + self.config.lease_ttl_s
        await self.offload.db(
            self.store.set_lease_workspace,
            grant.lease_id,
            base_commit=base,
            worktree=worktree,
            branch=branch,
            expires_at=expires,
        )
        self.track(grant.lease_id, session)
        self.metrics.lease_started(grant.lease_id)
        log.info(
            "lease_granted",
            handoff=grant.handoff,
            lease=grant.lease_id,
            token=grant.token,
            worker=session.worker_name,
            attempt=grant.attempt,
            base=base,
            integration=integration,
        )
        handoff = dict(grant.wire)
        handoff["feedback"] = grant.feedback
        extra: dict[str, Any] = {}
        if ports is not None:
            # portBase .. portBase + portCount - 1: ports no other live lease or gate uses.
            extra["portBase"] = ports.base
            extra["portCount"] = ports.count
        if workspace.setup:
            # Run by the worker, as the agent's uid, in the worktree before the agent: the
            # daemon never runs a command in a directory an agent writes.
            extra["setup"] = {
                "command": list(workspace.setup),
                "needed": setup_needed,
                "keep": list(workspace.keep),
                "timeoutS": workspace.setup_timeout_s,
            }
        return {
            "id": grant.lease_id,
            "token": grant.token,
            "handoff": handoff,
            "worktree": worktree,
            "branch": branch,
            # Where the handoff branch stood (first attempt: the integration tip; a
            # retry: the earlier attempts' commits) and where the integration branch is.
            "baseCommit": base,
            "integrationCommit": integration,
            "attempt": grant.attempt,
            "expiresAt": rfc3339(expires),
            **extra,
        }

    async def expire_forever(self) -> None:
        """Expire leases that missed their heartbeats; runs for the daemon's lifetime."""
        interval = min(1.0, self.config.lease_ttl_s / 10)
        store_full = False
        while True:
            try:
                if store_full:
                    # The spell is over only once this write works; the heartbeats that
                    # failed meanwhile were not the workers' fault.
                    extended = await self.offload.db(
                        self.store.extend_open_leases, until=time.time() + self.config.lease_ttl_s
                    )
                    log.info("store_writable_again", leases_extended=extended)
                expired = await self.offload.db(
                    self.store.expire_due,
                    now=time.time(),
                    max_duration_s=self.config.lease_max_duration_s or None,
                )
            except StoreFull as exc:
                # Nothing expires while nothing can be written; the leases keep running,
                # get a full TTL once the store can be written again, and only then are
                # judged by their heartbeats.
                if not store_full:
                    log.error(exc.reason, detail=str(exc))
                store_full = True
                await anyio.sleep(interval)
                continue
            store_full = False
            for item in expired:
                self.metrics.lease_expired(item.lease_id)
                # Worker names are no metric label (unbounded); the log names the worker.
                holder = self._holders.get(item.lease_id)
                log.warning(
                    "lease_expired",
                    handoff=item.handoff,
                    lease=item.lease_id,
                    worker=holder.worker_name if holder is not None else None,
                    new_state=item.new_state,
                    reason=item.reason,
                    metric="orchestrator_lease_expirations_total",
                )
                # The protocol's revocation reasons are cancelled/expired/shutdown: a lease
                # over its maximum duration has expired, by a longer clock.
                await self.revoke(item.lease_id, "expired")
            if expired:
                self.wake()
            await anyio.sleep(interval)

    async def notify_answer(self, lease_id: str, params: dict[str, Any]) -> bool:
        """Send ``lease.answered`` to the lease's worker; False when it is not connected
        (it then finds the answer in its next heartbeat result)."""
        session = self._holders.get(lease_id)
        if session is None or session.closed:
            return False
        await session.notify("lease.answered", params)
        return not session.closed

    async def revoke(self, lease_id: str, reason: str) -> None:
        """Tell the holder (if still connected) to stop working on ``lease_id``."""
        session = self._holders.pop(lease_id, None)
        if session is not None:
            await session.notify("lease.revoked", {"leaseId": lease_id, "reason": reason})
