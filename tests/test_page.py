"""The live page at ``/`` on ``metrics.listen``, looked at in a real browser."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from browser import CHROMIUM, NO_CHROMIUM, Browser
from conftest import git
from harness import Conn, Daemon, control, handoff_doc, wait_for, write_config

from orchestrator.observe.board import Board, LeaseView, Outcome, Question, QueueEntry
from orchestrator.observe.page import CONTENT_SECURITY_POLICY, render_page

# Where `make page-screenshot` wants the picture for README.
SCREENSHOT_ENV = "ORCHESTRATOR_PAGE_SCREENSHOT"
HOSTILE_SCRIPT = "<script>window.__pwned=1</script>"
HOSTILE_IMG = '<img src=x onerror="window.__pwned=2">'
# The gate fails the candidate that carries work/bad.txt and says why in its output.
GATE_CHECK = (
    "import os, sys\n"
    "print('gate: checking the tree')\n"
    "if os.path.exists('work/bad.txt'):\n"
    "    print('BAD FILE FOUND: work/bad.txt')\n"
    "    sys.exit(1)\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def work(conn: Conn, lease: dict[str, object], status: str = "completed", **extra: str) -> None:
    """Commit something in the lease's worktree and report it."""
    worktree = Path(str(lease["worktree"]))
    filename = extra.pop("filename", "work/done.txt")
    (worktree / filename).parent.mkdir(parents=True, exist_ok=True)
    (worktree / filename).write_text("work\n")
    git(worktree, "add", "-A")
    git(worktree, "commit", "-q", "-m", "work")
    head = git(worktree, "rev-parse", "HEAD")
    reply = conn.request(
        "handoff.report",
        {
            "leaseId": lease["id"],
            "token": lease["token"],
            "report": {"status": status, "summary": extra.get("summary", "done"), "head": head},
        },
    )
    assert reply.get("result") == {"accepted": True}, reply


def acquire(conn: Conn, expected: str) -> dict[str, object]:
    lease = conn.request("lease.acquire", {"waitS": 30})["result"]["lease"]
    assert lease is not None and lease["handoff"]["name"] == expected, lease
    return lease  # type: ignore[no-any-return]


def heartbeat(conn: Conn, lease: dict[str, object], percent: int, phase: str, message: str) -> None:
    reply = conn.request(
        "lease.heartbeat",
        {
            "leaseId": lease["id"],
            "token": lease["token"],
            "progress": {"percent": percent, "phase": phase, "message": message},
        },
    )
    assert "result" in reply, reply


