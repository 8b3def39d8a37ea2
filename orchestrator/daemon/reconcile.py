"""Start-up reconciliation: make the store and the repository agree again after a crash
(or after a person worked in the repository by hand while the daemon was down).

The store is the record of what was promised (leases, reports, merges); the repository
holds the work. A crash can fall between a change to one and the matching change to the
other, and people move branches and delete directories. Before serving, the daemon looks
for each mismatch it knows how to settle, settles it, and logs one structured event per
repair (``reconcile_*``), so an operator can see in the journal what a restart changed:

* a worktree laid out for a handoff that is merged, failed, cancelled or unknown (the
  crash fell between the merge and putting the worktree back in the pool) goes back to the
  pool: ``reconcile_worktree_released``;
* an open lease whose worktree is gone (deleted by its agent or by a person) ends, and
  its handoff is re-queued with its branch (its commits) intact:
  ``reconcile_lease_ended``;
* stale ``index.lock``/``HEAD.lock`` files in the daemon's idle worktrees (pool, gates)
  are deleted: ``reconcile_lock_removed``;
* lock files on the integration branch or its checkout are *reported*, never deleted
  (they may be a person's running git): ``reconcile_integration_locked``; merging waits
  for them and says why in ``orchestrator status``;
* a merged handoff whose merge commit is no longer on the integration branch (the branch
  was reset by hand) is reported: ``reconcile_merge_missing``. It is not merged again:
  landing twice is worse than asking a person;
* a leased handoff whose branch was moved by hand so that it no longer contains the
  lease's base commit is reported (``reconcile_branch_moved``): the report check decides
  what lands, against the branch as it is.

Merges interrupted between their landing intent and their outcome are settled before
this runs, by :meth:`orchestrator.merge.queue.MergeQueue.reconcile_landings`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.git.workspace import GitError, Workspace
from orchestrator.handoff import template as handoff_model
from orchestrator.observe import logs
from orchestrator.store.sqlite import Store
from orchestrator.store.states import LIVE_STATES

log = logs.get("reconcile")


@dataclass(frozen=True)
class Repair:
    """One mismatch found at start-up, and what was done about it."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)


def reconcile(store: Store, workspace: Workspace, *, now: float | None = None) -> list[Repair]:
    """Settle the mismatches between ``store`` and ``workspace``; blocking (run it in a
    thread, before the daemon serves). Returns the repairs, each already logged."""
    now = time.time() if now is None else now
    repairs: list[Repair] = []

    def report(kind: str, level: str = "warning", **fields: Any) -> None:
        repairs.append(Repair(kind, fields))
        getattr(log, level)("reconcile_" + kind, **fields)

    open_leases = store.open_leases()
    leased = {lease.handoff for lease in open_leases}

    # Open leases whose worktree vanished: the worker cannot go on, and git still thinks
    # the branch is checked out there until the registration is pruned.
    for lease in open_leases:
        path = lease.worktree
        if path is None or os.path.isdir(path):
            continue
        state = store.end_lease_fault(
            lease.id,
            reason="worktree_missing",
            detail=f"its worktree {path} was deleted; the next attempt gets a new one "
            "with the branch's commits",
            now=now,
        )
        leased.discard(lease.handoff)
        report(
            "lease_ended",
            handoff=lease.handoff,
            lease=lease.id,
            worktree=path,
            cause="worktree_missing",
            new_state=state,
        )

    # Worktrees laid out for a handoff that is done with them (merged, failed, cancelled)
    # or that the store does not know. A live handoff between leases keeps its worktree
    # on purpose: its next attempt continues there, which is cheaper than a pool slot.
    states = {h.name: h.state for h in store.summaries()}
    for name in workspace.lease_worktree_names():
        state = states.get(name)
        if name in leased or state in LIVE_STATES:
            continue
        try:
            workspace.release_worktree(name)
        except (GitError, OSError) as exc:
            report("worktree_release_failed", level="error", worktree=name, error=str(exc))
            continue
        report("worktree_released", worktree=name, state=state, cause="no open lease")

    for lock in workspace.clear_idle_locks():
        report("lock_removed", path=str(lock), cause="left by a killed git process")

    for lock in workspace.integration_locks():
        report(
            "integration_locked",
            level="error",
            path=str(lock),
            detail="merging waits until it is gone; delete it if no git process runs there",
        )

    try:
        tip = workspace.integration_tip()
    except GitError as exc:
        report("integration_branch_missing", level="error", error=str(exc))
        return repairs
    merged = store.merged_commits()
    on_branch = workspace.reachable((commit for _, commit in merged), tip)
    for name, commit in merged:
        if commit not in on_branch:
            report(
                "merge_missing",
                level="error",
                handoff=name,
                commit=commit,
                branch=workspace.integration_branch,
                detail="the branch was moved by hand and no longer holds this merge; it is "
                "not merged again: restore the branch, or resubmit the handoff",
            )

    for lease in open_leases:
        base = lease.base_commit
        if base is None or lease.handoff not in leased:
            continue
        branch = lease.branch or handoff_model.branch_name(lease.handoff)
        branch_tip: str | None = None
        try:
            branch_tip = workspace.branch_tip(branch)
            moved = branch_tip is None or not workspace.is_ancestor(base, branch_tip)
        except GitError:
            moved = True
        if moved:
            report(
                "branch_moved",
                handoff=lease.handoff,
                branch=branch,
                base=base,
                tip=branch_tip,
                detail="no longer contains the lease's base commit; the report is checked "
                "against the branch as it is",
            )
    return repairs
