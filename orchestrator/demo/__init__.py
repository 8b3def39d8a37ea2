"""``orchestrator demo``: the whole flow on a sample repository, in about half a minute.

It builds a small calculator project with a real test suite, starts the daemon with that
suite as its gate, submits the three example handoffs, and attaches three real workers
whose agents are scripted (one breaks the tests first and repairs from the feedback).
With ``--mcp`` the workers run the ``claude`` recipe (``orchestrator worker --agent
claude``) on a stand-in CLI (orchestrator.demo.stand_in) that works only through
``orchestrator mcp``.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio

from orchestrator.agent.client import Client
from orchestrator.config import load
from orchestrator.daemon.service import Daemon
from orchestrator.demo import sample
from orchestrator.handoff.completed import completed_document
from orchestrator.observe import logs
from orchestrator.observe.terminal import visible
from orchestrator.protocol.records import HandoffDetail, HandoffSummary, Progress
from orchestrator.store.states import State

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "handoffs"
DEMO_TIMEOUT_S = 240.0


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=demo", "-c", "user.email=demo@demo.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def build_sample_repo(path: Path) -> None:
    """A git repository on ``main`` holding the sample project, one commit."""
    path.mkdir(parents=True)
    _git(path, "init", "-q", "-b", "main")
    for rel, text in sample.INITIAL.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "calc: initial version")


def write_config(root: Path) -> Path:
    config = root / "orchestrator.toml"
    python = sys.executable
    config.write_text(
        f"""# Written by `orchestrator demo`.
[repository]
path = "{root / "repo"}"
integration_branch = "main"

[daemon]
state_dir = "{root / "state"}"

[leases]
ttl_s = 10
heartbeat_interval_s = 0.25
max_attempts = 3

[merge]
strategy = "merge"
on_conflict = "requeue"
on_gate_failure = "requeue"

[[gates]]
name = "tests"
run = ["{python}", "-m", "unittest", "-q"]
timeout_s = 120

[metrics]
listen = "127.0.0.1:0"
""",
        encoding="utf-8",
    )
    return config


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(directory: Path | None, *, keep: bool = False, mcp: bool = False) -> int:
    """Run the demo; 0 when every example handoff was merged. ``mcp``: the agents are the
    claude recipe's stand-in, talking MCP."""
    if not EXAMPLES.is_dir():
        print(
            f"demo: cannot find the example handoffs in {EXAMPLES}; run it from a clone "
            "of the repository (make demo)",
            file=sys.stderr,
        )
        return 2
    if mcp and importlib.util.find_spec("mcp") is None:
        print(
            "demo --mcp: the MCP SDK is not installed; pip install 'orchestrator[mcp]'",
            file=sys.stderr,
        )
        return 2
    if directory is None:
        holder = tempfile.TemporaryDirectory(prefix="orchestrator-demo-")
        root = Path(holder.name)
    else:
        holder = None
        root = directory.resolve()
        root.mkdir(parents=True, exist_ok=True)
    try:
        return anyio.run(_demo, root, mcp)
    finally:
        if holder is not None:
            if keep:
                print(f"\n(demo files kept in {root})")
            else:
                holder.cleanup()


async def _demo(root: Path, mcp: bool = False) -> int:
    _say(f"== orchestrator demo in {root}")
    build_sample_repo(root / "repo")
    config = load(write_config(root))
    _say(f"   sample repository: {config.repository_path} (a calculator with a unittest suite)")
    _say("   gate 'tests': python -m unittest, on every merge candidate")
    log_file = (root / "daemon.log").open("w", encoding="utf-8")
    logs.configure("json", "info", stream=log_file)
    daemon = Daemon(config)
    workers: list[subprocess.Popen[bytes]] = []
    ok = False
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            _say(
                f"   daemon listening on {config.socket}; metrics at "
                f"http://127.0.0.1:{daemon.metrics_port}/metrics; log in {root / 'daemon.log'}"
            )
            _say(f"   watch it live: http://127.0.0.1:{daemon.metrics_port}/")
            files = sorted(EXAMPLES.glob("*.md"))
            async with Client.connect(config.socket, role="control") as client:
                result = await client.call(
                    "handoff.submit", {"markdown": [f.read_text(encoding="utf-8") for f in files]}
                )
                _say(f"== submitted {', '.join(result['names'])}")
                for index in range(1, 4):
                    workers.append(_start_worker(root, config.socket, index, mcp=mcp))
                if mcp:
                    _say(
                        "== three workers attached: `orchestrator worker --agent claude`, on a "
                        "stand-in claude that talks MCP\n"
                    )
                else:
                    _say("== three workers attached, each running the scripted agent\n")
                ok = await _watch(client, result["names"])
                await _finale(client, root, result["names"], daemon.metrics_port)
            # Let every peer hang up before the daemon stops, as in an orderly shutdown.
            await anyio.to_thread.run_sync(_stop_workers, workers)
            await anyio.sleep(0.2)
            tg.cancel_scope.cancel()
    finally:
        _stop_workers(workers)
        log_file.close()
    _say(
        "\n== demo "
        + (
            "finished: every handoff merged, main never broken"
            if ok
            else "FAILED: see daemon.log and worker-*.log (use --keep)"
        )
    )
    return 0 if ok else 1


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _stand_in_path(root: Path) -> str:
    """A PATH whose ``claude`` is the demo's stand-in (orchestrator.demo.stand_in)."""
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "claude"
    script.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m orchestrator.demo.stand_in "$@"\n',
        encoding="utf-8",
    )
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def _start_worker(
    root: Path, socket: Path, index: int, *, mcp: bool = False
) -> subprocess.Popen[bytes]:
    log = (root / f"worker-{index}.log").open("wb")
    base = [sys.executable, "-m", "orchestrator", "--socket", str(socket), "worker"]
    base += ["--name", f"agent-{index}", "--wait", "2"]
    env = dict(os.environ)
    if mcp:
        argv = [*base, "--agent", "claude"]
        env["PATH"] = _stand_in_path(root)
    else:
        argv = [*base, "--", sys.executable, "-m", "orchestrator.demo.agent"]
    return subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )


async def _watch(client: Client, names: list[str]) -> bool:
    """Print every change of state, progress or merge result until all are merged or stuck."""
    seen: dict[str, tuple[Any, ...]] = {}
    merges_seen: dict[str, int] = {}
    start = time.monotonic()
    width = max(len(n) for n in names)
    while time.monotonic() - start < DEMO_TIMEOUT_S:
        listed = (await client.call("handoff.list", {}))["handoffs"]
        handoffs = [HandoffSummary.from_wire(h) for h in listed]
        for h in handoffs:
            progress = h.progress or Progress(None, None, None)
            key = (h.state, h.attempt, progress.percent, progress.message)
            if seen.get(h.name) == key:
                continue
            seen[h.name] = key
            stamp = f"   {time.monotonic() - start:5.1f}s  {h.name:<{width}}"
            record = HandoffDetail.from_wire(await client.call("handoff.get", {"name": h.name}))
            for merge in record.merges[merges_seen.get(h.name, 0) :]:
                if merge.result in ("gate_failed", "conflict"):
                    _say(f"{stamp}  {merge.result:<9} {visible(merge.detail or '')}")
                    gate_log = [g for g in record.gates if g.candidate == merge.candidate]
                    if gate_log:
                        last = gate_log[-1].output_tail.strip().splitlines()[-1:]
                        _say(f"{'':>{len(stamp)}}  gate log ends: {visible(' '.join(last))}")
            merges_seen[h.name] = len(record.merges)
            extra = ""
            if h.state is State.LEASED and progress.message:
                extra = f"  {int(progress.percent or 0):>3}% {visible(progress.message)}"
            elif h.state is State.LEASED and record.feedback is not None:
                extra = f"  (with feedback: {visible(record.feedback.reason)})"
            elif h.state is State.MERGED:
                extra = f"  as {(record.merge_commit or '')[:12]}"
            _say(f"{stamp}  {h.state:<9} attempt {h.attempt}{extra}")
        states = {h.state for h in handoffs}
        if states == {State.MERGED}:
            return True
        if states & {State.FAILED, State.CANCELLED} and not states & {
            State.QUEUED,
            State.LEASED,
            State.REPORTED,
            State.GATING,
        }:
            return False
        await anyio.sleep(0.1)
    _say("   demo timed out")
    return False


async def _finale(client: Client, root: Path, names: list[str], port: int | None) -> None:
    _say("\n== integration log (first-parent history of main)")
    history = _git(root / "repo", "log", "--first-parent", "--format=   %h %s", "main")
    _say(visible(history.rstrip(), keep_newlines=True))
    for name in names:
        record = HandoffDetail.from_wire(await client.call("handoff.get", {"name": name}))
        _say(f"\n== {name}: rendered report\n")
        _say(visible(completed_document(record).rstrip(), keep_newlines=True))
    if port:
        text = await anyio.to_thread.run_sync(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                .read()
                .decode()
            )
        )
        _say("\n== a few metrics, as Prometheus would scrape them")
        for line in text.splitlines():
            if line.startswith(
                ("orchestrator_merges_total", 'orchestrator_handoffs{state="merged')
            ):
                _say(f"   {line}")
