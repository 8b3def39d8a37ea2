"""The merge queue: integrate reported handoffs one at a time, each behind every gate.

For each handoff, in priority then report order: build the candidate in memory on the
current integration tip, check it out in the gate worktree, run every configured gate on
exactly that commit, and only then move the branch with a compare-and-swap. If the branch
moved meanwhile, the candidate is rebuilt and gated again; nothing unvalidated lands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import anyio

from orchestrator.blocking import Offload
from orchestrator.clock import SYSTEM_CLOCK, Clock
from orchestrator.config import Config, GateConfig
from orchestrator.daemon.ports import PortLedger
from orchestrator.git.copy_files import copy_untracked
from orchestrator.git.merging import ALREADY_MERGED
from orchestrator.git.workspace import (
    GIT_TIMEOUT_S,
    GitError,
    IntegrationLocked,
    IntegrationTreeDirty,
    MergeResult,
    Workspace,
    conflict_detail,
)
from orchestrator.handoff import template as handoff_model
from orchestrator.merge import commit_message
from orchestrator.merge.eta import landing_etas
from orchestrator.merge.gates import (
    GateFences,
    GateIsolation,
    GateResult,
    detect_isolation,
    gate_fingerprint,
    run_gate,
)
from orchestrator.observe import logs
from orchestrator.observe.metrics import Metrics
from orchestrator.protocol.records import Feedback
from orchestrator.store.sqlite import InvalidTransition, MergeJob, Store, StoreFull
from orchestrator.store.states import State

log = logs.get("merge")

# How often a merge held back by a dirty integration checkout is tried again.
BLOCKED_RETRY_S = 2.0
PAUSED = "merging is paused (merge.paused = true in the config)"


class _Stopped(Enum):
    """A candidate that could not be built on a speculative base: it waits for the train."""

    STOPPED = "stopped"


_STOPPED = _Stopped.STOPPED


class Landing(Enum):
    """How a compare-and-swap of the integration branch to a gated candidate ended."""

    MOVED = "moved"  # the branch is the candidate now
    RACED = "raced"  # someone else moved the branch first: rebuild on the new tip
    ABANDONED = "abandoned"  # the handoff stopped being ours to land (a person cancelled)


# How much of a gate log goes into an agent's feedback.
FEEDBACK_LOG_BYTES = 8 * 1024


@dataclass(frozen=True)
class OutsideMove:
    """The integration branch moved by something other than the queue (shown in status)."""

    count: int
    old: str
    new: str
    at: float


@dataclass(eq=False)
class _Entry:
    """One candidate of the rolling train, from built to decided."""

    job: MergeJob
    result: MergeResult
    candidate: str
    bound: Any
    slot: int = 0
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: bool = False
    """Its gates finished (``outcome`` is then the verdict)."""
    outcome: GateResult | Exception | None = None
    """None when every gate passed; the failed run, or the error of its gating."""
    settled: bool = False
    """Those built on it were discarded after it failed."""
    started: float = 0.0
    """When its gating began, on the queue's monotonic clock."""
    members: list[tuple[MergeJob, MergeResult]] = field(default_factory=list)
    """A batch's handoffs ahead of ``job``, each merged on the one before; ``job``'s
    candidate (the batch's tip) is the one gated. Empty for a handoff gated alone."""

    @property
    def failed(self) -> bool:
        return self.done and self.outcome is not None

    @property
    def jobs(self) -> list[MergeJob]:
        return [job for job, _ in self.members] + [self.job]

    @property
    def base(self) -> str:
        return self.members[0][1].base if self.members else self.result.base


