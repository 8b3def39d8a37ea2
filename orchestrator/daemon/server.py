"""The Unix socket server: framing, peer credentials, sessions, and the ``initialize`` gate.

It knows the transport rules of PROTOCOL.md and nothing about leases or handoffs: each
request of an initialized session is passed to a :class:`Dispatcher` in its own task, so a
long-polling ``lease.acquire`` never delays a heartbeat on the same connection.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from orchestrator import __version__
from orchestrator.config import Config
from orchestrator.observe import logs
from orchestrator.observe.metrics import Metrics
from orchestrator.protocol.capabilities import CAPABILITIES
from orchestrator.protocol.jsonrpc import (
    CONTROL_METHODS,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NOT_AUTHORIZED,
    PROTOCOL_VERSION,
    SHUTTING_DOWN,
    SUPPORTED_VERSIONS,
    UNSUPPORTED_VERSION,
    WORKER_METHODS,
    Request,
    RpcError,
    decode_line,
    encode,
    error_response,
    notification,
    parse_request,
    response,
)

log = logs.get("server")

_session_ids = itertools.count(1)
# Requests one connection may have in progress at once; the next waits for a reply.
MAX_IN_FLIGHT = 32
# Connections served at once; more are closed at once so file descriptors never run out.
MAX_CONNECTIONS = 512
# Kept free for root and the daemon's own uid above MAX_CONNECTIONS, so the operator's CLI
# always gets in, however many connections other uids hold.
OPERATOR_RESERVE = 64
# A refused connection stays open (never read) this long after its error and a shutdown of
# our side, so the peer reads the error and EOF even if it sent something first: closing
# a Unix socket with unread data would make the peer's recv fail with ECONNRESET instead.
REFUSED_LINGER_S = 5.0
# At most this many refused connections linger at once; more are closed straight away.
REFUSED_LINGER_MAX = 64
# A peer must send initialize this soon after connecting.
INITIALIZE_TIMEOUT_S = 10.0
# How long a notification (lease.revoked) may wait for a peer that does not read.
NOTIFY_TIMEOUT_S = 1.0


@dataclass
class Session:
    """One connection's identity and role, set by ``initialize``."""

    id: str
    uid: int
    gid: int
    pid: int
    send: Callable[[dict[str, Any]], Awaitable[None]]
    groups: tuple[int, ...] = ()
    role: str | None = None
    client: dict[str, Any] = field(default_factory=dict)
    worker_name: str = ""
    labels: tuple[str, ...] = ()
    connected_at: float = field(default_factory=time.time)
    closed: bool = False
    in_flight: anyio.Semaphore = field(default_factory=lambda: anyio.Semaphore(MAX_IN_FLIGHT))
    # For the idle limit: requests being answered (a long-poll included), and when the
    # connection last had one (monotonic clock).
    busy: int = 0
    last_active: float = field(default_factory=time.monotonic)

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        """Send a notification; a peer that is gone is simply skipped."""
        if self.closed:
            return
        with anyio.move_on_after(NOTIFY_TIMEOUT_S):
            try:
                await self.send(notification(method, params))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, TimeoutError, OSError):
                self.closed = True


class Dispatcher(Protocol):
    """What the server needs from the daemon."""

    # Messages, errors and handling times are counted here, where every frame passes.
    metrics: Metrics

    async def dispatch(self, session: Session, request: Request) -> Any: ...

    def session_opened(self, session: Session) -> None: ...

    def session_closed(self, session: Session) -> None: ...


