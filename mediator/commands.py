"""Operator commands (device wipe, fabric partitions): run, timed, and audited.

The daemon runs what the config names as an argv list, never through a
shell, with no stdin, a timeout, and its output captured. Each call, its
result and its duration go to the audit log whether it succeeds or not, so
who-did-what-when can be answered from the journal alone.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mediator.audit import audit_log

OUTPUT_KEPT = 400  # characters of the command's output kept in the log and records


@dataclass(frozen=True)
class CommandResult:
    ok: bool
    summary: str  # "exit 0 in 0.02 s", "timed out after 60 s", "cannot run: ..."
    output: str  # the tail of stdout and stderr
    seconds: float


def run_command(purpose: str, argv: Sequence[str], timeout: float, **context: object) -> CommandResult:
    """Run ``argv``; never raises for the command's own failure."""
    started = time.monotonic()
    try:
        completed = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        result = CommandResult(False, f"timed out after {timeout:g} s", _tail(e.stdout, e.stderr), timeout)
    except OSError as e:
        result = CommandResult(False, f"cannot run {argv[0]}: {e.strerror or e}", "", 0.0)
    else:
        seconds = time.monotonic() - started
        result = CommandResult(
            completed.returncode == 0,
            f"exit {completed.returncode} in {seconds:.2f} s",
            _tail(completed.stdout, completed.stderr),
            seconds,
        )
    (audit_log.info if result.ok else audit_log.error)(
        "operator command",
        purpose=purpose,
        argv=list(argv),
        ok=result.ok,
        result=result.summary,
        seconds=round(result.seconds, 3),
        output=result.output,
        **context,
    )
    return result


def _tail(*streams: str | bytes | None) -> str:
    text = "".join(s.decode(errors="replace") if isinstance(s, bytes) else (s or "") for s in streams)
    return text.strip()[-OUTPUT_KEPT:]
