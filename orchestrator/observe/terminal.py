"""Agent-written text made safe for an operator's terminal.

Progress messages, questions, summaries and handoff titles come from agents, which are
untrusted. Printed raw, an escape sequence in them could write the operator's clipboard
(OSC 52), retitle the window, move the cursor to forge a status line, or hide text. Every
agent-written string that reaches a terminal (``status``, ``show``, ``status --watch``,
the demo) goes through :func:`visible` first.
"""

from __future__ import annotations

import unicodedata

# C0 controls (tab kept: it cannot move the cursor up or erase), DEL, C1 controls.
_CONTROL_PICTURES = {code: chr(0x2400 + code) for code in range(0x20) if code != 0x09}
_CONTROL_PICTURES[0x7F] = "\u2421"
# Format characters that legitimate text needs: zero-width (non-)joiners build emoji
# sequences and Persian or Indic words; they cannot move the cursor or reorder a line.
_JOINERS = frozenset("\u200c\u200d")


def visible(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character shown as a visible stand-in.

    C0 controls become their Unicode control pictures (ESC shows as ``␛``), DEL as ``␡``,
    and C1 controls, bidirectional overrides and other format characters as ``<U+XXXX>``,
    so a person sees that something was there and what it was. With ``keep_newlines``,
    line feeds stay line feeds (a multi-line body shown as such); a carriage return never
    does, since it lets a later line overwrite an earlier one.
    """
    out: list[str] = []
    for char in text:
        code = ord(char)
        if char == "\n" and keep_newlines:
            out.append(char)
        elif code in _CONTROL_PICTURES:
            out.append(_CONTROL_PICTURES[code])
        elif 0x80 <= code <= 0x9F or (
            char not in _JOINERS and unicodedata.category(char) in ("Cf", "Zl", "Zp")
        ):
            out.append(f"<U+{code:04X}>")
        else:
            out.append(char)
    return "".join(out)
