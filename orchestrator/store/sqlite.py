"""Durable state in SQLite (WAL): handoffs, leases, reports, gate runs, merges and events.

Every method is one transaction, so a state change is either wholly on disk or not at all;
a reply that says "accepted" is sent only after the transaction committed with
``synchronous=FULL``. Methods are blocking: the daemon calls them from a worker thread, one
at a time (the store's connection is not shared concurrently), which also makes each
read-modify-write here atomic with respect to every other.

The state machine of a handoff::

    waiting -> queued -> leased -> reported -> gating -> merged
                  ^         |                     |
                  +---------+ (expired/released)  +-> conflict / failed -> queued (requeue)
    any live state -> cancelled;  failed/conflict/cancelled -> queued (retry)
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.protocol.asking import OpenQuestion, Question, needs_input_to_wire
from orchestrator.protocol.jsonrpc import rfc3339

STATES = (
    "queued",
    "waiting",
    "leased",
    "reported",
    "gating",
    "merged",
    "conflict",
    "failed",
    "cancelled",
)
LIVE_STATES = ("queued", "waiting", "leased", "reported", "gating")
RETRYABLE_STATES = ("failed", "conflict", "cancelled")
PRIORITY_RANK = {"HIGH": 0, "MEDIUM": 1, "LOW": 2}
# A granted lease does not expire while its worktree is being prepared (the TTL starts
# when the worker gets it); this bounds how long a preparation may take.
PREPARE_GRACE_S = 900.0
SCHEMA_VERSION = 1
# How a lease's end reason reads in a -32001 message.
END_REASONS = {
    "max_duration": "held longer than leases.max_duration_s",
    "worktree_missing": "its worktree was deleted",
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS handoffs (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    title TEXT NOT NULL,
    priority TEXT NOT NULL,
    priority_rank INTEGER NOT NULL,
    dependencies TEXT NOT NULL,
    labels TEXT NOT NULL,
    body TEXT NOT NULL,
    wire TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    attempt_limit INTEGER NOT NULL,
    progress TEXT,
    feedback TEXT,
    detail TEXT,
    conflicts TEXT,
    report_seq INTEGER,
    merge_commit TEXT,
    submitted_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    merged_at REAL
);
CREATE INDEX IF NOT EXISTS handoffs_state ON handoffs(state, priority_rank, seq);
-- For the metrics' "oldest in each state": one index probe per state, whatever the backlog.
CREATE INDEX IF NOT EXISTS handoffs_state_since ON handoffs(state, updated_at);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    token INTEGER NOT NULL UNIQUE,
    handoff TEXT NOT NULL REFERENCES handoffs(name),
    worker TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    granted_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    base_commit TEXT,
    worktree TEXT,
    branch TEXT,
    ended_at REAL,
    end_reason TEXT
);
CREATE INDEX IF NOT EXISTS leases_active ON leases(ended_at, expires_at);
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY,
    handoff TEXT NOT NULL REFERENCES handoffs(name),
    lease_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,
    summary TEXT NOT NULL,
    head TEXT NOT NULL,
    report TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gate_runs (
    id INTEGER PRIMARY KEY,
    handoff TEXT NOT NULL REFERENCES handoffs(name),
    attempt INTEGER NOT NULL,
    candidate TEXT NOT NULL,
    gate TEXT NOT NULL,
    exit_status INTEGER,
    timed_out INTEGER NOT NULL,
    duration_s REAL NOT NULL,
    output_tail TEXT NOT NULL,
    started_at REAL NOT NULL
);
-- Gate passes by the tree gated and the gate's fingerprint (argv, environment, timeout):
-- the same tree under the same gate passes again, so it is never run twice. Created by
-- CREATE TABLE IF NOT EXISTS, which is also the migration of a store that predates it.
CREATE TABLE IF NOT EXISTS gate_cache (
    tree TEXT NOT NULL,
    gate_key TEXT NOT NULL,
    gate TEXT NOT NULL,
    handoff TEXT NOT NULL,
    candidate TEXT NOT NULL,
    duration_s REAL NOT NULL,
    passed_at REAL NOT NULL,
    PRIMARY KEY (tree, gate_key)
);
CREATE TABLE IF NOT EXISTS merges (
    id INTEGER PRIMARY KEY,
    handoff TEXT NOT NULL REFERENCES handoffs(name),
    attempt INTEGER NOT NULL,
    result TEXT NOT NULL,
    base TEXT,
    candidate TEXT,
    detail TEXT NOT NULL DEFAULT '',
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    handoff TEXT,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""
# Asking a person (capability "ask"). A table of its own, created on open like the rest:
# a store written before it gains the empty table, so no data migration is needed and an
# older daemon simply ignores it. `closed_at` is set when answered or when a newer question
# of the same lease replaces it; `delivered_at` once its worker has the answer.
QUESTIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS questions (
    id INTEGER PRIMARY KEY,
    handoff TEXT NOT NULL REFERENCES handoffs(name),
    lease_id TEXT NOT NULL REFERENCES leases(id),
    question TEXT NOT NULL,
    choices TEXT,
    asked_at REAL NOT NULL,
    answer TEXT,
    closed_at REAL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS questions_open ON questions(closed_at, handoff);
CREATE INDEX IF NOT EXISTS questions_lease ON questions(lease_id, delivered_at);
"""


class StoreError(Exception):
    """Base of the store's refusals; each maps to one protocol error code."""


class StateLocked(StoreError):
    """Another daemon holds the state directory."""


class StoreFull(StoreError):
    """The store could not write: its disk is full (or the file hit a size limit).

    Nothing was changed (the transaction rolled back). Reads still work, so the daemon
    keeps answering status and lookups and refuses only what would write."""

    # What a refused request's error data says (``{"reason": ...}``), and the log event.
    reason = "store_full"


class StoreBusy(StoreFull):
    """Another process has held the store's write lock for longer than the daemon waits.

    Waited out like a full disk: nothing was changed, reads still work, writes are refused
    until the lock is free again."""

    reason = "store_locked"


class StoreCorrupt(StoreError):
    """The store's file is not a readable SQLite database; start-up stops."""


class UnknownHandoff(StoreError):
    pass


class DuplicateHandoff(StoreError):
    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        super().__init__(
            "handoff name already submitted: "
            + ", ".join(self.names)
            + " (choose another name, or `orchestrator retry` the existing one)"
        )


class InvalidSubmission(StoreError):
    def __init__(self, problems: Sequence[dict[str, Any]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p.get("message")) for p in self.problems))


class LeaseNotHeld(StoreError):
    pass


class NothingAsked(StoreError):
    """``handoff.answer`` for a handoff whose agent is not waiting for an answer."""


class InvalidTransition(StoreError):
    pass


# The detail of a pending landing while the merge queue moves the branch to it.
_MOVING = "moving the integration branch to this candidate"


@dataclass(frozen=True)
class NewHandoff:
    """A validated handoff ready to store (the caller parsed and checked it)."""

    name: str
    title: str
    priority: str
    dependencies: tuple[str, ...]
    labels: tuple[str, ...]
    body: str
    wire: dict[str, Any]


@dataclass(frozen=True)
class Grant:
    """A lease just granted: what the daemon needs to prepare the worktree and reply."""

    lease_id: str
    token: int
    handoff: str
    attempt: int
    expires_at: float
    wire: dict[str, Any]
    feedback: dict[str, Any] | None


@dataclass(frozen=True)
class Expired:
    lease_id: str
    handoff: str
    new_state: str
    # "expired" (no heartbeat within the TTL) or "max_duration" (held too long).
    reason: str = "expired"


