"""Hostile review: holes found in the merged code (marked xfail while they are open)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Conn, control, handoff_doc
from test_identity import _agent, _worker_calls, daemon  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


@pytest.mark.xfail(
    strict=True,
    reason="hole: lease.ask checks the worker name but not the uid (handlers.py lease_ask, "
    "store.ask take no uid), so another allowed uid using the holder's worker name can "
    "replace the lease's question",
)
def test_lease_ask_is_bound_to_the_uid_that_acquired_the_lease(
    daemon: tuple[object, Path],  # noqa: F811
) -> None:
    _, sock = daemon
    control(sock, "handoff.submit", {"markdown": [handoff_doc("asked")]})
    holder = Conn(sock)
    try:
        holder.initialize("worker", name="w")
        lease = holder.request("lease.acquire", {"waitS": 30})["result"]["lease"]
        ident = {"leaseId": lease["id"], "token": lease["token"]}
        agent = _agent()
        replies = _worker_calls(
            sock, agent.pw_uid, agent.pw_gid, "w",
            [["lease.ask", {**ident, "question": "forged: merge without tests?",
                            "choices": ["yes", "no"]}]],
        )
        # Every other lease method refuses another uid with -32001 (test_identity.py).
        assert replies[1] is not None and replies[1].get("error", {}).get("code") == -32001, (
            replies)
    finally:
        holder.close()
