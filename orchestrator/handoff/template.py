"""Handoffs: the model, the template parser and the renderer.

A handoff is a markdown document in the seed template (see DESIGN.md, "The handoff
template")::

    # HANDOFF: handoff-1-critical - PENDING

    **DATE**: 2026-11-24 | **PRIORITY**: HIGH | **STATUS**: PENDING

    ## STATUS UPDATE
    **Status**: PENDING
    **Priority**: HIGH - crash on empty input blocks the release
    **Dependencies**: none
    **Progress**: 0% - not started

    ## IMPLEMENTATION PLAN
    ### PHASE 1: Reproduce
    - Add a failing test for the empty-input crash

    ## SUCCESS METRICS
    - **Overall**: the full test suite passes

Labels may be English or Spanish. `parse` reports every problem it finds with its line
number, `render` writes a `Handoff` back in the template, and ``parse(render(h)) == h``
for every valid handoff. A valid handoff is one that `parse` can produce: every text is
a single line without leading or trailing whitespace, names pass `validate_name`, there
is at least one phase (each with objectives) and one success metric, status values are
upper case, metric names hold no ``*`` and do not end with ``:``, and extra sections
have no blank first or last line and no line that would start a section of its own.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pygit2

__all__ = [
    "CompletedObjective",
    "CompletedPhase",
    "Handoff",
    "HandoffError",
    "InvalidNameError",
    "Language",
    "MetricResult",
    "Phase",
    "Priority",
    "Problem",
    "Section",
    "SuccessMetric",
    "branch_name",
    "check",
    "complete",
    "parse",
    "render",
    "to_wire",
    "validate_name",
]

Language = Literal["en", "es"]

BRANCH_PREFIX = "handoff/"
MAX_NAME_LENGTH = 100


# --------------------------------------------------------------------------- model


class Priority(enum.Enum):
    """How urgent a handoff is; `rank` orders dispatch (lower goes first)."""

    HIGH = "HIGH"
    MEDIUM = "MEDIUM"
    LOW = "LOW"

    @property
    def rank(self) -> int:
        """0 for HIGH, 1 for MEDIUM, 2 for LOW."""
        return _PRIORITY_RANKS[self]

    @classmethod
    def from_text(cls, text: str) -> Priority | None:
        """The priority a word names (any case, Spanish ALTA/MEDIA/BAJA too), else None."""
        return _PRIORITY_WORDS.get(_fold(text))


_PRIORITY_RANKS = {Priority.HIGH: 0, Priority.MEDIUM: 1, Priority.LOW: 2}
_PRIORITY_WORDS = {
    "HIGH": Priority.HIGH,
    "MEDIUM": Priority.MEDIUM,
    "LOW": Priority.LOW,
    "ALTA": Priority.HIGH,
    "MEDIA": Priority.MEDIUM,
    "BAJA": Priority.LOW,
}


@dataclass(frozen=True)
class Phase:
    """One `### PHASE N: name` of the implementation plan and its objective bullets."""

    name: str
    objectives: tuple[str, ...]


@dataclass(frozen=True)
class SuccessMetric:
    """One `- **Name**: criteria` line of the success metrics."""

    name: str
    criteria: str


@dataclass(frozen=True)
class CompletedObjective:
    """One `- ✅ text` (or `- ❌ text`) item of a completed phase."""

    text: str
    done: bool


@dataclass(frozen=True)
class CompletedPhase:
    """One `### PHASE N: name ✅` (or ❌) of the completed part."""

    name: str
    done: bool
    objectives: tuple[CompletedObjective, ...]


@dataclass(frozen=True)
class MetricResult:
    """One `- ✅ **Name**: result` line of the success metrics achieved."""

    name: str
    result: str
    achieved: bool


@dataclass(frozen=True)
class Section:
    """A `## heading` section the template does not know, kept verbatim."""

    heading: str
    text: str


@dataclass(frozen=True)
class Handoff:
    """A unit of work, as written in the handoff template."""

    name: str
    status: str = "PENDING"
    date: str = ""
    priority: Priority = Priority.MEDIUM
    priority_note: str = ""
    dependencies: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    progress_percent: int = 0
    progress_note: str = ""
    phases: tuple[Phase, ...] = ()
    success_metrics: tuple[SuccessMetric, ...] = ()
    completed_phases: tuple[CompletedPhase, ...] = ()
    metrics_achieved: tuple[MetricResult, ...] = ()
    completion_summary: str | None = None
    extra_sections: tuple[Section, ...] = ()
    language: Language = "en"

    @property
    def title(self) -> str:
        """The priority note when there is one (it says what the work is), else the name."""
        return self.priority_note or self.name


@dataclass(frozen=True)
class Problem:
    """Something wrong in a handoff document; `line` is 1-based, 0 means the whole text."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class HandoffError(ValueError):
    """A handoff document that does not fit the template; `problems` lists every fault."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def to_wire(self) -> list[dict[str, Any]]:
        """The problems as the protocol's `data.errors`: `[{"line": n, "message": m}]`."""
        return [{"line": p.line, "message": p.message} for p in self.problems]


class InvalidNameError(ValueError):
    """A handoff name that cannot be a branch or a directory name."""


# --------------------------------------------------------------------------- names

_NAME_ALLOWED = (
    "Use 1-100 characters: ASCII letters, digits, '.', '_' and '-', starting with a letter or digit"
)
_NAME_CHAR_RE = re.compile(r"[A-Za-z0-9._-]")
# A dependency list that is exactly one of these means "no dependencies", so no handoff
# (or label) may be called that: it could never be depended on.
_NONE_WORDS = frozenset({"NONE", "NINGUNA", "NINGUNO", "N/A", ""})


