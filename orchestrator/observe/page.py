"""The live page at ``/`` on ``metrics.listen``: what each agent is doing, what waits on
a person, what lands next.

Served by the same read-only HTTP server and under the same limits as ``/metrics``. The
first view is complete HTML rendered here (it works with JavaScript off, and then reloads
itself every few seconds); with JavaScript, a small inline script fetches ``/board`` (the
same HTML for the board alone) every second and swaps it in. No build step, no external
asset: it must work on a machine with no internet.

Agent-written text is untrusted. Every string goes through :func:`html.escape` (quotes
too, since some land in attributes), and a Content-Security-Policy allows only this
page's own script and style, by hash: even a string that escaped escaping could not run.
"""

from __future__ import annotations

import base64
import hashlib
import html
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable

import anyio

from orchestrator.observe import http, logs
from orchestrator.observe.board import Board, LeaseView, Outcome, Question, format_age
from orchestrator.store.states import State

__all__ = [
    "BOARD_PATH",
    "POLL_INTERVAL_S",
    "PageRoutes",
    "host_allowed",
    "render_board",
    "render_page",
]

log = logs.get("page")

BOARD_PATH = "/board"
# How often the page asks for a new board; reads are shared by everyone asking meanwhile.
POLL_INTERVAL_S = 1.0
# Without JavaScript the browser reloads the whole page this often instead.
NOSCRIPT_REFRESH_S = 5
# A board younger than this is served again rather than read again: many open pages cost
# the store one read per interval, not one per page.
BOARD_MAX_AGE_S = 0.5
READ_TIMEOUT_S = 5.0