@dataclass(frozen=True)
class CachedGatePass:
    """A gate that already passed on the same tree under the same fingerprint."""

    gate: str
    handoff: str
    candidate: str
    duration_s: float
    passed_at: float


@dataclass(frozen=True)
class MergeJob:
    """The next reported handoff the merge queue should integrate."""

    name: str
    title: str
    attempt: int
    submitted_at: float
    head: str
    summary: str


def lock_state_dir(state_dir: Path) -> int:
    """Take the exclusive lock that makes a second daemon on ``state_dir`` refuse to start.

    ``flock`` is released by the kernel when the process dies, so a crash never leaves a
    stale lock behind (unlike a pid file). Returns the fd to keep open."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "daemon.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise StateLocked(
            f"another orchestrator daemon (pid {holder}) is already using state dir "
            f"{state_dir}; stop it first, or give this one its own daemon.state_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# SQLite primary result codes: SQLITE_FULL, and SQLITE_IOERR (a write refused outright,
# e.g. EFBIG past RLIMIT_FSIZE, is an I/O error rather than "full").
_SQLITE_IOERR, _SQLITE_FULL = 10, 13


_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26
# How long a write waits for another process's lock before it is refused (StoreBusy).
WRITE_LOCK_WAIT_S = 30.0
# Once a write was refused so, the next ones wait only this long until one succeeds: the
# store's single lane must stay free for reads meanwhile.
CONTENDED_LOCK_WAIT_S = 0.1


def _sqlite_code(exc: sqlite3.DatabaseError) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    return None if code is None else int(code) & 0xFF


def _locked(exc: sqlite3.DatabaseError) -> bool:
    code = _sqlite_code(exc)
    if code is not None:
        return code in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return "database is locked" in str(exc) or "database table is locked" in str(exc)


def _corrupt(exc: sqlite3.DatabaseError) -> bool:
    code = _sqlite_code(exc)
    if code is not None:
        return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    return "file is not a database" in str(exc) or "malformed" in str(exc)


def _cannot_write(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (_SQLITE_FULL, _SQLITE_IOERR)
    text = str(exc)
    return "database or disk is full" in text or "disk I/O error" in text


def _add_lease_uid(conn: sqlite3.Connection) -> None:
    # A lease is bound to the uid that acquired it as well as to its worker name; stores
    # made before that get the column (NULL: bound by name only, as they were).
    columns = {row[1] for row in conn.execute("PRAGMA table_info(leases)")}
    if "uid" not in columns:
        conn.execute("ALTER TABLE leases ADD COLUMN uid INTEGER")


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, allow_nan=False, sort_keys=True)


def new_lease_id() -> str:
    # Time-prefixed so ids sort by grant time in logs; random part makes them unguessable.
    return f"l-{int(time.time() * 1000):x}{secrets.token_hex(6)}"


def _private(path: Path) -> None:
    """Create the store file 0600 (SQLite gives its -wal and -shm the same mode): the
    daemon's umask (0007 under systemd) would leave it group-writable, and agents of other
    uids must not read it. An existing one readable by others loses those bits."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        mode = os.stat(path).st_mode
        if mode & 0o007:
            os.chmod(path, stat.S_IMODE(mode) & ~0o007)
    else:
        os.close(fd)


