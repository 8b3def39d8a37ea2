"""The daemon's small read-only HTTP server (``metrics.listen``).

One request per connection, GET and HEAD only, bounded in every way a client could make
it costly: the size of a request head, the time to send it, the time to take a response,
and the number of connections at once. What it serves is given as routes (path to
coroutine); ``observe.metrics`` adds ``/metrics``, ``/healthz`` and ``/readyz``, and
``observe.page`` the live page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from orchestrator.observe import logs

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_REQUEST_HEAD",
    "REQUEST_TIMEOUT_S",
    "Request",
    "Response",
    "Route",
    "serve",
]

log = logs.get("metrics")

# Limits that keep one misbehaving client from costing the others anything: a request head
# larger than this is refused, a connection gets this long to send its head, and beyond
# this many concurrent connections new ones are turned away at once instead of queueing
# behind slow ones.
MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10.0
LINGER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Request:
    """What a route sees of a request: its path (no query), ``Accept`` and ``Host``."""

    method: str
    path: str
    accept: str = ""
    host: str = ""


@dataclass(frozen=True)
class Response:
    """A complete response; the server adds length, ``no-store`` and ``Connection: close``."""

    status: int
    body: bytes
    content_type: str = TEXT
    extra_headers: tuple[tuple[str, str], ...] = ()

    def encode(self, *, head_only: bool = False) -> bytes:
        """The response's bytes on the wire (only the head for a HEAD request)."""
        lines = [
            f"HTTP/1.1 {self.status} {_REASONS[self.status]}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.extra_headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        return head if head_only else head + self.body


Route = Callable[[Request], Awaitable[Response]]


class _RequestError(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class _Handler:
    def __init__(self, routes: Mapping[str, Route]) -> None:
        self._routes = dict(routes)
        self._slots = anyio.CapacityLimiter(MAX_CONNECTIONS)

    async def __call__(self, stream: anyio.abc.SocketStream) -> None:
        # Nothing a client does may escape: listener.serve() runs this in the endpoint's
        # task group, and an exception there would take the whole endpoint down.
        try:
            async with stream:
                try:
                    self._slots.acquire_nowait()
                except anyio.WouldBlock:
                    await _send(stream, Response(503, b"too many connections\n"), False)
                    return
                try:
                    await self._serve_one(stream)
                finally:
                    self._slots.release()
        except Exception as exc:
            log.debug("metrics_connection_error", error=repr(exc))

    async def _serve_one(self, stream: anyio.abc.SocketStream) -> None:
        head_only = False
        try:
            with anyio.fail_after(REQUEST_TIMEOUT_S):
                head = await _read_head(stream)
            method, path = _parse_request_line(head)
            head_only = method == "HEAD"
            request = Request(method, path, _header(head, "accept"), _header(head, "host"))
            response = await self._route(request)
        except _RequestError as exc:
            response = exc.response
        except TimeoutError:
            response = Response(408, b"request timeout\n")
        except anyio.EndOfStream:
            return  # the client left before finishing its request; nobody to answer
        await _send(stream, response, head_only)

    async def _route(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        if route is None:
            return Response(404, b"not found\n")
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"method not allowed\n", extra_headers=(("Allow", "GET, HEAD"),))
        return await route(request)


async def _send(stream: anyio.abc.SocketStream, response: Response, head_only: bool) -> None:
    with anyio.move_on_after(SEND_TIMEOUT_S):
        await stream.send(response.encode(head_only=head_only))
        # Half-close, then drain briefly: closing with unread input (say, a POST body)
        # makes the kernel send RST, which can destroy the response before it is read.
        await stream.send_eof()
        with anyio.move_on_after(LINGER_TIMEOUT_S):
            drained = 0
            try:
                while drained < 65536:
                    drained += len(await stream.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass  # the client read the response and closed: the normal ending


def _header(head: bytes, name: str) -> str:
    """The value of header ``name`` (case-insensitive; repeats joined by commas)."""
    values = []
    for line in head.split(b"\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name.encode():
            values.append(value.strip().decode("latin-1"))
    return ", ".join(values)


async def _read_head(stream: anyio.abc.SocketStream) -> bytes:
    buf = b""
    while True:
        try:
            chunk = await stream.receive(4096)
        except anyio.EndOfStream:
            if buf:
                raise _RequestError(Response(400, b"incomplete request\n")) from None
            raise
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end == -1:
            end = buf.find(b"\n\n")  # tolerate bare-LF clients such as hand-typed netcat
        if end != -1:
            if end > MAX_REQUEST_HEAD:
                break
            return buf[:end]
        if len(buf) > MAX_REQUEST_HEAD:
            break
    raise _RequestError(Response(431, b"request head too large\n"))


def _parse_request_line(head: bytes) -> tuple[str, str]:
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise _RequestError(Response(400, b"malformed request line\n")) from None
    if not version.startswith("HTTP/1.") or not method.isalpha():
        raise _RequestError(Response(400, b"malformed request line\n"))
    # Absolute-form targets ("http://host/metrics") are legal; the query string is ignored.
    path = urlsplit(target).path if "://" in target else target.split("?", 1)[0]
    return method, path


async def serve(
    host: str,
    port: int,
    routes: Mapping[str, Route],
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` on ``host:port`` until cancelled.

    Paths not in ``routes`` get 404, methods other than GET (or HEAD) 405. Calls
    ``task_status.started(port)`` with the bound port once the socket is listening.
    """
    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        bound_port = listener.extra(SocketAttribute.local_port)
        log.info("metrics_listening", host=host, port=bound_port)
        task_status.started(bound_port)
        await listener.serve(_Handler(routes))
