"""The quirk-table schema: what a TOML quirk file may say, and what it means.

A quirk table is a list of ``[[quirk]]`` entries. Each has a unique ``name``,
a one-line ``reason``, an optional ``match`` (vendor, device, subsystem IDs,
class with class_mask; each a value or a list) and any number of actions:

``hide`` / ``expose``
    capability selectors; the last quirk that names a capability decides
    whether the guest sees it. A hidden capability is unlinked *and* its
    whole body reads 0 and drops writes.
``writable``
    capability selectors whose bodies the guest may write through to the
    device (exposed bodies are read-only otherwise).
``registers``
    per-register rules in the kernel's ``perm_bits`` terms: ``virtual`` bits
    are served from the daemon's shadow, ``writable`` bits may be written
    (to the shadow if virtual, else to the device); ``value`` seeds the
    virtual bits. Offsets are absolute, or relative to a ``capability``.
``hide_ranges``
    absolute config ranges that read 0 and drop writes.
``gaps``
    what the guest gets for bytes no register or capability owns.
``synthesize``
    capabilities the daemon adds (the NVIDIA GPUDirect P2P clique).
``bar_traps``
    BAR windows served by the daemon instead of mapped: ``raz-wi``,
    ``all-ones``, ``config-mirror`` (the virtual config space) or ``audit``
    (passed through, logged).
``bar_flags``
    the guest's view of a BAR's type (64-bit, prefetchable).
``resizable_bar = "current-size"``
    Resizable BAR capabilities offer only each BAR's current size and
    cannot be written (as QEMU does); one whose size cannot be encoded is hidden.
``post_reset``
    BAR register writes the daemon makes after every reset.

This module only describes shapes; ``mediator.quirks.table`` loads, checks
and merges tables, and ``mediator.virt`` carries the actions out.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct, field

U4 = Annotated[int, Meta(ge=0, le=0xF)]
U8 = Annotated[int, Meta(ge=0, le=0xFF)]
U16 = Annotated[int, Meta(ge=0, le=0xFFFF)]
U24 = Annotated[int, Meta(ge=0, le=0xFFFFFF)]
U64 = Annotated[int, Meta(ge=0)]  # upper bounds are checked against the field size
ConfigOffset = Annotated[int, Meta(ge=0, lt=0x1000)]
ConfigLength = Annotated[int, Meta(ge=1, le=0x1000)]
BarIndex = Annotated[int, Meta(ge=0, le=5)]
BarLength = Annotated[int, Meta(ge=1, le=(1 << 63) - 1)]
QuirkName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._/-]*$", max_length=80)]
Reason = Annotated[str, Meta(min_length=1, max_length=300)]

GapPolicy = Literal["passthrough", "read-only", "hidden"]
TrapAction = Literal["raz-wi", "all-ones", "config-mirror", "audit"]


class Match(Struct, forbid_unknown_fields=True, frozen=True):
    """Which functions a quirk applies to; an absent key matches anything."""

    vendor: U16 | list[U16] | None = None
    device: U16 | list[U16] | None = None
    subsystem_vendor: U16 | list[U16] | None = None
    subsystem_device: U16 | list[U16] | None = None
    class_code: U24 | list[U24] | None = field(default=None, name="class")
    class_mask: U24 = 0xFFFFFF


class CapabilitySelector(Struct, forbid_unknown_fields=True, frozen=True):
    """One capability kind: ``{ std = 0x09 }``, ``{ ext = 0x0f }``, ``{ ext = "unknown" }``,
    ``{ ext = 0x0b, vsec_id = 1 }``, ``{ ext = 0x23, dvsec_vendor = 0x10de, dvsec_id = 3 }``."""

    std: U8 | Literal["unknown"] | None = None
    ext: U16 | Literal["unknown"] | None = None
    vsec_id: U16 | None = None
    vsec_rev: U4 | None = None
    dvsec_vendor: U16 | None = None
    dvsec_id: U16 | None = None


class RegisterRule(Struct, forbid_unknown_fields=True, frozen=True):
    offset: ConfigOffset
    # Absent: to the end of the capability (capability-relative rules only).
    size: ConfigLength | None = None
    capability: CapabilitySelector | None = None
    virtual: bool | U64 = False
    writable: bool | U64 = False
    value: U64 | None = None
    # Bits that, written as 1, make the daemon reset the device (FLR): the reset
    # then goes through the daemon, post-reset writes included.
    reset_on: U64 = 0


class ConfigRange(Struct, forbid_unknown_fields=True, frozen=True):
    offset: ConfigOffset
    size: ConfigLength


class Synthesis(Struct, forbid_unknown_fields=True, frozen=True):
    kind: Literal["nvidia-gpudirect-clique"]
    # A fixed clique, or "configured": the device's gpudirect_clique in the
    # daemon's config (nothing is added for a device without one).
    clique: Annotated[int, Meta(ge=0, le=15)] | Literal["configured"]
    at: list[U8] = field(default_factory=lambda: [0xC8, 0xD4])


class BarTrap(Struct, forbid_unknown_fields=True, frozen=True):
    bar: BarIndex
    offset: U64
    size: BarLength
    action: TrapAction


class BarFlags(Struct, forbid_unknown_fields=True, frozen=True):
    bar: BarIndex
    bits: Literal[32, 64] | None = None
    prefetchable: bool | None = None


class RegisterWrite(Struct, forbid_unknown_fields=True, frozen=True):
    bar: BarIndex
    offset: U64
    # A number, or "foreign-links": one bit per link (of ``links``) whose peer
    # does not belong to the device's tenant, shifted left by ``shift``.
    value: Annotated[int, Meta(ge=0, le=0xFFFFFFFF)] | Literal["foreign-links"]
    size: Literal[1, 2, 4] = 4
    # write: value; set: OR value in; clear: AND the value's bits out.
    op: Literal["write", "set", "clear"] = "write"
    links: Annotated[int, Meta(ge=0, le=32)] = 0
    shift: Annotated[int, Meta(ge=0, le=31)] = 0
    # Read the register back and refuse to serve the device unless the
    # written bits are there (a protection that must hold, e.g. link isolation).
    verify: bool = False


class Quirk(Struct, forbid_unknown_fields=True, frozen=True):
    name: QuirkName
    reason: Reason
    enabled: bool = True
    match: Match = field(default_factory=Match)
    hide: list[CapabilitySelector] = field(default_factory=list)
    expose: list[CapabilitySelector] = field(default_factory=list)
    writable: list[CapabilitySelector] = field(default_factory=list)
    registers: list[RegisterRule] = field(default_factory=list)
    hide_ranges: list[ConfigRange] = field(default_factory=list)
    gaps: GapPolicy | None = None
    resizable_bar: Literal["current-size"] | None = None
    synthesize: list[Synthesis] = field(default_factory=list)
    bar_traps: list[BarTrap] = field(default_factory=list)
    bar_flags: list[BarFlags] = field(default_factory=list)
    post_reset: list[RegisterWrite] = field(default_factory=list)
