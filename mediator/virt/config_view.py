"""The guest's config space: every access split into segments, one rule each.

A read of any offset and length (1, 2 or 4 bytes from a guest; the whole 256
or 4096 bytes when QEMU realizes the device) is cut at segment boundaries.
Each piece is ``(device & ~virtual) | (shadow & virtual)``; a piece whose
bits are all virtual never touches the device, so hidden and emulated bytes
cost nothing and reveal nothing. A write keeps only ``writable`` bits: the
virtual ones land in the shadow, the others are read-modify-written to the
device, one segment (one register or body run) at a time, the way the
kernel's ``vfio_default_config_write`` does. Bytes with no writable bit are
dropped without any device access.

Reads need only the per-byte virtual mask, so the view keeps it whole and
caches, for each small access it has seen, the mask and the runs of bytes
the device must supply: QEMU's per-access config reads then cost one dict
lookup and at most one device read.

A write that sets a reset-trigger bit (PCIe FLR, AF FLR) is reported to
the caller, which resets the device through the daemon (post-reset writes
included) rather than letting the guest reset it behind the policy's back.

The view holds the shadow and nothing else; ``reset`` restores the plan's
initial shadow (BAR addresses cleared, virtual registers re-seeded).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mediator.virt.errors import RegionAccessError
from mediator.virt.rules import Segment


class ConfigDevice(Protocol):
    """The part of a backend the config view talks to."""

    def read_config(self, offset: int, length: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...


def _int(data: bytes | bytearray) -> int:
    return int.from_bytes(data, "little")


@dataclass(frozen=True)
class ConfigRules:
    virtual: bytes  # per byte: the bits served from the shadow
    writable: bytes  # per byte: the bits a guest may write
    segment_starts: tuple[int, ...]  # a write goes to the device one segment piece at a time
    reset_bits: bytes  # per byte: bits whose write of 1 asks for a reset


# Accesses up to this many bytes get a cached read plan (guests use 1, 2 and 4).
CACHED_ACCESS = 8


class ConfigView:
    def __init__(
        self,
        segments: Sequence[Segment],
        initial_shadow: bytes,
        device: ConfigDevice,
        reset_triggers: dict[int, int] | None = None,
    ) -> None:
        self._segments = tuple(segments)
        self._reset_triggers = reset_triggers or {}
        self._starts = [s.start for s in self._segments]
        self._virtual = b"".join(s.virtual for s in self._segments)
        self._initial = bytes(initial_shadow)
        self.shadow = bytearray(initial_shadow)
        self.device = device
        self.size = len(initial_shadow)
        # keyed by offset << 4 | length (length <= CACHED_ACCESS < 16): no tuple per lookup
        self._read_plans: dict[int, tuple[int, tuple[tuple[int, int], ...]]] = {}

    @property
    def rules(self) -> ConfigRules:
        """The view's rules as per-byte tables (what the C fast path executes)."""
        writable = b"".join(s.writable for s in self._segments)
        reset = bytearray(self.size)
        for offset, bits in self._reset_triggers.items():
            reset[offset] = bits
        return ConfigRules(self._virtual, writable, tuple(self._starts), bytes(reset))

    def restore_shadow(self) -> None:
        self.shadow[:] = self._initial

    def _check(self, offset: int, length: int) -> None:
        if length <= 0 or offset < 0 or offset + length > self.size:
            raise RegionAccessError(
                f"config access at {offset:#x}, {length} bytes, is outside the {self.size}-byte config space"
            )

    def _pieces(self, offset: int, length: int) -> list[tuple[Segment, int, int]]:
        """(segment, start, end) for each segment the access touches."""
        pieces = []
        end = offset + length
        i = bisect_right(self._starts, offset) - 1
        while offset < end:
            segment = self._segments[i]
            stop = min(segment.end, end)
            pieces.append((segment, offset, stop))
            offset = stop
            i += 1
        return pieces

    def _read_plan(self, offset: int, length: int) -> tuple[int, tuple[tuple[int, int], ...]]:
        """The access's virtual mask and the (start, end) runs the device must supply."""
        virtual = self._virtual[offset : offset + length]
        runs: list[tuple[int, int]] = []
        for i, v in enumerate(virtual):
            if v == 0xFF:
                continue
            if runs and runs[-1][1] == offset + i:
                runs[-1] = (runs[-1][0], offset + i + 1)
            else:
                runs.append((offset + i, offset + i + 1))
        return _int(virtual), tuple(runs)

    def read(self, offset: int, length: int) -> bytes:
        if length > CACHED_ACCESS:
            self._check(offset, length)
            virtual, runs = self._read_plan(offset, length)
        else:
            key = offset << 4 | length
            plan = self._read_plans.get(key)
            if plan is None:
                self._check(offset, length)
                plan = self._read_plans[key] = self._read_plan(offset, length)
            virtual, runs = plan
        end = offset + length
        if not runs:
            return bytes(self.shadow[offset:end])
        if not virtual:
            return self.device.read_config(offset, length)
        device = bytearray(length)
        for start, stop in runs:
            device[start - offset : stop - offset] = self.device.read_config(start, stop - start)
        value = (_int(device) & ~virtual) | (_int(self.shadow[offset:end]) & virtual)
        return value.to_bytes(length, "little")

    def write(self, offset: int, data: bytes) -> bool:
        """Apply a write; True when it sets a bit that asks for a device reset (e.g. FLR)."""
        self._check(offset, len(data))
        triggers = self._reset_triggers
        reset = bool(triggers) and any(triggers.get(offset + i, 0) & b for i, b in enumerate(data))
        for segment, start, stop in self._pieces(offset, len(data)):
            rel = start - segment.start
            w = _int(segment.writable[rel : rel + stop - start])
            if not w:
                continue
            v = _int(segment.virtual[rel : rel + stop - start])
            size = stop - start
            value = _int(data[start - offset : stop - offset])
            to_shadow = w & v
            if to_shadow:
                shadow = _int(self.shadow[start:stop])
                shadow = (shadow & ~to_shadow) | (value & to_shadow)
                self.shadow[start:stop] = shadow.to_bytes(size, "little")
            to_device = w & ~v & ((1 << (8 * size)) - 1)
            if to_device:
                if to_device != (1 << (8 * size)) - 1:
                    current = _int(self.device.read_config(start, size))
                    value = (current & ~to_device) | (value & to_device)
                self.device.write_config(start, value.to_bytes(size, "little"))
        return reset