def _name_reasons(name: str) -> list[str]:
    reasons: list[str] = []
    if not name:
        return ["it is empty"]
    if len(name) > MAX_NAME_LENGTH:
        reasons.append(f"it is {len(name)} characters long (at most {MAX_NAME_LENGTH})")
    if name in (".", ".."):
        reasons.append("it would name the folder itself or its parent")
    if "/" in name or "\\" in name:
        reasons.append("it contains a slash; a handoff name is one folder, not a path")
    if any(c.isspace() for c in name):
        reasons.append("it contains whitespace")
    controls = sorted({c for c in name if unicodedata.category(c).startswith("C")})
    if controls:
        shown = ", ".join(f"U+{ord(c):04X}" for c in controls)
        reasons.append(f"it contains control or invisible characters ({shown})")
    others = sorted(
        {
            c
            for c in name
            if not _NAME_CHAR_RE.fullmatch(c)
            and c not in "/\\"
            and not c.isspace()
            and not unicodedata.category(c).startswith("C")
        }
    )
    if others:
        reasons.append("it contains " + ", ".join(_q(c) for c in others))
    if not _NAME_CHAR_RE.fullmatch(name[0]) or name[0] in "._-":
        reasons.append("it does not start with a letter or digit")
    if ".." in name and name != "..":
        reasons.append('it contains ".."')
    if name.endswith(".lock"):
        reasons.append('it ends with ".lock", which git reserves for lock files')
    elif name.endswith(".") and name not in (".", ".."):
        reasons.append('it ends with "."')
    if not reasons and _fold(name) in _NONE_WORDS:
        reasons.append(f'{_q(name)} is reserved: as a dependency list it means "none"')
    return reasons


def _suggest_name(name: str) -> str | None:
    candidate = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip())
    candidate = re.sub(r"\.{2,}", ".", candidate)
    candidate = re.sub(r"(\.lock)+$", "", candidate)
    candidate = candidate.strip("._-")[:MAX_NAME_LENGTH].rstrip("._-")
    if candidate and candidate != name and not _name_reasons(candidate):
        return candidate
    return None


def validate_name(name: str) -> str:
    """Return `name` if it can name a handoff, else raise `InvalidNameError`.

    A handoff name becomes the directory of its worktree and the branch
    `handoff/<name>`, so it must be a single safe path component and a valid git ref
    component. The error says every reason the name was refused and what is allowed.
    """
    if not isinstance(name, str):  # names arrive from JSON and TOML too
        raise InvalidNameError(f"handoff name must be a string, not {type(name).__name__}")
    reasons = _name_reasons(name)
    if not reasons and not pygit2.reference_is_valid_name(f"refs/heads/{BRANCH_PREFIX}{name}"):
        # The rules above are meant to imply a valid ref; this guards against a gap.
        reasons.append("git does not accept it in a branch name")
    if reasons:
        message = f"invalid handoff name {_q(name)}: {'; '.join(reasons)}. {_NAME_ALLOWED}"
        suggestion = _suggest_name(name)
        if suggestion is not None:
            message += f', e.g. "{suggestion}"'
        raise InvalidNameError(message)
    return name


def branch_name(name: str) -> str:
    """The git branch of a handoff: `handoff/<name>` (the name is validated first)."""
    return BRANCH_PREFIX + validate_name(name)


_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+/-]{0,63}")


def _label_problem(label: str) -> str | None:
    if not _LABEL_RE.fullmatch(label):
        return (
            f"label {_q(label)} is not valid; a label is 1-64 ASCII letters, digits or "
            "'.', '_', ':', '+', '/', '-', starting with a letter or digit, and labels "
            "are separated by commas"
        )
    if _fold(label) in _NONE_WORDS:
        return f"label {_q(label)} is reserved; leave the **Labels** line out for no labels"
    return None


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class _Words:
    date: str
    date_priority: str
    date_status: str
    status: str
    priority: str
    dependencies: str
    labels: str
    progress: str
    plan: str
    phase: str
    metrics: str
    none: str


_WORDS: dict[Language, _Words] = {
    "en": _Words(
        date="DATE",
        date_priority="PRIORITY",
        date_status="STATUS",
        status="Status",
        priority="Priority",
        dependencies="Dependencies",
        labels="Labels",
        progress="Progress",
        plan="IMPLEMENTATION PLAN",
        phase="PHASE",
        metrics="SUCCESS METRICS",
        none="none",
    ),
    "es": _Words(
        date="FECHA",
        date_priority="PRIORIDAD",
        date_status="ESTADO",
        status="Estado",
        priority="Prioridad",
        dependencies="Dependencias",
        labels="Etiquetas",
        progress="Progreso",
        plan="PLAN DE IMPLEMENTACIÓN",
        phase="FASE",
        metrics="MÉTRICAS DE ÉXITO",
        none="ninguna",
    ),
}

# The completed part is written as in the seed template whatever the language.
_COMPLETED_HEADING = "IMPLEMENTATION COMPLETED ✅"
_ACHIEVED_HEADING = "SUCCESS METRICS ACHIEVED 📊"
_TRAILER_LABEL = "HANDOFF COMPLETED"
_DONE = "✅"
_NOT_DONE = "❌"

