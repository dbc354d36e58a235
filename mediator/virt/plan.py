"""Building a device plan: the quirk table applied to one physical function.

The plan is everything the virtual device needs and ``inspect`` shows, fixed
when a client connects: the config segments with their rules and the initial
shadow, the guest's BARs (virtual sizes, types, mmappable areas, trap
windows), the post-reset writes, and the list of decisions with the quirk
behind each.

Theory of operation. Every config byte gets an owner and a rule, in layers
where a later layer wins:

1. defaults: gaps follow the ``gaps`` policy; header registers and the
   bodies of capabilities read from the device and drop writes; capability
   headers are virtual (the daemon owns the next pointers);
2. visibility: ``hide``/``expose`` selectors, last quirk wins per capability;
3. per quirk, in order: ``writable`` bodies, ``registers``, ``hide_ranges``;
   then Bus Master Enable becomes virtual, whatever the quirks said of the
   Command register: the hardware bit follows the guest's only while the
   device's DMA is all pinned (``mediator.virt.device``);
4. hidden capabilities: the whole extent reads 0 and drops writes;
5. chains: next pointers rewritten over the exposed capabilities in walk
   order; a hidden first extended capability leaves an ID-0 placeholder
   that keeps the chain; Status.CapList and the capability pointer follow;
6. synthesized capabilities, appended to the standard chain;
7. BARs and the ROM BAR: fully virtual, sized by the *virtual* size.

Physical facts that a table did not foresee (a capability too long for its
space, a loop) are anomalies; combinations that cannot be served (a 32-bit
BAR the guest could not size, a synthesized capability with no room) are a
``PlanError``, because serving half a policy is worse than refusing.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mediator.backends.base import RegionInfo
from mediator.pci import capabilities as caps
from mediator.pci.bars import MAX_32BIT_BAR, BarType, format_size, virtual_bar_size
from mediator.pci.capabilities import CapKind
from mediator.pci.chain import Capability, Chains, walk
from mediator.pci.registers import (
    BAR_COUNT,
    CAPABILITY_LIST,
    COMMAND,
    COMMAND_MASTER,
    CONFIG_SPACE_SIZE,
    HEADER_REGISTERS,
    ROM_ADDRESS,
    ROM_ADDRESS_MASK,
    ROM_ENABLE,
    STATUS,
    STATUS_CAP_LIST,
    Identity,
    bar_offset,
    u32,
)
from mediator.quirks.schema import GapPolicy, Quirk, RegisterRule, Synthesis, TrapAction
from mediator.quirks.table import selector_applies
from mediator.vfio_abi import ROM_REGION
from mediator.virt.rules import RuleKind, Segment

PAGE_SIZE = mmap.PAGESIZE
# Resizable BAR: a current size field above 27 (128 TiB) has no bit in the capability register.
REBAR_MAX_ENCODABLE = 27
REBAR_CONTROL_KEPT = 0x3FE7  # BAR index, number of BARs, current size


class PlanError(Exception):
    """The policy cannot be carried out on this device."""


@dataclass(frozen=True, slots=True)
class Decision:
    quirk: str
    action: str
    target: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TrapWindow:
    bar: int
    offset: int
    size: int
    action: TrapAction
    quirk: str

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class VirtualBar:
    index: int  # 0-5, or 6 for the ROM
    physical_size: int
    virtual_size: int
    physical_type: BarType
    type: BarType
    mmap_areas: tuple[tuple[int, int], ...]  # (offset, size), page-aligned
    traps: tuple[TrapWindow, ...]

    @property
    def padding(self) -> tuple[int, int] | None:
        """The (offset, size) past the real size that reads 0xFF and drops writes."""
        if self.virtual_size > self.physical_size:
            return self.physical_size, self.virtual_size - self.physical_size
        return None


@dataclass(frozen=True, slots=True)
class CapabilityFate:
    """What became of one physical capability."""

    capability: Capability
    hidden: bool
    decided_by: str | None  # the quirk whose hide/expose decided it; None: nobody asked
    placeholder_next: int | None = None  # hidden first extended capability: the ID-0 header's next


@dataclass(frozen=True, slots=True)
class PostResetWrite:
    bar: int
    offset: int
    size: int
    op: str
    value: int
    quirk: str
    verify: bool = False


@dataclass(frozen=True)
class DeviceContext:
    """What the policy needs to know about a device beyond its config space: the daemon's config.

    ``allowed_links`` are the link indexes whose peer belongs to the device's
    own tenant; every other link is foreign and gets disabled. A device the
    config says nothing about has no allowed link and no clique; a clique
    P2P cannot honour is withheld, and why is said (``mediator.tenancy``).
    """

    tenant: str | None = None
    allowed_links: frozenset[int] = frozenset()
    gpudirect_clique: int | None = None
    gpudirect_peers: tuple[str, ...] = ()  # the clique's devices P2P reaches
    gpudirect_withheld: str | None = None


@dataclass(frozen=True)
class DevicePlan:
    identity: Identity
    physical: bytes
    chains: Chains
    capabilities: tuple[CapabilityFate, ...]
    synthesized: tuple[Decision, ...]
    segments: tuple[Segment, ...]
    initial_shadow: bytes
    bars: tuple[VirtualBar, ...]  # implemented BARs only
    rom: VirtualBar | None
    post_reset: tuple[PostResetWrite, ...]
    reset_triggers: dict[int, int]  # config offset -> bits whose write of 1 resets the device
    decisions: tuple[Decision, ...]
    anomalies: tuple[str, ...]
    quirks: tuple[str, ...]  # names of the quirks that matched, in order

    @property
    def config_size(self) -> int:
        return len(self.physical)

    def bar(self, index: int) -> VirtualBar | None:
        if index == ROM_REGION:
            return self.rom
        return next((b for b in self.bars if b.index == index), None)


GPUDIRECT_SIGNATURE = b"P2P"


def gpudirect_clique_capability(clique: int) -> bytes:
    """NVIDIA's GPUDirect P2P clique vendor capability, as QEMU's pci-quirks.c builds it."""
    return bytes([caps.VENDOR, 0, 8]) + GPUDIRECT_SIGNATURE + bytes([clique << 3, 0])


def _mask_bytes(mask: bool | int, size: int) -> bytes:
    if isinstance(mask, bool):
        return (b"\xff" if mask else b"\x00") * size
    return mask.to_bytes(size, "little")


class _Layout:
    """Per-byte owner and rule arrays, turned into segments at the end."""

    def __init__(self, image: bytes, gaps: GapPolicy, gaps_by: str) -> None:
        self.image = image
        size = len(image)
        self.shadow = bytearray(image)
        self.owner = ["gap"] * size
        self.virtual = bytearray(size)
        self.writable = bytearray(size)
        self.kind = [RuleKind.PASSTHROUGH] * size
        self.decided_by = [gaps_by] * size
        self.rule_id = [0] * size
        self._next_rule = 1
        if gaps == "hidden":
            self.hide(0, size, gaps_by)
        elif gaps == "passthrough":
            self.writable[:] = b"\xff" * size

    def new_rule(self) -> int:
        self._next_rule += 1
        return self._next_rule

    def own(self, start: int, end: int, owner: str) -> None:
        rule = self.new_rule()
        for i in range(start, end):
            self.owner[i] = owner
            self.rule_id[i] = rule

    def set(
        self,
        start: int,
        virtual: bytes,
        writable: bytes,
        kind: RuleKind,
        by: str,
        *,
        value: bytes | None = None,
    ) -> None:
        """One rule over ``len(virtual)`` bytes; ``value`` seeds the virtual bits."""
        rule = self.new_rule()
        for i, (v, w) in enumerate(zip(virtual, writable, strict=True)):
            at = start + i
            self.virtual[at] = v
            self.writable[at] = w
            self.kind[at] = kind
            self.decided_by[at] = by
            self.rule_id[at] = rule
            if value is not None:
                self.shadow[at] = (self.image[at] & ~v) | (value[i] & v)

    def virtualize_bits(
        self, offset: int, mask: int, value: int, by: str, *, keep_writable: bool = False
    ) -> None:
        """Make ``mask`` bits of one byte virtual (read-only unless ``keep_writable``), other rules kept."""
        self.virtual[offset] |= mask
        if not keep_writable:
            self.writable[offset] &= ~mask & 0xFF
        self.shadow[offset] = (self.shadow[offset] & ~mask) | (value & mask)
        if self.kind[offset] is RuleKind.PASSTHROUGH:
            self.kind[offset] = RuleKind.MASKED
            self.decided_by[offset] = by

    def hide(self, start: int, end: int, by: str) -> None:
        size = end - start
        self.set(start, b"\xff" * size, bytes(size), RuleKind.HIDDEN, by, value=bytes(size))

    def emulate(self, start: int, value: bytes, writable: bytes, kind: RuleKind, by: str) -> None:
        self.set(start, b"\xff" * len(value), writable, kind, by, value=value)

    def segments(self) -> tuple[Segment, ...]:
        result = []
        start = 0
        size = len(self.owner)
        for i in range(1, size + 1):
            if i < size and (
                self.owner[i] == self.owner[start]
                and self.kind[i] is self.kind[start]
                and self.decided_by[i] == self.decided_by[start]
                and self.rule_id[i] == self.rule_id[start]
            ):
                continue
            result.append(
                Segment(
                    start,
                    i,
                    self.owner[start],
                    self.kind[start],
                    bytes(self.virtual[start:i]),
                    bytes(self.writable[start:i]),
                    self.decided_by[start],
                )
            )
            start = i
        return tuple(result)


class _Planner:
    def __init__(self, image: bytes, quirks: Sequence[Quirk], context: DeviceContext) -> None:
        self.image = image
        self.context = context
        self.reset_triggers: dict[int, int] = {}  # config offset -> bits that, written as 1, reset
        self.chains = walk(image)
        self.quirks = list(quirks)
        self.decisions: list[Decision] = []
        self.anomalies = list(self.chains.anomalies)
        self.rebar_unencodable: list[Capability] = []
        gaps: GapPolicy = "read-only"
        gaps_by = "core:default-gaps"
        for quirk in self.quirks:
            if quirk.gaps is not None:
                gaps, gaps_by = quirk.gaps, quirk.name
        self.layout = _Layout(image, gaps, gaps_by)
        self.decide(gaps_by, "gaps", "bytes no register or capability owns", gaps)

    def decide(self, quirk: str, action: str, target: str, detail: str = "") -> None:
        self.decisions.append(Decision(quirk, action, target, detail))

    # 1. defaults
    def own_defaults(self) -> None:
        layout = self.layout
        for register in HEADER_REGISTERS:
            layout.own(register.offset, register.offset + register.size, f"header {register.name}")
            layout.set(
                register.offset,
                bytes(register.size),
                bytes(register.size),
                RuleKind.PASSTHROUGH,
                "core:header",
            )
        for cap in self.chains.all():
            layout.own(cap.offset, cap.end, cap.label())
            layout.set(
                cap.offset,
                bytes(cap.length),
                bytes(cap.length),
                RuleKind.PASSTHROUGH,
                "core:capability",
            )
        if len(self.image) > CONFIG_SPACE_SIZE and not self.chains.extended_space:
            layout.hide(CONFIG_SPACE_SIZE, len(self.image), "core:extended-space")
            self.decide(
                "core:extended-space",
                "hide",
                "0x100-0xfff",
                "no walkable extended capability chain",
            )

    # 2. visibility
    def visibility(self) -> dict[Capability, CapabilityFate]:
        """Each capability's fate; the last quirk whose hide/expose selects it decides."""
        fates = {cap: CapabilityFate(cap, hidden=False, decided_by=None) for cap in self.chains.all()}
        for quirk in self.quirks:
            for hide, selectors in ((True, quirk.hide), (False, quirk.expose)):
                for selector in selectors:
                    for cap in self.chains.all():
                        if selector_applies(selector, cap, self.image):
                            fates[cap] = CapabilityFate(cap, hidden=hide, decided_by=quirk.name)
        for fate in fates.values():
            if fate.decided_by is not None:
                self.decide(fate.decided_by, "hide" if fate.hidden else "expose", fate.capability.label())
        return fates

    # 3. per-quirk config rules
    def apply_config_rules(self, exposed: list[Capability]) -> None:
        layout = self.layout
        for quirk in self.quirks:
            for selector in quirk.writable:
                for cap in exposed:
                    if selector_applies(selector, cap, self.image):
                        body = caps.body_offset(cap.kind, cap.id)
                        size = cap.length - body
                        if size > 0:
                            layout.set(
                                cap.offset + body,
                                bytes(size),
                                b"\xff" * size,
                                RuleKind.PASSTHROUGH,
                                quirk.name,
                            )
                            self.decide(quirk.name, "writable", cap.label(), f"{size} body bytes")
            for rule in quirk.registers:
                for start, size, target in self._register_targets(rule, exposed):
                    value = None if rule.value is None else rule.value.to_bytes(size, "little")
                    virtual = _mask_bytes(rule.virtual, size)
                    kind = RuleKind.PASSTHROUGH if not any(virtual) else RuleKind.MASKED
                    layout.set(
                        start, virtual, _mask_bytes(rule.writable, size), kind, quirk.name, value=value
                    )
                    for i, bits in enumerate(rule.reset_on.to_bytes(size, "little") if size <= 8 else b""):
                        if bits:
                            self.reset_triggers[start + i] = self.reset_triggers.get(start + i, 0) | bits
                    self.decide(quirk.name, "register", target, _describe_rule(rule))
            if quirk.resizable_bar == "current-size":
                for cap in exposed:
                    if cap.kind is CapKind.EXT and cap.id == caps.REBAR:
                        self._rebar_current_size(cap, quirk.name)
            for span in quirk.hide_ranges:
                end = min(span.offset + span.size, len(self.image))
                if span.offset < end:
                    layout.hide(span.offset, end, quirk.name)
                    self.decide(quirk.name, "hide-range", f"{span.offset:#x}-{end - 1:#x}")

    def _rebar_current_size(self, cap: Capability, by: str) -> None:
        """Each BAR entry offers its current size only, read-only (QEMU's virtualization)."""
        sizes = []
        for entry in range(cap.length // 8):
            control = u32(self.image, cap.offset + 8 + 8 * entry)
            sizes.append((entry, control, (control >> 8) & 0x3F))
        if any(size > REBAR_MAX_ENCODABLE for _, _, size in sizes):
            self.rebar_unencodable.append(cap)
            return
        for entry, control, size in sizes:
            at = cap.offset + 4 + 8 * entry
            capability = (1 << (size + 4)).to_bytes(4, "little")
            self.layout.emulate(at, capability, bytes(4), RuleKind.VIRTUAL, by)
            kept = (control & REBAR_CONTROL_KEPT).to_bytes(4, "little")
            self.layout.emulate(at + 4, kept, bytes(4), RuleKind.VIRTUAL, by)
        self.decide(
            by, "current-size", cap.label(), ", ".join(f"entry {e}: size field {s}" for e, _, s in sizes)
        )

    def _register_targets(
        self, rule: RegisterRule, exposed: list[Capability]
    ) -> Iterable[tuple[int, int, str]]:
        if rule.capability is None:
            assert rule.size is not None  # enforced when the table is loaded
            end = min(rule.offset + rule.size, len(self.image))
            if rule.offset < end:
                yield (
                    rule.offset,
                    end - rule.offset,
                    f"config {rule.offset:#x} ({end - rule.offset} bytes)",
                )
            return
        for cap in exposed:
            if not selector_applies(rule.capability, cap, self.image) or rule.offset >= cap.length:
                continue
            end = cap.length if rule.size is None else min(rule.offset + rule.size, cap.length)
            size = end - rule.offset
            yield cap.offset + rule.offset, size, f"{cap.label()} +{rule.offset:#x} ({size} bytes)"

    # 4 and 5. hidden bodies and chains
    def link_chains(self, fates: dict[Capability, CapabilityFate], synthesized: list[int]) -> None:
        layout = self.layout
        for fate in fates.values():
            if fate.hidden:
                assert fate.decided_by is not None
                layout.hide(fate.capability.offset, fate.capability.end, fate.decided_by)
        exposed_std = [c.offset for c in self.chains.std if not fates[c].hidden] + synthesized
        for i, offset in enumerate(exposed_std):
            if i < len(exposed_std) - len(synthesized):
                nxt = exposed_std[i + 1] if i + 1 < len(exposed_std) else 0
                layout.emulate(
                    offset,
                    bytes([self.image[offset], nxt]),
                    b"\0\0",
                    RuleKind.VIRTUAL,
                    "core:chain",
                )
        first = exposed_std[0] if exposed_std else 0
        layout.emulate(CAPABILITY_LIST, bytes([first]), b"\0", RuleKind.VIRTUAL, "core:chain")
        layout.virtualize_bits(STATUS, STATUS_CAP_LIST, STATUS_CAP_LIST if exposed_std else 0, "core:chain")
        if self.chains.std and not exposed_std:
            self.decide("core:chain", "clear", "Status.CapList", "no standard capability remains")

        exposed_ext = [c for c in self.chains.ext if not fates[c].hidden]
        for i, cap in enumerate(exposed_ext):
            nxt = exposed_ext[i + 1].offset if i + 1 < len(exposed_ext) else 0
            header = cap.id | cap.version << 16 | nxt << 20
            layout.emulate(cap.offset, header.to_bytes(4, "little"), bytes(4), RuleKind.VIRTUAL, "core:chain")
        head = self.chains.ext[0] if self.chains.ext else None
        if head is not None and fates[head].hidden:
            nxt = exposed_ext[0].offset if exposed_ext else 0
            fates[head] = dataclasses.replace(fates[head], placeholder_next=nxt)
            placeholder = (nxt << 20).to_bytes(4, "little")
            layout.emulate(head.offset, placeholder, bytes(4), RuleKind.VIRTUAL, "core:chain")
            detail = f"ID 0, next {nxt:#x}" if nxt else "nothing remains: dword 0x100 reads 0"
            self.decide("core:chain", "placeholder", head.label(), detail)

    def own_bus_master(self) -> None:
        self.layout.virtualize_bits(COMMAND, COMMAND_MASTER, 0, "core:bus-master", keep_writable=True)
        self.decide(
            "core:bus-master",
            "virtualize",
            "Command.BusMaster",
            "the hardware bit follows the guest's once every DMA mapping of its VM is pinned",
        )

    # 6. synthesized capabilities
    def synthesize(self) -> list[int]:
        taken = [(c.offset, c.end) for c in self.chains.std]
        placed: list[int] = []
        for quirk in self.quirks:
            for synthesis in quirk.synthesize:
                clique = (
                    synthesis.clique if isinstance(synthesis.clique, int) else self.context.gpudirect_clique
                )
                if clique is None:
                    if self.context.gpudirect_withheld:
                        self.decide(quirk.name, "withhold", synthesis.kind, self.context.gpudirect_withheld)
                    continue
                offset = self._place(synthesis, taken)
                body = gpudirect_clique_capability(clique)
                taken.append((offset, offset + len(body)))
                self.layout.own(offset, offset + len(body), f"synthesized {synthesis.kind} @{offset:#x}")
                self.layout.emulate(offset, body, bytes(len(body)), RuleKind.SYNTHESIZED, quirk.name)
                placed.append(offset)
                self.decide(
                    quirk.name,
                    "synthesize",
                    f"std 0x09 {synthesis.kind} @{offset:#x}",
                    f"clique {clique}" + self._reachable(),
                )
        for i, offset in enumerate(placed):
            nxt = placed[i + 1] if i + 1 < len(placed) else 0
            self.layout.shadow[offset + 1] = nxt
        return placed

    def _reachable(self) -> str:
        peers = self.context.gpudirect_peers
        if not peers:
            return ""  # a quirk file's own clique: the operator vouches for it
        return f"; P2P reaches {', '.join(peers)} through the VM's IOMMU space (their mmapped BARs)"

    def _place(self, synthesis: Synthesis, taken: list[tuple[int, int]]) -> int:
        for at in synthesis.at:
            if all(at + 8 <= start or end <= at for start, end in taken):
                return at
        tried = ", ".join(f"{a:#x}" for a in synthesis.at)
        raise PlanError(
            f"no room for the synthesized {synthesis.kind} capability: {tried} overlap capabilities"
        )

    # 7. BARs
    def bars(self, regions: Sequence[RegionInfo]) -> tuple[tuple[VirtualBar, ...], VirtualBar | None]:
        sizes = [region.size for region in regions[:BAR_COUNT]]
        types = [BarType.of(self.image, i) for i in range(BAR_COUNT)]
        virtual_types = self._bar_types(sizes, types)
        bars = []
        upper_halves: set[int] = set()
        for index in range(BAR_COUNT):
            if index in upper_halves:
                continue
            if sizes[index] == 0:
                self._emulate_bar_register(index, 0, 0)
                continue
            bar_type = virtual_types[index]
            if bar_type.is_64 and index == BAR_COUNT - 1:
                self.anomalies.append(f"BAR{index} claims 64 bits but is the last BAR; served as 32-bit")
                bar_type = BarType(prefetchable=bar_type.prefetchable)
            if bar_type.is_64:
                upper_halves.add(index + 1)
                if sizes[index + 1]:
                    self.anomalies.append(
                        f"BAR{index + 1} has a size but is the upper half of 64-bit BAR{index}; ignored"
                    )
            bars.append(self._bar(index, regions[index], types[index], bar_type))
        return tuple(bars), self._rom(regions[ROM_REGION].size)

    def _bar_types(self, sizes: Sequence[int], types: Sequence[BarType]) -> list[BarType]:
        """The guest's BAR types: the device's, as the quirks' ``bar_flags`` change them."""
        virtual_types = list(types)
        for quirk in self.quirks:
            for flags in quirk.bar_flags:
                if sizes[flags.bar] == 0:
                    continue
                current = virtual_types[flags.bar]
                if current.io:
                    raise PlanError(
                        f"{quirk.name}: BAR{flags.bar} is an I/O BAR; only memory BAR flags can change"
                    )
                is_64 = current.is_64 if flags.bits is None else flags.bits == 64
                prefetchable = current.prefetchable if flags.prefetchable is None else flags.prefetchable
                if is_64 and not current.is_64 and (flags.bar == BAR_COUNT - 1 or sizes[flags.bar + 1]):
                    raise PlanError(
                        f"{quirk.name}: BAR{flags.bar} cannot become 64-bit: the next BAR register is in use"
                    )
                virtual_types[flags.bar] = BarType(is_64=is_64, prefetchable=prefetchable)
                self.decide(quirk.name, "bar-flags", f"BAR{flags.bar}", str(virtual_types[flags.bar]))
        return virtual_types

    def _bar(self, index: int, region: RegionInfo, physical_type: BarType, bar_type: BarType) -> VirtualBar:
        """One implemented BAR: its virtual size, register emulation, trap windows and mmappable areas."""
        size = region.size
        vsize = virtual_bar_size(size, bar_type)
        if not bar_type.io and not bar_type.is_64 and vsize > MAX_32BIT_BAR:
            raise PlanError(
                f"BAR{index} is a 32-bit BAR of {format_size(vsize)}, above the 2G a 32-bit BAR can "
                f"decode; add a bar_flags quirk with bits = 64"
            )
        if vsize != size:
            self.decide(
                "core:power-of-two",
                "resize",
                f"BAR{index}",
                f"{format_size(size)} -> {format_size(vsize)}; padding reads 0xff",
            )
        traps = self._traps(index, vsize)
        address_mask = ~(vsize - 1) & ((1 << 64) - 1) & ~(0x3 if bar_type.io else 0xF)
        self._emulate_bar_register(index, bar_type.flags, address_mask & 0xFFFFFFFF)
        if bar_type.is_64:
            self._emulate_bar_register(index + 1, 0, address_mask >> 32)
        mmap_areas = () if bar_type.io else _mmap_areas(region.mappable, traps)
        return VirtualBar(index, size, vsize, physical_type, bar_type, mmap_areas, traps)

    def _rom(self, rom_size: int) -> VirtualBar | None:
        if not rom_size:
            self.layout.emulate(ROM_ADDRESS, bytes(4), bytes(4), RuleKind.VIRTUAL, "core:bar-emulation")
            return None
        vsize = virtual_bar_size(rom_size, BarType())
        mask = (~(vsize - 1) & ROM_ADDRESS_MASK) | ROM_ENABLE
        self.layout.emulate(
            ROM_ADDRESS, bytes(4), mask.to_bytes(4, "little"), RuleKind.VIRTUAL, "core:bar-emulation"
        )
        return VirtualBar(ROM_REGION, rom_size, vsize, BarType(), BarType(), (), ())

    def _emulate_bar_register(self, index: int, flags: int, writable: int) -> None:
        self.layout.emulate(
            bar_offset(index),
            flags.to_bytes(4, "little"),
            writable.to_bytes(4, "little"),
            RuleKind.VIRTUAL,
            "core:bar-emulation",
        )

    def _traps(self, index: int, virtual_size: int) -> tuple[TrapWindow, ...]:
        windows = []
        for quirk in self.quirks:
            for trap in quirk.bar_traps:
                if trap.bar != index:
                    continue
                if trap.offset >= virtual_size:
                    self.anomalies.append(
                        f"{quirk.name}: trap window {trap.offset:#x} lies past "
                        f"BAR{index}'s {format_size(virtual_size)}"
                    )
                    continue
                size = min(trap.size, virtual_size - trap.offset)
                windows.append(TrapWindow(index, trap.offset, size, trap.action, quirk.name))
                self.decide(
                    quirk.name,
                    "bar-trap",
                    f"BAR{index} {trap.offset:#x}-{trap.offset + size - 1:#x}",
                    trap.action,
                )
        return tuple(windows)

    def post_reset(self, bars: tuple[VirtualBar, ...]) -> tuple[PostResetWrite, ...]:
        writes = []
        for quirk in self.quirks:
            for write in quirk.post_reset:
                bar = next((b for b in bars if b.index == write.bar), None)
                if bar is None or write.offset + write.size > bar.physical_size:
                    raise PlanError(
                        f"{quirk.name}: post-reset write at BAR{write.bar}+{write.offset:#x} "
                        "is outside the device's BAR"
                    )
                if write.value == "foreign-links":
                    foreign = [link for link in range(write.links) if link not in self.context.allowed_links]
                    value = sum(1 << link for link in foreign) << write.shift
                else:
                    value = write.value
                writes.append(
                    PostResetWrite(
                        write.bar, write.offset, write.size, write.op, value, quirk.name, write.verify
                    )
                )
                self.decide(
                    quirk.name,
                    "post-reset",
                    f"BAR{write.bar}+{write.offset:#x}",
                    f"{write.op} {value:#x}" + (", verified" if write.verify else ""),
                )
        return tuple(writes)


def _mmap_areas(
    mappable: Sequence[tuple[int, int]], traps: Sequence[TrapWindow]
) -> tuple[tuple[int, int], ...]:
    """The device's mappable areas with every page a trap window touches cut out."""
    holes = sorted((t.offset - t.offset % PAGE_SIZE, -(-t.end // PAGE_SIZE) * PAGE_SIZE) for t in traps)
    areas = []
    for start, size in mappable:
        cursor, end = start, start + size
        for hole_start, hole_end in holes:
            if hole_end <= cursor or hole_start >= end:
                continue
            if hole_start > cursor:
                areas.append((cursor, hole_start - cursor))
            cursor = max(cursor, hole_end)
        if cursor < end:
            areas.append((cursor, end - cursor))
    return tuple(areas)


def _describe_rule(rule: RegisterRule) -> str:
    parts = []
    for key, mask in (("virtual", rule.virtual), ("writable", rule.writable)):
        if mask is True:
            parts.append(f"{key} all")
        elif mask:
            parts.append(f"{key} {mask:#x}")
    if rule.value is not None:
        parts.append(f"value {rule.value:#x}")
    if rule.reset_on:
        parts.append(f"reset on {rule.reset_on:#x}")
    return ", ".join(parts) or "read-only"


def build_plan(
    image: bytes, quirks: Sequence[Quirk], regions: Sequence[RegionInfo], context: DeviceContext | None = None
) -> DevicePlan:
    """The plan for a function whose config image is ``image``.

    Args:
        image: the physical config space (256 or 4096 bytes).
        quirks: the quirks that match this function, in decision order.
        regions: the real size and mappable areas of BAR0-5 and the ROM (7
            entries; size 0 for none, and for the upper register of a
            64-bit BAR).

    Raises:
        ChainError: the image is not a config space.
        PlanError: the policy cannot be carried out on this device.
    """
    if len(regions) != BAR_COUNT + 1:
        raise ValueError("regions needs BAR0-5 and the ROM")
    planner = _Planner(bytes(image), quirks, context or DeviceContext())
    planner.own_defaults()
    fates = planner.visibility()
    exposed = [c for c in planner.chains.all() if not fates[c].hidden]
    planner.apply_config_rules(exposed)
    planner.own_bus_master()
    for cap in planner.rebar_unencodable:
        fates[cap] = CapabilityFate(cap, hidden=True, decided_by="core:resizable-bar")
        planner.decide("core:resizable-bar", "hide", cap.label(), "a current size cannot be encoded")
    synthesized = planner.synthesize()
    planner.link_chains(fates, synthesized)
    bars, rom = planner.bars(regions)
    post_reset = planner.post_reset(bars)
    return DevicePlan(
        identity=Identity.of(image),
        physical=bytes(image),
        chains=planner.chains,
        capabilities=tuple(fates[c] for c in planner.chains.all()),
        synthesized=tuple(d for d in planner.decisions if d.action == "synthesize"),
        segments=planner.layout.segments(),
        initial_shadow=bytes(planner.layout.shadow),
        bars=bars,
        rom=rom,
        post_reset=post_reset,
        reset_triggers=dict(planner.reset_triggers),
        decisions=tuple(planner.decisions),
        anomalies=tuple(planner.anomalies),
        quirks=tuple(q.name for q in quirks),
    )
