"""Walking the standard and extended capability chains of a config image.

Config images come from hardware, from dumps and from fuzzers, so the walker
trusts nothing: every next pointer is aligned (``& ~3``), a pointer into the
header (below 0x40, or below 0x100 for extended capabilities) ends the walk,
a capability seen twice ends it (loop), the number of steps is bounded, and
reads never leave the image. What it cannot make sense of becomes an anomaly
string, not an exception; the only error it raises is ``ChainError`` for an
image that is not a config space at all (wrong size).

The extended chain is walked only on a PCI Express function with a 4 KiB
image, as the kernel does. A first extended header equal to the Vendor/Device
dword means the function aliases its 256-byte header over the extended space
(seen on real host bridges); that space then holds no capability either.

Each capability gets an extent: its specified length (``capabilities``),
clipped at the next capability in the same space; a capability whose length
is unknown extends to that next capability, or to the end of its space.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mediator.pci import capabilities as caps
from mediator.pci.capabilities import CapKind, LengthContext
from mediator.pci.registers import (
    CAPABILITY_LIST,
    CONFIG_SPACE_SIZE,
    EXTENDED_CONFIG_SPACE_SIZE,
    HEADER_SIZE,
    STATUS,
    STATUS_CAP_LIST,
    u16,
    u32,
)

STD_MAX_STEPS = (CONFIG_SPACE_SIZE - HEADER_SIZE) // 4
EXT_MAX_STEPS = (EXTENDED_CONFIG_SPACE_SIZE - CONFIG_SPACE_SIZE) // 4
VALID_IMAGE_SIZES = (CONFIG_SPACE_SIZE, EXTENDED_CONFIG_SPACE_SIZE)


class ChainError(ValueError):
    """The image cannot be a PCI config space."""


@dataclass(frozen=True, slots=True)
class Capability:
    kind: CapKind
    offset: int
    id: int
    version: int  # extended capabilities only; 0 for standard ones
    next: int  # the physical next pointer, aligned
    length: int  # bytes this capability owns, header included
    length_known: bool  # False: the length is the extent to the next capability

    @property
    def name(self) -> str:
        return caps.capability_name(self.kind, self.id)

    @property
    def end(self) -> int:
        return self.offset + self.length

    def label(self) -> str:
        width = 2 if self.kind is CapKind.STD else 4
        return f"{self.kind} {self.id:#0{width + 2}x} {self.name} @{self.offset:#x}"


@dataclass(frozen=True, slots=True)
class Chains:
    std: tuple[Capability, ...]
    ext: tuple[Capability, ...]
    anomalies: tuple[str, ...]
    extended_space: bool  # False: no walkable extended space (256-byte image, not PCIe, aliased)

    def all(self) -> tuple[Capability, ...]:
        return self.std + self.ext

    def find(self, kind: CapKind, cap_id: int) -> Capability | None:
        for cap in self.std if kind is CapKind.STD else self.ext:
            if cap.id == cap_id:
                return cap
        return None


@dataclass(frozen=True, slots=True)
class _Link:
    offset: int
    id: int
    version: int
    next: int


def _follow(
    kind: CapKind,
    *,
    first: int,
    floor: int,
    max_steps: int,
    read: Callable[[int], _Link | None],
    anomalies: list[str],
) -> list[_Link]:
    """The links from ``first`` on, stopping at 0, at a pointer below ``floor``, at a repeat,
    after ``max_steps``, or where ``read`` finds no capability."""
    links: list[_Link] = []
    seen: set[int] = set()
    pos = first
    for _ in range(max_steps):
        if pos == 0:
            return links
        if pos < floor:
            anomalies.append(
                f"{kind} next pointer {pos:#x} points into the space below {floor:#x}; chain ends"
            )
            return links
        if pos in seen:
            anomalies.append(f"{kind} chain loops back to {pos:#x}; chain ends")
            return links
        link = read(pos)
        if link is None:
            return links
        seen.add(pos)
        links.append(link)
        pos = link.next
    if pos:
        anomalies.append(f"{kind} chain longer than {max_steps} capabilities; chain ends")
    return links


def _walk_std(image: bytes, anomalies: list[str]) -> list[_Link]:
    if not u16(image, STATUS) & STATUS_CAP_LIST:
        return []

    def read(pos: int) -> _Link:
        return _Link(pos, image[pos], 0, image[pos + 1] & 0xFC)

    return _follow(
        CapKind.STD,
        first=image[CAPABILITY_LIST] & 0xFC,
        floor=HEADER_SIZE,
        max_steps=STD_MAX_STEPS,
        read=read,
        anomalies=anomalies,
    )


def _walk_ext(image: bytes, anomalies: list[str]) -> list[_Link]:
    def read(pos: int) -> _Link | None:
        header = u32(image, pos)
        if header == 0xFFFFFFFF:
            anomalies.append(f"ext header at {pos:#x} reads all ones; chain ends")
            return None
        if header == 0 and pos == CONFIG_SPACE_SIZE:
            return None  # no extended capabilities at all
        return _Link(pos, header & 0xFFFF, (header >> 16) & 0xF, (header >> 20) & 0xFFC)

    return _follow(
        CapKind.EXT,
        first=CONFIG_SPACE_SIZE,
        floor=CONFIG_SPACE_SIZE,
        max_steps=EXT_MAX_STEPS,
        read=read,
        anomalies=anomalies,
    )


def _with_extents(
    kind: CapKind, links: list[_Link], ctx: LengthContext, space_end: int, anomalies: list[str]
) -> tuple[Capability, ...]:
    starts = sorted({link.offset for link in links})
    result = []
    for link in links:
        later = [s for s in starts if s > link.offset]
        limit = (later[0] if later else space_end) - link.offset
        specified = caps.specified_length(kind, link.id, ctx, link.offset)
        if specified is None:
            length, known = limit, False
        else:
            length, known = min(specified, limit), True
            if specified > limit:
                anomalies.append(
                    f"{kind} {link.id:#x} at {link.offset:#x} claims {specified} bytes "
                    f"but only {limit} fit before the next capability or the end of space"
                )
        result.append(Capability(kind, link.offset, link.id, link.version, link.next, length, known))
    return tuple(result)


def walk(image: bytes) -> Chains:
    """Both capability chains of a 256-byte or 4-KiB config image."""
    if len(image) not in VALID_IMAGE_SIZES:
        raise ChainError(f"a config image is 256 or 4096 bytes, not {len(image)}")
    image = bytes(image)
    anomalies: list[str] = []
    std_links = _walk_std(image, anomalies)
    pcie = next((link.offset for link in std_links if link.id == caps.EXP), None)
    ctx = LengthContext(image, pcie)
    std = _with_extents(CapKind.STD, std_links, ctx, CONFIG_SPACE_SIZE, anomalies)

    extended_space = len(image) == EXTENDED_CONFIG_SPACE_SIZE
    ext: tuple[Capability, ...] = ()
    if extended_space and u32(image, CONFIG_SPACE_SIZE) == u32(image, 0) != 0:
        anomalies.append(
            "extended space aliases the 256-byte header (dword 0x100 repeats the IDs): "
            "no extended capabilities"
        )
        extended_space = False
    elif extended_space and pcie is None:
        anomalies.append("not a PCI Express function: extended space not walked")
        extended_space = False
    if extended_space:
        ext_links = _walk_ext(image, anomalies)
        ext = _with_extents(CapKind.EXT, ext_links, ctx, EXTENDED_CONFIG_SPACE_SIZE, anomalies)
    return Chains(std=std, ext=ext, anomalies=tuple(anomalies), extended_space=extended_space)
