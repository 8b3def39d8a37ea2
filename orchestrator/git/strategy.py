"""How a handoff's branch becomes a commit on the integration branch (``merge.strategy``):
the one definition of that vocabulary, for the config and for merge building.

A leaf module (nothing from the package), so ``config`` can validate the key without
importing git code."""

from __future__ import annotations

from enum import StrEnum


class MergeStrategy(StrEnum):
    """A ``merge.strategy`` value; each member is its config text."""

    MERGE = "merge"  # a merge commit with the branch as its second parent
    SQUASH = "squash"  # one commit with the branch's changes, the branch not a parent
    FF_ONLY = "ff-only"  # the branch itself, only when it already contains the tip


MERGE_STRATEGIES: tuple[MergeStrategy, ...] = tuple(MergeStrategy)
