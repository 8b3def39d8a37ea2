"""Paths a branch must not track: ``[workspace] copy_files`` and ``keep``.

The daemon puts the operator's ``copy_files`` (``.env``) into every checkout untracked, and
``keep`` paths (``.venv``) are built there by setup. A branch that commits one of them is
never what its gates saw (the operator's copy is put on top of the agent's), and landing
it would write the agent's file over the operator's ignored one in ``repository.path``.
So a commit whose tree holds anything at or under such a path, or a non-directory where
one of them needs a directory, is refused, with what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePosixPath

import pygit2

__all__ = ["tracked_untracked_only"]


def tracked_untracked_only(
    repo: pygit2.Repository,
    commit: str,
    *,
    copy_files: Sequence[str] = (),
    keep: Sequence[str] = (),
    tracked_by: str | None = None,
) -> str:
    """Why ``commit`` may not be taken (it tracks a path ``copy_files`` or ``keep``
    names, or blocks one), or "" when it tracks none of them. ``tracked_by``: a commit
    (the integration tip) whose tracking the same path makes it the project's own file,
    changed like any other."""
    tree = repo.revparse_single(commit).peel(pygit2.Tree)
    theirs = repo.revparse_single(tracked_by).peel(pygit2.Tree) if tracked_by else None
    for setting, paths in (("copy_files", copy_files), ("keep", keep)):
        for rel in paths:
            found = _tracked_at(tree, rel)
            if found and theirs is not None and _tracked_at(theirs, rel) == found:
                continue
            if found:
                return (
                    f"the branch tracks {found}, where [workspace] {setting} puts {rel} in "
                    f"place untracked: remove it from the branch with "
                    f"`git rm -r --cached {found}` and commit"
                )
    return ""


def _tracked_at(tree: pygit2.Tree, rel: str) -> str:
    """The tracked path that is ``rel``, holds it (a file where a directory goes) or is
    under it; "" when there is none."""
    parts = PurePosixPath(rel).parts
    node: pygit2.Object = tree
    walked: list[str] = []
    for name in parts:
        if not isinstance(node, pygit2.Tree):
            return "/".join(walked)
        try:
            node = node[name]
        except KeyError:
            return ""
        walked.append(name)
    return "/".join(walked)
