"""The supervisor: one task group owns every long-lived task of the daemon.

Start-up order matters for recovery: lock the state dir (a second daemon refuses), open
the store, put back any handoff caught mid-gate, then serve. Leases survive a restart in
the store, so a worker that reconnects within its TTL carries on as if nothing happened.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import anyio
from anyio.abc import TaskStatus

from orchestrator import __version__, logs, systemd
from orchestrator.blocking import Offload
from orchestrator.config import Config
from orchestrator.handlers import Handlers
from orchestrator.leases import LeaseManager
from orchestrator.merge import MergeQueue
from orchestrator.metrics import Metrics, StoreSnapshot, serve_http
from orchestrator.protocol import Request
from orchestrator.server import Session, SocketServer
from orchestrator.store import Store, lock_state_dir
from orchestrator.worktrees import Workspace

log = logs.get("service")

# How long a graceful stop waits for requests in progress.
DRAIN_S = 5.0


class Daemon:
    """The orchestrator daemon; ``await Daemon(config).run()`` serves until SIGTERM."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics(__version__)
        self.offload = Offload()
        self.ready = False
        self.metrics_port: int | None = None
        self._stop = anyio.Event()

    def stop(self) -> None:
        """Ask the daemon to shut down gracefully."""
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        lock_fd = lock_state_dir(config.state_dir)
        store: Store | None = None
        try:
            store = await anyio.to_thread.run_sync(Store.open, config.database)
            workspace = await anyio.to_thread.run_sync(
                Workspace, config.repository_path, config.integration_branch, config.worktrees_dir
            )
            recovered = await self.offload.db(
                store.recover, ttl_s=config.lease_ttl_s, now=time.time()
            )
            if recovered:
                log.warning(
                    "gating_interrupted", handoffs=recovered, detail="these will be gated again"
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
        leases = LeaseManager(config, store, workspace, self.offload, self.metrics)
        merges = MergeQueue(
            config, store, workspace, self.offload, self.metrics, on_change=self._changed
        )
        self.leases, self.merges = leases, merges
        self.server = SocketServer(config, self)
        self.handlers = Handlers(
            config,
            store,
            workspace,
            self.offload,
            leases,
            merges,
            sessions=lambda: list(self.server.sessions.values()),
            on_change=self._changed,
        )
        await merges.reconcile_landings()
        self.metrics.start_state_clock(*await self.offload.db(store.state_clock_start))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._signals)
            await tg.start(self.server.serve)
            if config.metrics_listen:
                self.metrics_port = await self._start_metrics(tg)
            tg.start_soon(leases.expire_forever)
            tg.start_soon(merges.run)
            tg.start_soon(self._watchdog)
            self._changed()
            self.ready = True
            systemd.notify(f"READY=1\nSTATUS=serving on {config.socket}\nMAINPID={os.getpid()}")
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
            systemd.notify("STOPPING=1")
            log.info("daemon_stopping")
            # Long polls answer "no lease" at once; a report or a submission in progress
            # gets its reply. Leases stay valid: workers reconnect after the restart.
            leases.stopping = True
            leases.wake()
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
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal", signal=signal.Signals(signum).name)
                self.stop()

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval_s()
        if interval is None:
            return
        while True:
            # Pinging from the loop proves the loop itself is alive, not just the process.
            systemd.notify("WATCHDOG=1")
            await anyio.sleep(interval)

    def _changed(self) -> None:
        """Handoff states changed: wake dispatch and the merge queue."""
        self.leases.wake()
        self.merges.wake()

    async def _refresh_metrics(self) -> None:
        """Before each scrape: gauges from the store's truth, read off the event loop."""
        cursor = self.metrics.state_cursor or 0

        def read() -> tuple[dict[str, Any], list[tuple[int, float, str, str]]]:
            return self.store.metrics_snapshot(now=time.time()), self.store.state_changes(cursor)

        snapshot, changes = await self.offload.db(read)
        self.metrics.set_store_snapshot(StoreSnapshot(**snapshot))
        self.metrics.state_changes(changes)
        self.metrics.set_merge_blocked(self.merges.blocked_reason is not None)
        self._count_workers()

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
        self.metrics.set_workers_connected(
            sum(1 for s in self.server.sessions.values() if s.role == "worker" and not s.closed)
        )
