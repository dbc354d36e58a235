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

The view holds the shadow and nothing else; ``reset`` restores the plan's
initial shadow (BAR addresses cleared, virtual registers re-seeded).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Protocol

from mediator.virt.rules import Segment


class ConfigAccessError(Exception):
    """An access outside the config space."""


class ConfigDevice(Protocol):
    """The part of a backend the config view talks to."""

    def read_config(self, offset: int, length: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...


def _int(data: bytes | bytearray) -> int:
    return int.from_bytes(data, "little")


class ConfigView:
    def __init__(self, segments: Sequence[Segment], initial_shadow: bytes, device: ConfigDevice) -> None:
        self._segments = tuple(segments)
        self._starts = [s.start for s in self._segments]
        self._initial = bytes(initial_shadow)
        self.shadow = bytearray(initial_shadow)
        self.device = device
        self.size = len(initial_shadow)

    def reset(self) -> None:
        self.shadow[:] = self._initial

    def _check(self, offset: int, length: int) -> None:
        if length <= 0 or offset < 0 or offset + length > self.size:
            raise ConfigAccessError(
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

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        pieces = self._pieces(offset, length)
        device_bytes = self._read_device_runs(pieces)
        out = bytearray()
        for segment, start, stop in pieces:
            shadow = self.shadow[start:stop]
            virtual = segment.virtual[start - segment.start : stop - segment.start]
            if virtual.count(0xFF) == len(virtual):
                out += shadow
                continue
            v = _int(virtual)
            device = _int(device_bytes[start - offset : stop - offset])
            value = (device & ~v) | (_int(shadow) & v)
            out += value.to_bytes(stop - start, "little")
        return bytes(out)

    def _read_device_runs(self, pieces: list[tuple[Segment, int, int]]) -> bytearray:
        """Device bytes for every piece that needs them, fetched in as few reads as possible."""
        if not pieces:
            return bytearray()
        base = pieces[0][1]
        buffer = bytearray(pieces[-1][2] - base)
        run_start: int | None = None
        run_end = 0
        for segment, start, stop in pieces:
            virtual = segment.virtual[start - segment.start : stop - segment.start]
            needed = virtual.count(0xFF) != len(virtual)
            if needed and run_start is not None and start == run_end:
                run_end = stop
                continue
            if run_start is not None:
                buffer[run_start - base : run_end - base] = self.device.read_config(
                    run_start, run_end - run_start
                )
                run_start = None
            if needed:
                run_start, run_end = start, stop
        if run_start is not None:
            buffer[run_start - base : run_end - base] = self.device.read_config(
                run_start, run_end - run_start
            )
        return buffer

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
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
