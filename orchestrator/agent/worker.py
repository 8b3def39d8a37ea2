"""The generic agent runner behind ``orchestrator worker -- CMD ARGS...``.

It loops: acquire a lease, run the agent command in the worktree (the handoff on stdin and
in ``$ORCHESTRATOR_HANDOFF_FILE``), heartbeat with progress while it runs, commit whatever
the agent left uncommitted, build the report, and send it. A lost connection (the daemon
restarting) is re-established and the lease carries on: leases outlive connections.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pygit2
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from orchestrator import deathsig
from orchestrator.agent.asking import Asking, watch_question_file
from orchestrator.agent.channel import LeaseChannel
from orchestrator.agent.client import Client, ConnectionLost
from orchestrator.agent.recipes import Recipe, RecipeContext, progress_of_line
from orchestrator.agent.setup import SetupSpec, run_setup
from orchestrator.handoff import template as handoff_model
from orchestrator.observe import logs
from orchestrator.protocol.jsonrpc import (
    INTERNAL_ERROR,
    LEASE_NOT_HELD,
    REPORT_REJECTED,
    SHUTTING_DOWN,
    RpcError,
)
from orchestrator.protocol.lease_grant import LeaseGrant
from orchestrator.protocol.records import Progress, Report

log = logs.get("worker")

RECONNECT_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
# How often a report the daemon could not take (shutting down, internal error) is resent.
REPORT_RETRIES = 8
# How long a report may take once the agent is done, even while the worker is stopping.
REPORT_SHIELD_S = 120.0
AGENT_TERM_GRACE_S = 5.0


@dataclass
class WorkerOptions:
    """What ``orchestrator worker`` was asked to do."""

    socket: Path
    command: Sequence[str]
    name: str
    labels: tuple[str, ...] = ()
    wait_s: float = 30.0
    max_handoffs: int | None = None
    exit_when_idle: bool = False
    reconnect_for_s: float = 300.0
    # With a recipe (``--agent NAME``), ``command`` holds extra arguments for its CLI.
    recipe: Recipe | None = None


class Link:
    """A connection to the daemon that re-connects by itself; calls wait for it."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.client: Client | None = None
        self.connected = anyio.Event()
        self.revoked: set[str] = set()
        self.revoked_event = anyio.Event()
        self.server_info: dict[str, Any] = {}
        self.failure: Exception | None = None
        # The leases this worker is working on, for the notifications about them.
        self.channels: dict[str, LeaseChannel] = {}

    def _notified(self, method: str, params: dict[str, Any]) -> None:
        channel = self.channels.get(str(params.get("leaseId")))
        if method == "lease.answered" and channel is not None:
            channel.asking.answered(str(params.get("answer", "")))
        elif method == "lease.warning" and channel is not None:
            channel.warnings.append(params)
        elif method == "lease.revoked":
            self.revoked.add(str(params.get("leaseId")))
            self.revoked_event.set()
            self.revoked_event = anyio.Event()
            log.warning("lease_revoked", lease=params.get("leaseId"), reason=params.get("reason"))

    async def maintain(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Keep a connection open for as long as the worker runs."""
        started = False
        failures = 0
        lost_since: float | None = None
        while True:
            try:
                async with Client.connect(
                    self.options.socket,
                    role="worker",
                    name=self.options.name,
                    labels=self.options.labels,
                    on_notification=self._notified,
                ) as client:
                    self.client = client
                    self.server_info = client.server_info
                    self.connected.set()
                    failures = 0
                    lost_since = None
                    if not started:
                        started = True
                        task_status.started()
                    else:
                        log.info("reconnected")
                    await client.lost.wait()
            except (ConnectionLost, OSError) as exc:
                self.failure = exc
            except RpcError as exc:
                # initialize itself was refused (version, credentials): retrying won't help.
                self.failure = exc
                if not started:
                    raise
            self.client = None
            if self.connected.is_set():
                # Only on the way from connected to disconnected: replacing an unset
                # event would strand the calls already waiting on it.
                self.connected = anyio.Event()
            now = anyio.current_time()
            lost_since = lost_since if lost_since is not None else now
            if now - lost_since > self.options.reconnect_for_s:
                raise ConnectionLost(
                    f"gave up reconnecting to {self.options.socket} after "
                    f"{self.options.reconnect_for_s:g} s: {self.failure}"
                )
            delay = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
            failures += 1
            await anyio.sleep(delay)

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """Call, re-trying across a reconnect; RPC errors are the caller's to handle."""
        while True:
            await self.connected.wait()
            client = self.client
            if client is None:
                continue
            try:
                return await client.call(method, params)
            except ConnectionLost:
                await client.lost.wait()


async def run_worker(options: WorkerOptions) -> int:
    """Run the worker loop; returns the process exit status."""
    link = Link(options)
    done = 0
    async with anyio.create_task_group() as tg:
        try:
            await tg.start(link.maintain)
        except (ConnectionLost, RpcError) as exc:
            log.error("cannot_connect", error=str(exc))
            return 2
        # A signal cancels the work only; the connection stays up so the cleanup can
        # still give the lease back.
        with anyio.CancelScope() as work:
            tg.start_soon(_stop_on_signal, work)
            failures = 0
            while options.max_handoffs is None or done < options.max_handoffs:
                try:
                    result = await link.call("lease.acquire", {"waitS": options.wait_s})
                except RpcError as exc:
                    # e.g. the daemon could not prepare a worktree, or is shutting down:
                    # not this worker's fault, so wait a little and ask again.
                    failures = min(failures + 1, 6)
                    log.warning("acquire_refused", code=exc.code, error=exc.message)
                    await anyio.sleep(min(30.0, 0.5 * 2**failures))
                    continue
                failures = 0
                wire = result.get("lease")
                if wire is None:
                    if options.exit_when_idle:
                        break
                    continue
                try:
                    lease = LeaseGrant.from_wire(wire)
                except ValueError as exc:
                    # A daemon this worker cannot understand: the lease lapses after its
                    # TTL; asking again at once would only take the next one the same way.
                    failures = min(failures + 1, 6)
                    log.error("lease_unreadable", error=str(exc))
                    await anyio.sleep(min(30.0, 0.5 * 2**failures))
                    continue
                await _work_on(link, options, lease)
                done += 1
        tg.cancel_scope.cancel()
    return 0


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    """SIGTERM/SIGINT cancel the worker; cleanup (stopping the agent, giving the lease
    back) runs in shielded ``finally`` blocks on the way out."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                _dump_tasks()
                continue
            # Keep receiving: a second SIGTERM must not kill the worker mid-cleanup.
            log.info("signal", signal=signal.Signals(signum).name)
            scope.cancel()


def _dump_tasks() -> None:
    """SIGUSR1: print where every task of the worker is waiting (for a stuck worker)."""
    import asyncio

    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=sys.stderr)
        # Follow the chain of awaits, which a task's own stack does not show.
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                print(
                    f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}",
                    file=sys.stderr,
                )
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)


@dataclass
class _Run:
    lease: LeaseGrant
    files: Path
    channel: LeaseChannel
    process: Process | None = None
    revoked: bool = False
    # Progress read from a recipe's CLI output, and when (monotonic).
    stream_progress: Progress | None = None
    stream_progress_at: float = 0.0
    # When the report in flight was sent (monotonic), None when none is: a heartbeat sent
    # meanwhile would reach a lease the report just released and be refused for nothing.
    report_sent_at: float | None = None


def _channel(link: Link, lease: LeaseGrant, files: Path) -> LeaseChannel:
    return LeaseChannel(
        lease=lease,
        asking=Asking(lease.id, lease.token, files / "answer.txt"),
        call=link.call,
        progress_file=files / "progress",
        report_file=files / "report.md",
    )


async def _work_on(link: Link, options: WorkerOptions, lease: LeaseGrant) -> None:
    bound = log.bind(handoff=lease.handoff.name, lease=lease.id, attempt=lease.attempt)
    bound.info("lease_acquired", worktree=lease.worktree, branch=lease.branch)
    interval = float(link.server_info.get("heartbeatIntervalS", 15))
    agent_done = False
    with tempfile.TemporaryDirectory(prefix="orchestrator-worker-") as tmp:
        files = Path(tmp)
        run = _Run(lease=lease, files=files, channel=_channel(link, lease, files))
        link.channels[lease.id] = run.channel
        try:
            # Heartbeats cover the whole lease, report included: building the report and
            # waiting for the reply must not let the lease lapse.
            async with anyio.create_task_group() as tg:
                tg.start_soon(_heartbeat, link, run, interval, bound)
                tg.start_soon(
                    watch_question_file, files / "question", run.channel.asking, link.call, bound
                )
                try:
                    await tg.start(run.channel.serve, files / "agent.sock")
                except OSError as exc:
                    # e.g. a $TMPDIR too deep for a Unix socket path: the file interface
                    # still works, only `orchestrator mcp` cannot reach this lease.
                    bound.error("agent_channel_unavailable", error=str(exc))
                env = _agent_env(run)
                if not await _set_up(link, run, env, bound):
                    agent_done = True  # the lease was given back already
                    tg.cancel_scope.cancel()
                    return
                exit_status = await _run_agent(options, run, env, bound)
                agent_done = True
                if not run.revoked:
                    # The agent's work is done: a SIGTERM now must not throw it away, so
                    # the report gets a bounded, shielded chance to go out.
                    with anyio.CancelScope(shield=True), anyio.move_on_after(REPORT_SHIELD_S):
                        await _report(link, run, exit_status, bound)
                tg.cancel_scope.cancel()
        finally:
            link.channels.pop(lease.id, None)
            if not agent_done and not run.revoked:
                # Stopped by a signal: hand the work back now rather than after the TTL.
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    try:
                        await _release(link, lease, "the worker was stopped", bound)
                    except ConnectionLost:
                        pass
    if run.revoked:
        bound.warning("agent_stopped", reason="lease revoked")


async def _set_up(link: Link, run: _Run, env: dict[str, str], bound: Any) -> bool:
    """``[workspace] setup`` before the agent, when the lease asks for it; False (the
    lease released) when it failed."""
    spec = SetupSpec.from_lease(run.lease)
    if spec is None:
        return True
    if not spec.needed:
        bound.info("workspace_setup_skipped", reason="kept paths match the cache key")
        return True
    bound.info("workspace_setup_started", command=list(spec.command))
    outcome = await run_setup(spec, Path(run.lease.worktree), env)
    if outcome.status == 0:
        bound.info("workspace_setup_done")
        return True
    why = "timed out" if outcome.timed_out else f"exit status {outcome.status}"
    bound.error("workspace_setup_failed", status=outcome.status, timed_out=outcome.timed_out)
    tail = outcome.tail[-400:]
    await _release(link, run.lease, f"[workspace] setup failed ({why}): {tail}", bound)
    return False


async def _report(link: Link, run: _Run, exit_status: int, bound: Any) -> None:
    lease = run.lease
    params = {"leaseId": lease.id, "token": lease.token}
    rejected = 0
    troubles = 0
    while True:
        try:
            report = await anyio.to_thread.run_sync(_build_report, run, exit_status)
        except Exception as exc:  # a broken worktree must cost this lease, not the worker
            bound.error("report_not_built", error=f"{type(exc).__name__}: {exc}")
            await _release(link, lease, f"the worker could not build a report: {exc}", bound)
            return
        try:
            run.report_sent_at = time.monotonic()
            await link.call("handoff.report", {**params, "report": report.to_wire()})
            bound.info("reported", status=report.status, head=report.head)
            return
        except RpcError as exc:
            run.report_sent_at = None
            if exc.code == REPORT_REJECTED and rejected == 0:
                # Something changed the worktree after our commit (e.g. an agent's
                # background process): commit again once, then give up cleanly.
                rejected += 1
                bound.warning("report_rejected", reason=exc.message)
                continue
            if exc.code == LEASE_NOT_HELD:
                bound.warning("lease_lost", error=exc.message)
                return
            if exc.code in (SHUTTING_DOWN, INTERNAL_ERROR) and troubles < REPORT_RETRIES:
                # The daemon's trouble, not the work's: the report is idempotent, so
                # send it again (after a restart, the lease is still ours).
                troubles += 1
                bound.warning("report_deferred", code=exc.code, error=exc.message)
                await anyio.sleep(min(30.0, 0.5 * 2**troubles))
                continue
            bound.error("report_failed", code=exc.code, error=exc.message)
            await _release(link, lease, f"report refused: {exc.message}", bound)
            return


async def _release(link: Link, lease: LeaseGrant, reason: str, bound: Any) -> None:
    try:
        await link.call(
            "lease.release",
            {"leaseId": lease.id, "token": lease.token, "reason": reason[:500]},
        )
        bound.info("lease_released", reason=reason[:200])
    except RpcError:
        pass


def _agent_env(run: _Run) -> dict[str, str]:
    lease = run.lease
    handoff = lease.handoff
    handoff_file = run.files / "handoff.md"
    handoff_file.write_text(handoff.body, encoding="utf-8")
    feedback_file = run.files / "feedback.json"
    if handoff.feedback is not None:
        feedback_file.write_text(json.dumps(handoff.feedback.to_wire(), indent=2), encoding="utf-8")
    ports: dict[str, str] = {}
    if lease.ports is not None:
        # Ports of this lease's own (no other live lease or gate has them): for dev
        # servers and tests that listen.
        ports["ORCHESTRATOR_PORT_BASE"] = str(lease.ports.base)
        ports["ORCHESTRATOR_PORT_COUNT"] = str(lease.ports.count or 1)
    return {
        **git_env_for_lease(Path(lease.worktree), dict(os.environ), run.files),
        **ports,
        "ORCHESTRATOR_HANDOFF": handoff.name,
        "ORCHESTRATOR_HANDOFF_FILE": str(handoff_file),
        "ORCHESTRATOR_WORKTREE": lease.worktree,
        "ORCHESTRATOR_BRANCH": lease.branch,
        "ORCHESTRATOR_BASE_COMMIT": lease.base_commit,
        # origin/<integration branch> in the worktree is at this commit; older daemons
        # do not send it.
        "ORCHESTRATOR_INTEGRATION_COMMIT": lease.integration_commit or "",
        "ORCHESTRATOR_ATTEMPT": str(lease.attempt),
        "ORCHESTRATOR_LEASE_ID": lease.id,
        "ORCHESTRATOR_FEEDBACK_FILE": str(feedback_file),
        "ORCHESTRATOR_REPORT_FILE": str(run.files / "report.md"),
        "ORCHESTRATOR_PROGRESS_FILE": str(run.files / "progress"),
        "ORCHESTRATOR_QUESTION_FILE": str(run.files / "question"),
        "ORCHESTRATOR_ANSWER_FILE": str(run.files / "answer.txt"),
        "ORCHESTRATOR_AGENT_SOCKET": str(run.files / "agent.sock"),
        "ORCHESTRATOR_WORKER_PID": str(os.getpid()),
    }


def git_env_for_lease(
    worktree: Path, env: dict[str, str], scratch: Path, *, uid: int | None = None
) -> dict[str, str]:
    """``env`` with ``safe.directory`` for the lease's repository and its ``origin``, when
    the daemon (another uid) owns them, so that the agent's plain git works there.

    git refuses a repository another user owns ("dubious ownership") unless system,
    global or command-line config says it is safe, and it drops command-line config
    (GIT_CONFIG_COUNT) for the upload-pack of a local ``git fetch origin``. So the agent
    gets a global config file of its own in ``scratch``, which includes the user's
    usual one. ``uid``: the agent's (default: this process's)."""
    try:
        if os.stat(worktree).st_uid == (os.getuid() if uid is None else uid):
            return env
    except OSError:
        return env
    safe = [str(worktree)]
    try:
        origin = pygit2.Config(str(worktree / ".git" / "config"))["remote.origin.url"]
        safe.append(str(origin))
    except (KeyError, OSError, pygit2.GitError):
        pass
    home = Path(env.get("HOME", "/nonexistent"))
    usual = (
        [env["GIT_CONFIG_GLOBAL"]]
        if env.get("GIT_CONFIG_GLOBAL")
        else [
            str(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "git" / "config"),
            str(home / ".gitconfig"),
        ]
    )
    config = scratch / "gitconfig"
    lines = [f"[include]\n\tpath = {_config_quote(p)}\n" for p in usual if p != str(config)]
    lines += [f"[safe]\n\tdirectory = {_config_quote(p)}\n" for p in safe]
    config.write_text("".join(lines), encoding="utf-8")
    return {**env, "GIT_CONFIG_GLOBAL": str(config)}


def _config_quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


async def _run_agent(options: WorkerOptions, run: _Run, env: dict[str, str], bound: Any) -> int:
    lease = run.lease
    command = list(options.command)
    stdin_text: str | None = lease.handoff.body
    recipe = options.recipe
    if recipe is not None:
        invocation = recipe.invocation(
            RecipeContext(
                files=run.files,
                channel=run.files / "agent.sock",
                body=lease.handoff.body,
                feedback=lease.handoff.feedback,
                extra_args=tuple(options.command),
            )
        )
        command = invocation.argv
        env = {**env, **invocation.env}
        stdin_text = invocation.stdin
        bound.info("agent_recipe", agent=recipe.name, executable=command[0])
    try:
        # The agent gets its own process group (so it can be stopped whole) and dies with
        # this worker even on SIGKILL (orchestrator.deathsig), so it never keeps writing
        # into a worktree that a later attempt owns.
        process = await anyio.open_process(
            deathsig.wrapper_argv(command),
            cwd=lease.worktree,
            env=env,
            stdin=-1,
            # A recipe's CLI output is read for progress (and passed on to stderr).
            stdout=-1 if recipe is not None and recipe.progress is not None else None,
            stderr=None,
            start_new_session=True,
        )
    except OSError as exc:
        bound.error("agent_not_started", command=command, error=str(exc))
        return 127
    run.process = process
    if run.revoked:  # revoked while it was starting
        with anyio.CancelScope(shield=True):
            await _stop_agent(process)

    async def feed_stdin() -> None:
        assert process.stdin is not None
        try:
            if stdin_text:
                await process.stdin.send(stdin_text.encode("utf-8"))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # an agent that does not read its stdin is fine
        finally:
            await process.stdin.aclose()

    async def read_stdout() -> None:
        assert process.stdout is not None and recipe is not None
        reader = BufferedByteReceiveStream(process.stdout)
        while True:
            try:
                line = await reader.receive_until(b"\n", 16 * 1024 * 1024)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound):
                return
            sys.stderr.buffer.write(line + b"\n")
            sys.stderr.flush()
            progress = progress_of_line(recipe, line.decode("utf-8", errors="replace"))
            if progress is not None:
                run.stream_progress = progress
                run.stream_progress_at = time.monotonic()

    try:
        async with anyio.create_task_group() as tg:
            # A task, so a large handoff and an agent that never reads can't block us.
            tg.start_soon(feed_stdin)
            if process.stdout is not None:
                tg.start_soon(read_stdout)
            status = await process.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _stop_agent(process)
    bound.info("agent_exited", exit_status=status if not run.revoked else None)
    return status


async def _heartbeat(link: Link, run: _Run, interval: float, bound: Any) -> None:
    lease = run.lease
    while True:
        if lease.id not in link.revoked:
            with anyio.move_on_after(interval):
                await link.revoked_event.wait()
        if lease.id in link.revoked:
            await _revoked(run)
            return
        sent = run.report_sent_at
        if sent is not None and time.monotonic() - sent < interval:
            continue  # the report is the lease's last word; beat again only if it is slow
        params: dict[str, Any] = {"leaseId": lease.id, "token": lease.token}
        progress = _current_progress(run)
        if progress is not None:
            params["progress"] = progress.to_wire()
        if "warnings" in link.server_info.get("capabilities", ()):
            # The branch's tip, for early conflict warnings (PROTOCOL.md).
            head = await anyio.to_thread.run_sync(_branch_tip, Path(lease.worktree))
            if head is not None:
                params["head"] = head
        try:
            result = await link.call("lease.heartbeat", params)
            if isinstance(result, dict) and isinstance(result.get("answer"), str):
                run.channel.asking.answered(result["answer"])
        except RpcError as exc:
            if exc.code == LEASE_NOT_HELD:
                bound.warning("lease_lost", error=exc.message)
                await _revoked(run)
                return
            bound.warning("heartbeat_refused", code=exc.code, error=exc.message)


async def _revoked(run: _Run) -> None:
    run.revoked = True
    if run.process is not None:
        await _stop_agent(run.process)


async def _stop_agent(process: Process) -> None:
    """Stop the agent's whole process group: TERM, a grace period, then KILL."""
    if process.returncode is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        with anyio.move_on_after(AGENT_TERM_GRACE_S):
            await process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    await process.wait()


