"""The protocol additions within version 1 this daemon implements, as the ``initialize``
result lists them (PROTOCOL.md, "Additions within version 1")."""

from __future__ import annotations

__all__ = ["ASK", "CAPABILITIES", "INTEGRATION_TIP", "ISOLATED_WORKTREE", "WARNINGS"]

ISOLATED_WORKTREE = "isolated-worktree"
"""A lease's worktree is a repository of its own."""
INTEGRATION_TIP = "integration-tip"
"""Every lease knows the integration tip (``integrationCommit``, ``origin/<branch>``)."""

ASK = "ask"
"""Asking a person: ``lease.ask``, ``handoff.answer``, ``lease.answered``."""

WARNINGS = "warnings"
"""Early conflict warnings: ``lease.heartbeat`` may carry ``head``; ``lease.warning``."""

CAPABILITIES: tuple[str, ...] = (ISOLATED_WORKTREE, INTEGRATION_TIP, ASK, WARNINGS)
