"""The supervisor: one task group owns every long-lived task of the daemon.

Start-up order matters for recovery: lock the state dir (a second daemon refuses), open
the store, put back any handoff caught mid-gate, then serve. Leases survive a restart in
the store, so a worker that reconnects within its TTL carries on as if nothing happened.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from orchestrator import __version__
from orchestrator import config as config_file
from orchestrator.blocking import Offload
from orchestrator.clock import SYSTEM_CLOCK, Clock
from orchestrator.config import Config, ConfigError
from orchestrator.daemon import agent_reach, systemd
from orchestrator.daemon.handlers import Handlers
from orchestrator.daemon.leases import LeaseManager
from orchestrator.daemon.reconcile import reconcile
from orchestrator.daemon.server import Session, SocketServer
from orchestrator.daemon.worker_pool import WorkerPool
from orchestrator.git.workspace import Workspace
from orchestrator.merge.conflict_warnings import EarlyWarnings
from orchestrator.merge.queue import MergeQueue
from orchestrator.observe import logs
from orchestrator.observe.board import (
    OUTCOME_STATES,
    RECENT_OUTCOMES,
    Board,
    RecentRecords,
    build_board,
)
from orchestrator.observe.metrics import Metrics, parse_listen, serve_http
from orchestrator.observe.page import PageRoutes
from orchestrator.protocol.jsonrpc import Request
from orchestrator.store.events import StoreSnapshot
from orchestrator.store.sqlite import Store, lock_state_dir
from orchestrator.store.states import LIVE_STATES, State

log = logs.get("service")

# How long a graceful stop waits for requests in progress.
DRAIN_S = 5.0
# Set by tests only: SIGUSR2 then blocks the event loop, as a bug in a callback would, so
# a test can watch the systemd watchdog go quiet.
TEST_HOOKS_ENV = "ORCHESTRATOR_TEST_HOOKS"


class Daemon:
    """The orchestrator daemon; ``await Daemon(config).run()`` serves until SIGTERM."""

    def __init__(self, config: Config, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        # The one clock of every part: a test may pass one it moves by hand.
        self.clock = clock
        self.metrics = Metrics(__version__)
        self.offload = Offload()
        self.ready = False
        self.metrics_port: int | None = None
        self.pool = WorkerPool(config)
        self._records = RecentRecords()
        self._stop = anyio.Event()
        self._status = ""
        self._watchdog_withheld = False
        # Taken before anything else: the variables must not leak into agents and gates.
        self._inherited_socket = systemd.listen_socket()

    def stop(self) -> None:
        """Ask the daemon to shut down gracefully."""
        self._stop.set()

    def reconfigure(self, new: Config) -> None:
        """A reloaded config for the supervisor itself (its parts get theirs in ``reload``)."""
        self.config = new

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        # Until the signal receiver is up (start-up may take minutes on a big repository),
        # a `systemctl reload` must not kill the daemon with SIGHUP's default action.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        lock_fd = lock_state_dir(config.state_dir)
        store: Store | None = None
        try:
            store = await anyio.to_thread.run_sync(
                lambda: Store.open(config.database, lock_wait_s=config.store_lock_wait_s)
            )
            workspace = await anyio.to_thread.run_sync(
                Workspace, config.repository_path, config.integration_branch, config.worktrees_dir
            )
            await self._serve(store, workspace, task_status)
        finally:
            if store is not None:
                store.close()
            os.close(lock_fd)

    async def _serve(
        self, store: Store, workspace: Workspace, task_status: TaskStatus[None]
    ) -> None:
        config = self.config
        self.store = store
        leases = LeaseManager(config, store, workspace, self.offload, self.metrics, self.clock)
        # First of all, before the merge queue settles landings: the store's leases get
        # their TTL back and any handoff caught mid-gate is put back.
        recovered = await leases.recover()
        if recovered:
            log.warning(
                "gating_interrupted", handoffs=recovered, detail="these will be gated again"
            )
        merges = MergeQueue(
            config,
            store,
            workspace,
            self.offload,
            self.metrics,
            on_change=self._changed,
            clock=self.clock,
        )
        self.leases, self.merges = leases, merges
        self.server = SocketServer(config, self, inherited=self._inherited_socket)
        self.handlers = Handlers(
            config,
            store,
            workspace,
            self.offload,
            leases,
            merges,
            sessions=lambda: list(self.server.sessions.values()),
            on_change=self._changed,
            warnings=EarlyWarnings(
                store, workspace, self.offload, config.integration_branch, clock=self.clock
            ),
            clock=self.clock,
        )
        self._refresh_needed = anyio.Event()
        await merges.reconcile_landings()
        # Before serving, so nothing else uses the store or the repository meanwhile.
        await self.offload.git(reconcile, store, workspace)
        self.metrics.start_state_clock(*await self.offload.db(store.state_clock_start))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._signals)
            await tg.start(self.server.serve)
            # Once the socket exists; before READY=1, so a worker unit started after the
            # daemon finds its way to its lease.
            await anyio.to_thread.run_sync(agent_reach.open_to_agents, config, workspace.git_dir)
            if config.metrics_listen:
                self.metrics_port = await self._start_metrics(tg)
            tg.start_soon(leases.expire_forever)
            tg.start_soon(merges.run)
            if self.handlers.warnings is not None:
                tg.start_soon(self.handlers.warnings.run)
            tg.start_soon(self._refresh_status)
            tg.start_soon(self._watchdog)
            tg.start_soon(self.pool.run)
            self._changed()
            self.ready = True
            # READY=1 only now: the store is open, recovery is done and the socket accepts.
            self._status = f"serving on {config.socket}"
            systemd.notify(f"READY=1\nSTATUS={self._status}\nMAINPID={os.getpid()}")
            log.info(
                "daemon_ready",
                socket=str(config.socket),
                version=__version__,
                state_dir=str(config.state_dir),
                metrics_port=self.metrics_port,
            )
            task_status.started()
            await self._stop.wait()
            self.ready = False
            systemd.notify("STOPPING=1\nSTATUS=stopping: draining requests in progress")
            log.info("daemon_stopping")
            # Long polls answer "no lease" at once; a report or a submission in progress
            # gets its reply. Leases stay valid: workers reconnect after the restart. The
            # pool's own workers cannot outlive us, so they give their leases back first.
            leases.stopping = True
            leases.wake()
            # One after the other: the pool's workers give their leases back (at most
            # STOP_GRACE_S) while requests are still answered; then the drain. Both
            # bounded, 15 s in all, inside the unit's TimeoutStopSec=30.
            await self.pool.shutdown()
            await self.server.drain(DRAIN_S)
            tg.cancel_scope.cancel()

    async def _start_metrics(self, tg: anyio.abc.TaskGroup) -> int:
        listen = self.config.metrics_listen
        try:
            port: int = await tg.start(
                lambda task_status: serve_http(
                    listen,
                    self.metrics,
                    ready=self._readiness,
                    refresh=self._refresh_metrics,
                    routes=PageRoutes(self._board, host_names=[parse_listen(listen)[0]]).table(),
                    task_status=task_status,
                )
            )
        except OSError as exc:
            raise RuntimeError(
                f"cannot serve metrics on {listen}: {exc.strerror or exc}; choose another "
                'metrics.listen, or set it to "" to turn the endpoint off'
            ) from exc
        return port

    async def _signals(self) -> None:
        wanted = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        hooks = os.environ.get(TEST_HOOKS_ENV) == "1"
        if hooks:
            wanted.append(signal.SIGUSR2)
        with anyio.open_signal_receiver(*wanted) as signals:
            async for signum in signals:
                log.info("signal", signal=signal.Signals(signum).name)
                if signum == signal.SIGHUP:
                    if not self._stop.is_set():  # never READY=1 after STOPPING=1
                        await self.reload()
                elif signum == signal.SIGUSR2 and hooks:
                    log.warning("test_hook_wedging_event_loop")
                    time.sleep(3600)  # noqa: ASYNC251 - the point: block the loop
                else:
                    self.stop()

    async def reload(self) -> None:
        """Re-read the config file (SIGHUP). A bad file is refused and the old config stays.

        Gates, lease timings, merge settings, allowed peers and ``[workers]`` take effect
        at once; settings the daemon holds open (see ``config.RESTART_ONLY``) are kept
        and logged as needing a restart.
        """
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={systemd.monotonic_usec()}")
        try:
            new = await anyio.to_thread.run_sync(config_file.load, Path(self.config.source))
        except ConfigError as exc:
            log.error(
                "reload_refused",
                source=exc.source,
                problems=exc.problems,
                detail="the running configuration stays; fix the file and send SIGHUP again",
            )
        else:
            new, ignored = config_file.reloaded(self.config, new)
            if ignored:
                log.warning(
                    "reload_needs_restart",
                    settings=ignored,
                    detail="these settings keep their old values until the daemon restarts",
                )
            changed = [
                f.name
                for f in fields(Config)
                if getattr(self.config, f.name) != getattr(new, f.name)
            ]
            agents_before = agent_reach.agents_of(self.config)
            self.reconfigure(new)
            self.leases.reconfigure(new)
            self.merges.reconfigure(new)
            self.server.reconfigure(new)
            self.handlers.reconfigure(new)
            self.pool.reconfigure(new)
            if agent_reach.agents_of(new) != agents_before:
                await anyio.to_thread.run_sync(
                    agent_reach.open_to_agents, new, self.merges.workspace.git_dir
                )
            self._changed()
            log.info("config_reloaded", source=new.source, changed=changed)
        systemd.notify(f"READY=1\nSTATUS={self._status}")

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval_s()
        if interval is None:
            return
        while True:
            # Pinging from a task of the loop proves the loop itself is alive; withholding
            # the ping when the merge queue is stuck gets a wedged daemon restarted too.
            # A no-op through the store's one lane proves that lane still moves: a SQLite
            # call hung on a stalled disk would otherwise leave every request waiting
            # behind it while the pings went on.
            await self.offload.db(_nothing)
            stuck = self.merges.stuck_for(self.clock.monotonic())
            if stuck is None:
                systemd.notify("WATCHDOG=1")
                self._watchdog_withheld = False
            elif not self._watchdog_withheld:
                self._watchdog_withheld = True
                log.error(
                    "watchdog_withheld",
                    reason=f"one merge step has run for {stuck:.0f} s, beyond every timeout",
                    handoffs=sorted(self.merges.current),
                )
            await anyio.sleep(interval)

    def _changed(self) -> None:
        """Handoff states changed: wake dispatch and the merge queue, refresh the status."""
        self.leases.wake()
        self.merges.wake()
        self._refresh_needed.set()

    async def _refresh_status(self) -> None:
        """Keep systemd's ``STATUS=`` current as states change (metrics read the store
        themselves, at each scrape)."""
        if not os.environ.get("NOTIFY_SOCKET"):
            return  # not under systemd: nobody reads STATUS=, so spare the store the reads
        while True:
            with anyio.move_on_after(2.0):  # leases also end by the clock
                await self._refresh_needed.wait()
            self._refresh_needed = anyio.Event()
            # The same cheap, index-only read a scrape makes.
            snapshot = await self.offload.db(self.store.metrics_snapshot, now=self.clock.now())
            self._announce(snapshot)

    def _announce(self, snapshot: StoreSnapshot) -> None:
        """Keep systemd's one-line ``STATUS=`` (``systemctl status``) current."""
        if not self.ready:
            return
        counts = snapshot.counts
        status = (
            f"{self._workers_attached()} workers, {snapshot.leases_active} leases, "
            f"{counts[State.QUEUED]} queued, {snapshot.merge_queue_depth} to merge, "
            f"{counts[State.MERGED]} merged"
        )
        if self.merges.blocked_reason:
            status += f"; blocked: {self.merges.blocked_reason}"
        if status != self._status:
            self._status = status
            systemd.notify(f"STATUS={status}")

    async def _refresh_metrics(self) -> None:
        """Before each scrape: gauges from the store's truth, read off the event loop."""
        cursor = self.metrics.state_cursor or 0

        def read() -> tuple[StoreSnapshot, list[tuple[int, float, str, str]]]:
            now = self.clock.now()
            return self.store.metrics_snapshot(now=now), self.store.state_changes(cursor)

        snapshot, changes = await self.offload.db(read)
        self.metrics.set_store_snapshot(snapshot)
        self.metrics.state_changes(changes)
        self.metrics.set_merge_blocked(self.merges.blocked_reason is not None)
        queue = await self.offload.db(self.store.merge_queue)
        etas = await self.merges.landing_etas(queue) if queue else {}
        self.metrics.set_merge_queue_eta(max(etas.values(), default=0.0))

    async def _board(self) -> Board:
        """The live page's board: the ``status``, ``handoff.list`` and ``handoff.get``
        reads of the control API, for live handoffs and the few recent outcomes only (a
        store of 10,000 merged handoffs costs a frame no more than one of ten)."""
        status = await self.handlers.status_result()

        def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
            # The board reads the control API's JSON (the client's view draws it too).
            live = [h.to_wire() for state in LIVE_STATES for h in self.store.summaries(state)]
            recent = [
                h.to_wire() for h in self.store.recent_summaries(OUTCOME_STATES, RECENT_OUTCOMES)
            ]
            fetched = {
                name: self.store.detail(name).to_wire() for name in self._records.stale(recent)
            }
            return live, recent, fetched

        live, recent, fetched = await self.offload.db(read)
        records = self._records.records(recent, fetched)
        return build_board(status, live + recent, records, now=self.clock.now())

    def _readiness(self) -> dict[str, bool]:
        """``/readyz``: started and not stopping, store open, socket listening, merge
        queue running."""
        return {
            "daemon": self.ready,
            "store": self.store.is_open(),
            "socket": self.server.listening,
            "merge_queue": self.merges.running,
        }

    # ---- the server's Dispatcher interface ----------------------------------------------

    async def dispatch(self, session: Session, request: Request) -> Any:
        return await self.handlers.dispatch(session, request)

    def session_opened(self, session: Session) -> None:
        self._count_workers()

    def session_closed(self, session: Session) -> None:
        self._count_workers()

    def _count_workers(self) -> None:
        self.metrics.set_workers_connected(self._workers_attached())
        self._refresh_needed.set()

    def _workers_attached(self) -> int:
        return sum(1 for s in self.server.sessions.values() if s.role == "worker" and not s.closed)


def _nothing() -> None:
    """A store-lane round trip for the watchdog."""