class RoleRefused(RpcError):
    """A role the peer's credentials do not grant: answered, then the connection is closed."""


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux; not exported by Python


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups (``SO_PEERGROUPS``), empty where unsupported."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
    except OSError:
        return ()
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (``SO_PEERCRED``), not from the peer."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class SocketServer:
    """Serves protocol v1 on ``config.socket`` until cancelled."""

    def __init__(
        self, config: Config, dispatcher: Dispatcher, inherited: socket.socket | None = None
    ) -> None:
        """``inherited`` is a listening socket from systemd's socket activation; without
        one the server binds ``config.socket`` itself."""
        self.config = config
        self.dispatcher = dispatcher
        self.inherited = inherited
        self.shutting_down = False
        self.listening = False
        self.requests_in_flight = 0
        self._idle: anyio.Event | None = None
        self.sessions: dict[str, Session] = {}
        # Connections admitted and not yet closed, per peer uid.
        self.connections_per_uid: Counter[int] = Counter()
        self._lingering = 0

    def reconfigure(self, new: Config) -> None:
        """A reloaded config: limits and allowed peers apply to the next connection and
        request (the socket itself is restart-only)."""
        self.config = new

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self.inherited is not None:
            await self._serve_inherited(self.inherited, task_status)
            return
        path = self.config.socket
        await _clear_stale_socket(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeError(
                f"cannot create the socket's folder {path.parent}: {exc.strerror or exc}"
            ) from exc
        # Bind under a tight umask, then chmod: the socket is never reachable with wider
        # permissions than configured, not even for an instant.
        old_umask = os.umask(0o177)
        try:
            listener = await anyio.create_unix_listener(path)
        except OSError as exc:
            raise RuntimeError(
                f"cannot listen on {path}: {exc.strerror or exc}; check daemon.socket and "
                "that its folder exists and is writable by the daemon's user"
            ) from exc
        finally:
            os.umask(old_umask)
        os.chmod(path, self.config.socket_mode)
        log.info("socket_listening", socket=str(path), mode=oct(self.config.socket_mode))
        try:
            async with listener, anyio.create_task_group() as tg:
                self.listening = True
                task_status.started()
                await self._accept_loop(listener, tg)
        finally:
            self.listening = False
            path.unlink(missing_ok=True)

    async def _serve_inherited(self, sock: socket.socket, task_status: TaskStatus[None]) -> None:
        # systemd owns this socket's file, mode and owner (orchestrator.socket): it stays
        # bound across our restarts, so connections queue up while we start again.
        name = sock.getsockname()
        address = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        if address != str(self.config.socket):
            log.warning(
                "socket_mismatch",
                inherited=address,
                configured=str(self.config.socket),
                detail="clients use daemon.socket; make it match ListenStream= in the socket unit",
            )
        listener = await anyio.abc.SocketListener.from_socket(sock)
        log.info("socket_listening", socket=address, activated=True)
        try:
            async with listener, anyio.create_task_group() as tg:
                self.listening = True
                task_status.started()
                await self._accept_loop(listener, tg)
        finally:
            self.listening = False

    async def _accept_loop(self, listener: Any, tg: anyio.abc.TaskGroup) -> None:
        """Accept forever; running out of file descriptors pauses accepting, never ends it."""
        while True:
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                log.error("accept_failed", error=str(exc), detail="retrying in 0.5 s")
                await anyio.sleep(0.5)
                continue
            admitted = self._admit(stream)
            if admitted is None:
                if self._lingering < REFUSED_LINGER_MAX:
                    self._lingering += 1
                    tg.start_soon(self._close_refused, stream)
                else:
                    await stream.aclose()
                continue
            tg.start_soon(self._connection, stream, admitted)

    async def _close_refused(self, stream: SocketStream) -> None:
        try:
            await anyio.sleep(REFUSED_LINGER_S)
        finally:
            self._lingering -= 1
            with anyio.CancelScope(shield=True):
                await stream.aclose()

    def _admit(self, stream: SocketStream) -> tuple[int, int, int, tuple[int, ...]] | None:
        """The peer's (pid, uid, gid, groups) if it may have a connection, else None after
        telling it why. Decided from the kernel's credentials alone, before a byte of the
        peer's is read: a refused peer costs no buffer and no task."""
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        try:
            pid, uid, gid = peer_credentials(raw)
        except OSError:
            return None
        groups = peer_groups(raw)
        operator = uid in (0, os.getuid())
        total = sum(self.connections_per_uid.values())
        refusal: RpcError | None = None
        if not self._authorized(uid, (gid, *groups)):
            refusal = RpcError(
                NOT_AUTHORIZED,
                f"uid {uid} / gid {gid} may not use this daemon; "
                "add it to daemon.allowed_uids or daemon.allowed_gids",
            )
            log.warning("peer_refused", peer_uid=uid, peer_gid=gid, peer_pid=pid)
        elif not operator and self.connections_per_uid[uid] >= self.config.max_connections_per_uid:
            refusal = RpcError(
                NOT_AUTHORIZED,
                f"uid {uid} already has {self.connections_per_uid[uid]} connections "
                f"(daemon.max_connections_per_uid); close some and retry",
            )
            log.warning(
                "connection_refused",
                reason="too many connections for this uid",
                peer_uid=uid,
                limit=self.config.max_connections_per_uid,
            )
        elif total >= MAX_CONNECTIONS + (OPERATOR_RESERVE if operator else 0):
            refusal = RpcError(
                NOT_AUTHORIZED, f"the daemon serves {total} connections already; retry later"
            )
            log.warning("connection_refused", reason="too many connections", limit=total)
        if refusal is not None:
            self.dispatcher.metrics.protocol_error(refusal.code, None)
            try:
                # A new socket's send buffer is empty: this never blocks, and a peer that
                # does not read it loses nothing of ours.
                raw.send(encode(error_response(None, refusal)))
                raw.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return None
        self.connections_per_uid[uid] += 1
        return pid, uid, gid, groups

    def _controller(self, uid: int, gids: tuple[int, ...]) -> bool:
        # Operators are known by the kernel's credentials, never by the peer's word.
        return (
            uid in (0, os.getuid())
            or uid in self.config.control_uids
            or any(g in self.config.control_gids for g in gids)
        )

    def _authorized(self, uid: int, gids: tuple[int, ...]) -> bool:
        return (
            self._controller(uid, gids)
            or uid in self.config.allowed_uids
            or any(g in self.config.allowed_gids for g in gids)
        )

    async def _connection(
        self, stream: SocketStream, peer: tuple[int, int, int, tuple[int, ...]]
    ) -> None:
        pid, uid, gid, groups = peer
        send_lock = anyio.Lock()
        connection_scope = anyio.CancelScope()

        async def send(message: dict[str, Any]) -> None:
            data = encode(message)
            async with send_lock:
                try:
                    with anyio.fail_after(self.config.send_timeout_s):
                        await stream.send(data)
                except TimeoutError:
                    # A peer that does not read its replies is hung up on, so it can't
                    # hold buffers or tasks here (PROTOCOL.md: never block on a slow peer).
                    bound.warning("slow_peer_disconnected", timeout_s=self.config.send_timeout_s)
                    connection_scope.cancel()
                    raise

        session = Session(
            id=f"s-{next(_session_ids)}",
            uid=uid,
            gid=gid,
            pid=pid,
            send=send,
            groups=groups,
        )
        bound = log.bind(session=session.id, peer_pid=pid, peer_uid=uid)
        reader = BufferedByteReceiveStream(stream)
        self.sessions[session.id] = session
        try:
            with connection_scope:
                async with stream, anyio.create_task_group() as tg:
                    tg.start_soon(self._close_when_idle, session, connection_scope, bound)
                    await self._read_loop(session, reader, tg, bound)
                    tg.cancel_scope.cancel()
        except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            bound.info("peer_dropped")
        except Exception:  # a bug costs this one connection, never the daemon
            bound.exception("connection_failed")
        finally:
            session.closed = True
            self.sessions.pop(session.id, None)
            self.connections_per_uid[uid] -= 1
            if self.connections_per_uid[uid] <= 0:
                del self.connections_per_uid[uid]
            if session.role is not None:
                self.dispatcher.session_closed(session)

    async def _close_when_idle(
        self, session: Session, scope: anyio.CancelScope, bound: Any
    ) -> None:
        """Hang up on an initialized connection that has had no request in flight for
        ``daemon.idle_timeout_s`` (a long-poll is in flight), so silent connections cannot
        pile up; clients reconnect as after a daemon restart."""
        while True:
            # Read each round: a SIGHUP that changes the limit applies to open sessions.
            limit = self.config.idle_timeout_s or self.config.lease_ttl_s
            if session.role is None or session.busy:
                await anyio.sleep(min(limit, 1.0))
                continue
            idle_for = time.monotonic() - session.last_active
            if idle_for >= limit:
                bound.info("idle_connection_closed", idle_timeout_s=limit, role=session.role)
                scope.cancel()
                return
            await anyio.sleep(min(limit - idle_for, 1.0))

    async def _read_loop(
        self,
        session: Session,
        reader: BufferedByteReceiveStream,
        tg: anyio.abc.TaskGroup,
        bound: Any,
    ) -> None:
        while True:
            # Read per frame, not per connection: a SIGHUP that shrinks the limit or drops
            # a uid from daemon.allowed_uids applies to sessions already open too.
            limit = self.config.max_message_bytes
            try:
                if session.role is None:
                    with anyio.move_on_after(INITIALIZE_TIMEOUT_S) as deadline:
                        line = await reader.receive_until(b"\n", limit + 1)
                    if deadline.cancelled_caught:
                        bound.info("initialize_timeout", timeout_s=INITIALIZE_TIMEOUT_S)
                        return
                else:
                    # limit + 1: receive_until gives up once its buffer holds max_bytes, so
                    # a frame of exactly `limit` bytes whose newline comes later still fits.
                    line = await reader.receive_until(b"\n", limit + 1)
                # receive_until only enforces the limit while it is still looking for the
                # delimiter; a long frame that arrived in one read must be caught here.
                if len(line) > limit:
                    raise anyio.DelimiterNotFound(limit)
            except anyio.DelimiterNotFound:
                await self._error(
                    session,
                    None,
                    RpcError(
                        INVALID_REQUEST,
                        f"message longer than daemon.max_message_bytes ({limit} bytes); "
                        "closing the connection",
                    ),
                )
                bound.warning("oversized_frame", limit=limit)
                return
            except (anyio.EndOfStream, anyio.IncompleteRead):
                return
            if not line.strip():
                continue
            if not self._authorized(session.uid, (session.gid, *session.groups)):
                await self._error(
                    session,
                    _peek_id(line),
                    RpcError(
                        NOT_AUTHORIZED,
                        f"uid {session.uid} / gid {session.gid} may not use this daemon; "
                        "add it to daemon.allowed_uids or daemon.allowed_gids",
                    ),
                )
                bound.warning("peer_refused", uid=session.uid, gid=session.gid)
                return
            try:
                request = parse_request(decode_line(line))
            except RpcError as exc:
                self.dispatcher.metrics.request_received(None)
                await self._error(session, _peek_id(line), exc)
                continue
            self.dispatcher.metrics.request_received(request.method)
            if session.role is None:
                # initialize runs inline: nothing else may start before it finished.
                await self._initialize(session, request, bound)
                session.last_active = time.monotonic()
                continue
            # Back-pressure: a peer that pipelines requests waits for its own replies
            # instead of growing the daemon's memory and queueing in front of others.
            session.busy += 1
            await session.in_flight.acquire()
            tg.start_soon(self._call, session, request, bound)

    async def _initialize(self, session: Session, request: Request, bound: Any) -> None:
        if request.method != "initialize":
            await self._error(
                session,
                request.id,
                RpcError(
                    INVALID_REQUEST,
                    f"call initialize first (got {request.method!r} before initialize)",
                ),
                notify=request.is_notification,
                method=request.method,
            )
            return
        try:
            result = self._handshake(session, request.params)
        except RpcError as exc:
            await self._error(
                session, request.id, exc, notify=request.is_notification, method=request.method
            )
            if isinstance(exc, RoleRefused):
                bound.warning("role_refused", uid=session.uid, role=request.params.get("role"))
                raise anyio.ClosedResourceError from exc
            return
        self.dispatcher.session_opened(session)
        bound.info(
            "session_started",
            role=session.role,
            worker=session.worker_name or None,
            client=session.client.get("name"),
        )
        if not request.is_notification:
            await session.send(response(request.id, result))

    def _handshake(self, session: Session, params: dict[str, Any]) -> dict[str, Any]:
        version = params.get("protocolVersion")
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            raise RpcError(
                UNSUPPORTED_VERSION,
                f"protocol version {version!r} is not supported; this daemon speaks "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}",
                {"supported": list(SUPPORTED_VERSIONS)},
            )
        role = params.get("role")
        if role not in ("worker", "control"):
            raise RpcError(INVALID_PARAMS, 'invalid params: "role" must be "worker" or "control"')
        if role == "control" and not self._controller(session.uid, (session.gid, *session.groups)):
            raise RoleRefused(
                NOT_AUTHORIZED,
                f'uid {session.uid} may not take role "control"; '
                "add it to daemon.control_uids or daemon.control_gids",
            )
        client = params.get("client") or {}
        worker = params.get("worker") or {}
        if not isinstance(client, dict) or not isinstance(worker, dict):
            raise RpcError(INVALID_PARAMS, 'invalid params: "client" and "worker" must be objects')
        labels = worker.get("labels") or []
        if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise RpcError(INVALID_PARAMS, 'invalid params: "worker.labels" must be strings')
        name = worker.get("name") or client.get("name") or f"pid-{session.pid}"
        if not isinstance(name, str):
            raise RpcError(INVALID_PARAMS, 'invalid params: "worker.name" must be a string')
        session.role = role
        session.client = client
        session.worker_name = name
        session.labels = tuple(labels)
        return {
            "protocolVersion": PROTOCOL_VERSION,
            "server": {"name": "orchestrator", "version": __version__},
            "sessionId": session.id,
            "leaseTtlS": self.config.lease_ttl_s,
            "heartbeatIntervalS": self.config.heartbeat_interval_s,
            "capabilities": list(CAPABILITIES),
        }

    async def _call(self, session: Session, request: Request, bound: Any) -> None:
        self.requests_in_flight += 1
        started = time.monotonic()
        try:
            await self._answer(session, request, bound)
        finally:
            self.dispatcher.metrics.request_handled(request.method, time.monotonic() - started)
            self.requests_in_flight -= 1
            session.in_flight.release()
            session.busy -= 1
            session.last_active = time.monotonic()
            if not self.requests_in_flight and self._idle is not None:
                self._idle.set()

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests (-32006) and let those in progress finish, for a while."""
        self.shutting_down = True
        if self.requests_in_flight:
            self._idle = anyio.Event()
            with anyio.move_on_after(timeout_s):
                await self._idle.wait()

    async def _answer(self, session: Session, request: Request, bound: Any) -> None:
        if request.is_notification and request.method == "lease.acquire":
            # A lease nobody hears about would only sit there until it expired.
            bound.info("ignored_notification", method=request.method)
            return
        try:
            if self.shutting_down:
                raise RpcError(SHUTTING_DOWN, "the daemon is shutting down; retry shortly")
            if request.method == "initialize":
                raise RpcError(INVALID_REQUEST, "initialize was already called on this connection")
            if request.method in CONTROL_METHODS and session.role != "control":
                raise RpcError(
                    NOT_AUTHORIZED,
                    f'{request.method} is a control method; connect with role "control"',
                )
            if request.method in WORKER_METHODS and session.role != "worker":
                raise RpcError(
                    NOT_AUTHORIZED,
                    f'{request.method} is a worker method; connect with role "worker"',
                )
            if request.method not in CONTROL_METHODS | WORKER_METHODS:
                raise RpcError(METHOD_NOT_FOUND, f"unknown method {request.method!r}")
            result = await self.dispatcher.dispatch(session, request)
        except RpcError as exc:
            await self._error(
                session, request.id, exc, notify=request.is_notification, method=request.method
            )
            if exc.code not in (INVALID_PARAMS,):
                bound.info(
                    "request_refused",
                    method=request.method,
                    code=exc.code,
                    error=exc.message,
                    metric="orchestrator_protocol_errors_total",
                )
            return
        except Exception as exc:  # a bug must cost one request, never the daemon
            bound.exception("request_failed", method=request.method)
            await self._error(
                session,
                request.id,
                RpcError(INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}"),
                notify=request.is_notification,
                method=request.method,
            )
            return
        if not request.is_notification:
            try:
                await session.send(response(request.id, result))
            except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                session.closed = True
                bound.warning("reply_undelivered", method=request.method)

    async def _error(
        self,
        session: Session,
        request_id: Any,
        error: RpcError,
        *,
        notify: bool = False,
        method: str | None = None,
    ) -> None:
        self.dispatcher.metrics.protocol_error(error.code, method)
        if notify:
            return  # JSON-RPC: notifications get no reply, not even an error
        try:
            await session.send(error_response(request_id, error))
        except (TimeoutError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            session.closed = True


def _peek_id(line: bytes) -> Any:
    """The request id, if the frame is JSON enough to have one (for error replies)."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    request_id = obj.get("id")
    if isinstance(request_id, str) or (
        isinstance(request_id, int) and not isinstance(request_id, bool)
    ):
        return request_id
    return None


async def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead daemon; refuse if a live one answers on it."""
    try:
        mode = path.lstat().st_mode  # noqa: ASYNC240 - one syscall, at start-up
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RuntimeError(
            f"{path} exists and is not a socket; move it away or change daemon.socket"
        )
    try:
        stream = await anyio.connect_unix(path)
    except OSError:
        path.unlink(missing_ok=True)  # noqa: ASYNC240 - one syscall, at start-up
        return
    await stream.aclose()
    raise RuntimeError(
        f"another daemon is listening on {path}; stop it or configure another daemon.socket"
    )
