"""Logging: structlog lines on stderr, for a person at a terminal or for journald.

Formats: ``console`` (structlog's readable columns), ``text`` (key=value
lines, easy to grep), ``json`` (one object per line). ``auto`` picks
console on a terminal and json elsewhere. Under systemd, when stderr is the
journal's stream (``JOURNAL_STREAM`` names its device and inode), json lines
get a ``<N>`` syslog level prefix so journald files each at its priority.
Every line carries what it is about in its context (device, client), bound
with contextvars where a session starts; audit events carry ``audit=True``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, TextIO, get_args

import structlog
from structlog.typing import EventDict, Processor

LogFormat = Literal["auto", "console", "text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
LEADING = ("timestamp", "level", "event")
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def _leading_keys_first(_logger: object, _name: str, event: EventDict) -> EventDict:
    ordered: EventDict = {key: event.pop(key) for key in LEADING if key in event}
    ordered.update(event)
    return ordered


def writes_to_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (its dev:inode in JOURNAL_STREAM)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{status.st_dev}:{status.st_ino}"


class _PriorityPrefixed:
    """A JSON renderer whose lines start with ``<N>``, journald's level prefix."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(self, logger: object, name: str, event: EventDict) -> str:
        priority = SYSLOG_PRIORITY.get(str(event.get("level", "info")), 6)
        line = self._json(logger, name, event)
        return f"<{priority}>{line.decode() if isinstance(line, bytes) else line}"


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a line is written (it may be replaced, e.g. by a test harness)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: LogLevel = "info", format: LogFormat = "auto", stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    if format == "auto":
        format = "console" if out.isatty() else "json"
    renderer: Processor
    if format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    elif format == "text":
        renderer = structlog.processors.KeyValueRenderer()
    elif writes_to_journal(out):
        renderer = _PriorityPrefixed()
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
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
        logger_factory=structlog.PrintLoggerFactory(stream or _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
