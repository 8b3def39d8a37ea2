"""``orchestrator status --watch``: the live page's board in a terminal, redrawn in place.

Plain ANSI, no curses: each frame moves the cursor home, writes every line followed by
"erase to end of line", then erases the rest of the screen, so nothing flickers and no
stale text stays behind. The board comes from the control API (``status``,
``handoff.list``, ``handoff.get``) over the socket, exactly what the page is built from.
Every agent-written string goes through :func:`orchestrator.observe.terminal.visible`:
an escape sequence in a progress message shows as ``␛[...``, it never moves the cursor
or writes the clipboard.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import anyio

from orchestrator.agent.client import Client, ConnectionLost
from orchestrator.observe.board import (
    Board,
    RecentRecords,
    build_board,
    format_age,
    recent_outcome_names,
)
from orchestrator.observe.terminal import visible
from orchestrator.protocol.jsonrpc import RpcError
from orchestrator.store.sqlite import LIVE_STATES

__all__ = ["render_frame", "run_watch"]

HOME = "\x1b[H"
ERASE_LINE = "\x1b[K"
ERASE_BELOW = "\x1b[J"
CLEAR = "\x1b[2J"
BAR_WIDTH = 20
GATE_TAIL_SHOWN = 3


def _v(text: str | None) -> str:
    return visible(text or "")


def _bar(percent: float | None) -> str:
    if percent is None:
        return "[" + "?" * BAR_WIDTH + "]     "
    percent = max(0.0, min(100.0, percent))
    filled = round(percent / 100 * BAR_WIDTH)
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + f"] {percent:3.0f}%"


def render_frame(board: Board, *, width: int, clock: str = "") -> list[str]:
    """The board as terminal lines (no escape sequences), each at most ``width`` wide."""
    counts = ", ".join(f"{k} {v}" for k, v in board.counts.items() if v) or "none"
    lines = [
        f"orchestrator: {_v(board.integration_branch)} at {_v(board.integration_tip[:12])}"
        + (f"   {clock}" if clock else ""),
        f"handoffs: {counts}; workers connected: {board.workers}",
        f"MERGING BLOCKED: {_v(board.merge_blocked)}"
        if board.merge_blocked
        else "merging is not blocked",
        "",
        f"Waiting for a person ({len(board.questions)})",
    ]
    for q in board.questions:
        lines.append(f"  {_v(q.handoff)}: {_v(q.question)}  ({format_age(q.age_s)})")
        if q.choices:
            lines.append("    choices: " + ", ".join(_v(c) for c in q.choices))
    lines += ["", f"Working now ({len(board.leases)})"]
    for lease in board.leases:
        lines.append(
            f"  {_v(lease.handoff)}  {_bar(lease.percent)}  {_v(lease.worker)} "
            f"(attempt {lease.attempt}, {format_age(lease.age_s)})"
        )
        detail = " - ".join(_v(part) for part in (lease.phase, lease.message) if part)
        if detail:
            lines.append(f"    {detail}")
    lines += ["", f"Merge queue ({len(board.queue)})"]
    for i, entry in enumerate(board.queue, 1):
        eta = f"lands in ~{format_age(entry.eta_s)}" if entry.eta_s is not None else ""
        lines.append(f"  {i}. {_v(entry.name)}  {entry.state}  {eta}".rstrip())
    if board.pending:
        lines += ["", f"Not started ({len(board.pending)})"]
        lines.append("  " + ", ".join(f"{_v(p.name)} ({p.state})" for p in board.pending))
    lines += ["", f"Recent merges and failures ({len(board.outcomes)})"]
    for o in board.outcomes:
        what = (
            f"merged as {_v((o.merge_commit or '')[:12])}" if o.state == "merged" else _v(o.detail)
        )
        lines.append(f"  {_v(o.handoff)}  {o.state}  {format_age(o.age_s)} ago: {what}")
        if o.gate_tail:
            lines.append(f"    gate {_v(o.failed_gate)}, last lines:")
            lines += [f"      {_v(line)}" for line in o.gate_tail.splitlines()[-GATE_TAIL_SHOWN:]]
    return [_fit(line, width) for line in lines]


def _fit(line: str, width: int) -> str:
    # A line longer than the terminal would wrap and push the frame off the screen.
    return line if len(line) <= width else line[: max(1, width - 1)] + "…"


def _frame_text(lines: list[str], height: int) -> str:
    shown = lines[: max(1, height - 1)]
    return HOME + "".join(line + ERASE_LINE + "\r\n" for line in shown) + ERASE_BELOW


class _Reader:
    """Reads the board over the socket at a cost that does not grow with history.

    Live handoffs are listed state by state; ``merged`` only grows, so its list is asked
    for again only when its count in ``status`` moved; each recent outcome's record is
    fetched once per change (:class:`~orchestrator.observe.board.RecentRecords`).
    """

    def __init__(self) -> None:
        self._records = RecentRecords()
        self._merged: list[dict[str, Any]] = []
        self._merged_count: int | None = None

    async def board(self, client: Client) -> Board:
        status = await client.call("status", {})
        handoffs: list[dict[str, Any]] = []
        for state in (*LIVE_STATES, "failed", "conflict"):
            if status["counts"].get(state):
                handoffs += (await client.call("handoff.list", {"state": state}))["handoffs"]
        merged_count = status["counts"].get("merged", 0)
        if merged_count != self._merged_count:
            reply = await client.call("handoff.list", {"state": "merged"})
            self._merged, self._merged_count = reply["handoffs"], merged_count
        handoffs += self._merged
        recent_names = set(recent_outcome_names(handoffs))
        recent = [h for h in handoffs if h["name"] in recent_names]
        fetched = {}
        for name in self._records.stale(recent):
            try:
                fetched[name] = await client.call("handoff.get", {"name": name})
            except RpcError:
                continue  # gone between the list and the get; the next frame has it right
        records = self._records.records(
            sorted(recent, key=lambda h: str(h.get("updatedAt") or ""), reverse=True), fetched
        )
        return build_board(status, handoffs, records, now=time.time())


async def _watch(socket: Path, interval_s: float, out: TextIO) -> None:
    out.write(CLEAR)
    reader = _Reader()
    while True:
        try:
            async with Client.connect(socket, role="control") as client:
                while True:
                    board = await reader.board(client)
                    size = shutil.get_terminal_size()
                    lines = render_frame(board, width=size.columns, clock=time.strftime("%H:%M:%S"))
                    out.write(_frame_text(lines, size.lines))
                    out.flush()
                    await anyio.sleep(interval_s)
        except (ConnectionLost, OSError) as exc:
            size = shutil.get_terminal_size()
            message = f"daemon unreachable ({exc}); retrying every {interval_s:g} s"
            out.write(_frame_text([_fit(visible(message), size.columns)], size.lines))
            out.flush()
            await anyio.sleep(interval_s)


def run_watch(socket: Path, interval_s: float = 1.0, out: TextIO | None = None) -> int:
    """Redraw the board every ``interval_s`` seconds until Ctrl-C; returns the exit status."""
    stream = out or sys.stdout

    def end(signum: int, frame: object) -> None:
        # The view holds nothing to save: leave at once, from wherever the loop is, with
        # the cursor on a fresh line. (A KeyboardInterrupt raised inside the event loop
        # could escape as the process's death by SIGINT.)
        stream.write("\r\n")
        stream.flush()
        os._exit(0)

    signal.signal(signal.SIGINT, end)
    signal.signal(signal.SIGTERM, end)
    anyio.run(_watch, socket, interval_s, stream)
    return 0
