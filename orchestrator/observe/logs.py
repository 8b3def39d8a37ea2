"""Structured logging: JSON lines to stdout by default (journald keeps them whole), or a
readable console format for people. Every event is one line with its context bound."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Set up structlog for the whole process; ``fmt`` is ``json`` or ``console``.

    Logs go to ``stream`` (default stdout, which systemd hands to the journal)."""
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    elif fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=True)
    else:
        raise ValueError(f"log format must be json or console, got {fmt!r}")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> FilteringBoundLogger:
    """A bound logger for one part of the daemon (``component`` is bound).

    Every module logs through this one pipeline: events are snake_case names with their
    facts as keys, never sentences with %-formatting, so they stay queryable as JSON."""
    logger: FilteringBoundLogger = structlog.get_logger(component=name)
    return logger
