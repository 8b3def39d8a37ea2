"""The user's words, kept: a corpus of legitimate texts followed through every hop.

A person's text goes into a handoff (the priority note that is its title, a phase name,
an objective, a metric's criteria) and an agent's text into its report (summary, completed
phases and objectives, metric results). Each hop that copies words is checked:

    document -> parsed spec -> lease.acquire -> report -> handoff.get
             -> completed document (`show --markdown`) -> `show` -> merge commit message

A text arrives "unchanged" when it equals what was written after the documented
transformations alone (README, "What happens to your words"): blanks at the edges of a
one-line field are trimmed, a line break inside one becomes one space. No metric carries
agent-written text as a label (label values are gate names, states and reasons), so the
metrics hop has nothing to keep. The figure is printed; the goal, and the assertion, is
100%.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import git
from harness import Conn, Daemon, control, wait_for, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.handoff.template import (
    CompletedObjective,
    CompletedPhase,
    Handoff,
    Language,
    MetricResult,
    Phase,
    SuccessMetric,
    complete,
    parse,
    render,
)
from orchestrator.observe.terminal import visible

CORPUS: tuple[str, ...] = (
    'Cover whitespace-only input ("   ") in the same test',
    'Run `pytest  -k "a  b"` and keep   aligned   columns',
    "| Name | Value |  | --- | --- |",
    "Añadir validación de ñandú — “comillas”, acentos y ¿preguntas?",
    "Ship it 🚀🎉 for the 👨‍👩‍👧 family",
    "שלום עולם — مرحبا بالعالم",
    "See [the docs](https://example.com/a_b*c) and <b>bold</b> &amp; more",
    "Path C:\\Users\\me\\file  two.txt and /tmp/a  b",
    "Done!!!",
    "Ends with a colon:",
    "**bold** at the start",
    "- a dash at the start",
    "# a hash at the start",
    "ship it ✅",
    "✅ starts with a mark",
    "trailing ❌ mark",
    "e\u0301 combining acute and x\u0308",
    "tab\tinside and\t\ttwo",
    "1. numbered",
    "> quoted",
    "Phase 2: a label inside",
    "**Status**: FAKE",
    "zero\u200bwidth and non\u00a0breaking",
    "  leading and trailing blanks  ",
    "日本語のテキスト、句読点。",
    "x" * 4000,
)


def documented(text: str) -> str:
    """What the documented transformations make of a one-line text."""
    return re.sub(r"[ \t]*(?:\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029])+[ \t]*", " ", text).strip()


def document(name: str, text: str, language: str) -> str:
    """A handoff as a person writes it, in English or Spanish, carrying `text` four times."""
    if language == "es":
        return f"""# HANDOFF: {name} - PENDING

**FECHA**: 2026-12-04 | **PRIORIDAD**: MEDIUM | **ESTADO**: PENDING

## STATUS UPDATE
**Estado**: PENDING
**Prioridad**: MEDIUM - {text}
**Dependencias**: ninguna
**Progreso**: 0% - sin empezar

## PLAN DE IMPLEMENTACIÓN
### FASE 1: {text}
- {text}

## MÉTRICAS DE ÉXITO
- **Global**: {text}
"""
    return f"""# HANDOFF: {name} - PENDING

**DATE**: 2026-12-04 | **PRIORITY**: MEDIUM | **STATUS**: PENDING

## STATUS UPDATE
**Status**: PENDING
**Priority**: MEDIUM - {text}
**Dependencies**: none
**Progress**: 0% - not started

## IMPLEMENTATION PLAN
### PHASE 1: {text}
- {text}

