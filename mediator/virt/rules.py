"""Segments of the config space and the one rule each obeys.

A segment is a run of bytes with one owner (a header register, a capability,
or a gap) and one rule. The rule is the kernel's ``perm_bits`` pair, per
byte: ``virtual`` bits are served from (and written to) the daemon's shadow,
the others come from the device; only ``writable`` bits may be written.
The kind names which of the five shapes the masks take, for people reading
``inspect`` and the audit log:

- passthrough: virtual 0; reads come from the device, writable bits go to it.
- virtual: every bit from the shadow (emulated registers, capability headers).
- masked: a per-bit mix, from a register rule.
- hidden: virtual, never writable, shadow 0: reads 0, writes dropped.
- synthesized: virtual bytes of a capability the daemon adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RuleKind(StrEnum):
    PASSTHROUGH = "passthrough"
    VIRTUAL = "virtual"
    MASKED = "masked"
    HIDDEN = "hidden"
    SYNTHESIZED = "synthesized"


@dataclass(frozen=True, slots=True)
class Segment:
    start: int
    end: int  # exclusive
    owner: str
    kind: RuleKind
    virtual: bytes  # per-byte mask, len == end - start
    writable: bytes
    decided_by: str  # the quirk (or "core:...") that set this rule

    @property
    def size(self) -> int:
        return self.end - self.start

    def describe(self) -> str:
        if self.kind is RuleKind.PASSTHROUGH:
            return "passthrough" if any(self.writable) else "passthrough, read-only"
        return self.kind.value