@pytest.mark.skipif(not CHROMIUM.exists(), reason=NO_CHROMIUM)
def test_a_person_watches_the_page_in_a_browser(tmp_path: Path, repo: Path) -> None:
    port = free_port()
    check = tmp_path / "gate_check.py"
    check.write_text(GATE_CHECK)
    config = write_config(
        tmp_path,
        repo,
        gates=f'[[gates]]\nname = "tests"\nrun = ["{sys.executable}", "{check}"]\n',
        merge='on_gate_failure = "hold"',
        metrics=f"127.0.0.1:{port}",
        ttl_s=120,
    )
    url = f"http://127.0.0.1:{port}/"
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    conns: list[Conn] = []
    browser: Browser | None = None
    try:
        names = ["alpha", "stuck-one", "bad-gate"]
        control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc(n) for n in names]})
        worker = Conn(daemon.socket)
        conns.append(worker)
        worker.initialize("worker", name="worker-one")
        alpha = acquire(worker, "alpha")
        heartbeat(worker, alpha, 10, "Phase one", f"{HOSTILE_SCRIPT}{HOSTILE_IMG}")

        # The same listener serves the page next to /metrics, read-only.
        status, headers, body = get(url)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert HOSTILE_SCRIPT not in body and "&lt;script&gt;window.__pwned=1" in body
        assert get(url, "POST")[0] == 405
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 200

        # JavaScript off: the server-rendered first view shows it all.
        noscript = Browser(
            tmp_path / "profile-noscript",
            tmp_path / "chromium-noscript.log",
            "--blink-settings=scriptEnabled=false",
        )
        try:
            noscript.open(url)
            dom = noscript.wait_for_html("alpha", "worker-one", "Phase one", 'value="10"')
            assert "stuck-one" in dom and "bad-gate" in dom
            assert HOSTILE_SCRIPT not in dom and "&lt;script&gt;window.__pwned=1" in dom
            assert '<span id="live">snapshot</span>' in dom  # the script did not run
            shot = noscript.screenshot(tmp_path / "page-noscript.png")
        finally:
            noscript.close()
        print(f"screenshot (JavaScript off): {shot}")
        assert shot.stat().st_size > 1000

        browser = Browser(tmp_path / "profile", tmp_path / "chromium.log")
        browser.open(url)
        text = browser.wait_for_text("alpha", "worker-one", "10%", "Phase one", HOSTILE_SCRIPT)
        assert "Merging is not blocked." in text
        # The agent's markup is text on the page, never code that ran.
        assert browser.evaluate("window.__pwned === undefined") is True
        assert browser.evaluate("document.querySelectorAll('#board img').length") == 0
        browser.evaluate("window.__samePage = 1")

        # Progress changes while the person watches, without a reload.
        heartbeat(worker, alpha, 60, "Phase two", "halfway there")
        browser.wait_for_text("60%", "Phase two", "halfway there")
        assert browser.evaluate("document.querySelector('#lease-alpha progress').value") == 60

        # A handoff starts waiting for a person: its name and its question appear.
        asker = Conn(daemon.socket)
        conns.append(asker)
        asker.initialize("worker", name="worker-two")
        stuck = acquire(asker, "stuck-one")
        work(asker, stuck, "blocked", summary="Which database should I use?")
        browser.wait_for_text("Waiting for a person (1)", "Which database should I use?")
        assert "stuck-one" in browser.evaluate("document.querySelector('#questions').innerText")

        # A gate failure shows with its log tail.
        bad = acquire(asker, "bad-gate")
        work(asker, bad, filename="work/bad.txt")
        browser.wait_for_text("gate tests log tail")
        assert "BAD FILE FOUND" in browser.evaluate(
            "document.querySelector('#log-bad-gate pre').textContent"
        )

        # The busiest moment (a question, work in progress, a failure) is the picture
        # README shows: `make page-screenshot` copies it to docs/page.png.
        busy = browser.screenshot(tmp_path / "page-busy.png")
        print(f"screenshot: {busy}")
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copyfile(busy, os.environ[SCREENSHOT_ENV])

        # A merge appears.
        work(worker, alpha)
        wait_for(
            lambda: "merged" in browser.evaluate(
                "(document.querySelector('#outcome-alpha') || {innerText: ''}).innerText"
            ),
            "alpha to show as merged",
        )
        text = browser.wait_for_text("merged as", "Working now (0)")
        assert browser.evaluate("window.__samePage") == 1
        final = browser.screenshot(tmp_path / "page.png")
        print(f"screenshot: {final}")
        assert final.stat().st_size > 1000
    finally:
        if browser is not None:
            browser.close()
        for conn in conns:
            conn.close()
        daemon.stop()


def test_every_agent_written_string_is_escaped() -> None:
    evil = f"{HOSTILE_SCRIPT}{HOSTILE_IMG}'\"&"
    board = Board(
        integration_branch=evil,
        integration_tip=evil,
        counts={"queued": 1},
        workers=1,
        merge_blocked=evil,
        queue=(QueueEntry(evil, evil, evil, 30.0),),
        pending=(QueueEntry(evil, evil, evil, None),),
        leases=(LeaseView(evil, evil, evil, 1, 40.0, evil, evil, 5.0),),
        questions=(Question(evil, evil, evil, (evil,), 5.0),),
        outcomes=(
            Outcome(evil, evil, "merged", 1.0, evil, evil, None, ""),
            Outcome(evil, evil, "failed", 1.0, evil, None, evil, evil),
        ),
    )
    page = render_page(board)
    # The page's own script is the only one; no agent string opens a tag or an attribute.
    assert page.count("<script") == 1
    assert "<img" not in page
    assert "onerror=\"" not in page
    assert "'\"&" not in page
    assert page.count("&lt;script&gt;window.__pwned=1&lt;/script&gt;") >= 12


def test_the_board_estimates_when_queued_work_lands_from_recent_merges() -> None:
    from orchestrator.observe.board import build_board

    status = {
        "counts": {"merged": 2, "reported": 2},
        "workers": [],
        "leases": [],
        "mergeQueue": ["next", "after"],
        "mergeBlocked": "merge.paused is set",
        "integrationBranch": "main",
        "integrationTip": "ab" * 20,
    }
    handoffs = [
        {"name": "next", "title": "n", "state": "gating"},
        {"name": "after", "title": "a", "state": "reported"},
    ]
    merged = [
        {
            "name": name,
            "state": "merged",
            "attempt": 2,
            "gates": [
                {"gate": "t", "attempt": 1, "durationS": 500.0, "exitStatus": 1},
                {"gate": "t", "attempt": 2, "durationS": seconds, "exitStatus": 0},
            ],
        }
        for name, seconds in (("m1", 30.0), ("m2", 50.0), ("m3", 40.0))
    ]
    board = build_board(status, handoffs, merged, now=0.0)
    # The median gate time of the merged attempts (40 s) per place in the queue.
    assert [(q.name, q.state, q.eta_s) for q in board.queue] == [
        ("next", "gating", 40.0),
        ("after", "reported", 80.0),
    ]
    assert board.merge_blocked == "merge.paused is set"
    assert build_board(status, handoffs, [], now=0.0).queue[0].eta_s is None


