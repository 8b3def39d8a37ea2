"""The merge queue's outcomes, in-process on a real store, repository and gate process:
merged, conflict, gate failed, and a speculative candidate discarded when the one ahead
of it fails (``pytest -m fast``)."""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

import anyio
import pytest
from conftest import git
from inprocess import Parts, acquire, daemon_parts, peer, work_and_report

from orchestrator.git.copy_files import CopyError, CopyResult
from orchestrator.merge import queue as queue_module

pytestmark = [pytest.mark.fast, pytest.mark.anyio]

# Bounds a merge pass that should take a second or two: a bug fails, never hangs.
PASS_BOUND_S = 60

# The "test suite" of the repository: a tree with a BREAK file fails. Every run is written
# down (handoff, candidate) outside the checkout. When HOLD is set, a failing run of that
# handoff first waits until another handoff's gate has started, so the test knows the
# second candidate was gated on top of the first, side by side with it.
GATE_SCRIPT = """\
echo "$ORCHESTRATOR_HANDOFF $ORCHESTRATOR_CANDIDATE" >> "$GATE_LOG"
if [ -e BREAK ]; then
  if [ "$ORCHESTRATOR_HANDOFF" = "$HOLD" ]; then
    for _ in $(seq 400); do
      grep -qv "^$HOLD " "$GATE_LOG" && break
      sleep 0.05
    done
  fi
  echo "BREAK is in the tree"
  exit 1
fi
"""


def gate(tmp_path: Path, *, hold: str = "") -> str:
    script = tmp_path / "gate.sh"
    script.write_text(GATE_SCRIPT)
    return (
        '[[gates]]\nname = "tests"\n'
        f'run = ["sh", "{script}"]\ntimeout_s = 60\n'
        f'env = {{ GATE_LOG = "{tmp_path / "gate.log"}", HOLD = "{hold}" }}\n'
    )


def gate_runs(tmp_path: Path) -> list[tuple[str, str]]:
    log = tmp_path / "gate.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [(line.split()[0], line.split()[1]) for line in lines]


async def integrate(parts: Parts) -> bool:
    with anyio.fail_after(PASS_BOUND_S):
        return await parts.merges.integrate()


async def lease_and_report(parts: Parts, files_by_handoff: dict[str, dict[str, str]]) -> None:
    """Lease every handoff first (all on the same tip), then report each with its files."""
    held = [await acquire(parts, peer(name=f"w-{name}")) for name in files_by_handoff]
    for lease in held:
        assert await work_and_report(parts, lease, files_by_handoff[lease.handoff]) == {
            "accepted": True
        }


async def test_a_passing_candidate_is_merged(tmp_path: Path, repo: Path) -> None:
    async with daemon_parts(tmp_path, repo, gates=gate(tmp_path)) as parts:
        before = git(repo, "rev-parse", "main")
        await parts.submit("alpha")
        await lease_and_report(parts, {"alpha": {"alpha.txt": "alpha\n"}})
        assert await integrate(parts) is True
        assert parts.state_of("alpha") == "merged"
        assert git(repo, "show", "main:alpha.txt") == "alpha"
        assert git(repo, "rev-parse", "main^1") == before
        assert [name for name, _ in gate_runs(tmp_path)] == ["alpha"]
        assert parts.metric("orchestrator_merges_total", result="merged") == 1
        assert await integrate(parts) is False  # nothing left to take


async def test_a_conflicting_candidate_is_held_and_the_branch_keeps_the_first(
    tmp_path: Path, repo: Path
) -> None:
    merge = 'on_conflict = "hold"'
    async with daemon_parts(tmp_path, repo, gates=gate(tmp_path), merge=merge) as parts:
        await parts.submit("alpha", "beta")
        await lease_and_report(
            parts, {"alpha": {"README.md": "alpha's\n"}, "beta": {"README.md": "beta's\n"}}
        )
        assert await integrate(parts) is True
        assert parts.state_of("alpha") == "merged"
        assert parts.state_of("beta") == "conflict"
        assert git(repo, "show", "main:README.md") == "alpha's"
        # A conflict is found building the candidate: no gate ran for it.
        assert [name for name, _ in gate_runs(tmp_path)] == ["alpha"]
        assert parts.metric("orchestrator_merges_total", result="conflict") == 1


async def test_a_candidate_failing_its_gate_never_lands(tmp_path: Path, repo: Path) -> None:
    merge = 'on_gate_failure = "hold"'
    async with daemon_parts(tmp_path, repo, gates=gate(tmp_path), merge=merge) as parts:
        before = git(repo, "rev-parse", "main")
        await parts.submit("alpha")
        await lease_and_report(parts, {"alpha": {"BREAK": "x\n"}})
        assert await integrate(parts) is True
        assert parts.state_of("alpha") == "failed"
        assert git(repo, "rev-parse", "main") == before
        assert parts.metric("orchestrator_merges_total", result="gate_failed") == 1


