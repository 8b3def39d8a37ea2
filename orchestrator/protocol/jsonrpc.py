"""Protocol v1 (PROTOCOL.md): JSON-RPC 2.0 objects, one per ``\\n``-terminated line.

This module is shared by the daemon and its clients; it knows nothing about sockets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
LEASE_NOT_HELD = -32001
NOT_AUTHORIZED = -32002
UNKNOWN_HANDOFF = -32003
INVALID_HANDOFF = -32004
DUPLICATE_HANDOFF = -32005
SHUTTING_DOWN = -32006
REPORT_REJECTED = -32007
UNSUPPORTED_VERSION = -32010

WORKER_METHODS = frozenset(
    {"lease.acquire", "lease.heartbeat", "handoff.report", "lease.release", "lease.ask"}
)
CONTROL_METHODS = frozenset(
    {
        "handoff.submit",
        "handoff.list",
        "handoff.get",
        "handoff.cancel",
        "handoff.retry",
        "status",
        "handoff.answer",
    }
)


class RpcError(Exception):
    """An error reply: ``code`` from PROTOCOL.md, a message a person can act on, optional data."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@dataclass(frozen=True)
class Request:
    """A decoded request or notification (``id`` is None for a notification)."""

    method: str
    params: dict[str, Any]
    id: int | str | None
    is_notification: bool


def encode(message: dict[str, Any]) -> bytes:
    """One line of compact JSON; ``json.dumps`` escapes newlines inside strings, so the frame
    can never contain a raw ``\\n``. ASCII-only, so text that is not valid Unicode (a file
    name with stray bytes, a lone surrogate a peer sent) is escaped, never an encoding error."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode_line(line: bytes) -> Any:
    """Parse one frame (without its newline); raises :class:`RpcError` ``-32700``."""
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_no_constants)
        # A \ud800-style escape decodes to a lone surrogate: valid JSON syntax, but not
        # text that can be stored or logged. Refuse it here, with a reason, rather than
        # deep inside whatever method it reaches.
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RpcError(
            PARSE_ERROR,
            "parse error: a string holds a lone surrogate (e.g. \\ud800); send valid Unicode",
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise RpcError(PARSE_ERROR, f"parse error: not valid UTF-8 JSON ({exc})") from exc
    except RecursionError:
        raise RpcError(PARSE_ERROR, "parse error: JSON nested too deeply") from None
    return obj


def parse_request(obj: Any) -> Request:
    """Validate the JSON-RPC 2.0 envelope; raises ``-32600`` with what is wrong."""
    if not isinstance(obj, dict):
        raise RpcError(INVALID_REQUEST, "invalid request: a message must be a JSON object")
    if obj.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise RpcError(INVALID_REQUEST, 'invalid request: "method" must be a non-empty string')
    has_id = "id" in obj
    request_id = obj.get("id")
    if has_id and not (
        request_id is None
        or isinstance(request_id, str)
        or (isinstance(request_id, int) and not isinstance(request_id, bool))
    ):
        raise RpcError(INVALID_REQUEST, 'invalid request: "id" must be a string or an integer')
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, 'invalid params: "params" must be a JSON object')
    return Request(method=method, params=params, id=request_id, is_notification=not has_id)


def response(request_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def error_response(request_id: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": error.to_wire()}


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def rfc3339(epoch: float | None) -> str | None:
    """Seconds since the epoch as an RFC 3339 UTC string (``Z``), to the millisecond."""
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Typed accessors for params: each failure is -32602 naming the field.


def param_str(params: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = params.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise RpcError(INVALID_PARAMS, f'invalid params: "{key}" must be a non-empty string')
    return value


def param_int(params: dict[str, Any], key: str) -> int:
    value = params.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RpcError(INVALID_PARAMS, f'invalid params: "{key}" must be an integer')
    return value


def param_number(
    params: dict[str, Any], key: str, default: float, low: float, high: float
) -> float:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RpcError(
            INVALID_PARAMS, f'invalid params: "{key}" must be a number from {low:g} to {high:g}'
        )
    return float(value)
