"""Agent-written text made safe to put in a commit message, and otherwise kept as written.

A report's summary is the agent's; the merge commit's structure (subject, body, trailers)
is the daemon's. Control characters go: a NUL ended the message early for git, so the
agent's own ``Handoff:`` / ``Signed-off-by:`` lines became the commit's trailers. Two kinds
of line would let git read structure into the agent's text: a ``---`` patch divider and a
scissors line make ``git interpret-trailers`` stop there and take the lines above as the
trailers. Such a line gets one leading space, which git does not look past; every other
line, its spacing and its words, is the agent's (README, "What happens to your words").
"""

from __future__ import annotations

import re
import unicodedata

# Embedding, override and isolate controls reorder what a reviewer sees ("Trojan Source");
# other format characters (zero-width joiners and spaces, marks in right-to-left text) are
# part of legitimate writing and stay.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_LINE_BREAKS_RE = re.compile("\r\n|[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]")
# git's patch divider ("---" then a blank or the end) and its scissors line ("# --- >8 ---").
_STRUCTURE_RE = re.compile(r"---(?:\s|$)|#\s*-*\s*(?:>8|8<)")
NO_SUMMARY = "(no summary)"


def _clean(line: str) -> str:
    return "".join(
        c for c in line if c == "\t" or not (unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS)
    )


def one_line(text: str) -> str:
    """``text`` as a single line without control characters (for a subject line)."""
    return " ".join(_clean(part).strip() for part in _LINE_BREAKS_RE.split(text)).strip()


def body(text: str) -> str:
    """``text`` as commit-message lines, otherwise as written.

    Its line breaks stay line breaks (Unicode ones become ``\\n``); blanks at its edges and
    control characters go; a run of blank lines becomes one; a line git would read as
    structure gets one leading space. Empty when nothing is left.
    """
    out: list[str] = []
    for raw in _LINE_BREAKS_RE.split(text.strip()):
        line = _clean(raw).rstrip()
        if not line.strip():
            if out and out[-1]:
                out.append("")
            continue
        out.append(" " + line if _STRUCTURE_RE.match(line) else line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)
