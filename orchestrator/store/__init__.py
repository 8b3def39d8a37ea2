"""Durable state in SQLite: handoffs, leases, reports, gate runs, merges and events."""
