"""`orchestrator demo` (what `make demo` runs) works from a clone, end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_merges_all_three_examples(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "gate_failed" in out and "(with feedback: gate_failed)" in out
    assert out.count("Merge handoff ") == 3
    for name in ("handoff-1-critical", "handoff-2-patterns", "handoff-3-ux"):
        assert f"== {name}: rendered report" in out
    assert "**HANDOFF COMPLETED**" in out
    assert 'orchestrator_merges_total{result="merged"} 3.0' in out
    assert "Traceback" not in result.stderr
    assert "watch it live: http://127.0.0.1:" in out
    repo = tmp_path / "demo" / "repo"
    log = subprocess.run(["git", "log", "--first-parent", "--format=%s", "main"], cwd=repo,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    # Dependencies are merged before their dependents.
    assert log.index("Merge handoff handoff-3-ux: Friendlier CLI error messages") < \
        log.index("Merge handoff handoff-1-critical: Fix the crash on empty input in the parser")
    # The completed sections carry the plan's words exactly as the person wrote them (the
    # third example's agent leaves no completed document: the worker reports for it).
    examples = Path(__file__).parent.parent / "examples" / "handoffs"
    for example in (examples / "handoff-1-critical.md", examples / "handoff-2-patterns.md"):
        plan = example.read_text(encoding="utf-8").split("\n## ", 3)[2]  # the plan section
        for line in plan.splitlines():
            if line.startswith("- "):
                assert f"- ✅ {line[2:]}\n" in out or f"- ❌ {line[2:]}\n" in out, line


def test_demo_runs_with_the_claude_recipe_on_a_stand_in_that_talks_mcp(tmp_path: Path) -> None:
    pytest.importorskip("mcp", reason="the MCP SDK is the optional extra orchestrator[mcp]")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "demo", "--mcp", "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "orchestrator worker --agent claude" in out
    # Progress came through the MCP tool (the stand-in writes no progress file) or the
    # CLI's stream-json output, which the recipe reads (each shown while it lasts).
    assert "reading the code" in out or "claude started (demo stand-in)" in out
    assert "gate_failed" in out and out.count("Merge handoff ") == 3
    # The first two handoffs' completed reports were submitted as fields over MCP.
    assert "Empty input now raises EmptyExpressionError" in out
    assert "Traceback" not in result.stderr
    logs = [log.read_text() for log in (tmp_path / "demo").glob("worker-*.log")]
    assert any('"agent": "claude"' in text or "agent=claude" in text for text in logs), logs
