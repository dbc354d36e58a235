"""Base Address Register types and sizing arithmetic.

A BAR register's low bits say what it maps (I/O or memory, 32 or 64 bits,
prefetchable); its size is not in the register but comes from the device
(VFIO region info, or a profile). A 64-bit BAR takes two registers: the
upper one belongs to it and is not a BAR of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from mediator.pci.registers import (
    BAR_MEM_PREFETCH,
    BAR_MEM_TYPE_64,
    BAR_SPACE_IO,
    bar_offset,
    u32,
)

# Smallest BARs the specification allows: I/O decodes at least 4 bytes,
# memory at least 16.
MIN_IO_BAR = 4
MIN_MEMORY_BAR = 16
MAX_32BIT_BAR = 1 << 31


@dataclass(frozen=True, slots=True)
class BarType:
    io: bool = False
    is_64: bool = False
    prefetchable: bool = False

    @classmethod
    def decode(cls, register: int) -> BarType:
        if register & BAR_SPACE_IO:
            return cls(io=True)
        return cls(is_64=bool(register & BAR_MEM_TYPE_64), prefetchable=bool(register & BAR_MEM_PREFETCH))

    @classmethod
    def of(cls, image: bytes | bytearray, index: int) -> BarType:
        return cls.decode(u32(image, bar_offset(index)))

    @property
    def flags(self) -> int:
        if self.io:
            return BAR_SPACE_IO
        return (BAR_MEM_TYPE_64 if self.is_64 else 0) | (BAR_MEM_PREFETCH if self.prefetchable else 0)

    def __str__(self) -> str:
        if self.io:
            return "I/O"
        return (
            f"memory, {'64' if self.is_64 else '32'}-bit, {'' if self.prefetchable else 'non-'}prefetchable"
        )


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def virtual_bar_size(physical_size: int, bar_type: BarType) -> int:
    """The size the guest sees: a power of two no smaller than the spec minimum."""
    if physical_size == 0:
        return 0
    minimum = MIN_IO_BAR if bar_type.io else MIN_MEMORY_BAR
    return max(next_power_of_two(physical_size), minimum)


def format_size(size: int) -> str:
    """``lspci``-style size: 16M, 256K, 95.5G, 64."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift:
            value = size / (1 << shift)
            return f"{value:g}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return str(size)
