"""Logging: structlog, key=value or JSON lines on stderr.

Every line carries what it is about in its context (device, client), bound
with contextvars where a session starts. The journald and audit formats come
with the systemd integration; this is the minimal set-up they will extend.
"""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import EventDict

FORMATS = ("text", "json")
LEADING = ("timestamp", "level", "event")


def _leading_keys_first(_logger: object, _name: str, event: EventDict) -> EventDict:
    ordered: EventDict = {key: event.pop(key) for key in LEADING if key in event}
    ordered.update(event)
    return ordered


def configure(level: str = "info", format: str = "text") -> None:
    """``text``: key=value lines for people; ``json``: one object per line for machines."""
    renderer = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if format == "json"
        else structlog.processors.KeyValueRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _leading_keys_first,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
