"""The handlers' error mapping, in-process: each refusal reaches the client as the
JSON-RPC code PROTOCOL.md gives it, with a message that says what to fix
(``pytest -m fast``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from harness import handoff_doc
from inprocess import Parts, acquire, daemon_parts, peer

from orchestrator.protocol.jsonrpc import (
    DUPLICATE_HANDOFF,
    INVALID_HANDOFF,
    INVALID_PARAMS,
    LEASE_NOT_HELD,
    UNKNOWN_HANDOFF,
)

pytestmark = [pytest.mark.fast, pytest.mark.anyio]


async def test_an_unknown_lease_is_not_held(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo) as parts:
        who = peer()
        for method in ("lease.heartbeat", "lease.release"):
            error = await parts.call_error(who, method, {"leaseId": "no-such-lease", "token": 1})
            assert error.code == LEASE_NOT_HELD, method
            assert "does not exist" in error.message
        report = {"status": "completed", "head": "0" * 40}
        params = {"leaseId": "no-such-lease", "token": 1, "report": report}
        error = await parts.call_error(who, "handoff.report", params)
        assert error.code == LEASE_NOT_HELD


async def test_a_wrong_token_is_not_held_and_never_told(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        wrong = held.token + 1000
        error = await parts.call_error(
            held.who, "lease.heartbeat", {"leaseId": held.id, "token": wrong}
        )
        assert error.code == LEASE_NOT_HELD
        assert "fencing token" in error.message
        # Never the right token: whoever guessed the id would learn the one secret.
        numbers = re.findall(r"\b\d+\b", error.message.replace(held.id, ""))
        assert str(held.token) not in numbers
        assert error.to_wire()["code"] == LEASE_NOT_HELD
        # The refusal changed nothing: the holder carries on.
        await parts.call(held.who, "lease.heartbeat", held.ids())
        assert parts.state_of("alpha") == "leased"


async def test_another_uid_or_worker_cannot_use_a_lease(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        same_name_other_uid = peer(name=held.who.session.worker_name, uid=held.who.session.uid + 1)
        other_name = peer(name="someone-else")
        for who, why in ((same_name_other_uid, "another uid"), (other_name, "someone-else")):
            for method, extra in (
                ("lease.heartbeat", {}),
                ("lease.release", {"reason": "stolen"}),
                ("lease.ask", {"question": "may I?"}),
            ):
                error = await parts.call_error(who, method, held.ids(**extra))
                assert error.code == LEASE_NOT_HELD, (method, why)
                assert why in error.message
        assert parts.state_of("alpha") == "leased"


async def _bad_params(
    parts: Parts, params_by_method: list[tuple[str, dict[str, Any], str]]
) -> None:
    who = peer()
    for method, params, mentions in params_by_method:
        error = await parts.call_error(who, method, params)
        assert error.code == INVALID_PARAMS, (method, params, error.message)
        assert mentions in error.message, (method, error.message)


async def test_bad_params_are_invalid_params(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo) as parts:
        await parts.submit("alpha")
        held = await acquire(parts)
        ids = held.ids()
        good_report = {"status": "completed", "head": "0" * 40}
        await _bad_params(
            parts,
            [
                ("lease.acquire", {"waitS": 1000}, "waitS"),
                ("lease.acquire", {"waitS": "soon"}, "waitS"),
                ("lease.heartbeat", {"token": held.token}, "leaseId"),
                ("lease.heartbeat", {"leaseId": held.id, "token": "1"}, "token"),
                ("lease.heartbeat", {"leaseId": held.id, "token": True}, "token"),
                ("lease.heartbeat", {**ids, "progress": "half"}, "progress"),
                ("lease.heartbeat", {**ids, "progress": {"percent": 200}}, "percent"),
                ("lease.heartbeat", {**ids, "progress": {"phase": 3}}, "progress.phase"),
                ("lease.heartbeat", {**ids, "head": "abc"}, "head"),
                ("lease.release", {**ids, "reason": 7}, "reason"),
                ("handoff.report", {**ids, "report": "done"}, "report"),
                ("handoff.report", {**ids, "report": {**good_report, "status": "done"}}, "status"),
                ("handoff.report", {**ids, "report": {"status": "completed"}}, "head"),
                (
                    "handoff.report",
                    {**ids, "report": {**good_report, "summary": 1}},
                    "report.summary",
                ),
                ("handoff.report", {**ids, "report": {**good_report, "phases": {}}}, "phases"),
                ("handoff.submit", {}, "exactly one"),
                ("handoff.submit", {"markdown": []}, "non-empty"),
                ("handoff.list", {"state": "sleeping"}, "state"),
                ("handoff.get", {"name": ""}, "name"),
                ("handoff.cancel", {}, "name"),
            ],
        )
        # None of it touched the lease.
        assert parts.state_of("alpha") == "leased"
        await parts.call(held.who, "lease.heartbeat", ids)


async def test_store_refusals_map_to_their_codes(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo) as parts:
        control = peer("control")
        await parts.submit("alpha")
        error = await parts.call_error(control, "handoff.get", {"name": "nope"})
        assert error.code == UNKNOWN_HANDOFF
        error = await parts.call_error(control, "handoff.cancel", {"name": "nope"})
        assert error.code == UNKNOWN_HANDOFF
        error = await parts.call_error(
            control, "handoff.submit", {"markdown": [handoff_doc("alpha")]}
        )
        assert error.code == DUPLICATE_HANDOFF
        assert error.data == {"names": ["alpha"]}
        error = await parts.call_error(
            control, "handoff.submit", {"markdown": ["# not a handoff\n"]}
        )
        assert error.code == INVALID_HANDOFF
        assert isinstance(error.data, dict) and error.data["errors"]
        assert error.data["errors"][0]["document"] == 0
        error = await parts.call_error(
            control, "handoff.submit", {"handoffs": [{"name": "Bad Name!"}]}
        )
        assert error.code == INVALID_HANDOFF
        # Nothing was asked, so there is nothing to answer.
        error = await parts.call_error(
            control, "handoff.answer", {"name": "alpha", "answer": "yes"}
        )
        assert error.code == INVALID_PARAMS
        # A queued handoff cannot be retried: only a held or finished one.
        error = await parts.call_error(control, "handoff.retry", {"name": "alpha"})
        assert error.code == INVALID_PARAMS
        assert parts.state_of("alpha") == "queued"