def _branch_tip(worktree: Path) -> str | None:
    """The commit the lease repository's HEAD is at, or None (no commit yet, a broken
    repository: the heartbeat goes without it)."""
    try:
        repo = pygit2.Repository(str(worktree), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)
        return str(repo.head.target)
    except (pygit2.GitError, KeyError, ValueError):
        return None


def _current_progress(run: _Run) -> Progress | None:
    """What the agent said last (progress file or MCP tool) merged with what its CLI's
    output says, the newer on top: a stream message does not erase a percent."""
    path = run.files / "progress"
    written = _read_progress(path)
    if run.stream_progress is None:
        return written
    if written is None:
        return run.stream_progress
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        age = 0.0
    written_at = time.monotonic() - age
    if written_at >= run.stream_progress_at:
        return _on_top(written, run.stream_progress)
    return _on_top(run.stream_progress, written)


def _on_top(newer: Progress, older: Progress) -> Progress:
    """``newer`` with what it leaves unsaid taken from ``older``."""
    return Progress(
        percent=newer.percent if newer.percent is not None else older.percent,
        phase=newer.phase if newer.phase is not None else older.phase,
        message=newer.message if newer.message is not None else older.message,
    )


def _read_progress(path: Path) -> Progress | None:
    """The agent's last progress line: JSON, or ``PERCENT[%] [message]``."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return None
    if not lines:
        return None
    last = lines[-1].strip()
    try:
        value = json.loads(last)
        if isinstance(value, dict):
            percent = value.get("percent")
            phase, message = value.get("phase"), value.get("message")
            # A field of the wrong type is left out: the daemon would refuse the whole
            # heartbeat for it, and the lease would lapse.
            return Progress(
                percent=_percent(percent),
                phase=phase if isinstance(phase, str) else None,
                message=message if isinstance(message, str) else None,
            )
    except ValueError:
        pass
    head, _, rest = last.partition(" ")
    try:
        number = float(head.rstrip("%"))
    except ValueError:
        return Progress(percent=None, phase=None, message=last[:500])
    percent = _percent(number)
    if percent is None:  # nan or inf: no percent, the line is a message
        return Progress(percent=None, phase=None, message=last[:500])
    return Progress(percent=int(percent), phase=None, message=rest.strip() or None)


def _percent(value: object) -> float | None:
    """A percent the daemon accepts (a finite number, clamped to 0-100), or None: the
    daemon refuses a whole heartbeat for a bad one (and the lease would lapse), and NaN
    or infinity cannot even be framed as JSON."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    return max(0, min(100, value))