def test_recent_outcomes_are_read_newest_first_and_fetched_once_per_change(
    tmp_path: Path,
) -> None:
    from orchestrator.observe.board import RecentRecords
    from orchestrator.store.sqlite import NewHandoff, Store
    from orchestrator.store.states import State

    store = Store.open(tmp_path / "s.sqlite3")
    try:
        names = [f"h{i}" for i in range(6)]
        store.submit(
            [NewHandoff(n, n, "MEDIUM", (), (), "body", {"name": n}) for n in names],
            max_attempts=3,
            now=1.0,
        )
        for i, n in enumerate(names[:4]):
            store.cancel(n, now=10.0 + i)
        recent = [h.to_wire() for h in store.recent_summaries((State.CANCELLED, State.MERGED), 3)]
        assert [h["name"] for h in recent] == ["h3", "h2", "h1"]

        cache = RecentRecords()
        assert cache.stale(recent) == ["h3", "h2", "h1"]
        records = cache.records(recent, {h["name"]: {"name": h["name"]} for h in recent})
        assert [r["name"] for r in records] == ["h3", "h2", "h1"]
        assert cache.stale(recent) == []
        store.retry("h2", max_attempts=3, now=20.0)
        store.cancel("h2", now=21.0)
        again = [h.to_wire() for h in store.recent_summaries((State.CANCELLED,), 3)]
        assert [h["name"] for h in again] == ["h2", "h3", "h1"]
        assert cache.stale(again) == ["h2"]
    finally:
        store.close()


def _tiny_board() -> Board:
    return Board("main", "0" * 40, {}, 0, None, (), (), (), (), ())


async def _raw(port: int, request: bytes) -> bytes:
    import anyio

    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request)
        chunks = []
        with anyio.fail_after(30):
            while True:
                try:
                    chunks.append(await stream.receive())
                except anyio.EndOfStream:
                    break
    return b"".join(chunks)


@pytest.mark.anyio
async def test_the_page_refuses_a_rebound_host_name() -> None:
    import anyio

    from orchestrator.observe.metrics import Metrics, serve_http
    from orchestrator.observe.page import PageRoutes

    async def source() -> Board:
        return _tiny_board()

    routes = PageRoutes(source, host_names=["build-host.example"]).table()
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve_http(
                "127.0.0.1:0", Metrics("1"), ready=lambda: True, routes=routes,
                task_status=task_status,
            )
        )
        try:
            for path in (b"/", b"/board"):
                for host in (b"127.0.0.1:%d" % port, b"localhost:%d" % port, b"[::1]:9",
                             b"build-host.example:9464"):
                    reply = await _raw(port, b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, host))
                    assert reply.startswith(b"HTTP/1.1 200 "), (path, host, reply[:80])
                # DNS rebinding: the attacker's name, resolved to 127.0.0.1.
                for host in (b"rebind.attacker.example:%d" % port, b"", b"127.0.0.1.evil.example"):
                    reply = await _raw(port, b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, host))
                    assert reply.startswith(b"HTTP/1.1 403 "), (path, host, reply[:80])
                    assert b"orchestrator" not in reply.split(b"\r\n\r\n", 1)[1]
            # /metrics is for Prometheus, which may use any name: unchanged.
            reply = await _raw(port, b"GET /metrics HTTP/1.1\r\nHost: prom.example\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200 ")
        finally:
            tg.cancel_scope.cancel()


def test_a_question_asked_through_lease_ask_shows_with_its_choices() -> None:
    from orchestrator.observe.board import build_board

    status = {"counts": {"leased": 1}, "workers": [], "leases": [], "mergeQueue": []}
    handoffs: list[dict[str, Any]] = [
        {
            "name": "asks",
            "title": "t",
            "state": "leased",
            "needsInput": {
                "question": "Postgres or SQLite?",
                "choices": ["postgres", "sqlite"],
                "askedAt": "1970-01-01T00:01:40.000Z",
            },
        },
        {"name": "quiet", "title": "q", "state": "leased", "needsInput": None},
    ]
    board = build_board(status, handoffs, [], now=160.0)
    assert [(q.handoff, q.question, q.choices, q.age_s) for q in board.questions] == [
        ("asks", "Postgres or SQLite?", ("postgres", "sqlite"), 60.0)
    ]
    page = render_page(board)
    assert "Postgres or SQLite?" in page and "choices: postgres, sqlite" in page
