"""Agent-written text made safe to put in a commit message.

A report's summary is the agent's; the merge commit's structure (subject, body, trailers)
is the daemon's. Control characters go (a NUL ended the message early for git, so the
agent's own ``Handoff:`` / ``Signed-off-by:`` lines became the commit's trailers), and
every summary line is indented so no line of it can be what git looks for at a line's
start: a ``---`` patch divider or a ``# --- >8 ---`` scissors line would make
``git interpret-trailers`` stop there and read the agent's lines as trailers.
"""

from __future__ import annotations

import unicodedata

INDENT = "    "


def _clean_char(char: str) -> str:
    if char == "\t":
        return " "
    category = unicodedata.category(char)
    # Cc: C0/C1 controls, DEL, NUL; Cf: bidi overrides and other invisible format
    # characters; Zl/Zp: Unicode line and paragraph separators (a line break to some tools).
    if category in ("Cc", "Cf", "Zl", "Zp") and char not in "\u200c\u200d":
        return ""
    return char


def one_line(text: str) -> str:
    """``text`` as a single line without control characters (for a subject line)."""
    return " ".join("".join(_clean_char(c) for c in part) for part in text.splitlines()).strip()


def body(text: str) -> str:
    """``text`` as indented lines without control characters: its own line breaks stay
    line breaks, but no line starts where git would read structure into it."""
    lines = ["".join(_clean_char(c) for c in line).rstrip() for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):  # at most one blank line in a row
            out.append(INDENT + line if line else "")
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)
