"""The store's connection: opening (with its locking and fault handling), one
IMMEDIATE transaction per method, and the helpers each table family shares."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from orchestrator.protocol.asking import OpenQuestion, Question
from orchestrator.store.errors import (
    LeaseNotHeld,
    StateLocked,
    StoreBusy,
    StoreCorrupt,
    StoreError,
    StoreFull,
    UnknownHandoff,
)
from orchestrator.store.schema import QUESTIONS_SCHEMA, SCHEMA, SCHEMA_VERSION, add_lease_uid
from orchestrator.store.states import State

# How a lease's end reason reads in a -32001 message.
END_REASONS = {
    "max_duration": "held longer than leases.max_duration_s",
    "worktree_missing": "its worktree was deleted",
}


# The detail of a pending landing while the merge queue moves the branch to it.
MOVING_DETAIL = "moving the integration branch to this candidate"


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


def from_json(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def to_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, allow_nan=False, sort_keys=True)


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


class StoreConnection:
    """The connection, its transactions and the state-machine steps every table family shares."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, lock_wait_s: float = WRITE_LOCK_WAIT_S
    ) -> None:
        self._conn = conn
        self.path = path
        self._lock_wait_s = lock_wait_s
        self._lock_contended = False

    @classmethod
    def open(cls, path: Path, *, lock_wait_s: float = WRITE_LOCK_WAIT_S) -> Self:
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
    def _open(cls, path: Path, lock_wait_s: float) -> Self:
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
        add_lease_uid(conn)
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
        self, c: sqlite3.Connection, name: str, state: State, now: float, **fields: Any
    ) -> None:
        assigns = ", ".join(f"{k} = ?" for k in fields)
        extra = f", {assigns}" if assigns else ""
        sql = f"UPDATE handoffs SET state = ?, updated_at = ?{extra} WHERE name = ?"
        c.execute(sql, (state, now, *fields.values(), name))
        self._event(c, now, name, "state", state=state)

    def _release_waiting(self, c: sqlite3.Connection, now: float) -> list[str]:
        """Move ``waiting`` handoffs whose dependencies are all merged to ``queued``."""
        merged = {
            r[0] for r in c.execute("SELECT name FROM handoffs WHERE state = ?", (State.MERGED,))
        }
        released = []
        for row in c.execute(
            "SELECT name, dependencies FROM handoffs WHERE state = ?", (State.WAITING,)
        ).fetchall():
            if set(json.loads(row["dependencies"])) <= merged:
                self._set_state(c, row["name"], State.QUEUED, now)
                released.append(row["name"])
        return released

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
    ) -> State:
        """Another attempt if the budget allows, else ``failed``. Returns the new state."""
        if row["attempt"] >= row["attempt_limit"]:
            self._set_state(
                c,
                row["name"],
                State.FAILED,
                now,
                detail=f"{detail}; gave up after {row['attempt']} attempt(s)",
                feedback=to_json(feedback),
            )
            return State.FAILED
        self._set_state(
            c,
            row["name"],
            State.QUEUED,
            now,
            attempt=row["attempt"] + 1,
            feedback=to_json(feedback),
            detail=detail,
        )
        return State.QUEUED

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
        return bool(row["detail"] == MOVING_DETAIL)

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

    def is_open(self) -> bool:
        """Whether the database connection is still open (for ``/readyz``)."""
        try:
            self._conn.total_changes  # noqa: B018 - raises once the connection is closed
        except sqlite3.ProgrammingError:
            return False
        return True
