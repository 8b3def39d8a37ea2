"""Leases: grant (with the worktree prepared), renew, report, release, expire, revoke.

The store decides *which* handoff a worker gets (dependencies merged, priority, then
submission order, labels) and issues the fencing token in the same transaction; this
module adds the parts that are not SQL: long-polling, preparing the worktree, expiry on a
clock, and telling a worker its lease was revoked. It is the one owner of a lease's
lifecycle: every renewal, ending and expiry goes through ``LeaseManager``, which alone
reads the TTL and the clock, and keeps the holder map and the lease metrics in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio

from orchestrator.blocking import Offload
from orchestrator.clock import SYSTEM_CLOCK, Clock
from orchestrator.config import Config
from orchestrator.daemon.ports import PortLedger, PortRange
from orchestrator.daemon.server import Session
from orchestrator.git.copy_files import copy_untracked
from orchestrator.git.workspace import Workspace
from orchestrator.handoff import template as handoff_model
from orchestrator.observe import logs
from orchestrator.observe.metrics import Metrics
from orchestrator.protocol.asking import Question
from orchestrator.protocol.jsonrpc import INTERNAL_ERROR, REPORT_REJECTED, RpcError
from orchestrator.protocol.lease_grant import LeasedHandoff, LeaseGrant, LeasePorts, LeaseSetup
from orchestrator.protocol.records import LeaseRecord, Progress, Report
from orchestrator.store.sqlite import Expired, Grant, LeaseNotHeld, Store, StoreFull
from orchestrator.store.states import State

log = logs.get("leases")

# After this many grants in a row of one handoff whose worktree could not be prepared, the
# failure is the handoff's (what its branch holds), not a passing one: it spends an attempt.
PREPARE_FAILURES_CHARGED = 3


@dataclass(frozen=True)
class Renewal:
    """What a heartbeat gives back: the new expiry, and an answer the worker missed."""

    expires_at: float
    answer: str | None


class _QueuedProbe:
    """The queued handoffs' label sets, read once after a wake-up for every long-poll."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.labels: set[frozenset[str]] | None = None  # None: the read failed