# Keys are folded (see _fold); the value says which field and which language it votes for.
_DATE_FIELDS: dict[str, tuple[str, Language]] = {
    "DATE": ("date", "en"),
    "FECHA": ("date", "es"),
    "PRIORITY": ("priority", "en"),
    "PRIORIDAD": ("priority", "es"),
    "STATUS": ("status", "en"),
    "ESTADO": ("status", "es"),
}
_UPDATE_FIELDS: dict[str, tuple[str, Language]] = {
    "STATUS": ("status", "en"),
    "ESTADO": ("status", "es"),
    "PRIORITY": ("priority", "en"),
    "PRIORIDAD": ("priority", "es"),
    "DEPENDENCIES": ("dependencies", "en"),
    "DEPENDENCY": ("dependencies", "en"),
    "DEPENDENCIAS": ("dependencies", "es"),
    "LABELS": ("labels", "en"),
    "ETIQUETAS": ("labels", "es"),
    "PROGRESS": ("progress", "en"),
    "PROGRESO": ("progress", "es"),
}
_SECTIONS: dict[str, tuple[str, Language | None]] = {
    "STATUS UPDATE": ("status", None),
    "ACTUALIZACION DE ESTADO": ("status", None),
    "IMPLEMENTATION PLAN": ("plan", "en"),
    "PLAN DE IMPLEMENTACION": ("plan", "es"),
    "SUCCESS METRICS": ("metrics", "en"),
    "METRICAS DE EXITO": ("metrics", "es"),
    "IMPLEMENTATION COMPLETED": ("completed", None),
    "IMPLEMENTACION COMPLETADA": ("completed", None),
    "SUCCESS METRICS ACHIEVED": ("achieved", None),
    "METRICAS DE EXITO ALCANZADAS": ("achieved", None),
    "METRICAS ALCANZADAS": ("achieved", None),
}
_TRAILER_LABELS = frozenset({"HANDOFF COMPLETED", "HANDOFF COMPLETADO"})
_SECTION_TITLES = {
    "status": "STATUS UPDATE",
    "plan": "IMPLEMENTATION PLAN",
    "metrics": "SUCCESS METRICS",
    "completed": _COMPLETED_HEADING,
    "achieved": _ACHIEVED_HEADING,
}

_DONE_MARKS = frozenset({"✅", "✔", "✓", "☑"})
_NOT_DONE_MARKS = frozenset({"❌", "✗", "✘", "✖"})
_MARK = "|".join(re.escape(m) for m in sorted(_DONE_MARKS | _NOT_DONE_MARKS))

_HEADER_RE = re.compile(
    r"#\s*HANDOFF\s*:\s*(?P<name>.*?)(?:\s+-(?:\s+(?P<status>.*?))?)?\s*", re.IGNORECASE
)
_H2_RE = re.compile(r" {0,3}##(?:\s+(?P<title>.*?))?\s*")
_H3_RE = re.compile(r"###(?:\s+(?P<title>.*?))?\s*")
_PHASE_RE = re.compile(
    r"(?P<word>PHASE|FASE)(?![^\W\d_])\s*(?P<num>[0-9]+)?\s*(?:[:.–—-]\s*)?(?P<name>.*)",
    re.IGNORECASE,
)
_BULLET_RE = re.compile(r"[-*+](?:\s+(?P<text>.*))?")
_RULE_RE = re.compile(r"-{3,}|\*{3,}|_{3,}")
_FENCE_RE = re.compile(r" {0,3}(?P<fence>`{3,}|~{3,})")
# Both `**Label**: value` and `**Label:** value` are common.
_FIELD_RE = re.compile(r"\*\*(?P<label>[^*]+?)\s*(?:\*\*\s*:|:\s*\*\*)\s*(?P<value>.*)")
_PRIORITY_RE = re.compile(r"(?P<word>[^\s:–—-]*)(?:\s*[:–—-]\s*|\s+)?(?P<note>.*)")
_PROGRESS_RE = re.compile(r"(?P<num>[^\s%]*)\s*%?(?:\s*[:–—-]\s*|\s+)?(?P<note>.*)")
_ITEM_MARK_RE = re.compile(rf"(?P<mark>{_MARK})\ufe0f?\s*(?P<text>.*)")
_HEADING_MARK_RE = re.compile(rf"(?P<name>.*?)\s*(?P<mark>{_MARK})\ufe0f?")
_EDGE_RE = re.compile(r"^[\W_]+|[\W_]+$")
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
_INNER_BREAKS_RE = re.compile("[" + "".join(sorted(_LINE_BREAKS - {"\n"})) + "]")


