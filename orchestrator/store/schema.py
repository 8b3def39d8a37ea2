"""The SQLite schema of the store, and the migrations that run on open."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 1


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


def add_lease_uid(conn: sqlite3.Connection) -> None:
    # A lease is bound to the uid that acquired it as well as to its worker name; stores
    # made before that get the column (NULL: bound by name only, as they were).
    columns = {row[1] for row in conn.execute("PRAGMA table_info(leases)")}
    if "uid" not in columns:
        conn.execute("ALTER TABLE leases ADD COLUMN uid INTEGER")
