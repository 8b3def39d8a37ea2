"""The demo's scripted agent, run by ``orchestrator worker -- python -m orchestrator.demo.agent``.

It does what a real coding agent would, minus the thinking: reads the handoff from stdin,
edits files in ``$ORCHESTRATOR_WORKTREE``, reports progress, and leaves a completed
handoff document in ``$ORCHESTRATOR_REPORT_FILE``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.demo import sample
from orchestrator.handoff import template as handoff_model


def _write(files: dict[str, str]) -> None:
    root = Path(os.environ["ORCHESTRATOR_WORKTREE"])
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def _progress(percent: int, message: str) -> None:
    with open(os.environ["ORCHESTRATOR_PROGRESS_FILE"], "a", encoding="utf-8") as f:
        f.write(f"{percent} {message}\n")
    time.sleep(0.4)  # long enough for the demo's watcher to show it


def _commit(message: str) -> None:
    subprocess.run(["git", "add", "-A"], check=True)
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=demo agent",
            "-c",
            "user.email=agent@demo.invalid",
            "commit",
            "-q",
            "-m",
            message,
        ],
        check=True,
    )


def _merge_integration() -> None:
    """Repair a conflict the way the protocol says: merge the integration branch, which
    the lease's repository has as ``origin/<branch>`` at ``$ORCHESTRATOR_INTEGRATION_COMMIT``
    (fetched again, in case it moved since). Where both sides changed a line, the demo keeps
    its own: it rewrites its files right after anyway."""
    subprocess.run(["git", "fetch", "-q", "origin"], check=False)
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname:short)", "refs/remotes/origin/"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    target = refs[0] if refs else os.environ.get("ORCHESTRATOR_INTEGRATION_COMMIT", "")
    if not target:
        return
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=demo agent",
            "-c",
            "user.email=agent@demo.invalid",
            "merge",
            "-q",
            "--no-edit",
            "-X",
            "ours",
            target,
        ],
        check=True,
    )


def _report(doc: handoff_model.Handoff, summary: str) -> None:
    phases = [
        handoff_model.CompletedPhase(
            name=p.name,
            done=True,
            objectives=tuple(handoff_model.CompletedObjective(o, True) for o in p.objectives),
        )
        for p in doc.phases
    ]
    metrics = [
        handoff_model.MetricResult(m.name, f"done: {m.criteria}", True) for m in doc.success_metrics
    ]
    done = handoff_model.complete(doc, summary=summary, phases=phases, metrics=metrics)
    Path(os.environ["ORCHESTRATOR_REPORT_FILE"]).write_text(
        handoff_model.render(done), encoding="utf-8"
    )


def main() -> int:
    body = sys.stdin.read()
    feedback_file = Path(os.environ["ORCHESTRATOR_FEEDBACK_FILE"])
    feedback = json.loads(feedback_file.read_text()) if feedback_file.is_file() else None
    return run_script(handoff_model.parse(body), feedback)


def run_script(
    doc: handoff_model.Handoff,
    feedback: dict[str, Any] | None,
    progress: Callable[[int, str], None] = _progress,
    report: Callable[[handoff_model.Handoff, str], None] = _report,
) -> int:
    """The scripted work for each example handoff; ``progress`` and ``report`` say how it
    is told (the files of ``$ORCHESTRATOR_*``, or MCP tools: orchestrator.demo.stand_in)."""
    name = doc.name
    progress(10, "reading the code")
    if feedback is not None and feedback.get("reason") == "conflict":
        progress(20, "merging the integration branch to resolve the conflict")
        _merge_integration()
    if name == "handoff-1-critical":
        progress(40, "regression test written")
        _write(sample.FIX_EMPTY_INPUT)
        progress(80, "parser fixed")
        _commit("Reject empty input with a clear error")
        report(doc, "Empty input now raises EmptyExpressionError; regression test added.")
    elif name == "handoff-2-patterns":
        if feedback is None:
            progress(50, "extracting the shared validation")
            _write(sample.EXTRACT_PATTERN_BROKEN)  # left uncommitted: the worker commits it
        else:
            progress(50, f"repairing after feedback: {feedback['detail'][:60]}")
            _write(sample.EXTRACT_PATTERN_FIXED)
            _commit("Fix spread() after the gate failure")
            report(
                doc,
                "Operand checks live in require_number(); its int() truncation, caught by the "
                "gate, was repaired from the feedback.",
            )
    elif name == "handoff-3-ux":
        progress(50, "wrapping errors for people")
        _write(sample.FRIENDLY_ERRORS)
        _commit("Friendly command-line errors")
    else:
        print(f"demo agent: no script for {name}", file=sys.stderr)
        return 1
    progress(100, "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
