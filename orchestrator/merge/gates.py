"""The gate runner: run one configured command on a candidate checkout, with a timeout.

A gate runs code an agent wrote, so it is confined (docs/security.md):

* by default (``merge.gate_isolation = "auto"``) inside bubblewrap, in PID and mount
  namespaces of its own: the integration repository is read-only, the daemon's state
  directory (store, socket, the other checkouts) is not there at all, and only its own
  checkout is writable; when its command ends, its PID namespace and everything in it go;
* always below :mod:`orchestrator.merge.gate_supervisor`, a child subreaper that kills
  every process the gate started (``setsid`` and double-forked ones too) when it ends,
  times out, is cancelled, or the daemon dies. Where namespaces are not available this
  is what remains, and the daemon says so at start-up and in ``status``.

``merge.gate_sandbox`` (a user prefix) runs inside all of that, for people who want more.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio
from anyio.abc import Process

from orchestrator.config import GateConfig
from orchestrator.daemon import systemd
from orchestrator.merge import gate_supervisor
from orchestrator.merge.gate_supervisor import END_NOW

# After SIGTERM, how long a gate's process group gets to exit before SIGKILL.
TERM_GRACE_S = 2.0
# How long the supervisor gets to kill and reap a gate's whole tree before SIGKILL.
END_GRACE_S = 5.0
BWRAP = "/usr/bin/bwrap"
# What `auto` probes bubblewrap with at start-up; it must answer quickly.
PROBE_TIMEOUT_S = 10.0

IsolationMode = Literal["bwrap", "processes"]


@dataclass(frozen=True)
class GateFences:
    """What a gate must not touch: ``read_only`` paths are visible but cannot be written
    (the integration repository, whose objects a gate's git reads); ``hidden`` ones are
    replaced by an empty tmpfs (the daemon's state dir: store, socket, other checkouts)."""

    read_only: tuple[Path, ...] = ()
    hidden: tuple[Path, ...] = ()


@dataclass(frozen=True)
class GateIsolation:
    """How gates are confined on this machine, decided once at start-up."""

    mode: IsolationMode
    detail: str
    fences: GateFences = field(default_factory=GateFences)
    bwrap: str = BWRAP
    # Off where PID namespaces are refused but mount namespaces are not (the shipped
    # systemd unit allows only user and mnt, to keep its exposure at 2.0): the fences hold,
    # and the supervisor, a child subreaper, still kills every descendant.
    pid_namespace: bool = True

    @property
    def namespaces(self) -> bool:
        return self.mode == "bwrap"

    def prefix(self, checkout: Path, read_only: Sequence[Path] = ()) -> list[str]:
        """The argv prefix that confines one gate run in ``checkout``; ``read_only`` paths
        inside it (kept dependencies) are visible but cannot be written."""
        if self.mode != "bwrap":
            return []
        return bwrap_argv(
            self.bwrap,
            checkout,
            self.fences,
            pid_namespace=self.pid_namespace,
            read_only=read_only,
        )


def bwrap_argv(
    bwrap: str,
    checkout: Path,
    fences: GateFences,
    *,
    pid_namespace: bool = True,
    read_only: Sequence[Path] = (),
) -> list[str]:
    """bubblewrap arguments: the host's file system as it is, minus the fences, plus the
    checkout writable; a PID namespace (unless ``pid_namespace`` is off) that dies with
    the daemon."""
    argv = [bwrap, "--die-with-parent", "--new-session"]  # no TIOCSTI into our terminal
    argv += ["--bind", "/", "/"]
    if pid_namespace:
        argv[2:2] = ["--unshare-pid"]
        argv += ["--proc", "/proc"]
    if os.geteuid() == 0:
        # Root keeps its capabilities in bwrap, and CAP_SYS_ADMIN could remount the fences.
        argv += ["--cap-drop", "ALL"]
    mounts = [(p, "--ro-bind") for p in fences.read_only] + [(p, "--tmpfs") for p in fences.hidden]
    # Outer directories first, so an inner fence is mounted on top of an outer one.
    for path, how in sorted(mounts, key=lambda m: len(m[0].parts)):
        if not os.path.lexists(path):
            continue
        if how == "--tmpfs" and not path.is_dir():
            # A file (the socket, when it lives elsewhere): connect() ignores read-only
            # mounts, so put an empty device in its place.
            argv += ["--ro-bind", "/dev/null", str(path)]
        elif how == "--tmpfs":
            argv += [how, str(path)]
        else:
            argv += [how, str(path), str(path)]
    argv += ["--bind", str(checkout), str(checkout)]
    for path in read_only:
        if os.path.isdir(path) and not os.path.islink(path):
            argv += ["--ro-bind", str(path), str(path)]
    # The empty stand-ins read-only too, once the checkout's mount point is made in them:
    # nothing a gate writes there could be mistaken for the daemon's files.
    for path in fences.hidden:
        if path.is_dir() and not path.is_symlink():
            argv += ["--remount-ro", str(path)]
    argv += ["--chdir", str(checkout), "--"]
    return argv


def detect_isolation(
    mode: str, fences: GateFences, probe_dir: Path, *, bwrap: str | None = None
) -> GateIsolation:
    """The isolation ``merge.gate_isolation`` asks for, as far as this machine allows.

    ``auto`` and ``bwrap`` try bubblewrap once with the real fences; when it does not
    work (not installed, namespaces forbidden, as under a strict systemd unit) ``auto``
    falls back to ``processes`` and the detail says why. ``bwrap`` keeps mode ``bwrap``
    out of the answer too, and the merge queue then refuses to gate. ``bwrap`` names the
    program to try instead of looking it up."""
    if mode == "processes":
        return GateIsolation(
            "processes",
            'merge.gate_isolation = "processes": gates share the daemon\'s file system; '
            "every process they start is killed when they end",
            fences,
        )
    if bwrap is None:
        bwrap = shutil.which("bwrap") or (BWRAP if os.access(BWRAP, os.X_OK) else None)
    problem = None
    if bwrap is None:
        problem = "bubblewrap (bwrap) is not installed"
    else:
        problem = _probe(bwrap, probe_dir, fences, pid_namespace=True)
        if problem is None:
            return GateIsolation(
                "bwrap",
                "gates run in bubblewrap: own PID namespace, integration repository "
                "read-only, state directory hidden, only the gate checkout writable",
                fences,
                bwrap,
            )
        if _probe(bwrap, probe_dir, fences, pid_namespace=False) is None:
            return GateIsolation(
                "bwrap",
                "gates run in bubblewrap without a PID namespace (refused here: "
                f"{problem}): integration repository read-only, state directory hidden, "
                "only the gate checkout writable; every process they start is killed "
                "when they end",
                fences,
                bwrap,
                pid_namespace=False,
            )
    return GateIsolation(
        "processes",
        f"namespaces unavailable ({problem}): gates can write what the daemon's user can; "
        "every process they start is still killed when they end",
        fences,
    )


def _probe(bwrap: str, probe_dir: Path, fences: GateFences, *, pid_namespace: bool) -> str | None:
    """Why bubblewrap with these fences does not run ``true`` here, or None when it does."""
    try:
        done = subprocess.run(
            [*bwrap_argv(bwrap, probe_dir, fences, pid_namespace=pid_namespace), "true"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap does not work here: {exc}"
    if done.returncode != 0:
        return f"bwrap does not work here: {done.stderr.strip() or done.returncode}"
    return None


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
    """End the gate and every process it started: TERM to its group first when
    ``graceful``, then the supervisor kills the whole tree, then KILL what is left.

    Even after a clean exit this runs, since a gate's background children (a test server,
    a watcher) must not outlive it."""
    if graceful and process.returncode is None:
        _kill_group(process, signal.SIGTERM)
        with anyio.move_on_after(TERM_GRACE_S):
            await process.wait()
    if process.returncode is None:
        try:
            process.send_signal(END_NOW)
        except ProcessLookupError:
            pass
        with anyio.move_on_after(END_GRACE_S):
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
    isolation: GateIsolation | None = None,
    read_only: Sequence[Path] = (),
) -> GateResult:
    """Run ``gate`` in ``checkout``; stdout and stderr are merged into one tail.

    ``sandbox`` (``merge.gate_sandbox``) is an argv prefix the gate's command is appended
    to, e.g. ``bwrap ... --`` or ``systemd-run --user --pipe --wait ...``: gates run the
    agents' code, and the prefix is how a deployment confines it further; it runs inside
    ``isolation`` (see the module's docstring). Only the tail of the output is kept in
    memory, however much the gate writes."""
    argv = [*sandbox, *gate.run]
    confined = [*(isolation.prefix(checkout, read_only) if isolation else []), *argv]
    started = time.time()
    clock = time.monotonic()
    tail = _Tail(tail_bytes)
    # The supervisor knows the daemon's pid: a daemon killed outright (outside systemd,
    # whose cgroup would catch it) takes its gates along, so none keeps writing in a gate
    # worktree the restarted daemon hands to the next candidate.
    full_env = systemd.child_environment(
        env or {}, gate.env, {"ORCHESTRATOR_WORKER_PID": str(os.getpid())}
    )
    try:
        process = await anyio.open_process(
            # By file, isolated and without site (-I -S): it needs only the standard
            # library, runs the same whatever PYTHONPATH or site-packages the daemon or a
            # gate's env has, and skips site's ~25 ms (an editable install's finder).
            [sys.executable, "-I", "-S", gate_supervisor.__file__, *confined],
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