async def test_a_failed_gate_requeues_with_its_log_as_feedback(
    tmp_path: Path, repo: Path
) -> None:
    async with daemon_parts(tmp_path, repo, gates=gate(tmp_path)) as parts:
        await parts.submit("alpha")
        await lease_and_report(parts, {"alpha": {"BREAK": "x\n"}})
        assert await integrate(parts) is True
        assert parts.state_of("alpha") == "queued"
        again = await acquire(parts)
        assert again.lease["attempt"] == 2
        feedback = again.lease["handoff"]["feedback"]
        assert feedback is not None and "BREAK is in the tree" in str(feedback)


async def test_a_speculative_candidate_is_discarded_when_the_one_ahead_fails(
    tmp_path: Path, repo: Path
) -> None:
    merge = 'speculative_window = 2\non_gate_failure = "hold"'
    gates = gate(tmp_path, hold="alpha")
    async with daemon_parts(tmp_path, repo, gates=gates, merge=merge) as parts:
        before = git(repo, "rev-parse", "main")
        await parts.submit("alpha", "beta")
        await lease_and_report(
            parts, {"alpha": {"BREAK": "x\n"}, "beta": {"beta.txt": "beta\n"}}
        )
        assert await integrate(parts) is True
        assert parts.state_of("alpha") == "failed"
        assert parts.state_of("beta") == "merged"
        # beta landed rebuilt on the tip without alpha, never on alpha's candidate.
        assert git(repo, "rev-parse", "main^1") == before
        assert git(repo, "ls-tree", "--name-only", "main", "BREAK") == ""
        runs = gate_runs(tmp_path)
        alpha = [candidate for name, candidate in runs if name == "alpha"]
        beta = [candidate for name, candidate in runs if name == "beta"]
        assert len(alpha) == 1 and len(beta) == 2, runs
        speculative, rebuilt = beta
        assert git(repo, "rev-parse", f"{speculative}^1") == alpha[0]
        assert rebuilt == git(repo, "rev-parse", "main")
        assert parts.metric("orchestrator_merges_total", result="merged") == 1
        assert parts.metric("orchestrator_merges_total", result="gate_failed") == 1



async def test_an_error_gating_a_batch_is_charged_to_its_culprit_alone(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Preparing the gate checkout of any candidate holding beta's file fails (a disk
    # error copying copy_files, faked: the one outside failure here): beta, the middle
    # of a batch of three, is the culprit; no gate fails.
    (repo / ".gitignore").write_text("/local.env\n")
    git(repo, "add", ".gitignore")
    git(repo, "commit", "-q", "-m", "ignore local files")
    (repo / "local.env").write_text("SECRET=1\n")
    from orchestrator.git.copy_files import copy_untracked as real_copy

    def failing_copy(source: Path, dest: Path, paths: Sequence[str]) -> CopyResult:
        if (dest / "beta.txt").exists():
            raise CopyError(errno.EIO, f"cannot copy local.env into {dest}: I/O error")
        return real_copy(source, dest, paths)

    monkeypatch.setattr(queue_module, "copy_untracked", failing_copy)
    gates = '[workspace]\ncopy_files = ["local.env"]\n' + gate(tmp_path)
    async with daemon_parts(tmp_path, repo, gates=gates, merge="max_batch = 3") as parts:
        before = git(repo, "rev-parse", "main")
        names = ["alpha", "beta", "gamma"]
        await parts.submit(*names)
        held = {h.handoff: h for h in [await acquire(parts, peer(name=f"w{i}")) for i in range(3)]}
        for name in names:
            answer = await work_and_report(parts, held[name], {f"{name}.txt": f"{name}\n"})
            assert answer == {"accepted": True}
        states: dict[str, str] = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(parts.merges.run)  # run() holds a lone candidate's error
            with anyio.fail_after(PASS_BOUND_S):
                while True:
                    states = {n: parts.state_of(n) for n in names}
                    if not any(s in ("reported", "gating") for s in states.values()):
                        break
                    await anyio.sleep(0.1)
            tg.cancel_scope.cancel()
        assert states == {"alpha": "merged", "beta": "failed", "gamma": "merged"}, states
        assert "CopyError" in str(parts.store.detail("beta").detail)
        # Each innocent landed gated alone, on the tip: nothing ungated reached main.
        landed = git(repo, "rev-list", "--first-parent", f"{before}..main").split()
        gated = {candidate: name for name, candidate in gate_runs(tmp_path)}
        assert sorted(gated.get(c, "ungated") for c in landed) == ["alpha", "gamma"]
        assert git(repo, "ls-tree", "main", "beta.txt") == ""  # beta's file never landed