class MergeQueue:
    """The single integrator. ``run`` is one long-lived task of the daemon."""

    def __init__(
        self,
        config: Config,
        store: Store,
        workspace: Workspace,
        offload: Offload,
        metrics: Metrics,
        on_change: Callable[[], None],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        self.store = store
        self.workspace = workspace
        self.offload = offload
        self.metrics = metrics
        self.on_change = on_change
        self.blocked_reason: str | None = None
        self.running = False  # for /readyz
        self.current: set[str] = set()
        self._focus: MergeJob | None = None
        self._wakeup = anyio.Event()
        # Set when a gate run ends or a report arrives: the rolling train looks again.
        self._progress = anyio.Event()
        # The train's current length bound (Zuul's window), 1..merge.speculative_window.
        self._window = config.speculative_window
        self._train: list[_Entry] = []  # the train in flight, head first (for ETAs)
        # handoff -> the batch size to take it in next (bisection after a batch failed).
        self._batch_hint: dict[str, int] = {}
        # Merged handoffs whose directories go back to the pool when the git lane is idle.
        self._to_release: list[str] = []
        # When the step in progress began (monotonic), for the systemd watchdog.
        self._busy_since: float | None = None
        # How gates are confined here; decided by the first run() (a probe of bwrap).
        self.isolation: GateIsolation | None = None
        # Where the queue last saw or left the integration branch; any other tip means
        # someone else moved it.
        self._known_tip: str | None = None
        self.moved_outside: OutsideMove | None = None

    def reconfigure(self, new: Config) -> None:
        """A reloaded config: gates, window and pausing are read afresh on the next pass."""
        self.config = new
        self.wake()

    def wake(self) -> None:
        """A report arrived or a handoff was retried: look at the queue again."""
        self._wakeup.set()
        self._progress.set()

    def stuck_for(self, now: float) -> float | None:
        """Seconds the merge step in progress has run beyond every bound it has, or None.

        Each step is bounded (every gate's timeout, git's timeout), and waiting for a
        person to clean a dirty checkout counts as progress, so only a wedge (a thread
        that never returns) makes this non-None.
        """
        if self._busy_since is None:
            return None
        elapsed = now - self._busy_since
        bound = sum(g.timeout_s * (1 + g.retries) for g in self.config.gates)
        bound += 2 * GIT_TIMEOUT_S * (1 + sum(g.retries for g in self.config.gates))
        return elapsed if elapsed > bound else None

    async def run(self) -> None:
        """Integrate reported handoffs one train at a time, for the daemon's lifetime.

        A store that cannot be written (full disk) pauses the queue, says so in status,
        and resumes once writes work again; it never takes the daemon down."""
        self.running = True  # for /readyz: the probe below must not hold readiness back
        self._known_tip = await self.offload.git(self.workspace.integration_tip)
        await self._detect_isolation()
        while True:
            try:
                await self._run()
            except StoreFull as exc:
                self.blocked_reason = f"merging paused: {exc}"
                log.error("store_full", detail=str(exc))
                # A train cut short left its handoffs in ``gating``: settle a landing whose
                # ref moved but whose record could not be written (never land it twice),
                # then put the rest back in the queue. Not one merge before both worked.
                while True:
                    await anyio.sleep(BLOCKED_RETRY_S)
                    try:
                        await self.reconcile_landings()
                        await self.offload.db(self.store.recover_gating, now=self.clock.now())
                    except StoreFull:
                        continue
                    break
                self.blocked_reason = None
                log.info("store_writable_again", detail="merging resumes")
                self.on_change()

    async def _detect_isolation(self) -> None:
        """Decide once how gates are confined, and say so (log and ``status``)."""
        fences = GateFences(
            read_only=(self.workspace.repo_path, self.workspace.common_dir),
            hidden=(self.config.state_dir, self.workspace.worktrees_dir, self.config.socket),
        )
        wanted = self.config.gate_isolation
        self.isolation = await anyio.to_thread.run_sync(
            detect_isolation, wanted, fences, self.workspace.worktrees_dir
        )
        event = log.info if self.isolation.namespaces or wanted == "processes" else log.warning
        event(
            "gate_isolation",
            mode=self.isolation.mode,
            namespaces=self.isolation.namespaces,
            detail=self.isolation.detail,
        )
        if wanted == "bwrap" and not self.isolation.namespaces:
            # Asked for namespaces and cannot have them: gate nothing rather than less.
            self.blocked_reason = (
                f'not gating: merge.gate_isolation = "bwrap" but {self.isolation.detail}; '
                'install bubblewrap, allow namespaces, or set merge.gate_isolation = "auto"'
            )
            log.error("merge_blocked", reason=self.blocked_reason)
            await anyio.sleep_forever()

    async def _run(self) -> None:
        self.running = True
        while True:
            self._wakeup = anyio.Event()
            if self.config.merge_paused:
                # Re-read on every pass: a SIGHUP reload may pause or resume merging.
                self.blocked_reason = PAUSED
                await self._wakeup.wait()
                continue
            if self.blocked_reason == PAUSED:
                self.blocked_reason = None
            self._focus = None
            self._busy_since = self.clock.monotonic()
            took = False
            try:
                took = await self.integrate()
            except StoreFull:
                raise  # not the job's fault: run() waits for the disk and settles the train
            except Exception as exc:
                # One broken job (a deleted branch, a corrupt object) must not take the
                # daemon down, nor crash-loop it after a restart: hold it for a person.
                culprit = self._focus
                log.exception(
                    "merge_error",
                    handoff=culprit.name if culprit else None,
                    attempt=culprit.attempt if culprit else None,
                )
                # If the error came after the branch moved, the candidate did land: record
                # it as merged, never hold a merged handoff for a person to retry.
                await self.reconcile_landings(landed_only=True)
                state = (
                    await self.offload.db(self.store.state_of, culprit.name) if culprit else None
                )
                if culprit and state == State.GATING:
                    await self.offload.db(
                        self.store.merge_error,
                        culprit.name,
                        detail=f"merge failed: {type(exc).__name__}: {exc}; fix it and "
                        "`orchestrator retry` the handoff",
                        now=self.clock.now(),
                    )
                await anyio.sleep(1.0)
                took = True
            finally:
                owned, self.current = sorted(self.current), set()
                self._busy_since = None
                # Whatever is still ``gating`` (speculation discarded, or shutdown) goes
                # back to the queue in its place, at no cost to its attempts.
                with anyio.CancelScope(shield=True):
                    for name in owned:
                        await self.offload.db(
                            self.store.return_to_queue, name, now=self.clock.now()
                        )
                    # Only after a pass that did something: on_change wakes this queue
                    # too, so an unconditional one made an idle queue spin (~100 passes
                    # a second, each waking every long-polling acquire).
                    if owned or took:
                        self.on_change()
            if not took:
                with anyio.move_on_after(5.0):  # also a safety net against a missed wake-up
                    await self._wakeup.wait()

    async def landing_etas(self, queue: list[str]) -> dict[str, float]:
        """Expected seconds until each handoff of ``queue`` (``Store.merge_queue`` order)
        lands, from recent gate times and refusals, the train in flight and the window;
        empty until a gate has run."""
        history = await self.offload.db(self.store.gating_history)
        wanted = set(queue)
        train = [e for e in self._train if e.job.name in wanted]
        in_train = [j.name for e in train for j in e.jobs]
        order = in_train + [n for n in queue if n not in set(in_train)]
        head_elapsed = self.clock.monotonic() - train[0].started if train else 0.0
        return landing_etas(
            order,
            history,
            window=self._window,
            head_elapsed_s=head_elapsed,
            gated=bool(self.config.gates),
        )

    async def reconcile_landings(self, *, landed_only: bool = False) -> None:
        """Settle landings a crash left open (intent recorded, outcome not): a candidate
        the branch contains was merged; any other never landed and is gated again (left
        as it is with ``landed_only``)."""
        pending = await self.offload.db(self.store.pending_landings)
        if not pending:
            return
        tip = await self.offload.git(self.workspace.integration_tip)
        for name, attempt, base, candidate in pending:
            try:
                landed = await self.offload.git(self.workspace.is_ancestor, candidate, tip)
            except GitError:
                # The candidate object itself is gone (lost in a power cut, pruned): it
                # cannot be on the branch, and start-up must not fail over it.
                landed = False
            if landed:
                cycle = await self.offload.db(
                    self.store.mark_merged,
                    name,
                    attempt=attempt,
                    base=base,
                    commit=candidate,
                    now=self.clock.now(),
                )
                self.metrics.merge_finished("merged")
                self.metrics.handoff_merged(cycle, attempt)
                log.warning(
                    "merge_recovered",
                    handoff=name,
                    attempt=attempt,
                    commit=candidate,
                    metric="orchestrator_merges_total",
                    result="merged",
                )
                # The crash may have come between moving the branch and updating a
                # checkout of it, which would now look dirty and block every merge.
                fixed = await self.offload.git(
                    self.workspace.finish_interrupted_update, base, candidate
                )
                if fixed:
                    log.warning("checkout_update_finished", paths=[str(p) for p in fixed])
            elif not landed_only:
                await self.offload.db(
                    self.store.landing_superseded,
                    name,
                    detail="the daemon stopped before this candidate landed",
                    now=self.clock.now(),
                )
                await self.offload.db(self.store.return_to_queue, name, now=self.clock.now())
                log.warning(
                    "landing_not_done",
                    handoff=name,
                    attempt=attempt,
                    candidate=candidate,
                    detail="it will be gated again",
                )

    async def integrate(self) -> bool:
        """Take reported handoffs from ``gating`` to ``merged``, ``conflict`` or ``failed``,
        in order, as a rolling train; False when there was nothing to take.

        Candidate *i* is built on candidate *i-1* (the first on the integration tip) and
        gated as soon as it is built, each in its own gate worktree. The head of the train
        lands as soon as its gates pass, and the next candidate starts at once, built on
        the last one of the train: the train never waits to empty. When a candidate fails,
        those built on it are stopped and rebuilt without it (at no cost to their
        attempts); it is refused once everything ahead of it has landed (a failure ahead
        of it would mean it is rebuilt too). The train's length adapts as Zuul's window
        does: one longer after each landing, halved after a refusal that follows another,
        between 1 and ``merge.speculative_window``. Whatever is undecided when the train
        stops goes back to the queue (``run`` puts it there).
        """
        train: list[_Entry] = []
        self._train = train
        busy_slots: set[int] = set()

        async def gate_one(entry: _Entry) -> None:
            try:
                with entry.scope:
                    try:
                        entry.outcome = await self._run_gates(
                            entry.job,
                            entry.candidate,
                            entry.bound,
                            slot=entry.slot,
                            batch=entry.jobs,
                        )
                    except Exception as exc:  # e.g. its gate checkout failed: its own error
                        entry.outcome = exc
                    entry.done = True
            finally:
                busy_slots.discard(entry.slot)
                self._progress.set()

        # The gate runs are the task group's children and never raise; the train itself
        # runs in the host, whose errors leave here as they are (not in an ExceptionGroup),
        # for run() to tell a full store from one job's fault.
        failure: Exception | None = None
        took = False
        async with anyio.create_task_group() as tg:
            try:
                took = await self._roll(train, busy_slots, lambda e: tg.start_soon(gate_one, e))
            except Exception as exc:
                failure = exc
            finally:
                tg.cancel_scope.cancel()  # only discarded candidates' gates are left
        if failure is not None:
            raise failure
        return took

    async def _roll(
        self,
        train: list[_Entry],
        busy_slots: set[int],
        start_gating: Callable[[_Entry], object],
    ) -> bool:
        """The rolling train's loop (see :meth:`integrate`); returns once it is empty and
        no reported handoff is left to take. True when it took any."""
        expected = await self.offload.git(self.workspace.integration_tip)
        self._note_tip(expected)
        took = False
        # Set after a candidate could not be built on the speculative base: nothing more
        # joins until the train has emptied, so it is next, built on the real tip.
        hold_fill = False
        # A refusal right after a refusal (no landing between) halves the window; an
        # isolated one does not, as the candidates behind it are rebuilt at once anyway.
        refused_last = False
        while True:
            self._progress = anyio.Event()
            self._busy_since = self.clock.monotonic()
            while True:
                await self._settle_failures(train)
                if not (train and train[0].done):
                    break
                # The head is done: land it, or refuse it.
                head = train.pop(0)
                self._focus = head.job
                if head.failed:
                    if isinstance(head.outcome, Exception):
                        if head.members and not isinstance(head.outcome, StoreFull):
                            # Which member's tree broke the gating is unknown: each is
                            # gated alone next, where only its own error is charged to it.
                            await self._split_after_error(head, head.outcome)
                            continue
                        raise head.outcome  # held by run(), charged to this job only
                    assert isinstance(head.outcome, GateResult)
                    if head.members:
                        # Bisection is expected to meet failures: the window is kept, so
                        # the halves are gated side by side.
                        await self._bisect(head, head.outcome)
                    else:
                        await self._gate_failed(
                            head.job, head.result.base, head.candidate, head.outcome, head.bound
                        )
                        if refused_last:
                            self._window = max(1, self._window // 2)
                        refused_last = True
                    self.current.discard(head.job.name)
                    continue
                landed = await self._land(head, expected)
                for job in head.jobs:
                    self.current.discard(job.name)
                if not landed:
                    # Everything behind is built on a candidate that did not land.
                    behind, train[:] = train[:], []
                    await self._discard(behind, f"{head.job.name} did not land")
                    break
                expected = head.candidate
                refused_last = False
                self._window = min(self._window + 1, self.config.speculative_window)
                # The next candidate joins (and its gate starts) before the next landing:
                # a landing's fsyncs must not keep a slot idle.
                break
            if not train:
                hold_fill = False
            # Fill the train up to the window, each candidate on the last one.
            self._window = max(1, min(self._window, self.config.speculative_window))
            while (
                not hold_fill
                and not self.config.merge_paused
                and sum(not e.failed for e in train) < self._window
                and len(busy_slots) < self.config.speculative_window
            ):
                if any(e.failed and not e.settled for e in train):
                    break  # settle it first: building on a failed candidate is wasted
                jobs = await self.offload.db(
                    self.store.next_merge_jobs, limit=1, now=self.clock.now()
                )
                if not jobs:
                    break
                took = True
                job = jobs[0]
                self.current.add(job.name)
                self.metrics.merge_started(job.name)
                self._focus = job
                ahead = [e for e in train if not e.failed]
                if not train:
                    # An empty train builds on the tip as it is now (a person may have
                    # moved it since the last landing).
                    expected = await self.offload.git(self.workspace.integration_tip)
                    self._note_tip(expected)
                base = ahead[-1].candidate if ahead else expected
                size = min(self.config.max_batch, self._batch_hint.pop(job.name, 1 << 30))
                batch = [job]
                if size > 1:
                    batch += await self.offload.db(
                        self.store.next_merge_jobs, limit=size - 1, now=self.clock.now()
                    )
                    for other in batch[1:]:
                        self._batch_hint.pop(other.name, None)
                        self.current.add(other.name)
                        self.metrics.merge_started(other.name)
                built, leftover = await self._build_batch(batch, base, speculative=base != expected)
                for other in leftover:  # clashed within the batch: it joins a later one
                    await self.offload.db(
                        self.store.return_to_queue, other.name, now=self.clock.now()
                    )
                    self.current.discard(other.name)
                if not isinstance(built, _Entry):
                    if built is _STOPPED:
                        await self.offload.db(
                            self.store.return_to_queue, job.name, now=self.clock.now()
                        )
                        hold_fill = True
                    self.current.discard(job.name)
                    continue
                built.slot = min(set(range(len(busy_slots) + 1)) - busy_slots)
                busy_slots.add(built.slot)
                train.append(built)
                start_gating(built)
            self._focus = None
            if not train:
                await self._release_worktrees(lambda: False)
                return took
            if train[0].done:
                continue  # the next head waits to land (or be refused)
            # Gates are running and nothing is to land: the idle git lane puts merged
            # handoffs' directories back in the pool, one at a time, until a gate ends.
            await self._release_worktrees(self._progress.is_set)
            await self._progress.wait()

    async def _release_worktrees(self, stop: Callable[[], bool]) -> None:
        """Put merged handoffs' directories back in the pool (``_merged`` leaves them
        here so that a landing never waits behind a rename), until ``stop()``."""
        while self._to_release and not stop():
            name = self._to_release.pop(0)
            try:
                if not await self.offload.db(self.store.has_open_lease, name):
                    await self.offload.git(self.workspace.release_worktree, name)
            except Exception:  # the pool is an optimisation; a stuck worktree is not an error
                log.bind(handoff=name).exception("worktree_release_failed")

    async def _settle_failures(self, train: list[_Entry]) -> None:
        """Stop the candidates built on a failed one and put them back in the queue: they
        are rebuilt without it, at once, while it waits to be refused."""
        while True:
            for index, entry in enumerate(train):
                if entry.failed and not entry.settled:
                    entry.settled = True
                    behind, train[index + 1 :] = train[index + 1 :], []
                    await self._discard(behind, f"built on {entry.job.name}, which failed")
                    break
            else:
                return

    async def _discard(self, entries: list[_Entry], reason: str) -> None:
        for entry in entries:
            entry.scope.cancel()
            entry.bound.info("speculation_discarded", reason=reason)
            for job in entry.jobs:
                if entry.members:
                    self._batch_hint[job.name] = len(entry.members) + 1  # same grouping
                await self.offload.db(self.store.return_to_queue, job.name, now=self.clock.now())
                self.current.discard(job.name)

    async def _build_batch(
        self, jobs: list[MergeJob], base: str, *, speculative: bool
    ) -> tuple[_Entry | _Stopped | None, list[MergeJob]]:
        """Build ``jobs`` as one batch on ``base``, each on the one before: what
        :meth:`_build` gives for the first (an entry whose ``members`` are the others,
        ahead of its ``job``), and the jobs left out because they did not merge onto the
        batch (they go back to the queue). The commits' trailers name the batch, so a
        batch cut short is built again with the right names."""
        left: list[MergeJob] = []
        while True:
            names = [j.name for j in jobs]
            first = await self._build(jobs[0], base, speculative=speculative, batch=names)
            if not isinstance(first, _Entry) or len(jobs) == 1:
                return first, jobs[1:] + left
            entry, members = first, []
            for index, job in enumerate(jobs[1:], start=1):
                built = await self._build(job, entry.candidate, speculative=True, batch=names)
                if not isinstance(built, _Entry):
                    left = jobs[index:] + left
                    jobs = jobs[:index]
                    break
                members.append((entry.job, entry.result))
                entry = built
            else:
                entry.members = members
                return entry, left

    async def _build(
        self, job: MergeJob, base: str, *, speculative: bool, batch: list[str] | None = None
    ) -> _Entry | _Stopped | None:
        """Build ``job``'s candidate on ``base``: an entry for the train; None when the
        job was decided here (a conflict, or nothing left to merge); ``_STOPPED`` when it
        could not be built on a speculative base (it waits for the train to land)."""
        bound = log.bind(handoff=job.name, attempt=job.attempt)
        if job.head:
            # The report check refuses this too, but [workspace] may have changed since
            # (a reload): landing it would write over the operator's untracked file.
            ws = self.config.workspace
            tracked = await self.offload.git(
                self.workspace.tracked_untracked_only,
                job.head,
                base,
                copy_files=ws.copy_files,
                keep=ws.keep,
            )
            if tracked:
                if speculative:
                    return _STOPPED  # refused once built on the real tip
                await self._refuse_tracked(job, base, tracked, bound)
                return None
        result = await self.offload.git(
            self.workspace.merge_candidate,
            handoff_model.branch_name(job.name),
            strategy=self.config.merge_strategy,
            message=self._message(job) + _gated_trailer(batch or [job.name]),
            head=job.head,
            onto=base,
        )
        if result.candidate is None:
            if speculative:
                # It may only clash with a candidate ahead of it, which might still
                # fail: decide once the ones ahead have landed.
                bound.info("speculation_stopped", reason=result.detail or "conflict")
                return _STOPPED
            if result.detail != ALREADY_MERGED:
                await self._conflict(job, result.base, list(result.conflicts), result.detail, bound)
                return None
            # Its commit reached the branch by someone else's move (an agent's update-ref,
            # a person's push), never through a gate: it is not merged on that alone. The
            # tip holding it is its candidate, gated like any other.
            bound.warning(
                "already_on_integration_branch",
                tip=result.base,
                detail="gating the integration tip that holds it",
            )
            result = MergeResult(result.base, (), result.base)
        candidate = result.candidate
        assert candidate is not None
        bound.info("candidate_built", candidate=candidate, base=result.base)
        return _Entry(
            job=job,
            result=result,
            candidate=candidate,
            bound=bound,
            started=self.clock.monotonic(),
        )

    async def _land(self, entry: _Entry, expected: str) -> bool:
        """Move the branch to the head's gated candidate (a batch's tip: one commit per
        handoff on the first-parent line); False when it did not land (cancelled
        meanwhile, or the branch moved: it is rebuilt in its place)."""
        chain = [*entry.members, (entry.job, entry.result)]
        assert entry.base == expected, (entry.base, expected)
        job, bound = entry.job, entry.bound
        recorded: list[MergeJob] = []
        try:
            for member, result in chain:
                assert result.candidate is not None
                await self.offload.db(
                    self.store.record_landing_intent,
                    member.name,
                    attempt=member.attempt,
                    base=result.base,
                    candidate=result.candidate,
                    now=self.clock.now(),
                )
                recorded.append(member)
        except InvalidTransition as exc:
            bound.warning("merge_abandoned", reason=str(exc))
            await self._supersede(recorded, "a handoff of its batch left gating")
            return False
        landing = await self._advance(expected, entry.candidate, job, bound)
        if landing is Landing.ABANDONED:
            await self._supersede(recorded, "no longer gating when it could land (cancelled?)")
            bound.warning("merge_abandoned", reason="the handoff left gating")
            return False
        if landing is Landing.RACED:
            detail = "the integration branch moved while gating; rebuilding the candidate"
            await self._supersede(recorded, detail)
            bound.warning("integration_moved", expected=expected, detail=detail)
            for member in recorded:
                await self.offload.db(self.store.return_to_queue, member.name, now=self.clock.now())
            return False
        self._known_tip = entry.candidate
        for member, result in chain:
            assert result.candidate is not None
            member_bound = (
                bound if member is job else log.bind(handoff=member.name, attempt=member.attempt)
            )
            await self._merged(member, result.base, result.candidate, member_bound)
        return True

    def _note_tip(self, tip: str) -> None:
        """Log, count and keep for ``status`` a tip the queue did not put there."""
        known, self._known_tip = self._known_tip, tip
        if known is None or known == tip:
            return
        count = (self.moved_outside.count if self.moved_outside else 0) + 1
        self.moved_outside = OutsideMove(count=count, old=known, new=tip, at=self.clock.now())
        self.metrics.integration_moved_outside()
        log.warning(
            "integration_moved_outside",
            branch=self.config.integration_branch,
            old=known,
            new=tip,
            metric="orchestrator_integration_moved_outside_total",
            detail="the integration branch moved without the merge queue; whatever it holds "
            "that no gate saw is gated before any handoff is recorded as merged",
        )

    async def _supersede(self, jobs: list[MergeJob], detail: str) -> None:
        for job in jobs:
            await self.offload.db(
                self.store.landing_superseded, job.name, detail=detail, now=self.clock.now()
            )

    async def _bisect(self, entry: _Entry, result: GateResult) -> None:
        """A batch failed its gate: send it back to the queue split in parts (as many as
        gate slots, at least two), each gated as a batch of its own (the parts in the same
        rolling train), until the
        handoff that breaks the gate is gated alone and refused with its log; the others
        land. Nobody is charged an attempt for a batch's failure."""
        jobs = entry.jobs
        # Split in as many parts as there are gate slots (halves with one or two): the
        # parts are gated side by side, so the culprit's part is found in one gate time,
        # not one per halving.
        parts = max(2, min(self.config.speculative_window, len(jobs)))
        half = max(1, -(-len(jobs) // parts))
        entry.bound.warning(
            "batch_failed",
            batch=[j.name for j in jobs],
            gate=result.name,
            candidate=entry.candidate,
            detail=f"bisecting: batches of {half} next",
        )
        for job in jobs:
            self._batch_hint[job.name] = half
            await self.offload.db(self.store.return_to_queue, job.name, now=self.clock.now())
            self.current.discard(job.name)

    async def _split_after_error(self, entry: _Entry, exc: Exception) -> None:
        """A batch's gating raised (its gate checkout could not be made, say): send every
        member back to the queue to be gated alone, at no cost to its attempts. Raising
        it would hold the batch's last member for a person, whoever's tree caused it."""
        jobs = entry.jobs
        entry.bound.warning(
            "batch_gate_error",
            batch=[j.name for j in jobs],
            candidate=entry.candidate,
            error=f"{type(exc).__name__}: {exc}",
            detail="gating each handoff of the batch alone next",
        )
        for job in jobs:
            self._batch_hint[job.name] = 1
            await self.offload.db(self.store.return_to_queue, job.name, now=self.clock.now())
            self.current.discard(job.name)

    def _message(self, job: MergeJob) -> str:
        gates = ", ".join(g.name for g in self.config.gates) or "none configured"
        # The summary and title are agent- and submitter-written: no control characters,
        # and nothing git could read as a trailer (merge/commit_message.py).
        summary = commit_message.body(job.summary) or commit_message.NO_SUMMARY
        return (
            f"Merge handoff {job.name}: {commit_message.one_line(job.title)}\n\n{summary}\n\n"
            f"Handoff: {job.name}\nAttempt: {job.attempt}\nGates: {gates}\n"
        )

    async def _run_gates(
        self,
        job: MergeJob,
        candidate: str,
        bound: Any,
        *,
        slot: int = 0,
        batch: list[MergeJob] | None = None,
    ) -> GateResult | None:
        """Run every gate on the candidate; the first failure, or None when all passed.

        A gate that already passed on the same tree with the same fingerprint (argv,
        environment, timeout) is not run again: the tree is all a gate sees, so a
        requeued handoff or a rebuilt speculative candidate that merges to the same tree
        reuses the pass. Failures are not reused: a person's retry runs the gate again."""
        if not self.config.gates:
            return None
        tree = (
            await self.offload.git(self.workspace.tree_of, candidate)
            if self.config.gate_cache
            else None
        )
        workspace = self.config.workspace
        warm_key = None
        if workspace.keep or workspace.setup:
            warm_key = await self.offload.git(self.workspace.warm_key, candidate, workspace)
        checkout: Path | None = None  # checked out only when a gate has to run
        env = {"ORCHESTRATOR_HANDOFF": job.name, "ORCHESTRATOR_CANDIDATE": candidate}
        batch = batch or [job]
        if len(batch) > 1:
            env["ORCHESTRATOR_BATCH"] = " ".join(j.name for j in batch)
        ports = PortLedger(self.config.state_dir).gate_range(workspace, slot)
        if ports is not None:
            # Gates of parallel slots (and the agents) never share a port.
            env["ORCHESTRATOR_PORT_BASE"] = str(ports.base)
            env["ORCHESTRATOR_PORT_COUNT"] = str(ports.count)
        result: GateResult | None = None
        for gate in self.config.gates:
            key = gate_fingerprint(gate, self.config.gate_sandbox)
            if tree is not None:
                hit = await self.offload.db(self.store.cached_gate_pass, tree, key)
                if hit is not None:
                    self.metrics.gate_cache_hit(gate.name)
                    bound.info(
                        "gate_cached",
                        metric="orchestrator_gate_cache_hits_total",
                        gate=gate.name,
                        candidate=candidate,
                        tree=tree,
                        passed_on=hit.candidate,
                        passed_for=hit.handoff,
                    )
                    continue
            for run in range(gate.retries + 1):
                if run > 0:
                    # A flaky gate gets another go on a fresh checkout (forced to the
                    # candidate, untracked and ignored files removed): nothing the failed
                    # run left behind may decide the next.
                    self.metrics.gate_retried(gate.name)
                    bound.warning(
                        "gate_retry",
                        metric="orchestrator_gate_retries_total",
                        gate=gate.name,
                        candidate=candidate,
                        retry=run,
                        retries=gate.retries,
                    )
                # Every gate run starts from a checkout of exactly the candidate.
                checkout = await self.offload.git(
                    self.workspace.gate_checkout,
                    candidate,
                    slot=slot,
                    keep=workspace.keep,
                    key=warm_key,
                )
                if workspace.copy_files:
                    copied = await self.offload.git(
                        copy_untracked,
                        self.workspace.repo_path,
                        checkout,
                        workspace.copy_files,
                    )
                    for rel, why in copied.skipped:
                        bound.warning("copy_file_skipped", path=rel, reason=why)
                setup_failed = await self._warm_up(batch, candidate, checkout, env, bound, warm_key)
                if setup_failed is not None:
                    return setup_failed
                cache_key = None if tree is None else (tree, key)
                kept: list[Path] = []
                if warm_key is not None:
                    if self.isolation is not None and self.isolation.mode == "bwrap":
                        # What setup built is the gates' to use, not to change: a refused
                        # candidate's gate must not plant what passes the next one.
                        kept = [checkout / path for path in workspace.keep]
                    else:
                        # Without a sandbox to make them read-only, kept paths a gate ran
                        # beside are never trusted again: the next checkout rebuilds them.
                        await self.offload.git(self.workspace.forget_gate_warm, checkout)
                result = await self._run_one_gate(
                    batch, gate, candidate, checkout, env, bound, cache_key=cache_key, kept=kept
                )
                if result.passed:
                    break
            if result is not None and not result.passed:
                return result
        return None

    async def _warm_up(
        self,
        batch: list[MergeJob],
        candidate: str,
        checkout: Path,
        env: dict[str, str],
        bound: Any,
        warm_key: str | None,
    ) -> GateResult | None:
        """``[workspace] setup`` on a checkout whose kept paths were not built for
        ``warm_key``: run like a gate (sandboxed, recorded) before the gates, the key
        recorded once it passed. The failed run when it fails, else None."""
        workspace = self.config.workspace
        if warm_key is None or not workspace.setup:
            return None
        if await self.offload.git(self.workspace.gate_warm_key, checkout) == warm_key:
            bound.info("gate_setup_skipped", reason="kept paths match the cache key")
            return None
        setup = GateConfig("setup", workspace.setup, workspace.setup_timeout_s)
        result = await self._run_one_gate(
            batch, setup, candidate, checkout, env, bound, cache_key=None
        )
        if not result.passed:
            return result
        await self.offload.git(self.workspace.mark_gate_warm, checkout, warm_key)
        return None

    async def _run_one_gate(
        self,
        jobs: list[MergeJob],
        gate: GateConfig,
        candidate: str,
        checkout: Path,
        env: dict[str, str],
        bound: Any,
        *,
        cache_key: tuple[str, str] | None,
        kept: Sequence[Path] = (),
    ) -> GateResult:
        """Run one gate once on the checked-out candidate; record it for each handoff of
        the batch (``jobs``: one when gated alone), count and log it."""
        bound.info("gate_started", gate=gate.name, candidate=candidate)
        result = await run_gate(
            gate,
            checkout,
            tail_bytes=self.config.gate_output_tail_bytes,
            env=env,
            sandbox=self.config.gate_sandbox,
            isolation=self.isolation,
            read_only=kept,
        )
        for job in jobs:
            await self.offload.db(
                self.store.record_gate,
                job.name,
                attempt=job.attempt,
                candidate=candidate,
                gate=gate.name,
                exit_status=result.exit_status,
                timed_out=result.timed_out,
                duration_s=result.duration_s,
                output_tail=result.output_tail,
                started_at=result.started_at,
                cache_key=cache_key,
            )
        outcome = self.metrics.gate_finished(
            gate.name,
            result.duration_s,
            exit_status=result.exit_status,
            timed_out=result.timed_out,
        )
        bound.info(
            "gate_finished",
            metric="orchestrator_gate_runs_total",
            outcome=outcome,
            gate=gate.name,
            passed=result.passed,
            exit_status=result.exit_status,
            timed_out=result.timed_out,
            duration_s=round(result.duration_s, 3),
        )
        return result

    async def _advance(self, base: str, candidate: str, job: MergeJob, bound: Any) -> Landing:
        """Compare-and-swap the branch; waits (and says so) while a checkout is dirty."""
        reflog = f"orchestrator: merge handoff {job.name} (attempt {job.attempt})"
        while True:
            # Atomically "still gating" and "no cancel from now until the move is done".
            if not await self.offload.db(self.store.begin_ref_move, job.name):
                self.blocked_reason = None
                return Landing.ABANDONED
            try:
                moved = await self.offload.git(
                    self.workspace.advance_integration, base, candidate, reflog
                )
            except IntegrationLocked as exc:
                await self.offload.db(self.store.end_ref_move, job.name)  # a cancel may win
                reason = f"not merging {job.name}: {exc}"
                if self.blocked_reason != reason:
                    bound.error("merge_blocked", reason=reason, locks=[str(p) for p in exc.locks])
                self.blocked_reason = reason
                await anyio.sleep(BLOCKED_RETRY_S)
                self._busy_since = self.clock.monotonic()  # another git's lock is not a wedge
                continue
            except IntegrationTreeDirty as exc:
                await self.offload.db(self.store.end_ref_move, job.name)  # a cancel may win
                reason = (
                    f"not merging {job.name}: {exc.path} has {self.config.integration_branch} "
                    "checked out with local changes; commit, stash or discard them"
                )
                if self.blocked_reason != reason:
                    bound.error("merge_blocked", reason=reason, path=str(exc.path))
                self.blocked_reason = reason
                await anyio.sleep(BLOCKED_RETRY_S)
                self._busy_since = self.clock.monotonic()  # waiting for a person is not a wedge
                continue
            if self.blocked_reason is not None:
                bound.info("merge_unblocked")
            self.blocked_reason = None
            return Landing.MOVED if moved else Landing.RACED

    async def _merged(self, job: MergeJob, base: str, commit: str, bound: Any) -> None:
        cycle = await self.offload.db(
            self.store.mark_merged,
            job.name,
            attempt=job.attempt,
            base=base,
            commit=commit,
            now=self.clock.now(),
        )
        self.metrics.merge_finished("merged")
        self.metrics.handoff_merged(cycle, job.attempt)
        bound.info(
            "merged",
            commit=commit,
            base=base,
            cycle_s=round(cycle, 3),
            metric="orchestrator_merges_total",
            result="merged",
        )
        self._to_release.append(job.name)  # once the git lane is idle (_release_worktrees)
        self.on_change()

    async def _conflict(
        self, job: MergeJob, base: str, paths: list[str], detail: str, bound: Any
    ) -> None:
        integration = self.config.integration_branch
        text = detail or conflict_detail(integration, base, paths)
        state = await self._failed(
            job,
            "conflict",
            base,
            None,
            text,
            log="\n".join(paths),
            conflicts=paths,
            hold=self.config.on_conflict == "hold",
        )
        bound.warning(
            "merge_conflict",
            paths=paths,
            new_state=state,
            base=base,
            metric="orchestrator_merges_total",
            result="conflict",
        )

    async def _refuse_tracked(self, job: MergeJob, base: str, detail: str, bound: Any) -> None:
        """``job``'s head tracks what [workspace] puts in place untracked: it never lands
        and the next attempt is told what to fix; the queue goes on."""
        state = await self._failed(
            job, "gate_failed", base, None, detail, log="", conflicts=[], hold=False
        )
        bound.warning("tracked_untracked_path", detail=detail, new_state=state)

    async def _gate_failed(
        self, job: MergeJob, base: str, candidate: str, result: GateResult, bound: Any
    ) -> None:
        how = (
            f"timed out after {result.duration_s:.1f} s"
            if result.timed_out
            else f"exited with status {result.exit_status}"
        )
        text = (
            f"gate {result.name!r} {how} on candidate {candidate[:12]}; "
            "fix the cause and report again"
        )
        state = await self._failed(
            job,
            "gate_failed",
            base,
            candidate,
            text,
            log=result.output_tail[-FEEDBACK_LOG_BYTES:],
            conflicts=[],
            hold=self.config.on_gate_failure == "hold",
        )
        bound.warning(
            "gate_failed",
            gate=result.name,
            new_state=state,
            candidate=candidate,
            metric="orchestrator_merges_total",
            result="gate_failed",
        )

    async def _failed(
        self,
        job: MergeJob,
        result: str,
        base: str,
        candidate: str | None,
        detail: str,
        *,
        log: str,
        conflicts: list[str],
        hold: bool,
    ) -> State:
        """Record a conflict or a failed gate; the feedback is what the next agent gets."""
        state = await self.offload.db(
            self.store.mark_merge_failed,
            job.name,
            attempt=job.attempt,
            result=result,
            base=base,
            candidate=candidate,
            detail=detail,
            feedback=Feedback(reason=result, detail=detail, log=log),
            conflicts=conflicts,
            hold=hold,
            now=self.clock.now(),
        )
        self.metrics.merge_finished(result)
        self.on_change()
        return state


def _gated_trailer(batch: list[str]) -> str:
    """The trailer that says how a commit was gated: alone, or as part of which batch
    (a batch is gated once, on its last commit)."""
    if len(batch) == 1:
        return "Gated: alone\n"
    return f"Gated: in a batch of {len(batch)}: {', '.join(batch)}\n"