BoardSource = Callable[[], Awaitable[Board]]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em} h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%} td,th{text-align:left;padding:.25em .6em;
vertical-align:top;border-bottom:1px solid #ddd} th{font-weight:600;color:#555}
.blocked{background:#fde2e1;border:1px solid #c33;padding:.5em .8em;font-weight:600}
.flowing{color:#276b2e} .ask{background:#fff6d6} .muted{color:#777}
.merged{color:#276b2e} .failed,.conflict{color:#b3261e}
progress{width:10em} pre{background:#f0f0f0;padding:.5em;overflow:auto;max-height:20em;
white-space:pre-wrap} code{font-size:.95em} #live{float:right;color:#777}
"""

_SCRIPT = """
(function () {
  var board = document.getElementById("board");
  var live = document.getElementById("live");
  function tick() {
    fetch("/board", {cache: "no-store"}).then(function (reply) {
      if (!reply.ok) { throw new Error("HTTP " + reply.status); }
      return reply.text();
    }).then(function (text) {
      var open = [];
      board.querySelectorAll("details[open]").forEach(function (d) { open.push(d.id); });
      board.innerHTML = text;
      open.forEach(function (id) {
        var d = document.getElementById(id);
        if (d) { d.open = true; }
      });
      live.textContent = "live, updated " + new Date().toLocaleTimeString();
    }).catch(function () {
      live.textContent = "daemon unreachable, retrying";
    }).then(function () { setTimeout(tick, INTERVAL); });
  }
  setTimeout(tick, INTERVAL);
})();
""".replace("INTERVAL", str(int(POLL_INTERVAL_S * 1000)))


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"script-src 'sha256-{_sha256(_SCRIPT)}'; "
    f"style-src 'sha256-{_sha256(_STYLE)}'; "
    "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)
_HTML = "text/html; charset=utf-8"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def render_page(board: Board) -> str:
    """The whole page: head, style, script and the board."""
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>orchestrator: {_e(board.integration_branch)}</title>"
        f"<noscript><meta http-equiv=refresh content={NOSCRIPT_REFRESH_S}></noscript>"
        f"<style>{_STYLE}</style></head><body>"
        "<span id=live>snapshot</span>"
        f"<main id=board>{render_board(board)}</main>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


def render_board(board: Board) -> str:
    """The board alone (what ``/board`` serves for the page to swap in)."""
    counts = ", ".join(f"{_e(k)} {int(v)}" for k, v in board.counts.items() if v) or "none"
    parts = [
        f"<h1>orchestrator: <code>{_e(board.integration_branch)}</code> at "
        f"<code>{_e(board.integration_tip[:12])}</code></h1>",
        f"<p class=muted>handoffs: {counts}; workers connected: {board.workers}</p>",
    ]
    if board.merge_blocked:
        parts.append(
            f"<p class=blocked id=merge-blocked>Merging is blocked: {_e(board.merge_blocked)}</p>"
        )
    else:
        parts.append("<p class=flowing id=merge-flowing>Merging is not blocked.</p>")

    parts.append(f"<h2>Waiting for a person ({len(board.questions)})</h2>")
    parts.append(_questions(board.questions))
    parts.append(f"<h2>Working now ({len(board.leases)})</h2>")
    parts.append(_leases(board.leases))
    parts.append(f"<h2>Merge queue ({len(board.queue)})</h2>")
    if board.queue:
        rows = "".join(
            f"<tr id='queue-{_e(q.name)}'><td>{i}</td><td><b>{_e(q.name)}</b></td>"
            f"<td>{_e(q.title)}</td><td>{_e(q.state)}</td>"
            f"<td>{'~' + format_age(q.eta_s) if q.eta_s is not None else 'unknown'}</td></tr>"
            for i, q in enumerate(board.queue, 1)
        )
        parts.append(
            "<table id=queue><tr><th>#</th><th>handoff</th><th>title</th><th>state</th>"
            f"<th>lands in</th></tr>{rows}</table>"
        )
    else:
        parts.append("<p class=muted>empty</p>")
    parts.append(f"<h2>Not started ({len(board.pending)})</h2>")
    if board.pending:
        items = "".join(
            f"<li id='pending-{_e(p.name)}'><b>{_e(p.name)}</b> {_e(p.title)} "
            f"<span class=muted>({_e(p.state)})</span></li>"
            for p in board.pending
        )
        parts.append(f"<ul id=pending>{items}</ul>")
    else:
        parts.append("<p class=muted>nothing</p>")
    parts.append(f"<h2>Recent merges and failures ({len(board.outcomes)})</h2>")
    parts.append(_outcomes(board.outcomes))
    return "".join(parts)


def _questions(questions: tuple[Question, ...]) -> str:
    if not questions:
        return "<p class=muted>nothing</p>"
    rows = "".join(
        f"<tr class=ask id='ask-{_e(q.handoff)}'><td><b>{_e(q.handoff)}</b><br>"
        f"<span class=muted>{_e(q.title)}</span></td><td>{_e(q.question)}"
        + (f"<br>choices: {', '.join(_e(c) for c in q.choices)}" if q.choices else "")
        + f"</td><td>{format_age(q.age_s)}</td></tr>"
        for q in questions
    )
    return f"<table id=questions><tr><th>handoff</th><th>asks</th><th>for</th></tr>{rows}</table>"


def _leases(leases: tuple[LeaseView, ...]) -> str:
    if not leases:
        return "<p class=muted>no lease held</p>"
    rows = []
    for lease in leases:
        if lease.percent is None:
            bar, label = "<progress max=100></progress>", ""
        else:
            percent = max(0.0, min(100.0, lease.percent))
            bar, label = f"<progress max=100 value={percent:.0f}></progress>", f" {percent:.0f}%"
        rows.append(
            f"<tr id='lease-{_e(lease.handoff)}'><td><b>{_e(lease.handoff)}</b><br>"
            f"<span class=muted>{_e(lease.title)}</span></td>"
            f"<td>{_e(lease.worker)}<br><span class=muted>attempt {lease.attempt}</span></td>"
            f"<td>{bar}<span class=percent>{label}</span></td>"
            f"<td class=phase>{_e(lease.phase or '')}</td>"
            f"<td class=message>{_e(lease.message or '')}</td>"
            f"<td>{format_age(lease.age_s)}</td></tr>"
        )
    return (
        "<table id=leases><tr><th>handoff</th><th>worker</th><th>progress</th><th>phase</th>"
        f"<th>message</th><th>for</th></tr>{''.join(rows)}</table>"
    )


def _outcomes(outcomes: tuple[Outcome, ...]) -> str:
    if not outcomes:
        return "<p class=muted>none yet</p>"
    rows = []
    logs_html = []
    for o in outcomes:
        if o.state == State.MERGED:
            what = f"merged as <code>{_e((o.merge_commit or '')[:12])}</code>"
        else:
            what = _e(o.detail)
        if o.gate_tail:
            what += f" (<a href='#log-{_e(o.handoff)}'>gate {_e(o.failed_gate)} log tail</a>)"
            logs_html.append(
                f"<details id='log-{_e(o.handoff)}'><summary>{_e(o.handoff)}: gate "
                f"{_e(o.failed_gate)}, last lines</summary><pre>{_e(o.gate_tail)}</pre></details>"
            )
        rows.append(
            f"<tr id='outcome-{_e(o.handoff)}'><td><b>{_e(o.handoff)}</b><br>"
            f"<span class=muted>{_e(o.title)}</span></td>"
            f"<td class='{_e(o.state)}'>{_e(o.state)}</td><td>{what}</td>"
            f"<td>{format_age(o.age_s)} ago</td></tr>"
        )
    return (
        "<table id=outcomes><tr><th>handoff</th><th>result</th><th>detail</th><th>when</th></tr>"
        f"{''.join(rows)}</table>{''.join(logs_html)}"
    )


def host_allowed(host_header: str, names: Iterable[str] = ()) -> bool:
    """Whether a ``Host`` header names this machine: an IP address, ``localhost``, this
    host's own name, or one of ``names``.

    Anything else is a DNS-rebinding attempt: a web page on attacker.example whose name
    was made to resolve to 127.0.0.1 would otherwise read the board (handoff titles, agent
    messages, gate logs) with the victim's browser, as same-origin.
    """
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    host = host.rstrip(".")
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    allowed = {"localhost", socket.gethostname().lower(), *(n.lower() for n in names)}
    return host in allowed or host.endswith(".localhost")


class PageRoutes:
    """``/`` and ``/board`` for :func:`orchestrator.observe.metrics.serve_http`'s ``routes``."""

    def __init__(self, source: BoardSource, *, host_names: Iterable[str] = ()) -> None:
        """``source`` reads a fresh board (the daemon's store reads, off the event loop);
        ``host_names`` are names besides IP addresses, ``localhost`` and this host's own
        name that the page answers to (the ``metrics.listen`` host, say)."""
        self._source = source
        self._host_names = tuple(host_names)
        self._board: Board | None = None
        self._read_at = float("-inf")
        self._reading: anyio.Event | None = None

    def table(self) -> dict[str, http.Route]:
        """The paths this serves."""
        return {"/": self._page, BOARD_PATH: self._fragment}

    def _refused(self, request: http.Request) -> http.Response | None:
        if host_allowed(request.host, self._host_names):
            return None
        return http.Response(
            403,
            b"this page answers only to an IP address, localhost or this host's name; "
            b"open it as http://127.0.0.1:PORT/ (through an SSH tunnel from elsewhere)\n",
            extra_headers=_HEADERS,
        )

    async def _page(self, request: http.Request) -> http.Response:
        if refused := self._refused(request):
            return refused
        board = await self._current()
        if board is None:
            return self._unavailable()
        return http.Response(200, render_page(board).encode(), _HTML, _HEADERS)

    async def _fragment(self, request: http.Request) -> http.Response:
        if refused := self._refused(request):
            return refused
        board = await self._current()
        if board is None:
            return self._unavailable()
        return http.Response(200, render_board(board).encode(), _HTML, _HEADERS)

    @staticmethod
    def _unavailable() -> http.Response:
        return http.Response(
            503, b"the daemon could not read its store; see its log\n", extra_headers=_HEADERS
        )

    async def _current(self) -> Board | None:
        """A board at most BOARD_MAX_AGE_S old, read once for any number of requests."""
        if time.monotonic() - self._read_at < BOARD_MAX_AGE_S:
            return self._board
        if self._reading is not None:
            await self._reading.wait()
            return self._board
        self._reading = done = anyio.Event()
        try:
            with anyio.fail_after(READ_TIMEOUT_S):
                self._board = await self._source()
            self._read_at = time.monotonic()
        except Exception as exc:
            log.warning("page_store_read_failed", error=repr(exc))
            self._board = None
        finally:
            self._reading = None
            done.set()
        return self._board
