"""Fuzz the daemon's socket protocol with hypothesis against one real daemon process.

Every example opens a fresh connection (optionally initialized, optionally holding a real
lease), sends a handful of frames -- arbitrary bytes, valid JSON with a broken envelope, or
well-formed calls of every method in PROTOCOL.md with random params -- and then a sentinel
request. Every line the daemon sends back must be a well-formed JSON-RPC 2.0 response with a
documented error code, every request with a valid id must be answered with that id, the
connection may only be closed after an oversized frame, and after each example the daemon
must still be alive and serving ``status`` to another peer.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import GIT_ENV, make_repo
from harness import Daemon, control, handoff_doc, write_config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator.store.sqlite import STATES

pytestmark = pytest.mark.slow

LIMIT = 4096  # daemon.max_message_bytes in this module's config
DOCUMENTED_CODES = frozenset(
    {
        -32700,
        -32600,
        -32601,
        -32602,
        # -32603 (internal error) is deliberately absent: any bad input must get a
        # documented, actionable code, never a bug's.
        -32001,
        -32002,
        -32003,
        -32004,
        -32005,
        -32006,
        -32007,
        -32010,
    }
)
# How long one example may take to be answered before it counts as a hang.
REPLY_DEADLINE_S = 10.0
# Lines nested deeper than this may hit the recursion limit in the daemon but not in this
# test's parser (or the other way round): their replies are optional, not required.
DEEP = 400

METHODS = (
    "initialize",
    "lease.acquire",
    "lease.heartbeat",
    "lease.release",
    "handoff.report",
    "handoff.submit",
    "handoff.list",
    "handoff.get",
    "handoff.cancel",
    "handoff.retry",
    "status",
)
# Names fuzzed submits may use; gets, cancels and retries also aim at run_case's held-N.
SUBMIT_NAMES = ("pool-a", "pool-b", "pool-c")
POOL = (*SUBMIT_NAMES, "held-1", "held-2", "held-3")

# Placeholders replaced at send time by the example's real lease (or harmless fakes).
LEASE_ID = "\x00LEASE_ID\x00"
TOKEN = "\x00TOKEN\x00"
HEAD = "\x00HEAD\x00"

_unique = itertools.count(1)
_held = itertools.count(1)  # held-1, held-2, ...: the handoffs run_case leases out


# ---- the daemon under test ------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("fuzz-protocol")
    repo = make_repo(base / "repo")
    config = write_config(base, repo, merge="paused = true", extra=f"max_message_bytes = {LIMIT}")
    with pytest.MonkeyPatch.context() as mp:  # the daemon inherits a git identity
        for key, value in GIT_ENV.items():
            mp.setenv(key, value)
        daemon = Daemon(config, base / "daemon.log").start()
    yield daemon
    daemon.stop()


def _log_tail(daemon: Daemon, lines: int = 25) -> str:
    text = daemon.log_path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# ---- strategies -----------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text spliced verbatim into a frame (tokens json.dumps can't produce)."""

    text: bytes


