"""Device profiles: what the simulator pretends to be.

A profile is a TOML file::

    name = "h100-sxm5"                      # default: the file name
    description = "H100 SXM5-like GPU"
    address = "0000:62:00.0"                # shown by inspect; optional

    [config]
    file = "nvidia-h100.lspci"              # lspci -xxx/-xxxx dump, relative to the profile
    function = "62:00.0"                    # which function, when the dump holds several
    size = 4096                             # force 256 or 4096 (default: from the rows)
    hex = '''
    60: 10 9c 02 00 ...                     # rows laid over the file's (or alone)
    '''

    [[bars]]                                # one per implemented BAR
    index = 0
    size = 0x1000000                        # bytes; any size, power of two or not
    type = "mem64"                          # mem32 | mem64 | io; default: from the image
    prefetchable = true                     # default: from the image

    [rom]
    size = 0x20000
    contents = "image"                      # a valid x86 image for the device (default), or "blank"

    [irqs]
    intx = 1                                # 0 or 1; default: 1 when Interrupt Pin is set
    msi = 16
    msix = 0

    resets = ["function", "bus"]            # reset methods: an FLR, a bus reset (alone on its bus)

    [faults]                                # misbehaving hardware, for fault-injection tests
    reset_seconds = 6.0                     # every reset takes this long
    reset_fails = true                      # every reset fails with EIO
    config_read_eio = [0x40]                # guest-sized config reads (<= 8 bytes) covering these fail
    dma_map_fails = true                    # every DMA map of guest memory fails to pin
    dma_map_seconds_per_gib = 20.0          # pinning guest memory takes this long per GiB

    [[behaviours]]                          # what the simulated hardware does
    kind = "config-mirror"                  # BAR window that reads/writes the real config space
    bar = 0
    offset = 0x88000
    size = 0x1000

    [[behaviours]]
    kind = "irq-doorbell"                   # writing N raises vector N (MSI-X, else MSI, else INTx)
    bar = 0
    offset = 0x4000

    [[behaviours]]
    kind = "dma-engine"                     # edu-style: +0 src, +8 dst, +0x10 count, +0x18 command
    bar = 0
    offset = 0x5000

    [[behaviours]]
    kind = "sticky-bits"                    # a 32-bit register whose mask bits, once set, only a
    bar = 0                                 # reset clears (NVLink link-disable bits)
    offset = 0xa00148
    mask = 0x3f0000

    [[behaviours]]
    kind = "read-only"                      # writes to the window are ignored (fault injection)
    bar = 0
    offset = 0x12004c
    size = 4

The BAR type normally comes from the image's BAR register; a profile may
state it for a BAR whose register reads 0 (a variant driver's fake BAR), and
must agree with the image otherwise. Every error names the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from msgspec import Meta, Struct, field

from mediator.backends.base import IrqCounts
from mediator.errors import InputError, InputErrors
from mediator.pci import capabilities as caps
from mediator.pci.bars import BarType
from mediator.pci.chain import ChainError, walk
from mediator.pci.hexdump import DumpedFunction, parse_lspci, select_function
from mediator.pci.registers import BAR_COUNT, INTERRUPT_PIN, bar_offset, u32
from mediator.pci.rom import UNIT
from mediator.tomlinput import convert, read_toml

PROFILES_PACKAGE = "mediator.profiles"
DEFAULT_PROFILE = "h100-sxm5"

Size = Annotated[int, Meta(ge=1, le=1 << 48)]


class ConfigSpec(Struct, forbid_unknown_fields=True, frozen=True):
    file: str | None = None
    function: str | None = None
    size: Literal[256, 4096] | None = None
    hex: str | None = None


class BarSpec(Struct, forbid_unknown_fields=True, frozen=True):
    index: Annotated[int, Meta(ge=0, le=5)]
    size: Size
    type: Literal["mem32", "mem64", "io"] | None = None
    prefetchable: bool | None = None


class RomSpec(Struct, forbid_unknown_fields=True, frozen=True):
    size: Annotated[int, Meta(ge=UNIT, le=1 << 24)]
    contents: Literal["image", "blank"] = "image"


class IrqSpec(Struct, forbid_unknown_fields=True, frozen=True):
    intx: Literal[0, 1] | None = None
    msi: Literal[0, 1, 2, 4, 8, 16, 32] = 0
    msix: Annotated[int, Meta(ge=0, le=2048)] = 0


class BehaviourSpec(Struct, forbid_unknown_fields=True, frozen=True):
    kind: Literal["config-mirror", "irq-doorbell", "dma-engine", "sticky-bits", "read-only"]
    bar: Annotated[int, Meta(ge=0, le=5)]
    offset: Annotated[int, Meta(ge=0)]
    size: Size | None = None
    mask: Annotated[int, Meta(ge=0, le=0xFFFFFFFF)] | None = None


# Register windows whose size the hardware fixes: a 4-byte doorbell, and an
# edu-style DMA engine (source, destination, count, command; 8 bytes each).
BEHAVIOUR_SIZES = {"irq-doorbell": 4, "dma-engine": 0x20, "sticky-bits": 4}


class FaultSpec(Struct, forbid_unknown_fields=True, frozen=True):
    """Hardware that misbehaves, for fault-injection tests."""

    reset_seconds: Annotated[float, Meta(ge=0, le=600)] = 0.0  # every reset takes this long
    reset_fails: bool = False  # every reset fails with EIO
    # Offsets whose guest-sized (<= 8 byte) config reads fail with EIO.
    config_read_eio: list[Annotated[int, Meta(ge=0, le=0xFFF)]] = field(default_factory=list)
    dma_map_fails: bool = False  # every DMA map fails to pin (as a full IOMMU or low memlock answers)
    # Pinning guest memory (DMA maps with an fd) takes this long per GiB, as on a slow host.
    dma_map_seconds_per_gib: Annotated[float, Meta(ge=0, le=3600)] = 0.0


@dataclass(frozen=True)
class Faults:
    reset_seconds: float = 0.0
    reset_fails: bool = False
    config_read_eio: frozenset[int] = frozenset()
    dma_map_fails: bool = False
    dma_map_seconds_per_gib: float = 0.0


class ProfileSpec(Struct, forbid_unknown_fields=True, frozen=True):
    config: ConfigSpec
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)] | None = None
    description: str = ""
    address: str | None = None
    bars: list[BarSpec] = field(default_factory=list)
    rom: RomSpec | None = None
    irqs: IrqSpec = field(default_factory=IrqSpec)
    behaviours: list[BehaviourSpec] = field(default_factory=list)
    resets: list[Literal["function", "bus"]] = field(default_factory=lambda: ["function", "bus"])
    faults: FaultSpec = field(default_factory=FaultSpec)


@dataclass(frozen=True)
class Behaviour:
    kind: str
    bar: int
    offset: int
    size: int
    mask: int = 0


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    address: str | None
    source: str
    image: bytes
    bar_sizes: tuple[int, ...]  # BAR0-5, 0 where none
    rom_size: int
    irqs: IrqCounts
    behaviours: tuple[Behaviour, ...]
    rom_contents: str = "image"  # "image": a valid expansion ROM for the device; "blank": zeros
    resets: frozenset[str] = frozenset({"function", "bus"})  # the reset methods the hardware has
    faults: Faults = Faults()


def _dump(spec: ConfigSpec, folder: Path, source: str) -> DumpedFunction:
    if spec.file is None and spec.hex is None:
        raise InputError(source, "config", "give file, hex, or both")
    rows: dict[int, bytes] = {}
    base = DumpedFunction(None, "")
    if spec.file is not None:
        path = folder / spec.file
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(source, "config.file", f"cannot read {spec.file}: {e}") from None
        base = select_function(parse_lspci(text, str(path)), spec.function, source, "config.function")
        rows.update(base.rows)
    if spec.hex is not None:
        overlay = parse_lspci(spec.hex, source, "config.hex")
        if len(overlay) > 1:
            raise InputError(source, "config.hex", "holds several functions; give rows for one")
        rows.update(overlay[0].rows)
    return DumpedFunction(base.address, base.title, rows)


def _bar_sizes(spec: ProfileSpec, image: bytearray, source: str) -> list[int]:
    """BAR sizes by index; a type stated for a BAR whose register reads 0 is written into it."""
    sizes = [0] * BAR_COUNT
    types = [BarType.of(image, i) for i in range(BAR_COUNT)]
    seen: dict[int, int] = {}
    upper_of: dict[int, int] = {}
    for i, bar in enumerate(spec.bars):
        where = f"bars[{i}]"
        if bar.index in seen:
            raise InputError(source, f"{where}.index", f"BAR{bar.index} is already bars[{seen[bar.index]}]")
        seen[bar.index] = i
        register = u32(image, bar_offset(bar.index))
        declared = None
        if bar.type is not None or bar.prefetchable is not None:
            image_type = types[bar.index]
            kind = bar.type or ("io" if image_type.io else "mem64" if image_type.is_64 else "mem32")
            prefetchable = image_type.prefetchable if bar.prefetchable is None else bar.prefetchable
            declared = BarType(
                io=kind == "io", is_64=kind == "mem64", prefetchable=prefetchable and kind != "io"
            )
            if register and declared != image_type:
                raise InputError(
                    source,
                    where,
                    f"says {declared} but the image's BAR{bar.index} register "
                    f"({register:#010x}) says {image_type}",
                )
            types[bar.index] = declared
            image[bar_offset(bar.index)] |= declared.flags
        bar_type = types[bar.index]
        if bar_type.is_64:
            if bar.index == BAR_COUNT - 1:
                raise InputError(source, where, "BAR5 cannot be a 64-bit BAR (it has no upper register)")
            upper_of[bar.index + 1] = bar.index
        sizes[bar.index] = bar.size
    for index, lower in upper_of.items():
        if index in seen:
            raise InputError(
                source,
                f"bars[{seen[index]}].index",
                f"BAR{index} is the upper half of 64-bit BAR{lower}",
            )
    return sizes


def _check_irqs(spec: IrqSpec, image: bytes | bytearray, source: str) -> IrqCounts:
    try:
        chains = walk(bytes(image))
    except ChainError as e:
        raise InputError(source, "config", str(e)) from None
    pin = image[INTERRUPT_PIN]
    intx = (1 if pin else 0) if spec.intx is None else spec.intx
    if intx and not pin:
        raise InputError(source, "irqs.intx", "INTx needs an Interrupt Pin, and the image's reads 0")
    if spec.msi and chains.find(caps.CapKind.STD, caps.MSI) is None:
        raise InputError(source, "irqs.msi", "MSI vectors need an MSI capability, and the image has none")
    if spec.msix and chains.find(caps.CapKind.STD, caps.MSIX) is None:
        raise InputError(
            source, "irqs.msix", "MSI-X vectors need an MSI-X capability, and the image has none"
        )
    return IrqCounts(intx, spec.msi, spec.msix)


def _check_behaviours(spec: ProfileSpec, sizes: list[int], source: str) -> tuple[Behaviour, ...]:
    behaviours = []
    for i, behaviour in enumerate(spec.behaviours):
        where = f"behaviours[{i}]"
        fixed = BEHAVIOUR_SIZES.get(behaviour.kind)
        if fixed is None and behaviour.size is None:
            raise InputError(source, f"{where}.size", f"required for a {behaviour.kind} window")
        if fixed is not None and behaviour.size not in (None, fixed):
            raise InputError(source, f"{where}.size", f"a {behaviour.kind} window is {fixed:#x} bytes")
        size = fixed or behaviour.size or 0
        if sizes[behaviour.bar] == 0:
            raise InputError(source, f"{where}.bar", f"BAR{behaviour.bar} is not in bars")
        if behaviour.offset + size > sizes[behaviour.bar]:
            raise InputError(source, where, f"window ends past BAR{behaviour.bar}'s size")
        if fixed is not None and behaviour.offset % 4:
            raise InputError(source, f"{where}.offset", "registers are 4-byte aligned")
        if (behaviour.kind == "sticky-bits") != (behaviour.mask is not None):
            raise InputError(source, f"{where}.mask", "sticky-bits windows, and only they, take a mask")
        behaviours.append(
            Behaviour(behaviour.kind, behaviour.bar, behaviour.offset, size, behaviour.mask or 0)
        )
    return tuple(behaviours)


def load_profile(path: Path, source: str | None = None) -> Profile:
    """A profile, checked. Raises InputErrors naming the file and key of the problem."""
    name = source or str(path)
    try:
        spec = convert(read_toml(path, name), ProfileSpec, name, "")
        dump = _dump(spec.config, path.parent, name)
        image = bytearray(dump.image(spec.config.size))
        sizes = _bar_sizes(spec, image, name)
        irqs = _check_irqs(spec.irqs, image, name)
        behaviours = _check_behaviours(spec, sizes, name)
    except InputError as e:
        raise InputErrors([e]) from None
    return Profile(
        name=spec.name or path.stem,
        description=spec.description,
        address=spec.address or dump.address,
        source=name,
        image=bytes(image),
        bar_sizes=tuple(sizes),
        rom_size=spec.rom.size if spec.rom else 0,
        rom_contents=spec.rom.contents if spec.rom else "image",
        resets=frozenset(spec.resets),
        faults=Faults(
            spec.faults.reset_seconds,
            spec.faults.reset_fails,
            frozenset(spec.faults.config_read_eio),
            spec.faults.dma_map_fails,
            spec.faults.dma_map_seconds_per_gib,
        ),
        irqs=irqs,
        behaviours=behaviours,
    )


def shipped_profiles() -> dict[str, Path]:
    """Name -> path of every profile that ships in the package."""
    folder = resources.files(PROFILES_PACKAGE)
    return {
        Path(f.name).stem: Path(str(f))
        for f in sorted(folder.iterdir(), key=lambda f: f.name)
        if f.name.endswith(".toml")
    }


def resolve_profile(name_or_path: str) -> Path:
    """A shipped profile's name, or a path to a profile file."""
    shipped = shipped_profiles()
    if name_or_path in shipped:
        return shipped[name_or_path]
    return Path(name_or_path)
