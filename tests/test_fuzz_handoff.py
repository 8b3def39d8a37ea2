"""Fuzz the handoff parser, which reads files from people and agents alike: hypothesis
over template-shaped documents with hostile values, and seeded random bytes (plain noise,
and the example files with bytes flipped, cut and spliced).

Whatever comes in, ``parse`` either returns a handoff whose name is a valid branch and
directory name and which survives ``render`` unchanged, or raises ``HandoffError`` whose
every problem carries a line number inside the document. Nothing else: no other
exception, no hang. Counts come from the environment, so ``make test`` runs a bounded
number and ``make fuzz`` many more (figures in docs/reliability.md).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.handoff.template import HandoffError, parse, render, validate_name

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "handoffs").glob("*.md"))
HYPOTHESIS_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
RANDOM_INPUTS = int(os.environ.get("FUZZ_RANDOM_INPUTS", "3000"))
SEED = int(os.environ.get("FUZZ_SEED", "1"))


def check(text: str) -> str:
    """Parse ``text`` and check the parser's contract; returns what happened."""
    try:
        handoff = parse(text)
    except HandoffError as err:
        assert err.problems, "a HandoffError must list its problems"
        last = text.count("\n") + 2
        for problem in err.problems:
            assert 0 <= problem.line <= last, (problem, last)
            assert problem.message.strip()
        return "refused"
    assert validate_name(handoff.name) == handoff.name
    assert parse(render(handoff)) == handoff
    return "parsed"


HOSTILE_VALUES = [
    "../../etc/passwd", "-rf", "--upload-pack=x", "a/b", "\x00", "\x1b[2J", "\u202e", "\u200b",
    "caf\u00e9", "cafe\u0301", "\ud800", "x" * 5000, "```", "## STATUS UPDATE", "**", "|",
    "none", "ninguna", "HIGH", "ALTA", "100%", "-1%", "1e9%", "NaN%", "✅", "❌", "\r", "\t",
]
LABELS = [
    "FECHA", "DATE", "PRIORIDAD", "PRIORITY", "ESTADO", "STATUS", "Estado", "Status",
    "Prioridad", "Priority", "Dependencies", "Dependencias", "Progress", "Labels",
]
HEADINGS = [
    "# HANDOFF: {v} - PENDING", "## STATUS UPDATE", "## IMPLEMENTATION PLAN",
    "### PHASE 1: {v}", "### FASE 2: {v}", "## SUCCESS METRICS", "## IMPLEMENTATION COMPLETED ✅",
    "### SUCCESS METRICS ACHIEVED 📊", "**HANDOFF COMPLETED**: {v}", "## {v}",
]

values = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    st.text(max_size=40),
    st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True),
)


@st.composite
def template_like(draw: st.DrawFn) -> str:
    """Lines shaped like the template's, in a plausible order, with hostile values."""
    lines = [f"# HANDOFF: {draw(values)} - PENDING", ""]
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(["field", "heading", "item", "metric", "text", "blank"]))
        value = draw(values)
        if kind == "field":
            lines.append(f"**{draw(st.sampled_from(LABELS))}**: {value}")
        elif kind == "heading":
            lines.append(draw(st.sampled_from(HEADINGS)).format(v=value))
        elif kind == "item":
            lines.append(f"- {draw(st.sampled_from(['', '✅ ', '[x] ', '❌ ']))}{value}")
        elif kind == "metric":
            lines.append(f"- **{value}**: {draw(values)}")
        elif kind == "text":
            lines.append(value)
        else:
            lines.append("")
    return "\n".join(lines)


def base_documents() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in EXAMPLES]


@settings(
    max_examples=HYPOTHESIS_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(template_like())
def test_fuzz_template_shaped_documents(text: str) -> None:
    check(text)


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(base_documents()), st.data())
def test_fuzz_examples_with_hostile_values_spliced_in(doc: str, data: st.DataObject) -> None:
    lines = doc.split("\n")
    for _ in range(data.draw(st.integers(1, 5))):
        index = data.draw(st.integers(0, len(lines) - 1))
        line = lines[index]
        cut = data.draw(st.integers(0, len(line)))
        lines[index] = line[:cut] + data.draw(values) + line[cut:]
    check("\n".join(lines))


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 12)):
        op = rng.random()
        at = rng.randrange(len(buf) + 1)
        if op < 0.4 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op < 0.6:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op < 0.8:
            del buf[at : at + rng.randint(1, 64)]
        else:  # splice a chunk from elsewhere (duplicated or moved sections)
            start = rng.randrange(len(buf) + 1)
            buf[at:at] = buf[start : start + rng.randint(1, 200)]
    return bytes(buf)


@pytest.mark.parametrize("source", ["noise", "mutated-examples"])
def test_fuzz_random_bytes(source: str) -> None:
    rng = random.Random(f"{SEED}-{source}")
    docs = [d.encode() for d in base_documents()]
    outcomes = {"parsed": 0, "refused": 0}
    for _ in range(RANDOM_INPUTS):
        if source == "noise":
            raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))
        else:
            raw = _mutate(rng, rng.choice(docs))
        # The daemon gets text (JSON strings); files are read with errors="replace".
        text = raw.decode("utf-8", errors=rng.choice(["replace", "ignore", "surrogateescape"]))
        outcomes[check(text)] += 1
    if source == "mutated-examples":
        # Not every mutation breaks a document: the fuzzer reaches the accepting paths too.
        assert outcomes["parsed"] > 0, outcomes
    print(f"handoff fuzz {source}: {RANDOM_INPUTS} inputs, {outcomes}")