def _nest(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "dict":
        return b'{"a":' * depth + b"0" + b"}" * depth
    return b'[{"a":' * (depth // 2) + b"1" + b"}]" * (depth // 2)


RAW_TOKENS = (
    b"NaN",
    b"-NaN",
    b"Infinity",
    b"-Infinity",
    b"nan",
    b"inf",
    b"1e999",
    b"-1e999",
    b"1E400",
    b"1e-400",
    b"-0",
    b"-0.0",
    b"0x10",
    b"01",
    b".5",
    b"1.",
    b"+1",
    b"True",
    b"None",
    b"undefined",
    b"'single'",
    b'"\\ud800"',
    b'"\\udfff\\ud800"',
    b'"\\ud800\\udc00"',
    b'"\\u0000"',
    b'"\\x41"',
    b'"tab\tinside"',
    b'"\xff\xfe"',
    b'"\xed\xa0\x80"',
    b'"\xc3\xa9"',
    b"[1,]",
    b'{"a":1,}',
    b"{,}",
    b"[",
    b"}",
    b"",
    b"1 2",
    b"/* comment */ 1",
    b'{"a":1,"a":2}',
    b"9" * 400,
    b"123456789012345678901234567890.5e-10",
    b"\xef\xbb\xbf1",
)

deep_nesting = st.one_of(
    st.builds(_nest, st.integers(1, 64), st.sampled_from(["list", "dict", "mixed"])),
    # Around Python's recursion limit (1000), where parsers and encoders give up.
    st.builds(_nest, st.integers(940, 1010), st.just("list")),
)
# Values that fill most of a frame on their own: used sparingly, or every frame is too long.
giant_values = st.one_of(
    st.sampled_from([b"-" + b"9" * 3000, b"1" + b"0" * 3900]),
    st.builds(_nest, st.integers(1900, 2040), st.just("list")),
).map(Raw)
raw_values = st.one_of(st.sampled_from(RAW_TOKENS), deep_nesting).map(Raw)

# Built from a list of characters: st.text() would drop the lone surrogates.
weird_text = st.lists(
    st.one_of(
        st.characters(),
        st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\n", "\u2028", "\ufeff"]),
        st.sampled_from(['"', "\\", "{", "}", "\r"]),
    ),
    max_size=12,
).map("".join)
huge_ints = st.one_of(
    st.sampled_from([2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**100, -(10**300)]),
    st.integers(19, 200).map(lambda n: 10**n - 1),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    huge_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    weird_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(weird_text, inner, max_size=3)
    ),
    max_leaves=8,
)
any_value = st.one_of(json_values, raw_values)


def _weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Pick a strategy with the given weights (``one_of`` treats repeated branches as one)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


def _either(*valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a plausible value for a field, sometimes anything at all."""
    return _weighted(*((2, v) for v in valid), (1, any_value))


def _params(
    required: dict[str, st.SearchStrategy[Any]] | None = None,
    optional: dict[str, st.SearchStrategy[Any]] | None = None,
) -> st.SearchStrategy[Any]:
    """Known keys plus, sometimes, unknown ones."""
    known = st.fixed_dictionaries(required or {}, optional=optional or {})
    extra = st.dictionaries(weird_text, json_values, max_size=2)
    return st.tuples(known, extra).map(lambda t: {**t[1], **t[0]})


lease_id = _either(st.just(LEASE_ID), st.just(LEASE_ID), weird_text)
token = _either(st.just(TOKEN), st.just(TOKEN), st.integers(-5, 5), huge_ints)
names = _either(st.sampled_from(POOL), weird_text)

handoff_docs = st.builds(
    handoff_doc,
    st.sampled_from((*SUBMIT_NAMES, "Bad Name", "../escape", "")),
    priority=st.sampled_from(["HIGH", "MEDIUM", "LOW", "URGENT"]),
    deps=st.sampled_from(["none", "pool-a", "pool-b", "ghost"]),
    labels=st.sampled_from(["", "python", "gpu, python"]),
)
mutated_docs = st.tuples(handoff_docs, st.integers(0, 500), st.integers(0, 40), weird_text).map(
    lambda t: t[0][: t[1]] + t[3] + t[0][t[1] + t[2] :]
)
handoff_objects = _either(
    _params(
        optional={
            "name": _either(st.sampled_from(SUBMIT_NAMES), weird_text),
            "title": _either(weird_text),
            "priority": _either(st.sampled_from(["HIGH", "low", "urgent"])),
            "dependencies": _either(st.lists(st.sampled_from(POOL), max_size=2)),
            "labels": _either(st.lists(weird_text, max_size=2)),
            "phases": _either(
                st.lists(
                    st.fixed_dictionaries(
                        {"name": weird_text, "objectives": st.lists(weird_text, max_size=2)}
                    ),
                    max_size=2,
                )
            ),
            "successMetrics": _either(
                st.lists(
                    st.fixed_dictionaries({"name": weird_text, "criteria": weird_text}),
                    max_size=2,
                )
            ),
        }
    )
)
progress = _either(
    st.none(),
    _params(
        optional={
            "percent": _either(st.integers(-10, 110), st.floats(allow_nan=False)),
            "phase": _either(weird_text),
            "message": _either(weird_text, st.integers(1990, 2010).map(lambda n: "m" * n)),
        }
    ),
)
report = _either(
    _params(
        optional={
            "status": _either(st.sampled_from(["completed", "failed", "blocked"])),
            "summary": _either(weird_text),
            "head": _either(st.just(HEAD), st.just(HEAD), st.sampled_from(["0" * 40, "HEAD"])),
            "phases": _either(st.lists(json_values, max_size=2)),
            "metrics": _either(st.lists(json_values, max_size=2)),
            "markdown": _either(weird_text),
        }
    )
)
held = {"leaseId": st.just(LEASE_ID), "token": st.just(TOKEN)}
plausible_report = st.fixed_dictionaries(
    {
        "status": st.sampled_from(["completed", "failed", "blocked"]),
        "head": st.sampled_from([HEAD, HEAD, "0" * 40]),
    },
    optional={
        "summary": weird_text,
        "markdown": weird_text,
        "phases": st.lists(json_values, max_size=2),
        "metrics": st.lists(json_values, max_size=2),
    },
)

PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "initialize": _params(
        optional={
            "protocolVersion": _either(
                st.just(1), st.just(1), st.sampled_from([0, 2, -1, "1", 1.0, True, None])
            ),
            "role": _either(
                st.sampled_from(["worker", "control"]),
                st.sampled_from(["", "admin", "Worker", None, 1, ["worker"]]),
            ),
            "client": _either(
                _params(optional={"name": _either(weird_text), "version": _either(weird_text)})
            ),
            "worker": _either(
                _params(
                    optional={
                        "name": _either(weird_text),
                        "labels": _either(st.lists(weird_text, max_size=3)),
                    }
                )
            ),
        }
    ),
    # waitS stays tiny (or invalid) so a long poll never outlasts the example.
    "lease.acquire": _params(
        optional={
            "waitS": _either(
                st.floats(0, 0.05),
                st.sampled_from([0, -1, -0.001, 300.5, 301, 1e308, "1", True, None]),
            )
        }
    ),
    # Half of the lease calls name the connection's real lease, so they get past the
    # fencing check to the progress, release and worktree checks behind it.
    "lease.heartbeat": st.one_of(
        _params({"leaseId": lease_id, "token": token}, optional={"progress": progress}),
        st.fixed_dictionaries(held, optional={"progress": progress}),
    ),
    "lease.release": st.one_of(
        _params({"leaseId": lease_id, "token": token}, optional={"reason": _either(weird_text)}),
        st.fixed_dictionaries(held, optional={"reason": weird_text}),
    ),
    "handoff.report": st.one_of(
        _params({"leaseId": lease_id, "token": token}, optional={"report": report}),
        st.fixed_dictionaries({**held, "report": plausible_report}),
    ),
    "handoff.submit": st.one_of(
        _params({"markdown": st.lists(_either(handoff_docs, mutated_docs), max_size=3)}),
        _params({"handoffs": st.lists(handoff_objects, max_size=3)}),
        _params(optional={"markdown": any_value, "handoffs": any_value}),
    ),
    "handoff.list": _params(optional={"state": _either(st.sampled_from(STATES), st.none())}),
    "handoff.get": _params(optional={"name": names}),
    "handoff.cancel": _params(optional={"name": names}),
    "handoff.retry": _params(optional={"name": names}),
    "status": _params(),
}

request_ids = st.one_of(st.integers(-(2**31), 2**31), weird_text, huge_ints)


def _encode(obj: Any) -> bytes:
    """``obj`` as one line of JSON, with every :class:`Raw` spliced in verbatim."""
    raws: list[bytes] = []

    def walk(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\x00RAW{len(raws) - 1}\x00"
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    data = json.dumps(walk(obj)).encode()  # ASCII: surrogates become \ud800 escapes
    for index, raw in enumerate(raws):
        data = data.replace(json.dumps(f"\x00RAW{index}\x00").encode(), raw)
    return data


@st.composite
def calls(draw: st.DrawFn, methods: st.SearchStrategy[str] | None = None) -> dict[str, Any]:
    """A well-formed envelope for a documented method, with random params and id."""
    method = draw(methods if methods is not None else st.sampled_from(METHODS))
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    shape = draw(st.sampled_from(["given", "given", "given", "omitted", "null"]))
    if shape == "given":
        message["params"] = draw(PARAMS[method])
    elif shape == "null":
        message["params"] = None
    if draw(st.integers(0, 3)):  # a quarter of them are notifications
        message["id"] = draw(request_ids)
    order = draw(st.permutations(list(message)))
    return {key: message[key] for key in order}


@st.composite
def bad_envelopes(draw: st.DrawFn) -> bytes:
    """Valid JSON (mostly) that is not a valid request: every field wrong in every way."""
    kind = draw(st.sampled_from(["non_object", "batch", "mutated", "mutated", "raw"]))
    if kind == "non_object":
        return _encode(draw(st.one_of(scalars, st.lists(json_values, max_size=3))))
    if kind == "batch":
        return _encode(draw(st.lists(calls(), max_size=3)))
    message = draw(calls())
    field_name = draw(st.sampled_from(["jsonrpc", "id", "method", "params", "extra"]))
    if kind == "raw":
        value = draw(_weighted((3, raw_values), (1, giant_values)))
        if field_name == "extra" and isinstance(message.get("params"), dict):
            key = draw(st.sampled_from(["waitS", "protocolVersion", "name", "leaseId", "token"]))
            message["params"][key] = value
        else:
            message[field_name] = value
        return _encode(message)
    if field_name == "jsonrpc":
        if draw(st.booleans()):
            del message["jsonrpc"]
        else:
            message["jsonrpc"] = draw(
                _either(st.sampled_from(["2", "1.0", "2.0 ", "", 2.0, 2, "2.0\x00", "２.0"]))
            )
    elif field_name == "id":
        message["id"] = draw(
            st.one_of(
                st.none(),
                st.booleans(),
                st.floats(),
                huge_ints,
                st.lists(scalars, max_size=2),
                st.dictionaries(weird_text, scalars, max_size=2),
                weird_text,
            )
        )
    elif field_name == "method":
        message["method"] = draw(
            _either(
                st.sampled_from(["", "lease.steal", "rpc.discover", "Status", "status ", "lease."]),
                weird_text,
            )
        )
    elif field_name == "params":
        message["params"] = draw(
            st.one_of(scalars, st.lists(json_values, max_size=3), st.just([]), st.just(""))
        )
    else:
        message[draw(weird_text)] = draw(json_values)
    return _encode(message)


small_bytes = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"", b" ", b"\t \r", b"\r", b"\xff", b"\x00", b"{}", b"[]", b"null"]),
)
# Frames around daemon.max_message_bytes; each one ends the connection, so they are rare.
near_limit_bytes = st.tuples(
    st.binary(min_size=1, max_size=8), st.integers(LIMIT - 8, LIMIT + 100)
).map(lambda t: (t[0] * (LIMIT + 100))[: t[1]].replace(b"\n", b" "))
WORKER_CALLS = ("lease.heartbeat", "lease.release", "handoff.report", "lease.acquire")
CONTROL_CALLS = (
    "handoff.submit",
    "handoff.list",
    "handoff.get",
    "handoff.cancel",
    "handoff.retry",
    "status",
)


@dataclass(frozen=True)
class Case:
    """One example: how the connection is prepared, then the frames sent on it."""

    setup: str  # "none", "worker", "control" or "lease" (a worker holding a real lease)
    frames: tuple[bytes, ...]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    setup = draw(st.sampled_from(["none", "none", "worker", "control", "lease"]))
    # Mostly the methods of the connection's role, so calls get past the role check.
    methods = {
        "none": st.sampled_from(METHODS),
        "worker": st.one_of(st.sampled_from(WORKER_CALLS), st.sampled_from(METHODS)),
        "control": st.one_of(st.sampled_from(CONTROL_CALLS), st.sampled_from(METHODS)),
        "lease": st.sampled_from(WORKER_CALLS),
    }[setup]
    frame = _weighted(
        (10, calls(methods).map(_encode)),
        (5, bad_envelopes()),
        (4, small_bytes),
        # One frame in 20 is around the size limit (most end the connection early).
        (1, near_limit_bytes),
    )
    frames = draw(st.lists(frame, min_size=1, max_size=6))
    if setup == "none" and draw(st.booleans()):
        # A good initialize somewhere: calls before it, and after it, in one connection.
        role = draw(st.sampled_from(["worker", "control"]))
        init = {
            "jsonrpc": "2.0",
            "id": draw(request_ids),
            "method": "initialize",
            "params": {"protocolVersion": 1, "role": role, "worker": {"name": "fuzz"}},
        }
        frames.insert(draw(st.integers(0, len(frames))), _encode(init))
    return Case(setup, tuple(f + b"\n" for f in frames))


# ---- what the daemon may answer -------------------------------------------------------


def _strict(line: bytes) -> Any:
    """JSON as the spec means it: UTF-8, no NaN/Infinity. Raises ValueError."""

    def constant(name: str) -> Any:
        raise ValueError(name)

    return json.loads(line.decode("utf-8"), parse_constant=constant)


def _deep_parse(parse: Callable[[bytes], Any], line: bytes) -> Any:
    """Parse with room for the deep nesting this module sends (the test's stack is deep)."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20_000))
    try:
        return parse(line)
    finally:
        sys.setrecursionlimit(old)


def _valid_id(obj: Any) -> tuple[bool, Any]:
    if not isinstance(obj, dict) or "id" not in obj:
        return False, None
    value = obj["id"]
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)), value


def _key(value: Any) -> str:
    return json.dumps(value)


def _depth(line: bytes) -> int:
    depth = deepest = 0
    for byte in line:
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


@dataclass
class Expectation:
    required: Counter[str] = field(default_factory=Counter)  # ids that must be answered
    optional: Counter[str] = field(default_factory=Counter)  # ids that may be answered
    nulls: int = 0  # replies with "id": null that some line may have earned
    oversized: bool = False  # a line longer than LIMIT: -32600, then the daemon hangs up
    may_close: bool = False  # a line of exactly LIMIT bytes: the daemon may hang up


def _long_poll(obj: dict[str, Any]) -> bool:
    params = obj.get("params")
    if obj.get("method") != "lease.acquire" or not isinstance(params, dict):
        return False
    wait = params.get("waitS")
    return isinstance(wait, (int, float)) and not isinstance(wait, bool) and wait > 1


def expectation(payload: bytes) -> Expectation:
    """What the daemon owes for ``payload`` (complete lines), per PROTOCOL.md / JSON-RPC."""
    expect = Expectation()
    for line in payload.split(b"\n")[:-1]:
        if len(line) > LIMIT:
            expect.oversized = True
            expect.nulls += 1
            break
        if len(line) == LIMIT:
            # "longer than max_message_bytes" is refused; exactly the limit may be either
            # way (it depends on whether the newline came in the same read).
            expect.may_close = True
            expect.nulls += 1
        if not line.strip():
            continue
        deep = _depth(line) > DEEP
        try:
            strict: Any = _deep_parse(_strict, line)
            parsed = True
        except (ValueError, RecursionError):
            strict, parsed = None, False
        has_id, value = _valid_id(strict)
        if parsed and has_id and not deep and not _long_poll(strict):
            expect.required[_key(value)] += 1
            continue
        if parsed and has_id:
            # Too deep for the daemon's parser (a -32700 with id null) or a long poll.
            expect.optional[_key(value)] += 1
            expect.nulls += deep
            continue
        # No valid id in valid JSON: an error (if any) has id null -- or the id the
        # daemon could still read from lenient JSON (NaN, a BOM, ...).
        expect.nulls += 1
        try:
            lenient: Any = _deep_parse(json.loads, line)
        except (ValueError, RecursionError):
            continue
        has_id, value = _valid_id(lenient)
        if has_id:
            expect.optional[_key(value)] += 1
    if expect.oversized or expect.may_close:
        # Closing the connection may cut off requests still in progress.
        expect.optional.update(expect.required)
        expect.required.clear()
    return expect


def check_message(line: bytes) -> dict[str, Any]:
    """One line from the daemon: a JSON-RPC 2.0 response (or a documented notification)."""
    try:
        message = _strict(line)
    except ValueError as exc:
        raise AssertionError(f"reply is not valid JSON ({exc}): {line!r}") from None
    assert isinstance(message, dict), f"reply is not an object: {line!r}"
    assert message.get("jsonrpc") == "2.0", f"reply without jsonrpc 2.0: {line!r}"
    if "method" in message and "id" not in message:
        assert message["method"] == "lease.revoked", f"undocumented notification: {line!r}"
        assert isinstance(message.get("params"), dict), line
        return message
    assert "id" in message, f"response without id: {line!r}"
    assert ("result" in message) != ("error" in message), f"need result xor error: {line!r}"
    if "error" in message:
        error = message["error"]
        assert isinstance(error, dict), f"error is not an object: {line!r}"
        code = error.get("code")
        assert isinstance(code, int) and not isinstance(code, bool), f"bad code: {line!r}"
        assert code in DOCUMENTED_CODES, f"undocumented error code {code}: {line!r}"
        assert isinstance(error.get("message"), str) and error["message"].strip(), (
            f"error without a message: {line!r}"
        )
    return message


# ---- talking to the daemon ------------------------------------------------------------


class Line:
    """A raw connection that returns lines as bytes, with a hard deadline per read."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(REPLY_DEADLINE_S)
        self.sock.connect(str(path))
        self.buffer = b""
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send; the daemon may hang up half-way (after an oversized frame)."""
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def readline(self) -> bytes | None:
        """The next line, or None at EOF. Raises TimeoutError when nothing comes in time."""
        while b"\n" not in self.buffer:
            if self.eof:
                return None
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.eof = True
                if self.buffer:  # a last line without its newline is still a violation
                    line, self.buffer = self.buffer, b""
                    return line
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def call(self, method: str, params: dict[str, Any], request_id: str) -> dict[str, Any]:
        """A setup call whose reply must arrive (other messages before it are checked)."""
        message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        self.send(_encode(message) + b"\n")
        while True:
            line = self.readline()
            assert line is not None, f"daemon hung up during setup {method}"
            message = check_message(line)
            if message.get("id") == request_id:
                return message


def _substitute(frame: bytes, lease: dict[str, Any] | None) -> bytes:
    lease_id = lease["id"] if lease else "l-fuzz-no-such-lease"
    fence = lease["token"] if lease else 1
    head = lease["baseCommit"] if lease else "0" * 40
    return (
        frame.replace(json.dumps(LEASE_ID).encode(), json.dumps(lease_id).encode())
        .replace(json.dumps(TOKEN).encode(), str(fence).encode())
        .replace(json.dumps(HEAD).encode(), json.dumps(head).encode())
    )


def _status_from_another_peer(daemon: Daemon) -> None:
    conn = Line(daemon.socket)
    try:
        init = conn.call("initialize", {"protocolVersion": 1, "role": "control"}, "init")
        assert "result" in init, init
        reply = conn.call("status", {}, "status")
        assert "counts" in reply.get("result", {}), reply
    finally:
        conn.close()


def run_case(daemon: Daemon, case: Case) -> None:
    conn = Line(daemon.socket)
    try:
        lease: dict[str, Any] | None = None
        if case.setup != "none":
            role = "control" if case.setup == "control" else "worker"
            params = {"protocolVersion": 1, "role": role, "worker": {"name": "fuzz"}}
            init = conn.call("initialize", params, "setup-init")
            assert "result" in init, init
        if case.setup == "lease":
            name = f"held-{next(_held)}"
            control(daemon.socket, "handoff.submit", {"markdown": [handoff_doc(name)]})
            acquired = conn.call("lease.acquire", {"waitS": 5}, "setup-acquire")
            assert "result" in acquired, acquired
            lease = acquired["result"]["lease"]
        sentinel = f"sentinel-{next(_unique)}"
        sentinel_frame = _encode(
            {"jsonrpc": "2.0", "id": sentinel, "method": "status", "params": {}}
        )
        payload = b"".join(_substitute(f, lease) for f in case.frames) + sentinel_frame + b"\n"
        expect = expectation(payload)  # the sentinel is required unless the daemon hangs up
        conn.send(payload)

        received: list[dict[str, Any]] = []
        answered: Counter[str] = Counter()
        closing = expect.oversized or expect.may_close
        while True:
            # Done when the sentinel and every request owed a reply are answered; after
            # an oversized frame, only when the daemon has hung up as PROTOCOL.md says.
            if (
                not expect.oversized
                and answered[_key(sentinel)]
                and all(answered[k] >= n for k, n in expect.required.items())
            ):
                break
            try:
                line = conn.readline()
            except TimeoutError:
                missing = {
                    k: n - answered[k] for k, n in expect.required.items() if answered[k] < n
                }
                waiting_for = (
                    "the daemon to close the connection after an oversized frame"
                    if expect.oversized
                    else f"replies to ids {missing or {_key(sentinel): 1}}"
                )
                raise AssertionError(
                    f"hang: waited {REPLY_DEADLINE_S} s for {waiting_for}\n"
                    f"payload={payload!r}\nreceived={received!r}\n"
                    f"daemon log:\n{_log_tail(daemon)}"
                ) from None
            if line is None:
                assert closing, (
                    "the daemon closed the connection without an oversized frame\n"
                    f"payload={payload!r}\nreceived={received!r}\n"
                    f"daemon log:\n{_log_tail(daemon)}"
                )
                break
            message = check_message(line)
            if "method" in message and "id" not in message:
                continue  # lease.revoked
            received.append(message)
            if message["id"] is not None:
                answered[_key(message["id"])] += 1

        # What the examples reached (shown by --hypothesis-show-statistics).
        event(f"setup {case.setup}" + (" (lease held)" if lease else ""))
        for message in received:
            event(f"error {message['error']['code']}" if "error" in message else "result")
        if expect.oversized:
            event("connection closed by an oversized frame")

        # Every reply answers something that was sent, as often as it was sent.
        nulls = sum(1 for m in received if m["id"] is None)
        assert nulls <= expect.nulls, (
            f"{nulls} replies with id null for {expect.nulls} lines that could earn one; "
            "an error to a request with a valid id must echo the id\n"
            f"payload={payload!r}\nreceived={received!r}"
        )
        for key, count in answered.items():
            allowed = expect.required[key] + expect.optional[key]
            assert count <= allowed, (
                f"id {key} answered {count} times, sent {allowed} times\n"
                f"payload={payload!r}\nreceived={received!r}"
            )
        if expect.oversized:
            assert any(
                m["id"] is None and m.get("error", {}).get("code") == -32600 for m in received
            ), f"an oversized frame got no -32600\npayload={payload!r}\nreceived={received!r}"
    finally:
        conn.close()

    assert daemon.process is not None
    assert daemon.process.poll() is None, (
        f"the daemon died (exit {daemon.process.returncode})\ndaemon log:\n{_log_tail(daemon)}"
    )
    _status_from_another_peer(daemon)


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(case=cases())
def test_fuzz_protocol(fuzz_daemon: Daemon, case: Case) -> None:
    run_case(fuzz_daemon, case)


# ---- raw random bytes ------------------------------------------------------------------

RAW_CONNECTIONS = int(os.environ.get("FUZZ_RAW_CONNECTIONS", "400"))
RAW_SEED = int(os.environ.get("FUZZ_SEED", "1"))
VALID_FRAMES = [
    b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":1,'
    b'"role":"worker","worker":{"name":"raw","labels":[]}}}',
    b'{"jsonrpc":"2.0","id":2,"method":"initialize","params":{"protocolVersion":1,'
    b'"role":"control"}}',
    b'{"jsonrpc":"2.0","id":3,"method":"status","params":{}}',
    b'{"jsonrpc":"2.0","id":4,"method":"handoff.list","params":{"state":null}}',
    b'{"jsonrpc":"2.0","id":5,"method":"handoff.get","params":{"name":"held-1"}}',
    b'{"jsonrpc":"2.0","id":6,"method":"lease.heartbeat","params":{"leaseId":"l-1","token":1}}',
    b'{"jsonrpc":"2.0","id":7,"method":"lease.acquire","params":{"waitS":0}}',
]


def _raw_payload(rng: random.Random) -> bytes:
    """Noise, or valid frames with bytes flipped, cut, duplicated and glued together."""
    if rng.random() < 0.3:
        # Up to past daemon.max_message_bytes (LIMIT), so some frames are oversized.
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 6000)))
    out = bytearray()
    for _ in range(rng.randint(1, 6)):
        frame = bytearray(rng.choice(VALID_FRAMES))
        for _ in range(rng.randint(0, 6)):
            at = rng.randrange(len(frame))
            op = rng.random()
            if op < 0.5:
                frame[at] ^= 1 << rng.randrange(8)
            elif op < 0.7:
                del frame[at : at + rng.randint(1, 20)]
            elif op < 0.9:
                frame[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                frame[at:at] = frame[: rng.randint(1, 40)]
        out += frame + rng.choice([b"\n", b"\n", b"\r\n", b"", b"\n\n"])
    return bytes(out)


def test_fuzz_protocol_raw_random_bytes(fuzz_daemon: Daemon) -> None:
    """Seeded random bytes, sent in random-sized pieces on fresh connections: every line
    back is a documented JSON-RPC reply, and the daemon and its store stay whole."""
    daemon = fuzz_daemon
    rng = random.Random(RAW_SEED)
    sent = 0
    codes: Counter[str] = Counter()
    for _ in range(RAW_CONNECTIONS):
        payload = _raw_payload(rng)
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(REPLY_DEADLINE_S)
        sock.connect(str(daemon.socket))
        try:
            rest = payload + b"\n"
            try:
                while rest:
                    cut = rng.randint(1, 512)
                    piece, rest = rest[:cut], rest[cut:]
                    sock.sendall(piece)
                    sent += len(piece)
                sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon hung up after an oversized frame: allowed
            data = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                data += chunk
        finally:
            sock.close()
        for line in data.split(b"\n"):
            if line:
                message = check_message(line)
                codes[str(message["error"]["code"]) if "error" in message else "result"] += 1
        assert daemon.process is not None and daemon.process.poll() is None, _log_tail(daemon)
    _status_from_another_peer(daemon)
    db = sqlite3.connect(f"file:{daemon.socket.parent / 'orchestrator.sqlite3'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    print(f"raw protocol fuzz: {RAW_CONNECTIONS} connections, {sent} bytes, replies {dict(codes)}")
