"""Protocol v1: JSON-RPC framing, error codes and the typed records that cross the socket.

This is the only place wire JSON is made.
"""
