"""The lease lifecycle through LeaseManager, in-process, on a fake clock: grant, renew,
expire, revoke, report, release, recover (``pytest -m fast``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import git
from inprocess import FAKE_EPOCH, acquire, daemon_parts, peer, work_and_report

from orchestrator.protocol.jsonrpc import LEASE_NOT_HELD, REPORT_REJECTED, rfc3339

pytestmark = [pytest.mark.fast, pytest.mark.anyio]

TTL_S = 30.0


async def test_grant_prepares_the_worktree_and_starts_the_ttl(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        lease = held.lease
        assert held.handoff == "alpha"
        assert lease["branch"] == "handoff/alpha"
        assert lease["attempt"] == 1
        assert lease["expiresAt"] == rfc3339(FAKE_EPOCH + TTL_S)
        tip = git(repo, "rev-parse", "main")
        assert lease["baseCommit"] == lease["integrationCommit"] == tip
        worktree = Path(lease["worktree"])
        assert git(worktree, "rev-parse", "HEAD") == tip
        assert parts.state_of("alpha") == "leased"
        # Nothing else is dispatchable: a second worker hears "no lease" at once.
        assert (await parts.call(held.who, "lease.acquire", {"waitS": 0})) == {"lease": None}


async def test_heartbeats_renew_from_the_clock_and_keep_the_lease(
    tmp_path: Path, repo: Path
) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        for _ in range(3):  # 60 s in all, twice the TTL, each step within it
            parts.clock.advance(TTL_S * 2 / 3)
            result = await parts.call(held.who, "lease.heartbeat", held.ids())
            assert result == {"expiresAt": rfc3339(parts.clock.now() + TTL_S)}
            assert await parts.leases.expire_due() == []
        assert parts.state_of("alpha") == "leased"
        assert held.who.notifications("lease.revoked") == []


async def test_a_lease_without_heartbeats_expires_and_its_holder_is_told(
    tmp_path: Path, repo: Path
) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        parts.clock.advance(TTL_S - 1)
        assert await parts.leases.expire_due() == []
        parts.clock.advance(2)
        expired = await parts.leases.expire_due()
        assert [e.lease_id for e in expired] == [held.id]
        assert held.who.notifications("lease.revoked") == [
            {"leaseId": held.id, "reason": "expired"}
        ]
        assert parts.state_of("alpha") == "queued"
        assert parts.metric("orchestrator_lease_expirations_total") == 1
        error = await parts.call_error(held.who, "lease.heartbeat", held.ids())
        assert error.code == LEASE_NOT_HELD
        # The handoff is dispatched again, as its next attempt.
        again = await acquire(parts)
        assert again.handoff == "alpha" and again.id != held.id


async def test_cancelling_revokes_the_lease(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        await parts.call(peer("control"), "handoff.cancel", {"name": "alpha"})
        assert held.who.notifications("lease.revoked") == [
            {"leaseId": held.id, "reason": "cancelled"}
        ]
        assert parts.state_of("alpha") == "cancelled"
        error = await parts.call_error(held.who, "lease.heartbeat", held.ids())
        assert error.code == LEASE_NOT_HELD
        # Revoked once: the expiry pass has nothing left to end.
        parts.clock.advance(TTL_S * 2)
        assert await parts.leases.expire_due() == []
        assert len(held.who.notifications("lease.revoked")) == 1


async def test_a_report_ends_the_lease_and_a_retried_report_is_accepted(
    tmp_path: Path, repo: Path
) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        parts.clock.advance(TTL_S - 1)  # a report in the last second still counts
        result = await work_and_report(parts, held, {"alpha.txt": "alpha\n"})
        assert result == {"accepted": True}
        assert parts.state_of("alpha") == "reported"
        # The reply was lost and the worker sends the same report again: accepted, once.
        head = git(Path(held.lease["worktree"]), "rev-parse", "HEAD")
        report = {"status": "completed", "head": head}
        again = await parts.call(held.who, "handoff.report", held.ids(report=report))
        assert again == {"accepted": True}
        assert parts.state_of("alpha") == "reported"
        error = await parts.call_error(held.who, "lease.heartbeat", held.ids())
        assert error.code == LEASE_NOT_HELD
        # Ended by the report: never expired afterwards.
        parts.clock.advance(TTL_S * 2)
        assert await parts.leases.expire_due() == []


async def test_a_report_of_a_head_the_worktree_does_not_hold_is_rejected(
    tmp_path: Path, repo: Path
) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        report = {"status": "completed", "head": "0" * 40}
        error = await parts.call_error(held.who, "handoff.report", held.ids(report=report))
        assert error.code == REPORT_REJECTED
        assert isinstance(error.data, dict) and error.data["reason"]
        # Rejected, not ended: the lease is still held and renewed by the attempt.
        assert parts.state_of("alpha") == "leased"
        await parts.call(held.who, "lease.heartbeat", held.ids())


async def test_a_report_after_expiry_is_refused(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        parts.clock.advance(TTL_S + 1)  # expired by the clock, before any expiry pass
        head = git(Path(held.lease["worktree"]), "rev-parse", "HEAD")
        report = {"status": "completed", "head": head}
        error = await parts.call_error(held.who, "handoff.report", held.ids(report=report))
        assert error.code == LEASE_NOT_HELD
        assert "expired" in error.message


async def test_release_gives_the_handoff_back_at_once(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        assert await parts.call(held.who, "lease.release", held.ids(reason="going away")) == {}
        assert parts.state_of("alpha") == "queued"
        error = await parts.call_error(held.who, "lease.heartbeat", held.ids())
        assert error.code == LEASE_NOT_HELD
        again = await acquire(parts)
        assert again.handoff == "alpha"
        assert held.who.notifications("lease.revoked") == []


async def test_recovery_gives_surviving_leases_a_full_ttl(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        parts.clock.advance(TTL_S - 5)  # the daemon was down for most of the TTL
        assert await parts.leases.recover() == []
        parts.clock.advance(TTL_S - 5)
        assert await parts.leases.expire_due() == []
        result = await parts.call(held.who, "lease.heartbeat", held.ids())
        assert result["expiresAt"] == rfc3339(parts.clock.now() + TTL_S)


async def test_a_reloaded_ttl_applies_to_the_next_renewal(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        parts.leases.reconfigure(dataclasses.replace(parts.config, lease_ttl_s=5.0))
        result = await parts.call(held.who, "lease.heartbeat", held.ids())
        assert result["expiresAt"] == rfc3339(parts.clock.now() + 5.0)
        parts.clock.advance(6)
        assert [e.lease_id for e in await parts.leases.expire_due()] == [held.id]


async def test_a_long_poll_is_woken_by_a_submission(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        who = peer()
        got: list[dict[str, Any] | None] = []

        async def poll() -> None:
            got.append((await parts.call(who, "lease.acquire", {"waitS": 60}))["lease"])

        with anyio.fail_after(30):  # the long poll's 60 s are never waited out
            async with anyio.create_task_group() as tg:
                tg.start_soon(poll)
                await anyio.sleep(0.2)
                assert got == []
                await parts.submit("alpha")
        assert len(got) == 1 and got[0] is not None
        assert got[0]["handoff"]["name"] == "alpha"


async def test_a_long_poll_with_nothing_to_do_ends_empty(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo, ttl_s=TTL_S) as parts:
        with anyio.fail_after(30):
            result = await parts.call(peer(), "lease.acquire", {"waitS": 0.2})
        assert result == {"lease": None}