class LeaseManager:
    """The one owner of a lease's lifecycle (grant, renew, ask, report, release, expire,
    revoke), of the dispatch wake-ups and of the map of which session holds which lease.
    Expiry is computed from its clock and the configured TTL, here only."""

    def __init__(
        self,
        config: Config,
        store: Store,
        workspace: Workspace,
        offload: Offload,
        metrics: Metrics,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        self.store = store
        self.workspace = workspace
        self.offload = offload
        self.metrics = metrics
        self._changed = anyio.Event()
        self._probe: _QueuedProbe | None = None
        self._holders: dict[str, Session] = {}
        # Handoff -> grants in a row whose preparation failed (see PREPARE_FAILURES_CHARGED).
        self._prepare_failures: dict[str, int] = {}
        self.stopping = False
        self.ports = PortLedger(config.state_dir)
        # Set while the store cannot be written: expiry waits for the spell to end.
        self._store_full = False

    def reconfigure(self, new: Config) -> None:
        """A reloaded config: the next grant, renewal and expiry pass use its timings."""
        self.config = new

    @property
    def ttl_s(self) -> float:
        """How long a lease lives past its last renewal."""
        return self.config.lease_ttl_s

    async def recover(self) -> list[str]:
        """At start-up: the handoffs caught mid-gate (gated again) and, for the leases
        that survived the restart, a full TTL from now for their workers to reconnect."""
        return await self.offload.db(self.store.recover, ttl_s=self.ttl_s, now=self.clock.now())

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
        # The event loop's clock: the wait below is measured on it.
        deadline = anyio.current_time() + wait_s
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
                    ttl_s=self.ttl_s,
                    now=self.clock.now(),
                )
                if grant is not None:
                    break
            woken = True
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return None
            with anyio.move_on_after(remaining):
                await changed.wait()
        try:
            granted = (await self._prepare(session, grant)).to_wire()
        except BaseException as exc:
            # The worker will never hear of this lease (its connection went away, or git
            # failed): give the handoff straight back rather than waiting out the TTL.
            # Failing again and again is the handoff's own doing (what its branch holds):
            # then it spends an attempt, or it would stay first in line for ever.
            failures = 0
            if isinstance(exc, Exception):
                failures = self._prepare_failures.get(grant.handoff, 0) + 1
                self._prepare_failures[grant.handoff] = failures
            charge = failures >= PREPARE_FAILURES_CHARGED
            if charge:
                self._prepare_failures.pop(grant.handoff, None)
            with anyio.CancelScope(shield=True):
                await self.offload.db(
                    self.store.abandon_grant,
                    grant.lease_id,
                    reason=(
                        f"lease could not be handed over ({type(exc).__name__}: {exc})"
                        + (f"; failed {failures} times in a row" if charge else "")
                    ),
                    now=self.clock.now(),
                    charge=charge,
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
        self._prepare_failures.pop(grant.handoff, None)
        return granted

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

    async def _prepare(self, session: Session, grant: Grant) -> LeaseGrant:
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
            live = [lease.id for lease in self.store.open_leases()]
            return self.ports.assign(grant.lease_id, self.config.workspace, live)

        ports = await self.offload.db(assign_ports)
        expires = self.clock.now() + self.ttl_s
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
        return LeaseGrant(
            id=grant.lease_id,
            token=grant.token,
            handoff=LeasedHandoff.from_wire({**grant.wire, "feedback": grant.feedback}),
            worktree=worktree,
            branch=branch,
            # Where the handoff branch stood (first attempt: the integration tip; a
            # retry: the earlier attempts' commits) and where the integration branch is.
            base_commit=base,
            integration_commit=integration,
            attempt=grant.attempt,
            expires_at=expires,
            # portBase .. portBase + portCount - 1: ports no other live lease or gate uses.
            ports=None if ports is None else LeasePorts(ports.base, ports.count),
            # Run by the worker, as the agent's uid, in the worktree before the agent: the
            # daemon never runs a command in a directory an agent writes.
            setup=LeaseSetup(
                command=tuple(workspace.setup),
                needed=setup_needed,
                keep=tuple(workspace.keep),
                timeout_s=workspace.setup_timeout_s,
            )
            if workspace.setup
            else None,
        )

    async def expire_forever(self) -> None:
        """Expire leases that missed their heartbeats; runs for the daemon's lifetime."""
        while True:
            await self.expire_due()
            await anyio.sleep(min(1.0, self.ttl_s / 10))

    async def expire_due(self) -> list[Expired]:
        """One expiry pass: end the leases past their expiry (or maximum duration) on the
        clock, revoke them with their holders, and return them."""
        try:
            if self._store_full:
                # The spell is over only once this write works; the heartbeats that
                # failed meanwhile were not the workers' fault.
                extended = await self.offload.db(
                    self.store.extend_open_leases, until=self.clock.now() + self.ttl_s
                )
                log.info("store_writable_again", leases_extended=extended)
            expired = await self.offload.db(
                self.store.expire_due,
                now=self.clock.now(),
                max_duration_s=self.config.lease_max_duration_s or None,
            )
        except StoreFull as exc:
            # Nothing expires while nothing can be written; the leases keep running,
            # get a full TTL once the store can be written again, and only then are
            # judged by their heartbeats.
            if not self._store_full:
                log.error(exc.reason, detail=str(exc))
            self._store_full = True
            return []
        self._store_full = False
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
        return expired

    async def heartbeat(
        self,
        session: Session,
        lease_id: str,
        token: int,
        *,
        progress: Progress | None,
    ) -> Renewal:
        """Renew a lease its holder still works on, and hand over an answer it missed."""
        expires = await self.offload.db(
            self.store.renew,
            lease_id,
            token,
            ttl_s=self.ttl_s,
            progress=progress,
            now=self.clock.now(),
            worker=session.worker_name,
            uid=session.uid,
        )
        # A worker that reconnected (e.g. after a daemon restart) is now the one to notify.
        self.track(lease_id, session)
        self.metrics.heartbeat(lease_id)
        # An answer given while this worker was disconnected reaches it here.
        answer = await self.offload.db(self.store.take_answer, lease_id, now=self.clock.now())
        return Renewal(expires_at=expires, answer=answer)

    async def ask(self, session: Session, lease_id: str, token: int, question: Question) -> str:
        """Record the holder's question; the handoff's name."""
        name = await self.offload.db(
            self.store.ask,
            lease_id,
            token,
            question,
            now=self.clock.now(),
            worker=session.worker_name,
            uid=session.uid,
        )
        self.track(lease_id, session)
        return name

    async def release(self, session: Session, lease_id: str, token: int, *, reason: str) -> str:
        """The holder gives the lease back unfinished; the handoff's new state."""
        state = await self.offload.db(
            self.store.release,
            lease_id,
            token,
            reason=reason,
            now=self.clock.now(),
            worker=session.worker_name,
            uid=session.uid,
        )
        self.forget(lease_id)
        self.metrics.lease_ended(lease_id, "released")
        log.info("lease_released", lease=lease_id, reason=reason, new_state=state)
        return state

    async def report(
        self, session: Session, lease_id: str, token: int, report: Report, head: str
    ) -> State | None:
        """Take the holder's report: the handoff's new state, or None for a retry of a
        report already accepted (its reply was lost). The worktree must hold ``head``
        (else REPORT_REJECTED); the lease ends with the report."""
        try:
            # Judged on arrival: the renewal keeps the lease alive while the worktree is
            # checked, which may wait behind other git work.
            await self.offload.db(
                self.store.renew,
                lease_id,
                token,
                ttl_s=self.ttl_s,
                progress=None,
                now=self.clock.now(),
                worker=session.worker_name,
                uid=session.uid,
            )
        except LeaseNotHeld:
            if await self.offload.db(
                self.store.already_reported,
                lease_id,
                token,
                head,
                worker=session.worker_name,
                uid=session.uid,
            ):
                return None  # a retry after a lost reply
            raise
        lease = await self.offload.db(self.store.lease, lease_id, token, now=self.clock.now())
        reason = await self.offload.git(self._check_worktree, lease, head)
        if reason:
            log.info("report_rejected", handoff=lease.handoff, lease=lease_id, reason=reason)
            raise RpcError(REPORT_REJECTED, f"report rejected: {reason}", {"reason": reason})
        state = await self.offload.db(
            self.store.accept_report,
            lease_id,
            token,
            report=report,
            head=head,
            now=self.clock.now(),
        )
        self.forget(lease_id)
        self.metrics.lease_ended(lease_id, "reported")
        if state == State.REPORTED:
            self.metrics.report_accepted(lease.handoff)
        log.info(
            "report_accepted",
            handoff=lease.handoff,
            lease=lease_id,
            status=report.status,
            head=head,
            new_state=state,
        )
        return state

    def _check_worktree(self, lease: LeaseRecord, head: str) -> str:
        """Why the worktree does not match the report, or "" when it does.

        The head is fetched from the lease's own repository into ours (see
        Workspace.import_lease_head): the lease's branch is not ours until then."""
        if not lease.branch:
            return "the lease has no branch"
        ws = self.config.workspace
        if ws.setup:
            # A worker reports only after its setup succeeded (it releases the lease when
            # setup fails): the kept paths are now built for the key left pending.
            self.workspace.confirm_lease_warm_up(lease.handoff)
        return self.workspace.import_lease_head(
            lease.handoff,
            lease.branch,
            head,
            untracked_ok=(*ws.keep, *ws.copy_files),
            copy_files=ws.copy_files,
            keep=ws.keep,
        )

    async def cancelled(self, lease_id: str) -> None:
        """The lease's handoff was cancelled (the store ended the lease): tell its holder."""
        self.metrics.lease_ended(lease_id, "cancelled")
        await self.revoke(lease_id, "cancelled")

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
