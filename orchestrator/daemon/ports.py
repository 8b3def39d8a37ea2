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

The ledger also records the settings (``port_base``, ``ports_per_lease``) its ranges were
laid out by. Changed settings (a reload, or a restart) take effect only once no lease of
the old layout is live: until then new leases and the gate slots keep the recorded
layout, so a gate never lands on the range of a lease whose worker still listens there.
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


@dataclass(frozen=True)
class PortLayout:
    """Where the ranges are: gate slot *s* at ``base + s * per``, leases above them."""

    base: int
    per: int

    @classmethod
    def of(cls, workspace: WorkspaceConfig) -> PortLayout:
        """The layout ``[workspace]`` asks for."""
        return cls(workspace.port_base, workspace.ports_per_lease)

    def gate(self, slot: int) -> PortRange:
        """The range of gate slot ``slot``."""
        return PortRange(self.base + slot * self.per, self.per)


def gate_range(workspace: WorkspaceConfig, slot: int) -> PortRange | None:
    """The range of gate slot ``slot`` as ``[workspace]`` lays them out; None when ports
    are off. A running daemon asks :meth:`PortLedger.gate_range`, which keeps the layout
    of leases still live."""
    if workspace.ports_per_lease <= 0:
        return None
    return PortLayout.of(workspace).gate(slot)


class PortLedger:
    """Which lease has which range; kept in ``state_dir/lease-ports.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LEDGER_NAME

    def gate_range(self, workspace: WorkspaceConfig, slot: int) -> PortRange | None:
        """The range of gate slot ``slot`` in the layout the live leases were given;
        None when ports are off."""
        if workspace.ports_per_lease <= 0:
            return None
        layout, _ = self._load()
        return (layout or PortLayout.of(workspace)).gate(slot)

    def assign(
        self, lease_id: str, workspace: WorkspaceConfig, live: Iterable[str]
    ) -> PortRange | None:
        """The range of ``lease_id`` (the one it has, or the lowest free one); ``live``:
        the ids of every lease still open (``lease_id`` among them). None when ports are
        off or every range is taken."""
        if workspace.ports_per_lease <= 0:
            return None
        keep = set(live) | {lease_id}
        recorded, ranges = self._load()
        held = {k: v for k, v in ranges.items() if k in keep}
        mine = held.get(lease_id)
        if mine is not None:
            return mine
        # The configured layout once no live lease holds a range of the recorded one.
        layout = recorded if recorded is not None and held else PortLayout.of(workspace)
        per = layout.per
        taken = list(held.values())
        start = layout.base + MAX_SPECULATIVE_WINDOW * per
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
        self._save(layout, held)
        return chosen

    def _load(self) -> tuple[PortLayout | None, dict[str, PortRange]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, {}
        ranges: dict[str, PortRange] = {}
        layout: PortLayout | None = None
        if isinstance(data, dict):
            shape = data.get("layout")
            if (
                isinstance(shape, list)
                and len(shape) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
            ):
                layout = PortLayout(shape[0], shape[1])
            leases = data.get("leases", data)  # a ledger from before the layout was kept
            for lease_id, value in (leases if isinstance(leases, dict) else {}).items():
                if (
                    isinstance(value, list)
                    and len(value) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                ):
                    ranges[str(lease_id)] = PortRange(value[0], value[1])
        return layout, ranges

    def _save(self, layout: PortLayout, ranges: dict[str, PortRange]) -> None:
        data = {
            "layout": [layout.base, layout.per],
            "leases": {k: [v.base, v.count] for k, v in sorted(ranges.items())},
        }
        partial = self.path.with_name(LEDGER_NAME + ".partial")
        partial.write_text(json.dumps(data) + "\n", encoding="utf-8")
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        try:
            partial.replace(self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
