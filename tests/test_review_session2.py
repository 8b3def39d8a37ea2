"""Hostile review of session 2 (typed records, lease lifecycle, copy_files, ports,
setup stamps, merge-queue changes): each test is an open hole, xfail(strict) until
fixed. In-process parts on a fake clock, real git, real SQLite."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import git
from harness import write_config
from inprocess import acquire, daemon_parts, peer

from orchestrator import config as config_file
from orchestrator.daemon import leases as daemon_leases
from orchestrator.git.copy_files import CopyError
from orchestrator.protocol.jsonrpc import REPORT_REJECTED, RpcError

pytestmark = [pytest.mark.anyio]

TTL_S = 30.0


def _ignore_and_place(repo: Path, rel: str, text: str) -> None:
    (repo / ".gitignore").write_text(f"/{rel}\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore local files")
    target = repo / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


# Was an open hole: a committed file where a copy_files parent directory goes made every
# grant of the handoff fail in copy_untracked; abandon_grant re-queued it at no cost to
# its attempts, first in line, so nothing behind it was ever leased.
async def test_agent_committed_file_at_copy_files_parent_wedges_dispatch(
    tmp_path: Path, repo: Path
) -> None:
    _ignore_and_place(repo, "config/local.env", "SECRET=1\n")
    gates = '[workspace]\ncopy_files = ["config/local.env"]\n'
    async with daemon_parts(tmp_path, repo, gates=gates, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        worktree = Path(held.lease["worktree"])
        assert (worktree / "config" / "local.env").read_text() == "SECRET=1\n"
        # The agent: `config` becomes a committed regular file; it never reports.
        shutil.rmtree(worktree / "config")
        (worktree / "config").write_text("mine\n")
        git(worktree, "add", "-f", "config")
        git(worktree, "commit", "-q", "-m", "config is a file now")
        parts.clock.advance(TTL_S + 1)
        assert [e.handoff for e in await parts.leases.expire_due()] == ["alpha"]
        await parts.submit("beta")
        got: list[str] = []
        for n in range(4):
            try:
                result = await parts.call(peer(name=f"w{n}"), "lease.acquire", {"waitS": 0})
            except RpcError as exc:
                got.append(f"error: {exc}")
                continue
            lease = result["lease"]
            got.append(lease["handoff"]["name"] if lease else "none")
        # Either the broken handoff is charged for it, or the next one gets through.
        assert "beta" in got, got



async def test_a_handoff_whose_worktree_cannot_be_prepared_spends_its_attempts(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preparation failing grant after grant (a fake: the disk refuses the copy) is the
    handoff's: it spends an attempt per PREPARE_FAILURES_CHARGED failures and fails at
    the end, naming the error, instead of staying first in line for ever."""
    _ignore_and_place(repo, ".env", "SECRET=1\n")

    def refuse(*_args: object) -> None:
        raise CopyError(errno.EIO, "cannot copy .env: Input/output error")

    monkeypatch.setattr(daemon_leases, "copy_untracked", refuse)
    gates = '[workspace]\ncopy_files = [".env"]\n'
    async with daemon_parts(tmp_path, repo, gates=gates, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        limit = parts.config.max_attempts
        for n in range(daemon_leases.PREPARE_FAILURES_CHARGED * limit):
            assert parts.state_of("alpha") == "queued", n
            with pytest.raises(RpcError):
                await parts.call(peer(name=f"w{n}"), "lease.acquire", {"waitS": 0})
        assert parts.state_of("alpha") == "failed"
        detail = parts.store.detail("alpha").detail or ""
        assert "Input/output error" in detail, detail
        assert f"gave up after {limit} attempt(s)" in detail, detail


# Was an open hole: lease_warm_up recorded the cache key at grant time, before the
# worker ran setup; a worker killed mid-setup (or whose lease expired) never removes the
# half-built kept paths, so the next lease of the directory was told setup is not needed.
async def test_setup_interrupted_by_an_expiry_is_not_needed_on_the_retry(
    tmp_path: Path, repo: Path
) -> None:
    (repo / ".gitignore").write_text("/.venv\n")
    (repo / "deps.lock").write_text("v1\n")
    git(repo, "add", ".gitignore", "deps.lock")
    git(repo, "commit", "-q", "-m", "lock file")
    gates = (
        '[workspace]\nsetup = ["sh", "-c", "mkdir -p .venv && sleep 600"]\n'
        'keep = [".venv"]\ncache_key_files = ["deps.lock"]\n'
    )
    async with daemon_parts(tmp_path, repo, gates=gates, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        assert held.lease["setup"]["needed"] is True
        # The worker starts setup, which gets as far as making .venv; then the worker
        # is SIGKILLed (OOM, a reboot): nothing removes the half-built .venv.
        os.mkdir(Path(held.lease["worktree"]) / ".venv")
        parts.clock.advance(TTL_S + 1)
        assert [e.handoff for e in await parts.leases.expire_due()] == ["alpha"]
        again = await acquire(parts, peer(name="w2"))
        assert again.lease["worktree"] == held.lease["worktree"]
        assert again.lease["setup"]["needed"] is True, "half-built .venv trusted"


async def _settle(parts: Any, names: list[str], bound_s: float = 60) -> dict[str, str]:
    """Run the merge queue's loop until none of ``names`` is reported/gating."""
    states: dict[str, str] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(parts.merges.run)
        with anyio.fail_after(bound_s):
            while True:
                states = {n: parts.state_of(n) for n in names}
                if not any(s in ("reported", "gating") for s in states.values()):
                    break
                await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    return states


def test_changed_port_settings_give_a_gate_slot_a_live_leases_ports(tmp_path: Path) -> None:
    from orchestrator.config import MAX_SPECULATIVE_WINDOW, WorkspaceConfig
    from orchestrator.daemon.ports import PortLedger, PortRange

    before = WorkspaceConfig(ports_per_lease=10, port_base=20000)
    held = PortLedger(tmp_path).assign("l-old", before, ["l-old"])
    assert held is not None
    after = WorkspaceConfig(ports_per_lease=20, port_base=20000)
    # The lease is still live (its worker outlives reloads and restarts); a new lease
    # is assigned under the new settings, and the gate slots use them.
    PortLedger(tmp_path).assign("l-new", after, ["l-old", "l-new"])
    mine = PortLedger(tmp_path).assign("l-old", after, ["l-old", "l-new"])
    assert mine is not None
    clashing = [
        slot
        for slot in range(MAX_SPECULATIVE_WINDOW)
        if (gate := PortLedger(tmp_path).gate_range(after, slot)) is not None
        and gate.overlaps(mine)
    ]
    assert clashing == [], f"gate slots {clashing} share ports with live lease {mine}"
    # Once no lease of the old layout is live, the new settings take effect.
    fresh = PortLedger(tmp_path).assign("l-3", after, ["l-3"])
    assert fresh == PortRange(20000 + MAX_SPECULATIVE_WINDOW * 20, 20)
    assert PortLedger(tmp_path).gate_range(after, 1) == PortRange(20020, 20)


# Was an open hole: an agent force-adds a file at a copy_files path (.env); its gate
# never sees it (copy_untracked puts the operator's copy on top in the gate checkout)
# and at landing advance_integration's read-tree -m -u overwrote the operator's ignored
# .env in repository.path with the agent's. Now such a report is refused.
async def test_agent_commit_at_a_copy_files_path_overwrites_the_operators_file(
    tmp_path: Path, repo: Path
) -> None:
    _ignore_and_place(repo, ".env", "SECRET=operator\n")
    gates = (
        '[workspace]\ncopy_files = [".env"]\n'
        '[[gates]]\nname = "ok"\nrun = ["true"]\ntimeout_s = 60\n'
    )
    async with daemon_parts(tmp_path, repo, gates=gates) as parts:
        await parts.submit("alpha", "beta")
        held = {}
        for n in ("w-a", "w-b"):
            one = await acquire(parts, peer(name=n))
            held[one.handoff] = one
        wa = Path(held["alpha"].lease["worktree"])
        (wa / ".env").write_text("SECRET=agent\n")
        git(wa, "add", "-f", ".env")
        git(wa, "commit", "-q", "-m", "track .env")
        wb = Path(held["beta"].lease["worktree"])
        (wb / "beta.txt").write_text("beta\n")
        git(wb, "add", "beta.txt")
        git(wb, "commit", "-q", "-m", "beta")
        reports = {}
        for name in ("alpha", "beta"):
            one = held[name]
            head = git(Path(one.lease["worktree"]), "rev-parse", "HEAD")
            reports[name] = {"status": "completed", "head": head, "summary": "done"}
        one = held["alpha"]
        with pytest.raises(RpcError) as refused:
            await parts.call(one.who, "handoff.report", one.ids(report=reports["alpha"]))
        assert refused.value.code == REPORT_REJECTED
        assert "git rm -r --cached .env" in str(refused.value), refused.value
        one = held["beta"]
        assert await parts.call(one.who, "handoff.report", one.ids(report=reports["beta"])) == {
            "accepted": True
        }
        async with anyio.create_task_group() as tg:
            tg.start_soon(parts.merges.run)
            with anyio.fail_after(60):
                while True:
                    if parts.state_of("beta") == "merged" or parts.merges.blocked_reason:
                        break
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
        # The operator's file is not the agent's to write, merged or not ...
        assert (repo / ".env").read_text() == "SECRET=operator\n"
        # ... and refusing to overwrite it must not stop the queue for everyone.
        assert parts.merges.blocked_reason is None, parts.merges.blocked_reason
        assert parts.state_of("beta") == "merged"


async def test_a_queued_candidate_tracking_a_path_copy_files_gained_never_lands(
    tmp_path: Path, repo: Path
) -> None:
    """The merge queue's own fence: a report accepted before .env was in copy_files (a
    reload added it) is refused at the queue, with feedback, and the queue goes on."""
    _ignore_and_place(repo, ".env", "SECRET=operator\n")
    ok_gate = '[[gates]]\nname = "ok"\nrun = ["true"]\ntimeout_s = 60\n'
    async with daemon_parts(tmp_path, repo, gates=ok_gate) as parts:
        await parts.submit("alpha", "beta")
        held = {}
        for n in ("w-a", "w-b"):
            one = await acquire(parts, peer(name=n))
            held[one.handoff] = one
        wa = Path(held["alpha"].lease["worktree"])
        (wa / ".env").write_text("SECRET=agent\n")
        git(wa, "add", "-f", ".env")
        git(wa, "commit", "-q", "-m", "track .env")
        wb = Path(held["beta"].lease["worktree"])
        (wb / "beta.txt").write_text("beta\n")
        git(wb, "add", "beta.txt")
        git(wb, "commit", "-q", "-m", "beta")
        for name in ("alpha", "beta"):
            one = held[name]
            head = git(Path(one.lease["worktree"]), "rev-parse", "HEAD")
            report = {"status": "completed", "head": head, "summary": "done"}
            assert await parts.call(one.who, "handoff.report", one.ids(report=report)) == {
                "accepted": True
            }
        reloaded = tmp_path / "reloaded"
        reloaded.mkdir()
        gates = '[workspace]\ncopy_files = [".env"]\n' + ok_gate
        new = config_file.load(write_config(reloaded, repo, gates=gates))
        parts.merges.reconfigure(dataclasses.replace(parts.config, workspace=new.workspace))
        states = await _settle(parts, ["alpha", "beta"])
        assert (repo / ".env").read_text() == "SECRET=operator\n"
        assert parts.merges.blocked_reason is None, parts.merges.blocked_reason
        assert states["beta"] == "merged", states
        assert states["alpha"] == "queued", states
        feedback = parts.store.detail("alpha").feedback
        assert feedback is not None and "git rm -r --cached .env" in feedback.detail, feedback


@pytest.mark.parametrize("number", ["NaN", "1e999", "150", "-5"])
def test_agent_progress_file_with_a_bad_percent_breaks_the_heartbeat(
    tmp_path: Path, number: str
) -> None:
    from orchestrator.agent.worker import _read_progress
    from orchestrator.daemon.handlers import _progress
    from orchestrator.protocol.jsonrpc import encode

    progress_file = tmp_path / "progress"
    for line in (f'{{"percent": {number}, "message": "half way"}}', f"{number} half way"):
        progress_file.write_text(line + "\n")
        progress = _read_progress(progress_file)
        assert progress is not None
        params = {"leaseId": "l-1", "token": 1, "progress": progress.to_wire()}
        encode({"jsonrpc": "2.0", "id": 1, "method": "lease.heartbeat", "params": params})
        _progress(params["progress"])  # what the daemon's heartbeat handler accepts
