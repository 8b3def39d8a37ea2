"""The gate runner, in-process with real commands: pass, fail, time out, cannot start,
environment and output tail (``pytest -m fast``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import host_pids

from orchestrator.config import GateConfig
from orchestrator.merge.gates import run_gate

pytestmark = [pytest.mark.fast, pytest.mark.anyio]


def gate(*run: str, timeout_s: float = 30, env: dict[str, str] | None = None) -> GateConfig:
    return GateConfig(name="tests", run=tuple(run), timeout_s=timeout_s, env=env or {})


async def test_a_gate_that_exits_zero_passes(tmp_path: Path) -> None:
    result = await run_gate(gate("true"), tmp_path)
    assert result.passed and result.exit_status == 0 and not result.timed_out


async def test_a_failing_gate_keeps_its_status_and_both_streams(tmp_path: Path) -> None:
    script = "echo to-stdout; echo to-stderr >&2; exit 3"
    result = await run_gate(gate("sh", "-c", script), tmp_path)
    assert not result.passed
    assert result.exit_status == 3
    assert "to-stdout" in result.output_tail and "to-stderr" in result.output_tail


async def test_a_gate_runs_in_the_checkout_with_its_environment(tmp_path: Path) -> None:
    (tmp_path / "marker").write_text("here\n")
    result = await run_gate(
        gate("sh", "-c", 'cat marker; echo "$FROM_GATE $FROM_QUEUE"', env={"FROM_GATE": "g"}),
        tmp_path,
        env={"FROM_QUEUE": "q"},
    )
    assert result.passed, result.output_tail
    assert result.output_tail.split() == ["here", "g", "q"]


async def test_a_gate_over_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    # A background child and the gate itself would both sleep far past the timeout; the
    # odd duration finds the child among the host's processes afterwards.
    script = "sleep 61.37 & sleep 60"
    result = await run_gate(gate("sh", "-c", script, timeout_s=0.5), tmp_path)
    assert result.timed_out and not result.passed
    assert result.exit_status is None
    assert "timed out" in result.output_tail
    assert host_pids("61.37") == []


async def test_a_gate_that_cannot_start_says_why(tmp_path: Path) -> None:
    result = await run_gate(gate("/no/such/gate-command"), tmp_path)
    assert not result.passed
    assert result.exit_status not in (0, None)
    assert result.output_tail


async def test_only_the_tail_of_a_loud_gate_is_kept(tmp_path: Path) -> None:
    script = "for i in $(seq 2000); do echo line-$i; done"
    result = await run_gate(gate("sh", "-c", script), tmp_path, tail_bytes=200)
    assert result.passed
    assert len(result.output_tail.encode()) <= 400
    assert "line-2000" in result.output_tail and "line-1\n" not in result.output_tail
