"""The supervised worker pool: ``[workers]`` agent workers the daemon starts and keeps running.

Each slot runs ``orchestrator worker`` (the generic worker, the same one a person would
attach by hand) as a process group of its own, restarts it with exponential backoff when
it dies, and stops it on shutdown. Orphans are impossible both ways round: each worker is
started through :mod:`orchestrator.deathsig` with the daemon's pid, so a SIGKILLed daemon
takes its workers with it, and each worker runs its agent the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import anyio
import anyio.abc

from orchestrator.config import Config, WorkerPoolConfig
from orchestrator.daemon import systemd
from orchestrator.observe import logs

__all__ = ["WorkerPool"]

log = logs.get("worker_pool")

# Backoff between restarts of a worker that keeps dying: 1 s doubling up to a minute; a
# worker that ran this long before it died starts the next one at the minimum again.
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
STABLE_AFTER_S = 30.0
# How long a worker has to give its lease back and stop after SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0


class WorkerPool:
    """Keeps ``config.workers.count`` workers attached; idle when there is no ``[workers]``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._wanted = config.workers
        self._changed = anyio.Event()
        self._stopping = False
        self._processes: dict[str, anyio.abc.Process] = {}

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config: a changed ``[workers]`` restarts the pool with it."""
        self.config = config
        if config.workers != self._wanted:
            self._wanted = config.workers
            self._changed.set()

    async def run(self) -> None:
        """Supervise until cancelled; the workers are stopped on the way out."""
        while not self._stopping:
            wanted = self._wanted
            self._changed = anyio.Event()
            if wanted is None:
                await self._changed.wait()
                continue
            log.info("pool_starting", workers=wanted.count, command=list(wanted.command))
            async with anyio.create_task_group() as tg:
                for index in range(1, wanted.count + 1):
                    tg.start_soon(self._keep_running, wanted, f"{wanted.name}-{index}")
                await self._changed.wait()
                await self._terminate_all()
                tg.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Stop every worker (SIGTERM: each gives its lease back), SIGKILL after a grace."""
        self._stopping = True
        self._changed.set()
        await self._terminate_all()

    async def _keep_running(self, wanted: WorkerPoolConfig, name: str) -> None:
        backoff = MIN_BACKOFF_S
        while not self._stopping:
            started = time.monotonic()
            try:
                process = await anyio.open_process(
                    self._argv(wanted, name),
                    stdin=subprocess.DEVNULL,
                    stdout=None,  # the daemon's own output: the journal under systemd
                    stderr=None,
                    start_new_session=True,
                    env=systemd.child_environment({"ORCHESTRATOR_WORKER_PID": str(os.getpid())}),
                )
            except OSError as exc:
                log.error("pool_worker_unstartable", worker=name, error=str(exc))
                process = None
            if process is not None:
                self._processes[name] = process
                log.info("pool_worker_started", worker=name, pid=process.pid)
                try:
                    code = await process.wait()
                finally:
                    with anyio.CancelScope(shield=True):
                        await _terminate(process)
                    self._processes.pop(name, None)
                if self._stopping:
                    return
            else:
                code = None
            delay = MIN_BACKOFF_S if time.monotonic() - started >= STABLE_AFTER_S else backoff
            backoff = min(delay * 2, MAX_BACKOFF_S)
            log.warning("pool_worker_exited", worker=name, exit_code=code, restart_in_s=delay)
            await anyio.sleep(delay)

    def _argv(self, wanted: WorkerPoolConfig, name: str) -> list[str]:
        argv = [sys.executable, "-m", "orchestrator.deathsig", sys.executable, "-m"]
        argv += ["orchestrator", "--config", self.config.source, "--socket"]
        argv += [str(self.config.socket), "worker", "--name", name]
        for label in wanted.labels:
            argv += ["--label", label]
        return [*argv, "--", *wanted.command]

    async def _terminate_all(self) -> None:
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for process in list(self._processes.values()):
                    tg.start_soon(_terminate, process)


async def _terminate(process: anyio.abc.Process) -> None:
    """SIGTERM the worker's process group, SIGKILL it after :data:`STOP_GRACE_S`.

    The group is SIGKILLed in the end even when its leader (the deathsig wrapper) is
    already gone: a wrapper that was itself killed leaves the worker under it running,
    and a second worker of the same name must never start beside it."""
    if process.returncode is None:
        _signal_group(process.pid, signal.SIGTERM)
        with anyio.move_on_after(STOP_GRACE_S):
            await process.wait()
    _signal_group(process.pid, signal.SIGKILL)
    await process.wait()


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