class Store:
    """The SQLite store. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, lock_wait_s: float = WRITE_LOCK_WAIT_S
    ) -> None:
        self._conn = conn
        self.path = path
        self._lock_wait_s = lock_wait_s
        self._lock_contended = False

    @classmethod
    def open(cls, path: Path, *, lock_wait_s: float = WRITE_LOCK_WAIT_S) -> Store:
        """Open (or create) the store; a file that is not a readable SQLite database raises
        :class:`StoreCorrupt` with what to do about it."""
        try:
            return cls._open(path, lock_wait_s)
        except sqlite3.DatabaseError as exc:
            if _corrupt(exc):
                raise StoreCorrupt(
                    f"the store {path} is not a readable SQLite database ({exc}); the daemon "
                    f"did not start and changed nothing. Move it aside (with any {path.name}-wal "
                    f"and {path.name}-shm beside it), e.g. `mv {path} {path}.corrupt`, then "
                    f"restore {path} from a backup, or start again with an empty store (the "
                    f"handoffs it held are then lost; `sqlite3 {path}.corrupt .recover` may "
                    "salvage them)"
                ) from exc
            if _locked(exc):
                raise StoreBusy(
                    f"the store {path} is locked by another process ({exc}); stop whatever "
                    "holds it open (e.g. an sqlite3 shell in a transaction) and start again"
                ) from exc
            raise StoreError(f"cannot open the store {path}: {exc}") from exc

    @classmethod
    def _open(cls, path: Path, lock_wait_s: float) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        _private(path)
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=lock_wait_s
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is fsynced before we reply "accepted" (NORMAL could lose the last
        # transactions on power loss in WAL mode).
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        _add_lease_uid(conn)
        conn.executescript(QUESTIONS_SCHEMA)
        store = cls(conn, path, lock_wait_s)
        with store._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                c.execute("INSERT INTO meta VALUES ('fencing_token', '0')")
                c.execute("INSERT INTO meta VALUES ('report_seq', '0')")
                c.execute("INSERT INTO meta VALUES ('handoff_seq', '0')")
            elif int(row["value"]) > SCHEMA_VERSION:
                raise StoreError(
                    f"{path} was written by a newer orchestrator (schema {row['value']}); "
                    "upgrade this one"
                )
        return store

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so a read-then-write can't be
        # interleaved with another writer (e.g. a CLI reading while the daemon writes).
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
                if self._lock_contended:
                    self._lock_contended = False
                    self._set_lock_wait(self._lock_wait_s)
            except BaseException:
                # Also after a failed COMMIT: a transaction left open would make every
                # later BEGIN fail.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            if _locked(exc):
                if not self._lock_contended:
                    self._lock_contended = True
                    self._set_lock_wait(CONTENDED_LOCK_WAIT_S)
                raise StoreBusy(
                    f"the store {self.path} is locked by another process ({exc}), for more "
                    f"than {self._lock_wait_s:g} s. Nothing was changed; new work is refused "
                    "until the lock is released, while status and lookups keep working. "
                    "Find the holder with `fuser` or `lsof` on the file"
                ) from exc
            if _cannot_write(exc):
                code = getattr(exc, "sqlite_errorcode", _SQLITE_FULL) & 0xFF
                cause = (
                    "its disk is full"
                    if code == _SQLITE_FULL
                    else "a write failed: the disk is full, the file hit a size limit, or "
                    "the disk is failing (see the kernel log)"
                )
                raise StoreFull(
                    f"the store {self.path} cannot be written ({exc}): {cause}. Nothing was "
                    "changed; new work is refused until writes work again, while status "
                    "and lookups keep working"
                ) from exc
            raise

    def _set_lock_wait(self, seconds: float) -> None:
        self._conn.execute(f"PRAGMA busy_timeout = {int(seconds * 1000)}")

    def _event(
        self, c: sqlite3.Connection, now: float, handoff: str | None, kind: str, **detail: Any
    ) -> None:
        c.execute(
            "INSERT INTO events(at, handoff, kind, detail) VALUES (?,?,?,?)",
            (now, handoff, kind, json.dumps(detail, allow_nan=False, sort_keys=True)),
        )

    def _counter(self, c: sqlite3.Connection, key: str) -> int:
        c.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = ?", (key,))
        return int(c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def _row(self, c: sqlite3.Connection, name: str) -> sqlite3.Row:
        row = c.execute("SELECT * FROM handoffs WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownHandoff(f"unknown handoff {name!r} (see `orchestrator status`)")
        return row  # type: ignore[no-any-return]

    def _set_state(
        self, c: sqlite3.Connection, name: str, state: str, now: float, **fields: Any
    ) -> None:
        assigns = ", ".join(f"{k} = ?" for k in fields)
        extra = f", {assigns}" if assigns else ""
        sql = f"UPDATE handoffs SET state = ?, updated_at = ?{extra} WHERE name = ?"
        c.execute(sql, (state, now, *fields.values(), name))
        self._event(c, now, name, "state", state=state)

    # ---- submission -------------------------------------------------------------------

    def submit(self, handoffs: Sequence[NewHandoff], *, max_attempts: int, now: float) -> list[str]:
        """Store all of ``handoffs`` or none of them."""
        with self._tx() as c:
            names = [h.name for h in handoffs]
            dupes = sorted({n for n in names if names.count(n) > 1})
            existing = [
                n
                for n in names
                if c.execute("SELECT 1 FROM handoffs WHERE name = ?", (n,)).fetchone()
            ]
            if dupes or existing:
                raise DuplicateHandoff(sorted(set(dupes) | set(existing)))
            batch = {h.name: h for h in handoffs}
            problems: list[dict[str, Any]] = []
            for h in handoffs:
                for dep in h.dependencies:
                    if dep in batch:
                        continue
                    if not c.execute("SELECT 1 FROM handoffs WHERE name = ?", (dep,)).fetchone():
                        problems.append(
                            {
                                "line": 0,
                                "handoff": h.name,
                                "message": f"{h.name} depends on unknown handoff {dep!r}: "
                                "submit it first or in the same batch",
                            }
                        )
            cycle = _find_cycle({h.name: h.dependencies for h in handoffs})
            if cycle:
                problems.append(
                    {
                        "line": 0,
                        "handoff": cycle[0],
                        "message": "dependency cycle: " + " -> ".join(cycle),
                    }
                )
            if problems:
                raise InvalidSubmission(problems)
            for h in handoffs:
                seq = self._counter(c, "handoff_seq")
                c.execute(
                    "INSERT INTO handoffs(name, seq, title, priority, priority_rank, dependencies,"
                    " labels, body, wire, state, attempt, attempt_limit, submitted_at, updated_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        h.name,
                        seq,
                        h.title,
                        h.priority,
                        PRIORITY_RANK[h.priority],
                        json.dumps(list(h.dependencies)),
                        json.dumps(list(h.labels)),
                        h.body,
                        json.dumps(h.wire, allow_nan=False),
                        "waiting",
                        1,
                        max_attempts,
                        now,
                        now,
                    ),
                )
                self._event(c, now, h.name, "submitted", priority=h.priority)
            self._release_waiting(c, now)
            return names

    def _release_waiting(self, c: sqlite3.Connection, now: float) -> list[str]:
        """Move ``waiting`` handoffs whose dependencies are all merged to ``queued``."""
        merged = {r[0] for r in c.execute("SELECT name FROM handoffs WHERE state = 'merged'")}
        released = []
        for row in c.execute(
            "SELECT name, dependencies FROM handoffs WHERE state = 'waiting'"
        ).fetchall():
            if set(json.loads(row["dependencies"])) <= merged:
                self._set_state(c, row["name"], "queued", now)
                released.append(row["name"])
        return released

    # ---- leases -----------------------------------------------------------------------

    def grant(
        self,
        *,
        worker: str,
        labels: Iterable[str],
        ttl_s: float,
        now: float,
        uid: int | None = None,
    ) -> Grant | None:
        """Lease the first dispatchable handoff the worker's labels allow, or None.

        Order: priority (HIGH first), then submission order."""
        worker_labels = set(labels)
        with self._tx() as c:
            for row in c.execute(
                "SELECT * FROM handoffs WHERE state = 'queued' ORDER BY priority_rank, seq"
            ).fetchall():
                if not set(json.loads(row["labels"])) <= worker_labels:
                    continue
                token = self._counter(c, "fencing_token")
                lease_id = new_lease_id()
                expires = now + ttl_s + PREPARE_GRACE_S
                c.execute(
                    "INSERT INTO leases(id, token, handoff, worker, attempt, granted_at,"
                    " expires_at, uid) VALUES (?,?,?,?,?,?,?,?)",
                    (lease_id, token, row["name"], worker, row["attempt"], now, expires, uid),
                )
                self._set_state(c, row["name"], "leased", now, progress=None)
                self._event(
                    c,
                    now,
                    row["name"],
                    "lease_granted",
                    lease=lease_id,
                    token=token,
                    worker=worker,
                    attempt=row["attempt"],
                )
                return Grant(
                    lease_id=lease_id,
                    token=token,
                    handoff=row["name"],
                    attempt=row["attempt"],
                    expires_at=expires,
                    wire=json.loads(row["wire"]),
                    feedback=_loads(row["feedback"]),
                )
        return None

    def queued_label_sets(self) -> set[frozenset[str]]:
        """The label sets of the queued handoffs: a worker whose labels hold none of them
        would find nothing to lease (a read, no write lock)."""
        rows = self._conn.execute("SELECT DISTINCT labels FROM handoffs WHERE state = 'queued'")
        return {frozenset(json.loads(r[0])) for r in rows.fetchall()}

    def set_lease_workspace(
        self, lease_id: str, *, base_commit: str, worktree: str, branch: str, expires_at: float
    ) -> None:
        """Record the prepared worktree and start the lease's TTL."""
        with self._tx() as c:
            updated = c.execute(
                "UPDATE leases SET base_commit = ?, worktree = ?, branch = ?, expires_at = ?"
                " WHERE id = ? AND ended_at IS NULL",
                (base_commit, worktree, branch, expires_at, lease_id),
            ).rowcount
            if updated != 1:
                raise LeaseNotHeld(f"lease {lease_id} ended while its worktree was prepared")

    def abandon_grant(self, lease_id: str, *, reason: str, now: float) -> None:
        """A lease the worker never received: end it and put the handoff back in the queue
        without spending an attempt (it was the daemon's failure, not the agent's)."""
        with self._tx() as c:
            lease = c.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if lease is None or lease["ended_at"] is not None:
                return
            self._end_lease(c, lease_id, "abandoned", now)
            self._event(c, now, lease["handoff"], "lease_abandoned", lease=lease_id, reason=reason)
            if self._row(c, lease["handoff"])["state"] == "leased":
                self._set_state(c, lease["handoff"], "queued", now, detail=reason)

    def _held(
        self,
        c: sqlite3.Connection,
        lease_id: str,
        token: int,
        now: float,
        worker: str | None = None,
        uid: int | None = None,
    ) -> sqlite3.Row:
        row = c.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
        if row is None:
            raise LeaseNotHeld(f"lease {lease_id} does not exist")
        if uid is not None and row["uid"] is not None and row["uid"] != uid:
            # The uid comes from the kernel (SO_PEERCRED): another user that learnt the
            # lease's id and token, and even its worker name, still cannot use it.
            raise LeaseNotHeld(
                f"lease {lease_id} was granted to another uid, not {uid}; "
                "a worker may only use the leases it acquired"
            )
        if worker is not None and row["worker"] != worker:
            # Lease ids are unguessable, but a log line or a shared file can leak one: a
            # lease is used only by the worker (by name) that acquired it.
            raise LeaseNotHeld(
                f"lease {lease_id} was granted to worker {row['worker']!r}, not {worker!r}; "
                "a worker may only use the leases it acquired"
            )
        if row["token"] != token:
            # Never the right token in the message: whoever guessed or leaked the id would
            # learn the one secret that makes them the holder.
            raise LeaseNotHeld(
                f"lease {lease_id} is not held with token {token}: a stale or wrong "
                "fencing token; stop working on it and acquire a new lease"
            )
        if row["ended_at"] is not None:
            why = END_REASONS.get(row["end_reason"], row["end_reason"])
            raise LeaseNotHeld(
                f"lease {lease_id} is no longer held ({why}); stop working on "
                "it and acquire a new lease"
            )
        if row["expires_at"] <= now:
            raise LeaseNotHeld(
                f"lease {lease_id} expired (no heartbeat within the TTL); acquire a new lease"
            )
        return row  # type: ignore[no-any-return]

    def lease(self, lease_id: str, token: int, *, now: float) -> dict[str, Any]:
        """The lease row if it is held with this token; raises :class:`LeaseNotHeld`."""
        with self._tx() as c:
            return dict(self._held(c, lease_id, token, now))

    def renew(
        self,
        lease_id: str,
        token: int,
        *,
        ttl_s: float,
        progress: dict[str, Any] | None,
        now: float,
        worker: str | None = None,
        uid: int | None = None,
    ) -> float:
        """Extend a held lease by ``ttl_s``; with ``worker`` (and ``uid``), only for the
        worker (and uid) that acquired it.

        The one commit not fsynced before the reply (``synchronous=NORMAL``): a renewal
        lost to a power cut costs nothing, since ``recover`` gives every open lease a full
        TTL at start-up, and the WAL keeps it in order behind every durable commit. On a
        disk shared with busy neighbours an fsync takes up to hundreds of ms, and 16
        leases heartbeating queued their fsyncs on the store's one lane (p99 > 100 ms)."""
        self._conn.execute("PRAGMA synchronous=NORMAL")
        try:
            with self._tx() as c:
                row = self._held(c, lease_id, token, now, worker, uid)
                expires = now + ttl_s
                c.execute("UPDATE leases SET expires_at = ? WHERE id = ?", (expires, lease_id))
                if progress is not None:
                    c.execute(
                        "UPDATE handoffs SET progress = ?, updated_at = ? WHERE name = ?",
                        (_dumps(progress), now, row["handoff"]),
                    )
                return expires
        finally:
            self._conn.execute("PRAGMA synchronous=FULL")

    def _end_lease(self, c: sqlite3.Connection, lease_id: str, reason: str, now: float) -> None:
        c.execute(
            "UPDATE leases SET ended_at = ?, end_reason = ? WHERE id = ?", (now, reason, lease_id)
        )

    def _requeue(
        self,
        c: sqlite3.Connection,
        row: sqlite3.Row,
        now: float,
        *,
        feedback: dict[str, Any] | None,
        detail: str,
    ) -> str:
        """Another attempt if the budget allows, else ``failed``. Returns the new state."""
        if row["attempt"] >= row["attempt_limit"]:
            self._set_state(
                c,
                row["name"],
                "failed",
                now,
                detail=f"{detail}; gave up after {row['attempt']} attempt(s)",
                feedback=_dumps(feedback),
            )
            return "failed"
        self._set_state(
            c,
            row["name"],
            "queued",
            now,
            attempt=row["attempt"] + 1,
            feedback=_dumps(feedback),
            detail=detail,
        )
        return "queued"

    def expire_due(self, *, now: float, max_duration_s: float | None = None) -> list[Expired]:
        """End every lease past its expiry, or (with ``max_duration_s``) held longer than
        that since it was granted however often it was renewed, and re-queue (or fail)
        its handoff."""
        out = []
        # 1e300 s stands for "no bound". A lease still being prepared has no worktree
        # yet: PREPARE_GRACE_S bounds that stretch instead.
        longest = max_duration_s or 1e300
        with self._tx() as c:
            for lease in c.execute(
                "SELECT * FROM leases WHERE ended_at IS NULL"
                " AND (expires_at <= ? OR (worktree IS NOT NULL AND granted_at + ? <= ?))",
                (now, longest, now),
            ).fetchall():
                too_long = lease["expires_at"] > now
                reason = "max_duration" if too_long else "expired"
                self._end_lease(c, lease["id"], reason, now)
                row = self._row(c, lease["handoff"])
                self._event(c, now, row["name"], "lease_" + reason, lease=lease["id"])
                state = row["state"]
                if state == "leased":
                    detail = (
                        f"lease {lease['id']} held for more than leases.max_duration_s "
                        f"({longest:g} s) without a report; revoked"
                        if too_long
                        else f"lease {lease['id']} expired"
                    )
                    # Keep whatever feedback the attempt had: the next agent still needs it.
                    state = self._requeue(
                        c, row, now, feedback=_loads(row["feedback"]), detail=detail
                    )
                out.append(Expired(lease["id"], row["name"], state, reason))
        return out

    def release(
        self,
        lease_id: str,
        token: int,
        *,
        reason: str,
        now: float,
        worker: str | None = None,
        uid: int | None = None,
    ) -> str:
        """Give a held lease back unfinished; the handoff is re-queued at once."""
        with self._tx() as c:
            lease = self._held(c, lease_id, token, now, worker, uid)
            self._end_lease(c, lease_id, "released", now)
            row = self._row(c, lease["handoff"])
            self._event(c, now, row["name"], "lease_released", lease=lease_id, reason=reason)
            return self._requeue(
                c,
                row,
                now,
                feedback=_loads(row["feedback"]),
                detail=f"released by the worker: {reason}" if reason else "released by the worker",
            )

    def already_reported(
        self,
        lease_id: str,
        token: int,
        head: str,
        *,
        worker: str | None = None,
        uid: int | None = None,
    ) -> bool:
        """Whether this exact report was accepted before (a retry after a lost reply),
        from the same worker name and uid as the lease's when those are given."""
        row = self._conn.execute(
            "SELECT l.token, l.end_reason, l.worker, l.uid, r.head FROM leases l JOIN reports r"
            " ON r.lease_id = l.id WHERE l.id = ? ORDER BY r.id DESC LIMIT 1",
            (lease_id,),
        ).fetchone()
        return bool(
            row is not None
            and (worker is None or row["worker"] == worker)
            and (uid is None or row["uid"] is None or row["uid"] == uid)
            and row["token"] == token
            and row["end_reason"] == "reported"
            and row["head"] == head
        )

    def accept_report(
        self, lease_id: str, token: int, *, report: dict[str, Any], head: str, now: float
    ) -> str:
        """Store a report and release its lease; returns the handoff's new state."""
        with self._tx() as c:
            lease = self._held(c, lease_id, token, now)
            name = lease["handoff"]
            handoff = self._row(c, name)
            if handoff["state"] != "leased" or handoff["attempt"] != lease["attempt"]:
                raise LeaseNotHeld(
                    f"lease {lease_id} no longer holds {name} (it is {handoff['state']}, "
                    f"attempt {handoff['attempt']}); stop working on it and acquire a new lease"
                )
            status = report["status"]
            summary = str(report.get("summary") or "")
            c.execute(
                "INSERT INTO reports(handoff, lease_id, attempt, status, summary, head, report,"
                " received_at) VALUES (?,?,?,?,?,?,?,?)",
                (
                    name,
                    lease_id,
                    lease["attempt"],
                    status,
                    summary,
                    head,
                    json.dumps(report, allow_nan=False),
                    now,
                ),
            )
            self._end_lease(c, lease_id, "reported", now)
            self._event(c, now, name, "report", lease=lease_id, status=status, head=head)
            if status == "completed":
                seq = self._counter(c, "report_seq")
                # ``conflicts`` stays: it records what the earlier attempt ran into.
                self._set_state(c, name, "reported", now, report_seq=seq, detail=None)
                return "reported"
            detail = (
                "the agent gave up: "
                if status == "failed"
                else "the agent is blocked and needs a person: "
            ) + (summary or "(no summary)")
            self._set_state(c, name, "failed", now, detail=detail)
            return "failed"

    # ---- control ----------------------------------------------------------------------

    def cancel(self, name: str, *, now: float) -> str | None:
        """Cancel a handoff; returns the id of the lease to revoke, if one was held."""
        with self._tx() as c:
            row = self._row(c, name)
            if row["state"] == "merged":
                raise InvalidTransition(f"{name} is already merged; nothing to cancel")
            if row["state"] == "cancelled":
                return None
            if row["state"] == "gating" and self._moving(c, name):
                # Its gates passed and the branch is moving: a cancel now could only be
                # overridden (the work lands anyway) or leave landed work marked cancelled.
                # Before the move (even while it waits for a dirty checkout) a cancel wins.
                raise InvalidTransition(
                    f"{name} passed its gates and is landing on the integration branch right "
                    "now; it cannot be cancelled any more. Once it is merged, revert its merge "
                    "commit if the work must go"
                )
            lease = c.execute(
                "SELECT id FROM leases WHERE handoff = ? AND ended_at IS NULL", (name,)
            ).fetchone()
            if lease is not None:
                self._end_lease(c, lease["id"], "cancelled", now)
            self._set_state(c, name, "cancelled", now, detail="cancelled by a person")
            return None if lease is None else str(lease["id"])

    def retry(self, name: str, *, max_attempts: int, now: float) -> str:
        """Give a failed, conflicting or cancelled handoff a fresh attempt budget."""
        with self._tx() as c:
            row = self._row(c, name)
            if row["state"] not in RETRYABLE_STATES:
                raise InvalidTransition(
                    f"{name} is {row['state']}; only a failed, conflict or cancelled handoff "
                    "can be retried"
                )
            attempt = row["attempt"] + 1
            self._set_state(
                c,
                name,
                "waiting",
                now,
                attempt=attempt,
                attempt_limit=attempt + max_attempts - 1,
                detail="retried by a person",
            )
            self._release_waiting(c, now)
            return str(self._row(c, name)["state"])

    # ---- merge queue ------------------------------------------------------------------

    def next_merge_jobs(self, *, limit: int, now: float) -> list[MergeJob]:
        """Take the next ``limit`` reported handoffs (priority, then report order) into
        ``gating``, in the order they are to land."""
        jobs = []
        with self._tx() as c:
            rows = c.execute(
                "SELECT * FROM handoffs WHERE state = 'reported'"
                " ORDER BY priority_rank, report_seq LIMIT ?",
                (limit,),
            ).fetchall()
            for row in rows:
                report = c.execute(
                    "SELECT head, summary FROM reports WHERE handoff = ? ORDER BY id DESC LIMIT 1",
                    (row["name"],),
                ).fetchone()
                self._set_state(c, row["name"], "gating", now)
                jobs.append(
                    MergeJob(
                        name=row["name"],
                        title=row["title"],
                        attempt=row["attempt"],
                        submitted_at=row["submitted_at"],
                        head=report["head"],
                        summary=report["summary"],
                    )
                )
        return jobs

    def record_gate(
        self,
        name: str,
        *,
        attempt: int,
        candidate: str,
        gate: str,
        exit_status: int | None,
        timed_out: bool,
        duration_s: float,
        output_tail: str,
        started_at: float,
        cache_key: tuple[str, str] | None = None,
    ) -> None:
        """Record one gate run; a pass with ``cache_key`` (tree, gate fingerprint) is
        also remembered for :meth:`cached_gate_pass`, in the same transaction."""
        with self._tx() as c:
            if cache_key is not None and exit_status == 0 and not timed_out:
                c.execute(
                    "INSERT OR REPLACE INTO gate_cache(tree, gate_key, gate, handoff, candidate,"
                    " duration_s, passed_at) VALUES (?,?,?,?,?,?,?)",
                    (*cache_key, gate, name, candidate, duration_s, started_at + duration_s),
                )
            c.execute(
                "INSERT INTO gate_runs(handoff, attempt, candidate, gate, exit_status, timed_out,"
                " duration_s, output_tail, started_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    name,
                    attempt,
                    candidate,
                    gate,
                    exit_status,
                    int(timed_out),
                    duration_s,
                    output_tail,
                    started_at,
                ),
            )

    def cached_gate_pass(self, tree: str, gate_key: str) -> CachedGatePass | None:
        """The recorded pass of a gate with fingerprint ``gate_key`` on ``tree``, if any."""
        row = self._conn.execute(
            "SELECT gate, handoff, candidate, duration_s, passed_at FROM gate_cache"
            " WHERE tree = ? AND gate_key = ?",
            (tree, gate_key),
        ).fetchone()
        if row is None:
            return None
        return CachedGatePass(
            gate=row["gate"],
            handoff=row["handoff"],
            candidate=row["candidate"],
            duration_s=float(row["duration_s"]),
            passed_at=float(row["passed_at"]),
        )

    def record_landing_intent(
        self, name: str, *, attempt: int, base: str, candidate: str, now: float
    ) -> None:
        """Written just before the ref moves, so a crash between the two is resolvable.

        Refused (:class:`InvalidTransition`) if the handoff left ``gating`` meanwhile, e.g.
        a person cancelled it: then nothing may land."""
        with self._tx() as c:
            state = self._row(c, name)["state"]
            if state != "gating":
                raise InvalidTransition(f"{name} is {state} now; its candidate will not land")
            c.execute(
                "INSERT INTO merges(handoff, attempt, result, base, candidate, at)"
                " VALUES (?,?,?,?,?,?)",
                (name, attempt, "landing", base, candidate, now),
            )

    def _pending_landing(self, c: sqlite3.Connection, name: str) -> int | None:
        row = c.execute(
            "SELECT id, result FROM merges WHERE handoff = ? ORDER BY id DESC LIMIT 1", (name,)
        ).fetchone()
        return int(row["id"]) if row is not None and row["result"] == "landing" else None

    def _moving(self, c: sqlite3.Connection, name: str) -> bool:
        row_id = self._pending_landing(c, name)
        if row_id is None:
            return False
        row = c.execute("SELECT detail FROM merges WHERE id = ?", (row_id,)).fetchone()
        return bool(row["detail"] == _MOVING)

    def begin_ref_move(self, name: str) -> bool:
        """The merge queue is about to move the branch to the recorded landing: True if the
        handoff is still ``gating`` with that landing pending, and from now until
        :meth:`end_ref_move` (or the outcome) a cancel is refused. False: a cancel won."""
        with self._tx() as c:
            row_id = self._pending_landing(c, name)
            if self._row(c, name)["state"] != "gating" or row_id is None:
                return False
            c.execute("UPDATE merges SET detail = ? WHERE id = ?", (_MOVING, row_id))
            return True

    def end_ref_move(self, name: str) -> None:
        """The branch did not move (a lock or a dirty checkout held it back): a cancel may
        win again while the queue waits."""
        with self._tx() as c:
            row_id = self._pending_landing(c, name)
            if row_id is not None:
                c.execute(
                    "UPDATE merges SET detail = '' WHERE id = ? AND detail = ?", (row_id, _MOVING)
                )

    def landing_superseded(self, name: str, *, detail: str, now: float) -> None:
        """The compare-and-swap lost: the branch moved, the candidate will be rebuilt."""
        with self._tx() as c:
            row_id = self._pending_landing(c, name)
            if row_id is not None:
                c.execute(
                    "UPDATE merges SET result = 'superseded', detail = ?, at = ? WHERE id = ?",
                    (detail, now, row_id),
                )

    def mark_merged(self, name: str, *, attempt: int, base: str, commit: str, now: float) -> float:
        """Record a landed merge; returns the cycle time (submitted to merged).

        Only from ``gating`` and only for the landing :meth:`record_landing_intent` wrote
        for this attempt and candidate (so only after every gate passed on it); anything
        else raises :class:`InvalidTransition`. A cancel cannot come in between: it is
        refused while a landing is pending."""
        with self._tx() as c:
            row = self._row(c, name)
            landing = self._pending_landing(c, name)
            recorded = (
                None
                if landing is None
                else c.execute(
                    "SELECT attempt, candidate FROM merges WHERE id = ?", (landing,)
                ).fetchone()
            )
            if (
                row["state"] != "gating"
                or recorded is None
                or recorded["attempt"] != attempt
                or recorded["candidate"] != commit
            ):
                raise InvalidTransition(
                    f"{name} is {row['state']} with no landing of {commit[:12]} (attempt "
                    f"{attempt}) recorded; only a gated candidate that landed is merged"
                )
            c.execute(
                "UPDATE merges SET result = 'merged', base = ?, candidate = ?, detail = '',"
                " at = ? WHERE id = ?",
                (base, commit, now, landing),
            )
            self._set_state(
                c,
                name,
                "merged",
                now,
                merge_commit=commit,
                merged_at=now,
                detail=None,
                feedback=None,
                progress=None,
            )
            self._release_waiting(c, now)
            return now - float(row["submitted_at"])

    def mark_merge_failed(
        self,
        name: str,
        *,
        attempt: int,
        result: str,
        base: str,
        candidate: str | None,
        detail: str,
        feedback: dict[str, Any],
        conflicts: Sequence[str],
        hold: bool,
        now: float,
    ) -> str:
        """Record a conflict or a failed gate; requeue with feedback or hold. New state.

        If the handoff left ``gating`` meanwhile (cancelled), only the result is recorded."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO merges(handoff, attempt, result, base, candidate, detail, at)"
                " VALUES (?,?,?,?,?,?,?)",
                (name, attempt, result, base, candidate, detail, now),
            )
            current = self._row(c, name)["state"]
            if current != "gating":
                return str(current)
            held_state = "conflict" if result == "conflict" else "failed"
            self._set_state(
                c,
                name,
                held_state,
                now,
                detail=detail,
                conflicts=_dumps(list(conflicts)) if conflicts else None,
                feedback=_dumps(feedback),
            )
            if hold:
                return held_state
            return self._requeue(c, self._row(c, name), now, feedback=feedback, detail=detail)

    def merge_error(self, name: str, *, detail: str, now: float) -> None:
        """The merge itself failed (a git error): hold the handoff for a person."""
        with self._tx() as c:
            if self._row(c, name)["state"] == "gating":
                self._set_state(c, name, "failed", now, detail=detail)

    def return_to_queue(self, name: str, *, now: float) -> None:
        """A merge attempt that could not finish (e.g. the daemon stopping) goes back."""
        with self._tx() as c:
            # A pending landing stays ``gating`` until reconcile_landings settles it: the
            # ref may have moved, and only from ``gating`` can it be recorded as merged.
            if self._row(c, name)["state"] == "gating" and self._pending_landing(c, name) is None:
                self._set_state(c, name, "reported", now)

    def recover(self, *, ttl_s: float, now: float) -> list[str]:
        """After a restart: a handoff caught mid-gate goes back to ``reported``; a lease
        whose worktree was never handed over is abandoned; every other open lease gets a
        full TTL from now, so its worker can reconnect and carry on (the daemon's downtime
        is not the worker's fault)."""
        with self._tx() as c:
            names = [
                r[0]
                for r in c.execute("SELECT name FROM handoffs WHERE state = 'gating'").fetchall()
                if self._pending_landing(c, r[0]) is None  # settled by reconcile_landings
            ]
            for name in names:
                self._set_state(c, name, "reported", now, detail="gating interrupted by a restart")
            for lease in c.execute(
                "SELECT id, handoff FROM leases WHERE ended_at IS NULL AND worktree IS NULL"
            ).fetchall():
                self._end_lease(c, lease["id"], "abandoned", now)
                if self._row(c, lease["handoff"])["state"] == "leased":
                    self._set_state(
                        c,
                        lease["handoff"],
                        "queued",
                        now,
                        detail="lease abandoned by a restart before hand-over",
                    )
            c.execute(
                "UPDATE leases SET expires_at = MAX(expires_at, ?) WHERE ended_at IS NULL",
                (now + ttl_s,),
            )
            self._release_waiting(c, now)
            return names

    def extend_open_leases(self, *, until: float) -> int:
        """Give every open lease at least until ``until``; returns how many were extended.

        For after a spell when the store could not be written: heartbeats failed then
        through no fault of their workers, so their leases must not expire for it."""
        with self._tx() as c:
            return c.execute(
                "UPDATE leases SET expires_at = ? WHERE ended_at IS NULL AND expires_at < ?",
                (until, until),
            ).rowcount

    def recover_gating(self, *, now: float) -> list[str]:
        """Put every ``gating`` handoff back to ``reported`` (the merge queue was cut short
        and will take them again); returns their names."""
        with self._tx() as c:
            names = [
                r[0]
                for r in c.execute("SELECT name FROM handoffs WHERE state = 'gating'").fetchall()
                if self._pending_landing(c, r[0]) is None  # settled by reconcile_landings
            ]
            for name in names:
                self._set_state(c, name, "reported", now, detail="gating interrupted")
            return names

    def open_leases(self) -> list[dict[str, Any]]:
        """Every lease not ended yet, expired or not (for start-up reconciliation)."""
        rows = self._conn.execute("SELECT * FROM leases WHERE ended_at IS NULL ORDER BY token")
        return [dict(r) for r in rows.fetchall()]

    def end_lease_fault(self, lease_id: str, *, reason: str, detail: str, now: float) -> str | None:
        """End an open lease the daemon found broken (e.g. its worktree is gone) and
        re-queue its handoff, spending an attempt as an expiry does. Returns the handoff's
        new state, or None if the lease had ended meanwhile."""
        with self._tx() as c:
            lease = c.execute("SELECT * FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if lease is None or lease["ended_at"] is not None:
                return None
            self._end_lease(c, lease_id, reason, now)
            row = self._row(c, lease["handoff"])
            self._event(c, now, row["name"], "lease_" + reason, lease=lease_id, detail=detail)
            if row["state"] != "leased":
                return str(row["state"])
            return self._requeue(c, row, now, feedback=_loads(row["feedback"]), detail=detail)

    def merged_commits(self) -> list[tuple[str, str]]:
        """(handoff, merge commit) of every merged handoff, in merge order."""
        rows = self._conn.execute(
            "SELECT name, merge_commit FROM handoffs WHERE state = 'merged'"
            " AND merge_commit IS NOT NULL ORDER BY merged_at"
        )
        return [(str(r[0]), str(r[1])) for r in rows.fetchall()]

    def pending_landings(self) -> list[tuple[str, int, str, str]]:
        """(handoff, attempt, base, candidate) of landings a crash left unresolved."""
        rows = self._conn.execute(
            "SELECT m.handoff, m.attempt, m.base, m.candidate FROM merges m"
            " WHERE m.result = 'landing'"
            " AND m.id = (SELECT MAX(id) FROM merges WHERE handoff = m.handoff)"
        ).fetchall()
        return [(r[0], int(r[1]), str(r[2]), str(r[3])) for r in rows]

    # ---- asking a person --------------------------------------------------------------

    def ask(
        self,
        lease_id: str,
        token: int,
        question: Question,
        *,
        now: float,
        worker: str | None,
        uid: int | None = None,
    ) -> str:
        """Record the lease's question (replacing one it asked before); the handoff's name."""
        with self._tx() as c:
            row = self._held(c, lease_id, token, now, worker, uid)
            c.execute(
                "UPDATE questions SET closed_at = ? WHERE lease_id = ? AND closed_at IS NULL",
                (now, lease_id),
            )
            c.execute(
                "INSERT INTO questions(handoff, lease_id, question, choices, asked_at)"
                " VALUES (?,?,?,?,?)",
                (
                    row["handoff"],
                    lease_id,
                    question.question,
                    _dumps(list(question.choices)) if question.choices is not None else None,
                    now,
                ),
            )
            self._event(c, now, row["handoff"], "asked", lease=lease_id, question=question.question)
            return str(row["handoff"])

    def answer(self, name: str, answer: str, *, now: float) -> str:
        """Answer the handoff's open question; the lease to tell. Raises
        :class:`UnknownHandoff` or :class:`NothingAsked`."""
        with self._tx() as c:
            self._row(c, name)
            found = self._open_questions(c, name)
            if not found:
                raise NothingAsked(
                    f"handoff {name!r} is not waiting for an answer (nothing was asked, it was "
                    "already answered, or its lease ended); see `orchestrator status`"
                )
            lease_id = found[0][1].lease_id
            c.execute(
                "UPDATE questions SET answer = ?, closed_at = ? WHERE id = ?",
                (answer, now, found[0][0]),
            )
            self._event(c, now, name, "answered", lease=lease_id, answer=answer)
            return lease_id

    def mark_answer_delivered(self, lease_id: str, *, now: float) -> None:
        """The worker has the answer (the notification went out)."""
        with self._tx() as c:
            c.execute(
                "UPDATE questions SET delivered_at = ? WHERE lease_id = ? AND answer IS NOT NULL"
                " AND delivered_at IS NULL",
                (now, lease_id),
            )

    def take_answer(self, lease_id: str, *, now: float) -> str | None:
        """An answer its worker has not had yet (it was disconnected), marked delivered."""
        # Asked on every heartbeat: a read first, so the usual "nothing" takes no write lock.
        if (
            self._conn.execute(
                "SELECT 1 FROM questions WHERE lease_id = ? AND answer IS NOT NULL"
                " AND delivered_at IS NULL LIMIT 1",
                (lease_id,),
            ).fetchone()
            is None
        ):
            return None
        with self._tx() as c:
            row = c.execute(
                "SELECT id, answer FROM questions WHERE lease_id = ? AND answer IS NOT NULL"
                " AND delivered_at IS NULL ORDER BY id DESC LIMIT 1",
                (lease_id,),
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE questions SET delivered_at = ? WHERE lease_id = ? AND answer IS NOT NULL"
                " AND delivered_at IS NULL",
                (now, lease_id),
            )
            return str(row["answer"])

    def _open_questions(
        self, c: sqlite3.Connection, name: str | None = None
    ) -> list[tuple[int, OpenQuestion]]:
        # Only a live lease's question waits for a person: once the lease ends (reported,
        # expired, released, cancelled) nobody is there to receive the answer.
        sql = (
            "SELECT q.* FROM questions q JOIN leases l ON l.id = q.lease_id"
            " WHERE q.closed_at IS NULL AND l.ended_at IS NULL"
        )
        args: tuple[Any, ...] = ()
        if name is not None:
            sql += " AND q.handoff = ?"
            args = (name,)
        rows = c.execute(sql + " ORDER BY q.id DESC", args).fetchall()
        return [
            (
                r["id"],
                OpenQuestion(
                    handoff=r["handoff"],
                    lease_id=r["lease_id"],
                    question=Question(
                        r["question"],
                        tuple(json.loads(r["choices"])) if r["choices"] is not None else None,
                    ),
                    asked_at=r["asked_at"],
                ),
            )
            for r in rows
        ]

    def open_questions(self) -> dict[str, OpenQuestion]:
        """Each handoff waiting for a person, with what it asked."""
        found: dict[str, OpenQuestion] = {}
        for _, question in self._open_questions(self._conn):
            found.setdefault(question.handoff, question)
        return found

    # ---- reads ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for row in self._conn.execute("SELECT state, COUNT(*) FROM handoffs GROUP BY state"):
            counts[row[0]] = row[1]
        return counts

    def active_leases(self, *, now: float) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT * FROM leases WHERE ended_at IS NULL AND expires_at > ? ORDER BY token", (now,)
        ).fetchall()
        return [dict(r) for r in rows]

    def gating_history(self, *, candidates: int = 20, decisions: int = 50) -> dict[str, Any]:
        """For the merge queue's ETAs: the total gate time of each of the last
        ``candidates`` candidates gated (newest first), and of the last ``decisions``
        decisions how many were gate failures (``refused``) out of ``decided``."""
        c = self._conn
        c.execute("BEGIN")  # deferred: one read snapshot, no write lock
        try:
            durations = [
                float(r[0])
                for r in c.execute(
                    "SELECT SUM(duration_s) FROM gate_runs"
                    " WHERE id > (SELECT COALESCE(MAX(id), 0) - ? FROM gate_runs)"
                    " GROUP BY candidate, attempt ORDER BY MAX(id) DESC LIMIT ?",
                    (candidates * 10, candidates),
                )
            ]
            results = [
                r[0]
                for r in c.execute(
                    "SELECT result FROM merges WHERE result IN ('merged', 'conflict',"
                    " 'gate_failed') ORDER BY id DESC LIMIT ?",
                    (decisions,),
                )
            ]
        finally:
            c.execute("COMMIT")
        return {
            "candidate_s": tuple(durations),
            "refused": results.count("gate_failed"),
            "decided": len(results),
        }

    def merge_queue_heads(self) -> list[tuple[str, str]]:
        """(handoff, reported head) of the merge queue, in :meth:`merge_queue` order."""
        rows = self._conn.execute(
            "SELECT h.name, r.head FROM handoffs h JOIN reports r"
            " ON r.id = (SELECT MAX(id) FROM reports WHERE handoff = h.name)"
            " WHERE h.state IN ('reported', 'gating')"
            " ORDER BY h.state = 'gating' DESC, h.priority_rank, h.report_seq"
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    def merge_queue(self) -> list[str]:
        rows = self._conn.execute(
            "SELECT name FROM handoffs WHERE state IN ('reported', 'gating')"
            " ORDER BY state = 'gating' DESC, priority_rank, report_seq"
        )
        return [r[0] for r in rows]

    def summaries(self, state: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM handoffs"
        args: tuple[Any, ...] = ()
        if state is not None:
            sql += " WHERE state = ?"
            args = (state,)
        rows = self._conn.execute(sql + " ORDER BY seq", args).fetchall()
        asked = self.open_questions()
        return [
            {**_summary(r), "needsInput": needs_input_to_wire(asked.get(r["name"]))} for r in rows
        ]

    def recent_summaries(self, states: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """The ``limit`` handoffs in ``states`` that changed last, newest first (one index
        probe per state, however many merged handoffs the store holds)."""
        rows: list[sqlite3.Row] = []
        for state in states:
            # Per state, so each is a backwards walk of handoffs_state_since (an IN list
            # would sort every merged handoff ever).
            rows += self._conn.execute(
                "SELECT * FROM handoffs WHERE state = ? ORDER BY updated_at DESC LIMIT ?",
                (state, limit),
            ).fetchall()
        rows.sort(key=lambda r: r["updated_at"], reverse=True)
        return [_summary(r) for r in rows[:limit]]

    def has_open_lease(self, name: str) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM leases WHERE handoff = ? AND ended_at IS NULL", (name,)
            ).fetchone()
            is not None
        )

    def handoff_row(self, name: str) -> dict[str, Any]:
        return dict(self._row(self._conn, name))

    def detail(self, name: str) -> dict[str, Any]:
        """The full record for ``handoff.get``."""
        c = self._conn
        row = self._row(c, name)
        record = _summary(row)
        asked = self._open_questions(c, name)
        record["needsInput"] = needs_input_to_wire(asked[0][1] if asked else None)
        record["body"] = row["body"]
        record["labels"] = json.loads(row["labels"])
        record["detail"] = row["detail"]
        record["feedback"] = _loads(row["feedback"])
        record["submittedAt"] = rfc3339(row["submitted_at"])
        record["mergedAt"] = rfc3339(row["merged_at"])
        record["mergeCommit"] = row["merge_commit"]
        record["conflicts"] = _loads(row["conflicts"]) or []
        record["leases"] = [
            {
                # No token: only the worker holding a lease ever sees it (PROTOCOL.md).
                "id": r["id"],
                "worker": r["worker"],
                "attempt": r["attempt"],
                "grantedAt": rfc3339(r["granted_at"]),
                "expiresAt": rfc3339(r["expires_at"]),
                "baseCommit": r["base_commit"],
                "worktree": r["worktree"],
                "branch": r["branch"],
                "endedAt": rfc3339(r["ended_at"]),
                "endReason": r["end_reason"],
            }
            for r in c.execute("SELECT * FROM leases WHERE handoff = ? ORDER BY token", (name,))
        ]
        record["reports"] = [
            {
                **json.loads(r["report"]),
                "attempt": r["attempt"],
                "leaseId": r["lease_id"],
                "receivedAt": rfc3339(r["received_at"]),
            }
            for r in c.execute("SELECT * FROM reports WHERE handoff = ? ORDER BY id", (name,))
        ]
        record["gates"] = [
            {
                "gate": r["gate"],
                "attempt": r["attempt"],
                "candidate": r["candidate"],
                "exitStatus": r["exit_status"],
                "timedOut": bool(r["timed_out"]),
                "durationS": r["duration_s"],
                "outputTail": r["output_tail"],
                "startedAt": rfc3339(r["started_at"]),
            }
            for r in c.execute("SELECT * FROM gate_runs WHERE handoff = ? ORDER BY id", (name,))
        ]
        record["merges"] = [
            {
                "attempt": r["attempt"],
                "result": r["result"],
                "base": r["base"],
                "candidate": r["candidate"],
                "detail": r["detail"],
                "at": rfc3339(r["at"]),
            }
            for r in c.execute("SELECT * FROM merges WHERE handoff = ? ORDER BY id", (name,))
        ]
        return record

    def events(self, name: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events"
        args: tuple[Any, ...] = ()
        if name is not None:
            sql += " WHERE handoff = ?"
            args = (name,)
        rows = self._conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [
            {
                "at": rfc3339(r["at"]),
                "handoff": r["handoff"],
                "kind": r["kind"],
                **json.loads(r["detail"]),
            }
            for r in reversed(rows)
        ]

    # ---- metrics (read-only) ----------------------------------------------------------

    def metrics_snapshot(self, *, now: float) -> dict[str, Any]:
        """What the store-backed gauges show, read in one transaction for a scrape.

        ``counts`` (handoffs by state), ``leases_active``, ``merge_queue_depth`` and
        ``oldest_s`` (per live state, how long its longest-waiting handoff has been in it).
        Costs an index scan plus a row per *live* handoff, so thousands of merged ones in
        the history do not slow a scrape down.
        """
        c = self._conn
        c.execute("BEGIN")  # deferred: one read snapshot for every query, no write lock
        try:
            # Covered by the handoffs_state index: no row is read.
            counts = dict.fromkeys(STATES, 0)
            for state, n in c.execute("SELECT state, COUNT(*) FROM handoffs GROUP BY state"):
                counts[state] = n
            # updated_at is when the handoff entered its state, except that a heartbeat's
            # progress also moves it while leased: a leased one's age comes from its lease.
            # One query per state: SQLite answers MIN() with a single probe of the
            # (state, updated_at) index, where a GROUP BY would walk a whole backlog.
            oldest: dict[str, float] = {}
            for state in LIVE_STATES:
                if state == "leased" or not counts.get(state):
                    continue
                (since,) = c.execute(
                    "SELECT MIN(updated_at) FROM handoffs WHERE state = ?", (state,)
                ).fetchone()
                if since is not None:
                    oldest[state] = now - since
            active, granted = c.execute(
                "SELECT COUNT(*), MIN(granted_at) FROM leases"
                " WHERE ended_at IS NULL AND expires_at > ?",
                (now,),
            ).fetchone()
            if granted is not None:
                oldest["leased"] = now - granted
            # Open questions are few (one per live lease at most): a join, not a scan.
            asking, asked_at = c.execute(
                "SELECT COUNT(DISTINCT q.handoff), MIN(q.asked_at) FROM questions q"
                " JOIN leases l ON l.id = q.lease_id"
                " WHERE q.closed_at IS NULL AND l.ended_at IS NULL"
            ).fetchone()
        finally:
            c.execute("COMMIT")
        return {
            "counts": counts,
            "leases_active": int(active),
            "merge_queue_depth": counts["reported"] + counts["gating"],
            "oldest_s": oldest,
            "needing_input": int(asking),
            "oldest_question_s": now - asked_at if asked_at is not None else 0.0,
        }

    def state_clock_start(self) -> tuple[int, list[tuple[str, str, float]]]:
        """Where :meth:`state_changes` should start reading (the last event's id), and the
        live handoffs with their state and since when, to time their next change."""
        c = self._conn
        c.execute("BEGIN")
        try:
            last = c.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
            live = ",".join("?" * len(LIVE_STATES))
            rows = c.execute(
                f"SELECT name, state, updated_at FROM handoffs WHERE state IN ({live})",
                LIVE_STATES,
            ).fetchall()
        finally:
            c.execute("COMMIT")
        return int(last), [(r[0], r[1], float(r[2])) for r in rows]

    def state_changes(self, after: int, limit: int = 10_000) -> list[tuple[int, float, str, str]]:
        """State changes recorded after event id ``after``, oldest first, as
        ``(event id, at, handoff, new state)``; a submission enters ``waiting``."""
        rows = self._conn.execute(
            "SELECT id, at, handoff, kind, detail FROM events"
            " WHERE id > ? AND kind IN ('state', 'submitted') ORDER BY id LIMIT ?",
            (after, limit),
        ).fetchall()
        return [
            (
                int(r[0]),
                float(r[1]),
                str(r[2]),
                "waiting" if r[3] == "submitted" else str(json.loads(r[4])["state"]),
            )
            for r in rows
        ]

    def is_open(self) -> bool:
        """Whether the database connection is still open (for ``/readyz``)."""
        try:
            self._conn.total_changes  # noqa: B018 - raises once the connection is closed
        except sqlite3.ProgrammingError:
            return False
        return True


def _summary(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "name": row["name"],
        "title": row["title"],
        "priority": row["priority"],
        "state": row["state"],
        "attempt": row["attempt"],
        "dependencies": json.loads(row["dependencies"]),
        "progress": _loads(row["progress"]),
        "updatedAt": rfc3339(row["updated_at"]),
    }


def _find_cycle(graph: dict[str, tuple[str, ...]]) -> list[str] | None:
    """A dependency cycle within one submission batch, as a path, or None."""
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done or node not in graph:
            return None
        visiting.append(node)
        for dep in graph[node]:
            found = visit(dep)
            if found:
                return found
        visiting.pop()
        done.add(node)
        return None

    for start in graph:
        found = visit(start)
        if found:
            return found
    return None
