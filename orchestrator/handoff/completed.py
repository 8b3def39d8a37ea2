"""The completed handoff document: the submitted template, filled in from the last report,
with the integration result (merge commit, gates, durations) as its own section."""

from __future__ import annotations

import dataclasses

from orchestrator.handoff import template as handoff_model
from orchestrator.protocol.jsonrpc import rfc3339
from orchestrator.protocol.records import HandoffDetail

STATUS_WORDS = {
    "merged": "COMPLETED",
    "failed": "FAILED",
    "conflict": "CONFLICT",
    "cancelled": "CANCELLED",
}


def completed_document(record: HandoffDetail) -> str:
    """Render a ``handoff.get`` record back in the handoff template."""
    spec = handoff_model.parse(record.body)
    state = str(record.state)
    status = STATUS_WORDS.get(state, state.upper())
    if record.reports:
        last = record.reports[-1].report
        # A report's phases and metrics are the worker's JSON, kept as it sent them.
        phases = [
            handoff_model.CompletedPhase(
                name=str(p.get("name", "")),
                done=bool(p.get("done")),
                objectives=tuple(
                    handoff_model.CompletedObjective(str(o.get("text", "")), bool(o.get("done")))
                    for o in p.get("objectives") or []
                ),
            )
            for p in last.phases or ()
        ]
        metrics = [
            handoff_model.MetricResult(
                str(m.get("name", "")), str(m.get("result", "")), bool(m.get("achieved"))
            )
            for m in last.metrics or ()
        ]
        spec = handoff_model.complete(
            spec,
            summary=last.summary or "(no summary)",
            phases=phases,
            metrics=metrics,
            status=status,
        )
    else:
        spec = dataclasses.replace(spec, status=status)
    section = handoff_model.Section("INTEGRATION RESULT", _integration(record))
    extra = tuple(s for s in spec.extra_sections if s.heading != section.heading)
    spec = dataclasses.replace(spec, extra_sections=(*extra, section))
    return handoff_model.render(spec)


def _integration(record: HandoffDetail) -> str:
    lines = [f"**State**: {record.state} (attempt {record.summary.attempt})"]
    if record.merge_commit:
        lines.append(f"**Merge commit**: {record.merge_commit}")
    if record.merged_at is not None:
        lines.append(f"**Merged at**: {rfc3339(record.merged_at)}")
    if record.detail:
        lines.append(f"**Detail**: {record.detail}")
    if record.conflicts:
        lines.append("**Conflicts**: " + ", ".join(record.conflicts))
    if record.gates:
        lines.append("**Gates**:")
        for gate in record.gates:
            verdict = (
                "passed"
                if gate.passed
                else ("timed out" if gate.timed_out else f"failed (exit {gate.exit_status})")
            )
            lines.append(
                f"- {gate.gate} on {gate.candidate[:12]} (attempt {gate.attempt}): "
                f"{verdict} in {gate.duration_s:.2f} s"
            )
    return "\n".join(lines)
