"""The daemon: socket server, handlers, the lease manager, reconciliation, supervision."""
