"""The completed handoff document: the submitted template, filled in from the last report,
with the integration result (merge commit, gates, durations) as its own section."""

from __future__ import annotations

import dataclasses
from typing import Any

from orchestrator.handoff import template as handoff_model

STATUS_WORDS = {
    "merged": "COMPLETED",
    "failed": "FAILED",
    "conflict": "CONFLICT",
    "cancelled": "CANCELLED",
}


def completed_document(record: dict[str, Any]) -> str:
    """Render a ``handoff.get`` record back in the handoff template."""
    spec = handoff_model.parse(record["body"])
    reports = [r for r in record.get("reports", [])]
    status = STATUS_WORDS.get(record["state"], record["state"].upper())
    if reports:
        last = reports[-1]
        phases = [
            handoff_model.CompletedPhase(
                name=str(p.get("name", "")),
                done=bool(p.get("done")),
                objectives=tuple(
                    handoff_model.CompletedObjective(str(o.get("text", "")), bool(o.get("done")))
                    for o in p.get("objectives") or []
                ),
            )
            for p in last.get("phases") or []
        ]
        metrics = [
            handoff_model.MetricResult(
                str(m.get("name", "")), str(m.get("result", "")), bool(m.get("achieved"))
            )
            for m in last.get("metrics") or []
        ]
        spec = handoff_model.complete(
            spec,
            summary=str(last.get("summary") or "(no summary)"),
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


def _integration(record: dict[str, Any]) -> str:
    lines = [f"**State**: {record['state']} (attempt {record['attempt']})"]
    if record.get("mergeCommit"):
        lines.append(f"**Merge commit**: {record['mergeCommit']}")
    if record.get("mergedAt"):
        lines.append(f"**Merged at**: {record['mergedAt']}")
    if record.get("detail"):
        lines.append(f"**Detail**: {record['detail']}")
    if record.get("conflicts"):
        lines.append("**Conflicts**: " + ", ".join(record["conflicts"]))
    gates = record.get("gates") or []
    if gates:
        lines.append("**Gates**:")
        for gate in gates:
            verdict = (
                "passed"
                if gate["exitStatus"] == 0 and not gate["timedOut"]
                else ("timed out" if gate["timedOut"] else f"failed (exit {gate['exitStatus']})")
            )
            lines.append(
                f"- {gate['gate']} on {gate['candidate'][:12]} (attempt {gate['attempt']}): "
                f"{verdict} in {gate['durationS']:.2f} s"
            )
    return "\n".join(lines)
