"""Debian's headless chromium, driven over the DevTools protocol on a pipe (stdlib only).

``--remote-debugging-pipe`` makes chromium read protocol commands from fd 3 and write
replies and events to fd 4, each a JSON object ending in a NUL byte: no websocket, no
extra package. Used by the live page's tests to look at the page as a person would.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import signal
import time
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1200,900",
]
TIMEOUT_S = 60.0
NO_CHROMIUM = f"{CHROMIUM} is not installed (.ci/run installs Debian's chromium)"


def chromium_flags(profile: Path, *extra: str) -> list[str]:
    return [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *extra]


def _high_fd(fd: int) -> int:
    """``fd`` moved to a number above 10, so dup2 onto 3 and 4 cannot clobber it."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """One headless chromium with one page, spoken to over the DevTools pipe."""

    def __init__(self, profile: Path, log: Path, *extra: str) -> None:
        to_chrome_r, to_chrome_w = (_high_fd(fd) for fd in os.pipe())
        from_chrome_r, from_chrome_w = (_high_fd(fd) for fd in os.pipe())
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        try:
            self.pid = os.posix_spawn(
                str(CHROMIUM),
                chromium_flags(profile, "--remote-debugging-pipe", *extra, "about:blank"),
                dict(os.environ),
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, null_fd, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                    (os.POSIX_SPAWN_DUP2, to_chrome_r, 3),
                    (os.POSIX_SPAWN_DUP2, from_chrome_w, 4),
                ],
                setpgroup=0,
            )
        finally:
            for fd in (to_chrome_r, from_chrome_w, log_fd, null_fd):
                os.close(fd)
        self._out = to_chrome_w
        self._in = from_chrome_r
        self._buffer = b""
        self._next_id = 1
        self.session: str | None = None

    def close(self) -> None:
        """Kill chromium and its helpers (its own process group) and reap it."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self._out)
        os.close(self._in)

    def call(self, method: str, params: dict[str, Any] | None = None, *, page: bool = True) -> Any:
        """Send one command (to the page's session unless ``page=False``); its result."""
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        self._next_id += 1
        if page and self.session is not None:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == message["id"]:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result")

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("chromium did not answer in time")
            ready, _, _ = select.select([self._in], [], [], left)
            if ready:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise AssertionError("chromium closed its DevTools pipe (crashed?)")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def open(self, url: str) -> None:
        """Open ``url`` in a new page and attach to it."""
        target = self.call("Target.createTarget", {"url": url}, page=False)["targetId"]
        self.session = self.call(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, page=False
        )["sessionId"]

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )["result"]
        return result.get("value")

    def html(self) -> str:
        """The page's DOM serialized, read by the DevTools DOM domain: works with
        JavaScript off, unlike :meth:`evaluate`."""
        root = self.call("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        try:
            return str(self.call("DOM.getOuterHTML", {"nodeId": root})["outerHTML"])
        except AssertionError as exc:
            if "Could not find node" in str(exc):
                return ""  # a navigation replaced the document meanwhile; ask again
            raise

    def wait_for_html(self, *needles: str, timeout: float = TIMEOUT_S) -> str:
        """Poll the DOM until it holds every needle; fail naming what is missing."""
        deadline = time.monotonic() + timeout
        while True:
            dom = self.html()
            missing = [n for n in needles if n not in dom]
            if not missing:
                return dom
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never held {missing}; it holds:\n{dom}")
            time.sleep(0.2)

    def text(self) -> str:
        """What a person reads on the page (``document.body.innerText``)."""
        return str(self.evaluate("document.body ? document.body.innerText : ''") or "")

    def wait_for_text(self, *needles: str, timeout: float = TIMEOUT_S) -> str:
        """Poll the page's text until it shows every needle; fail naming what is missing."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the page never showed {missing}; it shows:\n{text}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path
