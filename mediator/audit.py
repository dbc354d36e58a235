"""The audit log, and the events for guest accesses the policy watches, rate-limited.

Audit events (guest accesses to watched registers, hand-offs, quarantine,
operator commands, fabric calls) go to the same stream as the rest of the
log, each marked ``audit=True`` so they can be selected and kept apart.

A hostile guest can touch a watched register millions of times a second; the
journal must not pay for that. Each device has a token bucket: ``burst``
events at once, ``rate`` per second on average. Events over the budget are
counted, not logged, and the next logged event carries ``suppressed=N``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

audit_log = structlog.get_logger("mediator.audit", audit=True)


class RateLimiter:
    def __init__(
        self, rate: float = 50.0, burst: int = 200, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self.suppressed = 0

    def allow(self) -> int | None:
        """None when the event must be dropped; else how many were dropped before it."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            self.suppressed += 1
            return None
        self._tokens -= 1
        dropped, self.suppressed = self.suppressed, 0
        return dropped


class Auditor:
    """Writes audit events for one device: watched guest accesses and refused requests.

    Each kind has its own bucket, so a flood of one cannot hide the other.
    """

    def __init__(self, limiter: RateLimiter | None = None, refusals: RateLimiter | None = None) -> None:
        self.limiter = limiter or RateLimiter()
        self.refusal_limiter = refusals or RateLimiter()
        self.events = 0  # every event, logged or not

    def access(
        self, event: str, *, bar: int, offset: int, size: int, direction: str, value: bytes, action: str
    ) -> None:
        self._emit(
            self.limiter,
            event,
            bar=bar,
            offset=f"{offset:#x}",
            size=size,
            direction=direction,
            value="0x" + value[::-1].hex(),
            action=action,
        )

    def refused(self, *, msg_id: int, command: str, errno: str, why: str) -> None:
        """A request the daemon answered with an error: what a hostile client tried."""
        self._emit(
            self.refusal_limiter, "request refused", msg_id=msg_id, command=command, errno=errno, why=why
        )

    def _emit(self, limiter: RateLimiter, event: str, **fields: object) -> None:
        self.events += 1
        dropped = limiter.allow()
        if dropped is None:
            return
        if dropped:
            fields["suppressed"] = dropped
        audit_log.info(event, **fields)
