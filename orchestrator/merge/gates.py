"""The gate runner: run one configured command on a candidate checkout, with a timeout.

Each gate runs in a new session (its own process group), so on timeout or cancellation the
whole group is killed: a test runner's children must not outlive the gate and hold the
checkout or a port the next gate needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import Process

from orchestrator.config import GateConfig
from orchestrator.daemon import systemd

# After SIGTERM, how long a gate's process group gets to exit before SIGKILL.
TERM_GRACE_S = 2.0


@dataclass(frozen=True)
class GateResult:
    """What one gate run produced; ``passed`` only on exit status 0 within the timeout."""

    name: str
    exit_status: int | None
    timed_out: bool
    duration_s: float
    output_tail: str
    started_at: float

    @property
    def passed(self) -> bool:
        return self.exit_status == 0 and not self.timed_out


class _Tail:
    """Keeps the last ``limit`` bytes of a stream without holding all of it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        excess = len(self.buffer) - self.limit
        if excess > 0:
            del self.buffer[:excess]
            self.dropped += excess

    def text(self) -> str:
        body = self.buffer.decode("utf-8", errors="replace")
        if self.dropped:
            return f"[... {self.dropped} earlier bytes dropped ...]\n{body}"
        return body


def gate_fingerprint(gate: GateConfig, sandbox: Sequence[str] = ()) -> str:
    """What makes two runs of a gate on the same tree the same run: the argv (with the
    sandbox prefix), the gate's own environment and its timeout, hashed.

    The name is left out (renaming a gate does not change what it checks), and so are
    ``ORCHESTRATOR_HANDOFF`` and ``ORCHESTRATOR_CANDIDATE``, which say which candidate
    is gated rather than how."""
    spec = {
        "argv": [*sandbox, *gate.run],
        "env": sorted(gate.env.items()),
        "timeoutS": gate.timeout_s,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _kill_group(process: Process, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _stop_group(process: Process, *, graceful: bool) -> None:
    """End the gate's whole process group: TERM then KILL when ``graceful``, else KILL.

    Even after a clean exit the group is killed, since a gate's background children
    (a test server, a watcher) must not outlive it."""
    if graceful:
        _kill_group(process, signal.SIGTERM)
        with anyio.move_on_after(TERM_GRACE_S):
            await process.wait()
    _kill_group(process, signal.SIGKILL)
    await process.wait()


async def run_gate(
    gate: GateConfig,
    checkout: Path,
    *,
    tail_bytes: int = 64 * 1024,
    env: Mapping[str, str] | None = None,
    sandbox: Sequence[str] = (),
) -> GateResult:
    """Run ``gate`` in ``checkout``; stdout and stderr are merged into one tail.

    ``sandbox`` (``merge.gate_sandbox``) is an argv prefix the gate's command is appended
    to, e.g. ``bwrap ... --`` or ``systemd-run --user --pipe --wait ...``: gates run the
    agents' code, and the prefix is how a deployment confines it. Only the tail of the
    output is kept in memory, however much the gate writes."""
    argv = [*sandbox, *gate.run]
    started = time.time()
    clock = time.monotonic()
    tail = _Tail(tail_bytes)
    # Through deathsig with the daemon's pid: a daemon killed outright (outside systemd,
    # whose cgroup would catch it) takes its gates along, so none keeps writing in a gate
    # worktree the restarted daemon hands to the next candidate.
    full_env = systemd.child_environment(
        env or {}, gate.env, {"ORCHESTRATOR_WORKER_PID": str(os.getpid())}
    )
    try:
        process = await anyio.open_process(
            [sys.executable, "-m", "orchestrator.deathsig", *argv],
            cwd=checkout,
            env=full_env,
            stdin=None,
            stdout=-1,
            stderr=-2,  # subprocess.STDOUT: one interleaved log, as a person would see it
            start_new_session=True,
        )
    except OSError as exc:
        return GateResult(
            name=gate.name,
            exit_status=127,
            timed_out=False,
            duration_s=time.monotonic() - clock,
            output_tail=f"could not start gate {gate.name!r} ({' '.join(argv)}): {exc}",
            started_at=started,
        )
    timed_out = False
    drained = anyio.Event()

    async def pump() -> None:
        assert process.stdout is not None
        try:
            async for chunk in process.stdout:
                tail.feed(chunk)
        finally:
            drained.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            with anyio.move_on_after(gate.timeout_s) as scope:
                await process.wait()
            if scope.cancelled_caught:
                timed_out = True
            with anyio.CancelScope(shield=True):
                await _stop_group(process, graceful=timed_out)
                # Children that left the group could keep the pipe open; don't wait forever.
                with anyio.move_on_after(TERM_GRACE_S):
                    await drained.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await _stop_group(process, graceful=False)
            await process.aclose()
    if timed_out:
        tail.feed(f"\n[gate {gate.name!r} timed out after {gate.timeout_s:g} s; killed]\n".encode())
    return GateResult(
        name=gate.name,
        exit_status=None if timed_out else process.returncode,
        timed_out=timed_out,
        duration_s=time.monotonic() - clock,
        output_tail=tail.text(),
        started_at=started,
    )