def open_worktree(worktree: Path, branch: str) -> pygit2.Repository:
    """The lease's worktree, refusing anything else.

    No upward search: if the agent broke the worktree's ``.git`` link, a search would find
    the main repository and commit onto its checked-out branch, past every gate."""
    try:
        repo = pygit2.Repository(str(worktree), pygit2.enums.RepositoryOpenFlag.NO_SEARCH)
    except pygit2.GitError as exc:
        raise WorktreeBroken(f"{worktree} is no longer a git worktree: {exc}") from exc
    workdir = Path(repo.workdir or "").resolve()
    if workdir != worktree.resolve():
        raise WorktreeBroken(f"{worktree} is not its own worktree (git says {workdir})")
    if repo.head_is_detached or repo.head.name != f"refs/heads/{branch}":
        raise WorktreeBroken(f"{worktree} is no longer on {branch}; the agent switched branches")
    return repo


class WorktreeBroken(RuntimeError):
    """The agent left the worktree in a state the worker must not commit from."""


def commit_leftovers(repo: pygit2.Repository, message: str, worker_name: str) -> str | None:
    """Commit everything the agent left uncommitted (respecting .gitignore); new sha or None."""
    status = repo.status()
    changed = {
        path: flags for path, flags in status.items() if not flags & pygit2.enums.FileStatus.IGNORED
    }
    if not changed:
        return None
    index = repo.index
    for path, flags in changed.items():
        if flags & (pygit2.enums.FileStatus.WT_DELETED | pygit2.enums.FileStatus.INDEX_DELETED):
            if path in index:
                index.remove(path)
        else:
            index.add(path)
    index.write()
    tree = index.write_tree()
    parents = [] if repo.head_is_unborn else [repo.head.target]
    if parents and repo[parents[0]].peel(pygit2.Tree).id == tree:
        return None
    try:
        author = repo.default_signature
    except (KeyError, pygit2.GitError):
        author = pygit2.Signature(
            f"orchestrator worker {worker_name}", "worker@orchestrator.invalid"
        )
    oid = repo.create_commit("HEAD", author, author, message, tree, parents)
    return str(oid)


