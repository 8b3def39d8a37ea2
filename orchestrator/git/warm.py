"""Warm dependencies for the gate checkout (``[workspace]``): kept paths and their key.

Every gate run starts from a clean checkout of exactly the candidate (``git clean
-ffdx``), which deletes ``.venv`` and ``node_modules`` too, so a gate on a real project
would reinstall everything for every candidate. With ``[workspace] keep``, the named
ignored paths survive the clean while the *cache key* is unchanged: a hash of the
``cache_key_files`` as the candidate commits them (read from git, not from the working
tree a gate may have touched), of the ``setup`` command and of ``keep``. When the key
changes, the checkout is cleaned completely and ``setup`` rebuilds what is kept; the key
is recorded only once setup succeeded, so a gate never runs on kept paths built for
another key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pygit2

from orchestrator.config import WorkspaceConfig

STAMP_NAME = "orchestrator-warm-key"

# Beside the stamp: the key a setup under way builds for, recorded as the stamp once the
# lease shows setup finished (see write_pending).
PENDING_NAME = "orchestrator-warm-key.pending"


def cache_key(repo: pygit2.Repository, commit: str, workspace: WorkspaceConfig) -> str:
    """The key of the kept paths for ``commit``: what they were built from."""
    tree = repo.revparse_single(commit).peel(pygit2.Tree)
    digest = hashlib.sha256()
    digest.update(
        json.dumps({"setup": workspace.setup, "keep": workspace.keep}, sort_keys=True).encode()
    )
    for name in workspace.cache_key_files:
        try:
            entry = tree[name]
        except KeyError:
            blob_id = "missing"
        else:
            blob_id = str(entry.id)
        digest.update(f"\0{name}\0{blob_id}".encode())
    return digest.hexdigest()


def clean_excludes(keep: Sequence[str]) -> list[str]:
    """``git clean`` options that spare the kept paths (anchored at the root)."""
    return [arg for path in keep for arg in ("-e", f"/{path}")]


def read_stamp(admin: Path) -> str | None:
    """The key the kept paths of this checkout were built for, if any."""
    try:
        return (admin / STAMP_NAME).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def write_stamp(admin: Path, key: str | None) -> None:
    """Record (or with None, forget) the key the kept paths were built for."""
    stamp = admin / STAMP_NAME
    if key is None:
        stamp.unlink(missing_ok=True)
        return
    partial = stamp.with_name(STAMP_NAME + ".partial")
    partial.write_text(key + "\n", encoding="utf-8")
    partial.replace(stamp)


def write_pending(admin: Path, key: str) -> None:
    """Forget the stamp and remember ``key`` as the one a setup now under way builds for:
    a setup killed half-way (its worker SIGKILLed, its lease expired) leaves kept paths
    no later lease may trust. On disk, so that it survives a restart of the daemon."""
    write_stamp(admin, None)
    partial = admin / (PENDING_NAME + ".partial")
    partial.write_text(key + "\n", encoding="utf-8")
    partial.replace(admin / PENDING_NAME)


def forget_pending(admin: Path) -> None:
    """No setup is under way for this checkout."""
    (admin / PENDING_NAME).unlink(missing_ok=True)


def confirm_pending(admin: Path) -> bool:
    """Setup finished: the pending key becomes the stamp. False when none was pending."""
    try:
        (admin / PENDING_NAME).replace(admin / STAMP_NAME)
    except FileNotFoundError:
        return False
    return True
