"""A small async client for protocol v1, used by the CLI and the generic worker.

Third-party workers in Python can use it too::

    async with Client.connect(socket_path, role="worker", name="w1") as client:
        lease = (await client.call("lease.acquire", {"waitS": 30}))["lease"]
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from orchestrator import __version__
from orchestrator.groups import single_error
from orchestrator.protocol.jsonrpc import PROTOCOL_VERSION, RpcError, encode

# Replies can be large (a handoff.get with gate logs); accept more than the daemon does.
MAX_REPLY_BYTES = 64 * 1024 * 1024


class ConnectionLost(RuntimeError):
    """The daemon closed the connection or could not be reached."""


class Client:
    """One connection; concurrent calls are matched to replies by id."""

    def __init__(
        self, stream: SocketStream, on_notification: Callable[[str, dict[str, Any]], None] | None
    ) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[anyio.Event, list[Any]]] = {}
        self._send_lock = anyio.Lock()
        self._on_notification = on_notification
        self._closed: Exception | None = None
        self.lost = anyio.Event()
        self.server_info: dict[str, Any] = {}

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        socket_path: Path | str,
        *,
        role: str,
        name: str = "",
        labels: tuple[str, ...] = (),
        on_notification: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> AsyncIterator[Client]:
        """Connect and ``initialize``; the reader task lives as long as the block."""
        try:
            stream = await anyio.connect_unix(str(socket_path))
        except OSError as exc:
            raise ConnectionLost(
                f"cannot connect to the daemon at {socket_path}: {exc.strerror or exc} "
                "(is `orchestrator serve` running? set --socket or ORCHESTRATOR_SOCKET)"
            ) from exc
        client = cls(stream, on_notification)
        try:
            async with client._session(role, name, labels) as ready:
                yield ready
        except BaseExceptionGroup as group:
            # The reader task group wraps whatever the caller raised; hand back the error
            # itself, so callers catch RpcError and ConnectionLost as documented.
            raise single_error(group) from None

    @asynccontextmanager
    async def _session(
        self, role: str, name: str, labels: tuple[str, ...]
    ) -> AsyncIterator[Client]:
        client = self
        async with client._stream, anyio.create_task_group() as tg:
            tg.start_soon(client._read_loop)
            params: dict[str, Any] = {
                "protocolVersion": PROTOCOL_VERSION,
                "role": role,
                "client": {"name": "orchestrator-cli", "version": __version__},
            }
            if role == "worker":
                params["worker"] = {"name": name, "labels": list(labels)}
            client.server_info = await client.call("initialize", params)
            try:
                yield client
            finally:
                tg.cancel_scope.cancel()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send a request and wait for its reply; an error reply raises :class:`RpcError`."""
        if self._closed is not None:
            raise ConnectionLost(str(self._closed))
        request_id = next(self._ids)
        done = anyio.Event()
        slot: list[Any] = []
        self._pending[request_id] = (done, slot)
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}
        try:
            async with self._send_lock:
                await self._stream.send(encode(message))
            await done.wait()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"connection to the daemon lost: {exc}") from exc
        finally:
            self._pending.pop(request_id, None)
        reply = slot[0]
        if isinstance(reply, Exception):
            raise reply
        if "error" in reply:
            error = reply["error"]
            raise RpcError(
                int(error.get("code", 0)), str(error.get("message", "")), error.get("data")
            )
        return reply.get("result")

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.receive_until(b"\n", MAX_REPLY_BYTES)
                message = json.loads(line)
                if "id" in message and message.get("id") in self._pending:
                    done, slot = self._pending[message["id"]]
                    slot.append(message)
                    done.set()
                elif "method" in message and self._on_notification is not None:
                    self._on_notification(message["method"], message.get("params") or {})
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            anyio.DelimiterNotFound,
            OSError,
            ValueError,
        ) as exc:
            self._closed = ConnectionLost(f"connection to the daemon lost: {exc!r}")
            self.lost.set()
            for done, slot in list(self._pending.values()):
                slot.append(self._closed)
                done.set()