def _build_report(run: _Run, exit_status: int) -> Report:
    lease = run.lease
    worktree = Path(lease.worktree)
    name = lease.handoff.name
    repo = open_worktree(worktree, lease.branch)
    commit_leftovers(
        repo,
        f"{name}: work left uncommitted by the agent (attempt {lease.attempt})",
        worker_name=os.environ.get("ORCHESTRATOR_WORKER_NAME", "worker"),
    )
    head = str(repo.head.target)
    commits = []
    base = lease.base_commit
    walker = repo.walk(repo.head.target, pygit2.enums.SortMode.TOPOLOGICAL)
    if base:
        walker.hide(base)
    for commit in walker:
        commits.append(
            f"{str(commit.id)[:10]} {commit.message.splitlines()[0] if commit.message else ''}"
        )
    status = "completed" if exit_status == 0 else "failed"
    summary = ""
    markdown: str | None = None
    phases: tuple[dict[str, Any], ...] = ()
    metrics: tuple[dict[str, Any], ...] = ()
    report_file = run.files / "report.md"
    problems = ""
    if report_file.is_file():
        markdown = report_file.read_text(encoding="utf-8", errors="replace")
        try:
            doc = handoff_model.parse(markdown)
        except handoff_model.HandoffError as exc:
            problems = f" (its report file did not parse: {str(exc).splitlines()[0]})"
        else:
            said = doc.status.strip().upper()
            if said in ("FAILED", "FALLIDO"):
                status = "failed"
            elif said in ("BLOCKED", "BLOQUEADO"):
                status = "blocked"
            elif doc.completion_summary is not None or doc.completed_phases:
                status = "completed" if exit_status == 0 else "failed"
            summary = doc.completion_summary or ""
            phases = tuple(
                {
                    "name": p.name,
                    "done": p.done,
                    "objectives": [{"text": o.text, "done": o.done} for o in p.objectives],
                }
                for p in doc.completed_phases
            )
            metrics = tuple(
                {"name": m.name, "result": m.result, "achieved": m.achieved}
                for m in doc.metrics_achieved
            )
    if exit_status == 0 and not commits and markdown is None:
        # Nothing changed and nothing said: "completed" would merge an empty change and
        # release every handoff that depends on this one.
        status = "failed"
        summary = "The agent exited 0 without committing or changing anything."
    if not summary:
        verb = "finished" if exit_status == 0 else f"exited with status {exit_status}"
        listing = "; ".join(commits[:5]) if commits else "no commits"
        summary = f"The agent {verb}{problems}. Commits: {listing}."
    return Report(
        status=status,
        head=head,
        summary=summary,
        markdown=markdown,
        phases=phases,
        metrics=metrics,
    )


def default_name() -> str:
    return f"{os.uname().nodename}-{os.getpid()}"


def main_sync(options: WorkerOptions) -> int:
    """Entry point for the CLI."""
    os.environ.setdefault("ORCHESTRATOR_WORKER_NAME", options.name)
    # The lease's repository belongs to the daemon's uid when this worker runs as another
    # (it writes there by ACL): libgit2's ownership check would refuse to open it. The
    # worker opens only the directory the daemon named, never by searching upwards.
    pygit2.option(pygit2.enums.Option.SET_OWNER_VALIDATION, 0)
    try:
        return anyio.run(run_worker, options)
    except KeyboardInterrupt:
        print("worker interrupted", file=sys.stderr)
        return 130
