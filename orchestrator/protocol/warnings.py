"""Wire form of the early conflict warnings (PROTOCOL.md "Early conflict warnings")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# The capability ``initialize`` lists when ``lease.heartbeat`` takes ``head`` and the
# daemon may send ``lease.warning``.
LEASE_WARNING = "lease.warning"


def lease_warning(lease_id: str, paths: Sequence[str], against: str) -> dict[str, Any]:
    """The params of a ``lease.warning`` notification of kind ``conflict``."""
    return {"leaseId": lease_id, "kind": "conflict", "paths": list(paths), "with": against}