## SUCCESS METRICS
- **Overall**: {text}
"""


def _cli(config: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, f"orchestrator {' '.join(args)}: {done.stderr}"
    return done.stdout


class Hops:
    """Per hop, how many texts arrived as written (after the documented transformations)."""

    def __init__(self) -> None:
        self.kept: Counter[str] = Counter()
        self.seen: Counter[str] = Counter()
        self.changed: list[str] = []

    def check(self, hop: str, index: int, got: object, want: object) -> None:
        self.seen[hop] += 1
        if got == want:
            self.kept[hop] += 1
        else:
            self.changed.append(f"text {index} at {hop}: {got!r:.120} != {want!r:.120}")

    def report(self) -> str:
        lines = [
            f"  {hop:<28} {self.kept[hop]:>3}/{self.seen[hop]} unchanged "
            f"({100 * self.kept[hop] / self.seen[hop]:.0f}%)"
            for hop in self.seen
        ]
        total_kept, total_seen = sum(self.kept.values()), sum(self.seen.values())
        lines.append(f"  fidelity {100 * total_kept / total_seen:.1f}% of {total_seen} arrivals")
        return "\n".join(lines)


def test_every_hop_keeps_the_words_as_written(
    tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, repo)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    hops = Hops()
    try:
        names = [f"fidelity-{i}" for i in range(len(CORPUS))]
        files = []
        for i, (name, text) in enumerate(zip(names, CORPUS, strict=True)):
            path = tmp_path / f"{name}.md"
            path.write_text(document(name, text, "es" if i % 2 else "en"), encoding="utf-8")
            files.append(str(path))
            spec = parse(path.read_text(encoding="utf-8"))
            want = documented(text)
            hops.check("document -> parsed spec", i,
                       (spec.title, spec.phases[0].name, spec.phases[0].objectives[0],
                        spec.success_metrics[0].criteria), (want,) * 4)
        _cli(config, "submit", *files)
        conn = Conn(daemon.socket)
        conn.initialize("worker", "scribe")
        reports: dict[str, dict[str, Any]] = {}
        for _ in names:
            lease = conn.request("lease.acquire", {"waitS": 10})["result"]["lease"]
            handoff = lease["handoff"]
            i = names.index(handoff["name"])
            text, want = CORPUS[i], documented(CORPUS[i])
            hops.check("lease.acquire body", i, handoff["body"], Path(files[i]).read_text())
            hops.check("lease.acquire fields", i,
                       (handoff["title"], handoff["phases"][0]["name"],
                        handoff["phases"][0]["objectives"][0],
                        handoff["successMetrics"][0]["criteria"]),
                       (want,) * 4)
            worktree = Path(lease["worktree"])
            (worktree / f"{handoff['name']}.txt").write_text(text + "\n", encoding="utf-8")
            git(worktree, "add", "-A")
            git(worktree, "commit", "-q", "-m", "the work")
            report = {
                "status": "completed",
                "summary": text,
                "head": git(worktree, "rev-parse", "HEAD"),
                "phases": [{"name": text, "done": True,
                            "objectives": [{"text": text, "done": True}]}],
                "metrics": [{"name": "Overall", "result": text, "achieved": True}],
            }
            reports[handoff["name"]] = report
            params = {"leaseId": lease["id"], "token": lease["token"], "report": report}
            reply = conn.request("handoff.report", params)
            assert reply.get("result") == {"accepted": True}, reply
        conn.close()
        wait_for(lambda: all(h["state"] == "merged"
                             for h in control(daemon.socket, "handoff.list")["handoffs"]),
                 "every handoff to merge", timeout=120)
        for i, name in enumerate(names):
            text, want = CORPUS[i], documented(CORPUS[i])
            record = control(daemon.socket, "handoff.get", {"name": name})
            stored = record["reports"][-1]
            hops.check("handoff.get report", i,
                       (stored["summary"], stored["phases"][0]["name"],
                        stored["phases"][0]["objectives"][0]["text"],
                        stored["metrics"][0]["result"]),
                       (text,) * 4)
            completed = parse(_cli(config, "show", "--markdown", name))
            hops.check("show --markdown", i,
                       (completed.title, completed.phases[0].objectives[0],
                        completed.completed_phases[0].name,
                        completed.completed_phases[0].objectives[0].text,
                        completed.metrics_achieved[0].result, completed.completion_summary),
                       (want,) * 6)
            shown = _cli(config, "show", name)
            # A terminal shows control and invisible format characters as stand-ins.
            on_screen = visible(want)
            hops.check("show", i, on_screen if on_screen in shown else shown, on_screen)
            message = git(repo, "log", "-1", "--format=%B", record["mergeCommit"])
            subject, _, rest = message.partition("\n\n")
            hops.check("merge commit subject", i, subject, f"Merge handoff {name}: {want}")
            hops.check("merge commit body", i, rest.split("\n\n")[0], want)
    finally:
        daemon.stop()
    with capsys.disabled():
        print(f"\nfidelity over {len(CORPUS)} texts, English and Spanish templates:")
        print(hops.report())
    assert not hops.changed, "\n".join(hops.changed)


def test_a_line_break_in_a_report_text_becomes_one_space_and_nothing_else() -> None:
    spec = parse(document("breaks", "one line", "en"))
    done = complete(
        spec,
        summary="first  line\r\n  second\u2028third",
        phases=[CompletedPhase("a\nb", True, (CompletedObjective("keep  this\nand  that", True),))],
        metrics=[MetricResult("Overall", "x\n\ny", True)],
    )
    back = parse(render(done))
    assert back.completion_summary == "first  line second third"
    assert back.completed_phases[0].name == "a b"
    assert back.completed_phases[0].objectives[0].text == "keep  this and  that"
    assert back.metrics_achieved[0].result == "x y"


# Texts a person could put on one line: any letters, marks, symbols, punctuation and
# spaces; neither line breaks (they end the line) nor other control characters (shown
# visibly in a terminal, stripped from commit messages, so not kept by design).
_LINE_CHARS = st.characters(
    exclude_categories=("Cc", "Cs", "Zl", "Zp"),
    exclude_characters="\x85",
)
LANGUAGES: tuple[Language, ...] = ("en", "es")
one_line_texts = st.text(_LINE_CHARS, min_size=1, max_size=60).map(str.strip).filter(bool)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(one_line_texts, st.sampled_from(LANGUAGES))
def test_any_one_line_text_survives_the_spec_and_the_completed_document(
    text: str, language: Language
) -> None:
    spec = Handoff(name="prop", priority_note=text, phases=(Phase(text, (text,)),),
                   success_metrics=(SuccessMetric("Overall", text),), language=language)
    assert parse(render(spec)) == spec
    done = complete(
        spec,
        summary=text,
        phases=[CompletedPhase(text, True, (CompletedObjective(text, False),))],
        metrics=[MetricResult("Overall", text, True)],
    )
    back = parse(render(done))
    assert back == done
    assert (back.completion_summary, back.completed_phases[0].name,
            back.completed_phases[0].objectives[0].text,
            back.metrics_achieved[0].result) == (text,) * 4


def test_the_corpus_is_what_this_file_says() -> None:
    # A guard for whoever edits the corpus: every text is one line, and json-safe.
    for text in CORPUS:
        assert "\n" not in text
        assert json.loads(json.dumps(text)) == text
