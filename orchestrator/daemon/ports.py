"""Port ranges (``[workspace] ports_per_lease``, ``port_base``): no port fights.

Dev servers and tests of parallel agents (and of parallel gates) would fight over the
same ports. Each gate slot and each live lease gets a range of ``ports_per_lease`` ports
of its own, as ``ORCHESTRATOR_PORT_BASE`` / ``ORCHESTRATOR_PORT_COUNT`` in its
environment (a lease also as the result field ``portBase``). The first
``MAX_SPECULATIVE_WINDOW`` ranges from ``port_base`` up are the gate slots' (slot *s* has
range *s*, whatever the window is now); leases take the lowest free range above them.

A lease's range is recorded in a small file in the state directory, so that a restarted
daemon does not hand a range to a new lease while the worker of an old one (which
outlives connections, and daemons) still uses it. Entries of leases that are no longer
open in the store are dropped whenever a range is assigned.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import MAX_SPECULATIVE_WINDOW, WorkspaceConfig

LEDGER_NAME = "lease-ports.json"
HIGHEST_PORT = 65535


@dataclass(frozen=True)
class PortRange:
    """``count`` ports from ``base`` on."""

    base: int
    count: int

    def overlaps(self, other: PortRange) -> bool:
        """True when the two ranges share a port."""
        return self.base < other.base + other.count and other.base < self.base + self.count


def gate_range(workspace: WorkspaceConfig, slot: int) -> PortRange | None:
    """The range of gate slot ``slot``; None when ports are off."""
    if workspace.ports_per_lease <= 0:
        return None
    return PortRange(
        workspace.port_base + slot * workspace.ports_per_lease, workspace.ports_per_lease
    )


class PortLedger:
    """Which lease has which range; kept in ``state_dir/lease-ports.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LEDGER_NAME

    def assign(
        self, lease_id: str, workspace: WorkspaceConfig, live: Iterable[str]
    ) -> PortRange | None:
        """The range of ``lease_id`` (the one it has, or the lowest free one); ``live``:
        the ids of every lease still open (``lease_id`` among them). None when ports are
        off or every range is taken."""
        per = workspace.ports_per_lease
        if per <= 0:
            return None
        keep = set(live) | {lease_id}
        held = {k: v for k, v in self._load().items() if k in keep}
        mine = held.get(lease_id)
        if mine is not None:
            return mine
        taken = list(held.values())
        start = workspace.port_base + MAX_SPECULATIVE_WINDOW * per
        chosen: PortRange | None = None
        base = start
        while base + per - 1 <= HIGHEST_PORT:
            candidate = PortRange(base, per)
            if not any(candidate.overlaps(other) for other in taken):
                chosen = candidate
                break
            base += per
        if chosen is not None:
            held[lease_id] = chosen
        self._save(held)
        return chosen

    def _load(self) -> dict[str, PortRange]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        ranges: dict[str, PortRange] = {}
        if isinstance(data, dict):
            for lease_id, value in data.items():
                if (
                    isinstance(value, list)
                    and len(value) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                ):
                    ranges[str(lease_id)] = PortRange(value[0], value[1])
        return ranges

    def _save(self, ranges: dict[str, PortRange]) -> None:
        data = {k: [v.base, v.count] for k, v in sorted(ranges.items())}
        partial = self.path.with_name(LEDGER_NAME + ".partial")
        partial.write_text(json.dumps(data) + "\n", encoding="utf-8")
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        try:
            partial.replace(self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