def _fold(text: str) -> str:
    """Upper case, accents and surrounding punctuation/emoji removed, spaces collapsed.

    Labels and headings are compared folded so that `Métricas de éxito`, `METRICAS DE
    EXITO` and `SUCCESS METRICS ACHIEVED 📊` match their table entries.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _EDGE_RE.sub("", " ".join(bare.upper().split()))


def _q(text: str, limit: int = 60) -> str:
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return json.dumps(text, ensure_ascii=False)


def _one_line(text: str) -> str:
    if any(c in _LINE_BREAKS for c in text):
        return " ".join(text.split())
    return text


def _mark(done: bool) -> str:
    return _DONE if done else _NOT_DONE


def _split_mark(text: str) -> tuple[str, bool | None]:
    m = _HEADING_MARK_RE.fullmatch(text)
    if m is None:
        return text, None
    return m["name"], m["mark"] in _DONE_MARKS


def _section_kind(heading: str) -> str | None:
    """Which template section a `## heading` is, or None for a section kept verbatim."""
    entry = _SECTIONS.get(_fold(heading))
    return None if entry is None else entry[0]


# --------------------------------------------------------------------------- parser

_LineKind = Literal["text", "fence", "fenced"]


@dataclass
class _Block:
    heading: str
    line: int
    lines: list[tuple[int, str, _LineKind]] = dataclasses.field(default_factory=list)


@dataclass
class _Located:
    line: int
    value: str


class _Parser:
    def __init__(self, text: str) -> None:
        text = text.removeprefix("\ufeff")
        # Other line-break characters (a lone CR, form feed, U+2028...) inside a line
        # read as a space: the renderer writes them so (they would break the line for
        # other tools), and parse(render(x)) must give x back. Found by the fuzzer.
        self.lines = [
            _INNER_BREAKS_RE.sub(" ", line) for line in text.replace("\r\n", "\n").split("\n")
        ]
        self.problems: list[Problem] = []
        self.votes: list[Language] = []
        self.summary: _Located | None = None
        self.name = ""
        self.header_line = 0
        self.header_status: _Located | None = None
        self.date_fields: dict[str, _Located] = {}
        self.update_fields: dict[str, _Located] = {}
        self.phases: list[tuple[int, str, list[str]]] = []
        self.metrics: list[SuccessMetric] = []
        self.metric_lines = 0
        self.completed: list[tuple[str, bool, list[CompletedObjective]]] = []
        self.achieved: list[MetricResult] = []
        self.extra: list[Section] = []

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(line, message))

    # -- splitting into blocks ------------------------------------------------------

    def split(self) -> tuple[_Block, list[_Block]]:
        preamble = _Block("", 0)
        blocks: list[_Block] = []
        current = preamble
        fence: tuple[str, int, int] | None = None
        for no, raw in enumerate(self.lines, 1):
            if fence is not None:
                char, length, _ = fence
                if re.fullmatch(rf" {{0,3}}{re.escape(char)}{{{length},}}\s*", raw):
                    fence = None
                current.lines.append((no, raw, "fenced"))
                continue
            opening = _FENCE_RE.match(raw)
            if opening is not None:
                fence = (opening["fence"][0], len(opening["fence"]), no)
                current.lines.append((no, raw, "fence"))
                continue
            heading = _H2_RE.fullmatch(raw)
            if heading is not None:
                current = _Block(heading["title"] or "", no)
                blocks.append(current)
                continue
            field = _FIELD_RE.fullmatch(raw.strip())
            if field is not None and _fold(field["label"]) in _TRAILER_LABELS:
                if self.summary is not None:
                    self.problem(
                        no,
                        f"second **{_TRAILER_LABEL}** line (the first is on line "
                        f"{self.summary.line}); keep only one",
                    )
                else:
                    self.summary = _Located(no, field["value"].strip())
                self._drop_rule(current)
                continue
            current.lines.append((no, raw, "text"))
        if fence is not None:
            self.problem(
                fence[2],
                f"code block opened here is never closed; add a closing {fence[0] * 3} line",
            )
        return preamble, blocks

    @staticmethod
    def _drop_rule(block: _Block) -> None:
        # The `---` right above **HANDOFF COMPLETED** belongs to the trailer, not to the
        # section it happens to follow; render writes it back.
        index = len(block.lines) - 1
        while index >= 0 and not block.lines[index][1].strip():
            index -= 1
        if index >= 0 and block.lines[index][2] == "text":
            if _RULE_RE.fullmatch(block.lines[index][1].strip()):
                del block.lines[index:]

    # -- helpers for structured blocks ----------------------------------------------

    def structured_lines(self, block: _Block, where: str) -> list[tuple[int, str]]:
        """Non-blank, non-rule lines of a structured block; code blocks are refused."""
        out: list[tuple[int, str]] = []
        for no, raw, kind in block.lines:
            if kind == "fence":
                self.problem(
                    no,
                    f'code block inside {where}; move it to a "## " section of its own',
                )
                continue
            if kind == "fenced":
                continue
            line = raw.strip()
            if not line or _RULE_RE.fullmatch(line):
                continue
            out.append((no, line))
        return out

    def nowhere(self, no: int, line: str, where: str, holds: str) -> None:
        self.problem(
            no,
            f"text {_q(line)} does not fit in {where}, which holds only {holds}; "
            'change it to that form or move it to a "## " section of its own',
        )

    # -- preamble ---------------------------------------------------------------------

    def parse_preamble(self, block: _Block) -> None:
        for no, raw, kind in block.lines:
            line = raw.strip()
            if kind == "text" and (not line or _RULE_RE.fullmatch(line)):
                continue
            if kind == "text" and not self.header_line:
                header = _HEADER_RE.fullmatch(line)
                if header is not None:
                    self.parse_header(no, header)
                    continue
            if kind == "text" and self.header_line and not self.date_fields:
                if self.parse_date_line(no, line):
                    continue
            if kind == "fenced":
                continue
            if not self.header_line:
                self.problem(
                    no,
                    f"text {_q(line)} comes before the header; a handoff starts with "
                    '"# HANDOFF: <name> - <STATUS>"',
                )
            else:
                self.problem(
                    no,
                    f"text {_q(line)} is outside every section; move it under a "
                    '"## " heading of its own (kept as written) or remove it',
                )
        if not self.header_line:
            self.problem(1, 'missing header; start with "# HANDOFF: <name> - <STATUS>"')
        elif not self.date_fields:
            self.problem(
                self.header_line,
                'missing the line "**DATE**: <date> | **PRIORITY**: <HIGH/MEDIUM/LOW> | '
                '**STATUS**: <status>" under the header; add it',
            )

    def parse_header(self, no: int, header: re.Match[str]) -> None:
        self.header_line = no
        self.name = header["name"]
        try:
            validate_name(self.name)
        except InvalidNameError as err:
            self.problem(no, str(err))
        status = (header["status"] or "").strip()
        if not status:
            self.problem(no, 'the header has no status; write "# HANDOFF: <name> - <STATUS>"')
        else:
            self.header_status = _Located(no, status.upper())

    def parse_date_line(self, no: int, line: str) -> bool:
        parts = [p.strip() for p in line.split("|")]
        first = _FIELD_RE.fullmatch(parts[0])
        if first is None or _fold(first["label"]) not in _DATE_FIELDS:
            return False
        for part in parts:
            field = _FIELD_RE.fullmatch(part)
            if field is None:
                self.problem(
                    no,
                    f"{_q(part)} is not a field; each part of this line looks like "
                    '"**PRIORITY**: HIGH", separated by " | "',
                )
                continue
            entry = _DATE_FIELDS.get(_fold(field["label"]))
            if entry is None:
                self.problem(
                    no,
                    f"unknown field {_q(field['label'])} in the date line; it holds "
                    "DATE (FECHA), PRIORITY (PRIORIDAD) and STATUS (ESTADO)",
                )
                continue
            key, language = entry
            self.votes.append(language)
            if key in self.date_fields:
                self.problem(no, f"the date line names {key} twice; keep one")
                continue
            self.date_fields[key] = _Located(no, field["value"].strip())
        for key, label in (("date", "DATE"), ("priority", "PRIORITY"), ("status", "STATUS")):
            if key not in self.date_fields:
                self.problem(no, f'the date line has no {label}; add "| **{label}**: ..."')
        return True

    # -- ## STATUS UPDATE ---------------------------------------------------------

    def parse_status_update(self, block: _Block) -> None:
        for no, line in self.structured_lines(block, "STATUS UPDATE"):
            # Tolerate the fields written as a bullet list.
            line = re.sub(r"^[-+]\s+", "", line)
            field = _FIELD_RE.fullmatch(line)
            if field is None:
                self.nowhere(no, line, "STATUS UPDATE", '"**Field**: value" lines')
                continue
            entry = _UPDATE_FIELDS.get(_fold(field["label"]))
            if entry is None:
                self.problem(
                    no,
                    f"unknown field {_q(field['label'])} in STATUS UPDATE; the fields are "
                    "Status, Priority, Dependencies, Labels and Progress (Estado, "
                    'Prioridad, Dependencias, Etiquetas, Progreso); put other notes in a "## " '
                    "section of their own",
                )
                continue
            key, language = entry
            self.votes.append(language)
            if key in self.update_fields:
                self.problem(
                    no,
                    f"second {key} field (the first is on line "
                    f"{self.update_fields[key].line}); keep only one",
                )
                continue
            self.update_fields[key] = _Located(no, field["value"].strip())
        for key, example in (
            ("status", "**Status**: PENDING"),
            ("priority", "**Priority**: HIGH - what this is about"),
        ):
            if key not in self.update_fields:
                self.problem(block.line, f'STATUS UPDATE has no {key}; add "{example}"')

    # -- ## IMPLEMENTATION PLAN -------------------------------------------------------

    def parse_plan(self, block: _Block) -> None:
        current: list[str] | None = None
        in_unknown = False
        holds = '"### PHASE N: name" headings and "- objective" bullets'
        for no, line in self.structured_lines(block, "IMPLEMENTATION PLAN"):
            h3 = _H3_RE.fullmatch(line)
            if h3 is not None:
                title = h3["title"] or ""
                phase = _PHASE_RE.fullmatch(title)
                if phase is None:
                    self.problem(
                        no,
                        f"unknown subsection {_q(title)} in IMPLEMENTATION PLAN; "
                        'write "### PHASE N: name"',
                    )
                    current, in_unknown = None, True
                    continue
                self.votes.append("es" if phase["word"].upper() == "FASE" else "en")
                name = phase["name"].strip()
                if not name:
                    self.problem(no, f'the phase has no name; write "### {title}: <name>"')
                current, in_unknown = [], False
                self.phases.append((no, name, current))
                continue
            bullet = _BULLET_RE.fullmatch(line)
            if bullet is not None:
                text = (bullet["text"] or "").strip()
                if in_unknown:
                    continue
                if current is None:
                    self.problem(
                        no,
                        f"objective {_q(text)} is outside any phase; put it under a "
                        '"### PHASE N: name" heading',
                    )
                elif not text:
                    self.problem(no, "empty objective; write the objective after the dash")
                else:
                    current.append(text)
                continue
            self.nowhere(no, line, "IMPLEMENTATION PLAN", holds)
        for no, name, objectives in self.phases:
            if not objectives:
                self.problem(
                    no,
                    f'phase {_q(name)} has no objectives; add "- objective" bullets under it',
                )

    # -- ## SUCCESS METRICS -----------------------------------------------------------

    def parse_metrics(self, block: _Block) -> None:
        for no, line in self.structured_lines(block, "SUCCESS METRICS"):
            bullet = _BULLET_RE.fullmatch(line)
            if bullet is None:
                self.nowhere(no, line, "SUCCESS METRICS", '"- **Name**: criteria" bullets')
                continue
            self.metric_lines += 1
            text = (bullet["text"] or "").strip()
            metric = _FIELD_RE.fullmatch(text)
            if metric is None:
                self.problem(
                    no,
                    f"success metric {_q(text)} is malformed; write "
                    '"- **Name**: criteria", e.g. "- **Overall**: the test suite passes"',
                )
                continue
            name, criteria = metric["label"].strip(), metric["value"].strip()
            if not criteria:
                self.problem(no, f"success metric {_q(name)} has no criteria after the colon")
                continue
            self.metrics.append(SuccessMetric(name, criteria))

    # -- ## IMPLEMENTATION COMPLETED ✅ -----------------------------------------------

    def parse_completed(self, block: _Block, *, metrics_first: bool) -> None:
        mode: Literal["start", "phase", "metrics", "unknown"]
        mode = "metrics" if metrics_first else "start"
        current: list[CompletedObjective] = []
        where = _SECTION_TITLES["achieved" if metrics_first else "completed"]
        for no, line in self.structured_lines(block, where):
            h3 = _H3_RE.fullmatch(line)
            if h3 is not None:
                title = h3["title"] or ""
                phase = _PHASE_RE.fullmatch(title)
                if phase is not None:
                    name, done = _split_mark(phase["name"].strip())
                    if done is None:
                        self.problem(
                            no,
                            f"end the heading with {_DONE} (phase done) or {_NOT_DONE} (not done)",
                        )
                        done = False
                    current = []
                    self.completed.append((name, done, current))
                    mode = "phase"
                elif _SECTIONS.get(_fold(title), ("", None))[0] == "achieved":
                    mode = "metrics"
                else:
                    self.problem(
                        no,
                        f"unknown subsection {_q(title)} in {where}; write "
                        f'"### PHASE N: name {_DONE}" or "### {_ACHIEVED_HEADING}"',
                    )
                    mode = "unknown"
                continue
            bullet = _BULLET_RE.fullmatch(line)
            if bullet is None:
                self.nowhere(
                    no,
                    line,
                    where,
                    f'"### PHASE N: name {_DONE}" headings and "- {_DONE} ..." bullets',
                )
                continue
            if mode == "unknown":
                continue
            text = (bullet["text"] or "").strip()
            if mode == "start":
                self.problem(
                    no,
                    f"item {_q(text)} is outside any phase; put it under "
                    f'"### PHASE N: name {_DONE}" or "### {_ACHIEVED_HEADING}"',
                )
                continue
            marked = _ITEM_MARK_RE.fullmatch(text)
            if marked is None:
                self.problem(
                    no,
                    f"item {_q(text)} has no mark; start it with {_DONE} (done) or "
                    f"{_NOT_DONE} (not done)",
                )
                continue
            done = marked["mark"] in _DONE_MARKS
            rest = marked["text"].strip()
            if mode == "phase":
                current.append(CompletedObjective(rest, done))
                continue
            metric = _FIELD_RE.fullmatch(rest)
            if metric is None:
                self.problem(
                    no,
                    f'metric result {_q(text)} is malformed; write "- {_DONE} **Name**: result"',
                )
                continue
            self.achieved.append(
                MetricResult(metric["label"].strip(), metric["value"].strip(), done)
            )

    # -- extra sections ---------------------------------------------------------------

    def parse_extra(self, block: _Block) -> None:
        if not block.heading:
            self.problem(block.line, 'empty section heading; write "## <heading>"')
        raws = [raw for _, raw, _ in block.lines]
        while raws and not raws[0].strip():
            raws.pop(0)
        while raws and not raws[-1].strip():
            raws.pop()
        self.extra.append(Section(block.heading, "\n".join(raws)))

    # -- putting it together ----------------------------------------------------------

    def run(self) -> Handoff:
        preamble, blocks = self.split()
        self.parse_preamble(preamble)
        seen: dict[str, int] = {}
        for block in blocks:
            entry = _SECTIONS.get(_fold(block.heading))
            if entry is None:
                self.parse_extra(block)
                continue
            kind, language = entry
            if language is not None:
                self.votes.append(language)
            if kind in seen:
                self.problem(
                    block.line,
                    f"second {_q(block.heading)} section (the first is on line "
                    f"{seen[kind]}); merge them",
                )
            seen.setdefault(kind, block.line)
            if kind == "status":
                self.parse_status_update(block)
            elif kind == "plan":
                self.parse_plan(block)
            elif kind == "metrics":
                self.parse_metrics(block)
            else:
                self.parse_completed(block, metrics_first=kind == "achieved")
        if "status" not in seen:
            self.problem(
                0,
                'missing "## STATUS UPDATE" section; add it with **Status**, **Priority**, '
                "**Dependencies** and **Progress** lines",
            )
        if "plan" not in seen:
            self.problem(
                0,
                'missing "## IMPLEMENTATION PLAN" section; add it with "### PHASE 1: <name>" '
                'and "- objective" bullets',
            )
        elif not self.phases:
            self.problem(
                seen["plan"],
                'IMPLEMENTATION PLAN has no phases; add "### PHASE 1: <name>" with '
                '"- objective" bullets',
            )
        if "metrics" not in seen:
            self.problem(
                0,
                'missing "## SUCCESS METRICS" section; add it with "- **Overall**: <criteria>"',
            )
        elif not self.metric_lines:
            self.problem(
                seen["metrics"],
                'SUCCESS METRICS has no metrics; add "- **Overall**: <criteria>"',
            )
        status = self.resolve_status()
        priority, note = self.resolve_priority()
        dependencies = self.resolve_dependencies()
        labels = self.resolve_labels()
        percent, progress_note = self.resolve_progress()
        if self.problems:
            raise HandoffError(sorted(self.problems, key=lambda p: p.line))
        assert priority is not None  # no problems means a priority was found
        return Handoff(
            name=self.name,
            status=status,
            date=self.date_fields["date"].value,
            priority=priority,
            priority_note=note,
            dependencies=dependencies,
            labels=labels,
            progress_percent=percent,
            progress_note=progress_note,
            phases=tuple(Phase(name, tuple(objs)) for _, name, objs in self.phases),
            success_metrics=tuple(self.metrics),
            completed_phases=tuple(
                CompletedPhase(name, done, tuple(objs)) for name, done, objs in self.completed
            ),
            metrics_achieved=tuple(self.achieved),
            completion_summary=None if self.summary is None else self.summary.value,
            extra_sections=tuple(self.extra),
            language=self.votes[0] if self.votes else "en",
        )

    def resolve_status(self) -> str:
        candidates: list[tuple[str, _Located]] = []
        if "status" in self.update_fields:
            candidates.append(("STATUS UPDATE", self.update_fields["status"]))
        if "status" in self.date_fields:
            candidates.append(("date line", self.date_fields["status"]))
        if self.header_status is not None:
            candidates.append(("header", self.header_status))
        for _, found in candidates:
            found.value = found.value.upper()
            if not found.value:
                self.problem(found.line, 'status is empty; write one, e.g. "PENDING"')
            elif "|" in found.value:
                self.problem(found.line, f'status {_q(found.value)} must not contain "|"')
        if not candidates:
            return ""
        where, canonical = candidates[0]
        for other_where, other in candidates[1:]:
            if other.value and canonical.value and other.value != canonical.value:
                self.problem(
                    other.line,
                    f"status {_q(other.value)} in the {other_where} does not match status "
                    f"{_q(canonical.value)} in the {where} on line {canonical.line}; "
                    "make them the same",
                )
        return canonical.value

    def priority_of(self, found: _Located) -> tuple[Priority | None, str]:
        match = _PRIORITY_RE.fullmatch(found.value)
        assert match is not None  # every part of the pattern is optional
        word, note = match["word"], match["note"].strip()
        if not word:
            self.problem(found.line, "priority is empty; write HIGH, MEDIUM or LOW")
            return None, note
        priority = Priority.from_text(word)
        if priority is None:
            self.problem(
                found.line,
                f"priority {_q(word)} is not one of HIGH, MEDIUM, LOW "
                "(Spanish ALTA, MEDIA, BAJA are accepted too)",
            )
        return priority, note

    def resolve_priority(self) -> tuple[Priority | None, str]:
        update = self.update_fields.get("priority")
        header = self.date_fields.get("priority")
        priority, note = (None, "") if update is None else self.priority_of(update)
        if header is not None:
            header_priority, header_note = self.priority_of(header)
            if header_note:
                self.problem(
                    header.line,
                    f"the date line takes only the priority word; move {_q(header_note)} "
                    "to the **Priority** line of STATUS UPDATE",
                )
            if priority is None and update is None:
                priority = header_priority
            elif (
                update is not None
                and priority is not None
                and header_priority is not None
                and priority is not header_priority
            ):
                self.problem(
                    header.line,
                    f"priority {header_priority.value} in the date line does not match "
                    f"priority {priority.value} in STATUS UPDATE on line {update.line}; "
                    "make them the same",
                )
        return priority, note

    def resolve_dependencies(self) -> tuple[str, ...]:
        found = self.update_fields.get("dependencies")
        if found is None:
            return ()
        names = _split_list(found.value)
        seen: set[str] = set()
        for name in names:
            try:
                validate_name(name)
            except InvalidNameError as err:
                self.problem(found.line, f"in **Dependencies**: {err}; separate names with commas")
            if name in seen:
                self.problem(found.line, f"dependency {_q(name)} is listed twice; keep one")
            elif name == self.name:
                self.problem(
                    found.line,
                    f"{_q(name)} depends on itself; remove it from **Dependencies**",
                )
            seen.add(name)
        return tuple(dict.fromkeys(names))

    def resolve_labels(self) -> tuple[str, ...]:
        found = self.update_fields.get("labels")
        if found is None:
            return ()
        labels = _split_list(found.value)
        seen: set[str] = set()
        for label in labels:
            message = _label_problem(label)
            if message is not None:
                self.problem(found.line, message)
            if label in seen:
                self.problem(found.line, f"label {_q(label)} is listed twice; keep one")
            seen.add(label)
        return tuple(dict.fromkeys(labels))

    def resolve_progress(self) -> tuple[int, str]:
        found = self.update_fields.get("progress")
        if found is None:
            return 0, ""
        match = _PROGRESS_RE.fullmatch(found.value)
        assert match is not None  # every part of the pattern is optional
        number, note = match["num"], match["note"].strip()
        hint = 'write a whole percentage from 0 to 100, e.g. "40% - tests written"'
        if not number:
            self.problem(found.line, f"progress is empty; {hint}")
            return 0, note
        if not re.fullmatch(r"[+-]?[0-9]+", number):
            kind = (
                "a whole number" if re.fullmatch(r"[+-]?[0-9]*[.,][0-9]+", number) else "a number"
            )
            self.problem(found.line, f"progress {_q(number)} is not {kind}; {hint}")
            return 0, note
        percent = int(number)
        if not 0 <= percent <= 100:
            self.problem(found.line, f"progress {percent}% is not between 0 and 100; {hint}")
        return percent, note


def _split_list(value: str) -> list[str]:
    if _fold(value) in _NONE_WORDS:
        return []
    return [item.strip() for item in value.split(",") if item.strip()]


def parse(text: str) -> Handoff:
    """Parse a handoff document written in the template.

    Raises `HandoffError` listing every problem found, each with its 1-based line number
    (0 for something missing from the whole document) and what to change.
    """
    return _Parser(text).run()


# --------------------------------------------------------------------------- renderer


def _field(label: str, value: str) -> str:
    return f"**{label}**:" + (f" {value}" if value else "")


def _with_note(head: str, note: str) -> str:
    return f"{head} - {note}" if note else head


def render(handoff: Handoff) -> str:
    """Write `handoff` as a markdown document in the template (ending with a newline).

    The labels are those of `handoff.language`; the completed part is written as in the
    seed template. Texts that hold line breaks are joined onto one line so the result
    always stays in the template.
    """
    words = _WORDS[handoff.language]
    status = _one_line(handoff.status)
    priority = handoff.priority.value
    out: list[str] = [
        f"# HANDOFF: {_one_line(handoff.name)} - {status}",
        "",
        " | ".join(
            (
                _field(words.date, _one_line(handoff.date)),
                _field(words.date_priority, priority),
                _field(words.date_status, status),
            )
        ),
        "",
        "## STATUS UPDATE",
        _field(words.status, status),
        _field(words.priority, _with_note(priority, _one_line(handoff.priority_note))),
        _field(words.dependencies, ", ".join(handoff.dependencies) or words.none),
    ]
    if handoff.labels:
        out.append(_field(words.labels, ", ".join(handoff.labels)))
    out.append(
        _field(
            words.progress,
            _with_note(f"{handoff.progress_percent}%", _one_line(handoff.progress_note)),
        )
    )
    out += ["", f"## {words.plan}"]
    for number, phase in enumerate(handoff.phases, 1):
        if number > 1:
            out.append("")
        out.append(f"### {words.phase} {number}: {_one_line(phase.name)}")
        out += [f"- {_one_line(objective)}" for objective in phase.objectives]
    out += ["", f"## {words.metrics}"]
    out += [
        "- " + _field(_one_line(m.name), _one_line(m.criteria)) for m in handoff.success_metrics
    ]
    for section in handoff.extra_sections:
        out += ["", f"## {_one_line(section.heading)}"]
        if section.text:
            out.append(section.text)
    if handoff.completed_phases or handoff.metrics_achieved:
        out += ["", f"## {_COMPLETED_HEADING}"]
        for number, done_phase in enumerate(handoff.completed_phases, 1):
            if number > 1:
                out.append("")
            name = _one_line(done_phase.name)
            head = f"### {words.phase} {number}:"
            out.append(
                f"{head} {name} {_mark(done_phase.done)}"
                if name
                else f"{head} {_mark(done_phase.done)}"
            )
            out += [
                " ".join(filter(None, ("-", _mark(item.done), _one_line(item.text))))
                for item in done_phase.objectives
            ]
        if handoff.metrics_achieved:
            if handoff.completed_phases:
                out.append("")
            out.append(f"### {_ACHIEVED_HEADING}")
            out += [
                f"- {_mark(r.achieved)} " + _field(_one_line(r.name), _one_line(r.result))
                for r in handoff.metrics_achieved
            ]
    if handoff.completion_summary is not None:
        out += ["", "---", _field(_TRAILER_LABEL, _one_line(handoff.completion_summary))]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- helpers


_FIELD_RULES = (
    "texts must be single lines without leading or trailing whitespace, status upper "
    "case, metric names without '*' or a trailing ':'"
)


def check(handoff: Handoff) -> list[Problem]:
    """Problems that keep `handoff` from being written in the template and read back.

    Useful for handoffs built from data rather than parsed from markdown. Line numbers
    refer to `render(handoff)`. An empty list means ``parse(render(handoff)) == handoff``.
    """
    try:
        back = parse(render(handoff))
    except HandoffError as err:
        return err.problems
    return [
        Problem(0, f"{f.name} reads back differently after rendering; {_FIELD_RULES}")
        for f in dataclasses.fields(Handoff)
        if getattr(back, f.name) != getattr(handoff, f.name)
    ]


def _clean_metric_name(name: str) -> str:
    return _one_line(name).replace("*", "").strip().rstrip(":").strip()


_LINE_BREAK_RE = re.compile(r"[ \t]*(?:\r\n|[\n\r\v\f\x1c-\x1e\x85\u2028\u2029])+[ \t]*")


def _joined_lines(text: str) -> str:
    """`text` on one line: each line break (with the blanks around it) becomes one space.

    Runs of spaces and tabs inside the line are the writer's and are kept.
    """
    return _LINE_BREAK_RE.sub(" ", text).strip()


def complete(
    handoff: Handoff,
    *,
    summary: str,
    phases: Sequence[CompletedPhase],
    metrics: Sequence[MetricResult],
    status: str = "COMPLETED",
) -> Handoff:
    """A copy of `handoff` with its completed part filled in.

    Sets the status (upper-cased), progress to 100% (the old progress note described
    unfinished work, so it is cleared), the completed phases, the metrics achieved and
    the closing summary. Texts are put on one line (a line break becomes one space; runs
    of spaces inside a line are the writer's and are kept) and metric names lose `*` and
    a trailing `:` so that the result renders in the template and parses back unchanged.
    """
    return dataclasses.replace(
        handoff,
        status=" ".join(status.split()).upper().replace("|", "/"),
        progress_percent=100,
        progress_note="",
        completed_phases=tuple(
            CompletedPhase(
                name=_joined_lines(phase.name),
                done=phase.done,
                objectives=tuple(
                    CompletedObjective(_joined_lines(item.text), item.done)
                    for item in phase.objectives
                ),
            )
            for phase in phases
        ),
        metrics_achieved=tuple(
            MetricResult(_clean_metric_name(m.name), _joined_lines(m.result), m.achieved)
            for m in metrics
        ),
        completion_summary=_joined_lines(summary),
    )


def to_wire(handoff: Handoff, body: str) -> dict[str, Any]:
    """The protocol's handoff object (PROTOCOL.md, `lease.acquire`); `body` is the markdown."""
    return {
        "name": handoff.name,
        "title": handoff.title,
        "priority": handoff.priority.value,
        "dependencies": list(handoff.dependencies),
        "labels": list(handoff.labels),
        "body": body,
        "phases": [
            {"name": phase.name, "objectives": list(phase.objectives)} for phase in handoff.phases
        ],
        "successMetrics": [
            {"name": metric.name, "criteria": metric.criteria} for metric in handoff.success_metrics
        ],
        "feedback": None,
    }
