"""The agent side: the generic worker and the client library."""
