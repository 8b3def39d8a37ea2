"""The integration repository, merge building, and the lease and gate checkouts."""
