"""Loading, checking, merging and matching quirk tables.

Built-in tables ship in ``mediator/quirks/builtin`` and load in file-name
order (baseline permissions, security defaults, vendors). Operator tables
load after them, in the order given: a quirk whose name already exists
replaces the earlier one in place (``enabled = false`` switches a built-in
off), a new name is appended. Order matters where two quirks decide the same
thing: the later one wins.

Every check here is about one table on its own; what only makes sense
against a device (a capability that is not there, a BAR that does not exist)
is decided when the plan is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mediator.errors import InputError, InputErrors
from mediator.pci import capabilities as caps
from mediator.pci.capabilities import CapKind
from mediator.pci.chain import Capability
from mediator.pci.registers import BAR0, CAPABILITY_LIST, ROM_ADDRESS, Identity
from mediator.quirks.schema import CapabilitySelector, Match, Quirk, RegisterRule, RegisterWrite, Synthesis
from mediator.tomlinput import convert, parse_toml, read_toml

BUILTIN_PACKAGE = "mediator.quirks.builtin"

Problem = tuple[str, str]  # (key path inside the quirk, message)

# Registers the core emulates whatever a table says: BARs, ROM BAR, capability pointer.
CORE_EMULATED = (
    (BAR0, 0x28, "the BAR registers"),
    (ROM_ADDRESS, CAPABILITY_LIST + 1, "the ROM BAR and capability pointer"),
)


def _ids(value: int | list[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    return tuple(value) if isinstance(value, list) else (value,)


def match_applies(match: Match, identity: Identity) -> bool:
    for wanted, actual in (
        (match.vendor, identity.vendor),
        (match.device, identity.device),
        (match.subsystem_vendor, identity.subsystem_vendor),
        (match.subsystem_device, identity.subsystem_device),
    ):
        values = _ids(wanted)
        if values is not None and actual not in values:
            return False
    classes = _ids(match.class_code)
    if classes is not None:
        mask = match.class_mask
        if not any(identity.class_code & mask == c & mask for c in classes):
            return False
    return True


def selector_applies(selector: CapabilitySelector, cap: Capability, image: bytes) -> bool:
    wanted = selector.std if cap.kind is CapKind.STD else selector.ext
    if wanted is None:
        return False
    if wanted == "unknown":
        return not caps.is_known(cap.kind, cap.id)
    if wanted != cap.id:
        return False
    if selector.vsec_id is not None or selector.vsec_rev is not None:
        vsec, rev = caps.vsec_id(image, cap.offset)
        if selector.vsec_id not in (None, vsec) or selector.vsec_rev not in (None, rev):
            return False
    if selector.dvsec_vendor is not None or selector.dvsec_id is not None:
        vendor, dvsec = caps.dvsec_id(image, cap.offset)
        if selector.dvsec_vendor not in (None, vendor) or selector.dvsec_id not in (None, dvsec):
            return False
    return True


def _check_selector(selector: CapabilitySelector, where: str) -> Iterable[Problem]:
    if (selector.std is None) == (selector.ext is None):
        yield f"{where}", "give exactly one of std or ext"
        return
    if (selector.vsec_id is not None or selector.vsec_rev is not None) and selector.ext != caps.VSEC:
        yield f"{where}", f"vsec_id and vsec_rev select ext = {caps.VSEC:#04x} capabilities only"
    if (selector.dvsec_vendor is not None or selector.dvsec_id is not None) and selector.ext != caps.DVSEC:
        yield (
            f"{where}",
            f"dvsec_vendor and dvsec_id select ext = {caps.DVSEC:#04x} capabilities only",
        )


def _mask_fits(mask: bool | int, size: int | None) -> bool:
    if isinstance(mask, bool):
        return True
    return size is not None and size <= 8 and mask < 1 << (8 * size)


def _check_absolute_range(offset: int, size: int, where: str) -> Iterable[Problem]:
    if offset + size > 0x1000:
        yield f"{where}", f"ends at {offset + size:#x}, past the 4 KiB config space"
    for start, end, what in CORE_EMULATED:
        if offset < end and start < offset + size:
            yield (
                f"{where}",
                f"overlaps {what} ({start:#x}-{end - 1:#x}), which the daemon always emulates",
            )


def _check_register(rule: RegisterRule, where: str) -> Iterable[Problem]:
    if rule.capability is None:
        if rule.size is None:
            yield (
                f"{where}.size",
                "required for an absolute register (only capability rules may omit it)",
            )
        else:
            yield from _check_absolute_range(rule.offset, rule.size, where)
    else:
        yield from _check_selector(rule.capability, f"{where}.capability")
        kind = CapKind.STD if rule.capability.std is not None else CapKind.EXT
        if rule.offset < caps.header_size(kind):
            yield (
                f"{where}.offset",
                f"capability-relative rules start after the header (offset >= "
                f"{caps.header_size(kind)}); the daemon owns ID and next pointer",
            )
    for key, mask in (("virtual", rule.virtual), ("writable", rule.writable)):
        if not _mask_fits(mask, rule.size):
            yield (
                f"{where}.{key}",
                "a bit mask needs a size of at most 8 bytes and must fit in it; use true or false",
            )
    if rule.value is not None:
        if rule.virtual is False:
            yield f"{where}.value", "seeds virtual bits, but the rule has none"
        elif not _mask_fits(rule.value, rule.size):
            yield f"{where}.value", f"does not fit in {rule.size} bytes"
    if rule.reset_on:
        virtual = (1 << 64) - 1 if rule.virtual is True else int(rule.virtual)
        if not _mask_fits(rule.reset_on, rule.size) or rule.reset_on & ~virtual:
            # Otherwise the write would also reach the device and reset it
            # behind the daemon, with no post-reset writes after it.
            yield f"{where}.reset_on", "reset bits must fit in the register and be virtual"


def check_quirk(quirk: Quirk) -> list[Problem]:
    """Problems in one quirk, as (key path relative to the quirk, message)."""
    problems: list[Problem] = []
    for key in ("hide", "expose", "writable"):
        for i, selector in enumerate(getattr(quirk, key)):
            problems.extend(_check_selector(selector, f"{key}[{i}]"))
    for i, rule in enumerate(quirk.registers):
        problems.extend(_check_register(rule, f"registers[{i}]"))
    for i, span in enumerate(quirk.hide_ranges):
        problems.extend(_check_absolute_range(span.offset, span.size, f"hide_ranges[{i}]"))
    for i, synthesis in enumerate(quirk.synthesize):
        problems.extend(_check_synthesis(synthesis, f"synthesize[{i}]"))
    for i, trap in enumerate(quirk.bar_traps):
        if trap.offset + trap.size > 1 << 64:
            problems.append((f"bar_traps[{i}]", "window ends past 2^64"))
    for i, flags in enumerate(quirk.bar_flags):
        if flags.bits is None and flags.prefetchable is None:
            problems.append((f"bar_flags[{i}]", "give bits, prefetchable or both"))
    for i, write in enumerate(quirk.post_reset):
        problems.extend(_check_post_reset(write, f"post_reset[{i}]"))
    return problems


def _check_synthesis(synthesis: Synthesis, where: str) -> Iterable[Problem]:
    if not synthesis.at:
        yield f"{where}.at", "give at least one offset"
    for j, at in enumerate(synthesis.at):
        if at % 4 or at < 0x40 or at + 8 > 0x100:
            yield f"{where}.at[{j}]", f"{at:#x} is not a dword-aligned offset in 0x40-0xf8"


def _check_post_reset(write: RegisterWrite, where: str) -> Iterable[Problem]:
    if write.value == "foreign-links" and not write.links:
        yield f"{where}.links", "foreign-links needs the number of links"
    if write.value != "foreign-links" and (write.links or write.shift):
        yield where, 'links and shift only go with value = "foreign-links"'
    if write.offset % write.size:
        yield f"{where}.offset", f"{write.offset:#x} is not aligned to its size {write.size}"
    widest = write.value if isinstance(write.value, int) else ((1 << write.links) - 1) << write.shift
    if widest >= 1 << (8 * write.size):
        yield f"{where}.value", f"does not fit in {write.size} bytes"


def parse_table(document: dict[str, Any], source: str) -> list[Quirk]:
    """The quirks of one parsed table file. Raises InputErrors with every problem."""
    errors: list[InputError] = []
    for key in document:
        if key != "quirk":
            errors.append(InputError(source, key, "unknown key (a quirk table holds [[quirk]] entries)"))
    entries = document.get("quirk", [])
    if not isinstance(entries, list):
        errors.append(InputError(source, "quirk", "must be an array of tables ([[quirk]])"))
        entries = []
    quirks: list[Quirk] = []
    names: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"quirk[{i}]"
        try:
            quirk = convert(entry, Quirk, source, where)
        except InputError as e:
            errors.append(e)
            continue
        label = f"{where} ({quirk.name})"
        for path, message in check_quirk(quirk):
            errors.append(InputError(source, f"{label}.{path}", message))
        if quirk.name in names:
            errors.append(InputError(source, f"{label}.name", f"repeats quirk[{names[quirk.name]}]"))
        names[quirk.name] = i
        quirks.append(quirk)
    if errors:
        raise InputErrors(errors)
    return quirks


def load_table_file(path: Path, source: str | None = None) -> list[Quirk]:
    name = source or str(path)
    try:
        return parse_table(read_toml(path, name), name)
    except InputError as e:
        raise InputErrors([e]) from None


def builtin_sources() -> list[tuple[str, str]]:
    """(name, text) of every built-in table, in load order."""
    folder = resources.files(BUILTIN_PACKAGE)
    entries = sorted((f for f in folder.iterdir() if f.name.endswith(".toml")), key=lambda f: f.name)
    return [(f"builtin:{f.name}", f.read_text(encoding="utf-8")) for f in entries]


@dataclass(frozen=True)
class QuirkTable:
    """Merged quirks in decision order, and the file each came from."""

    quirks: tuple[Quirk, ...]
    origins: dict[str, str]

    @classmethod
    def load(cls, files: Sequence[Path] = (), *, builtin: bool = True) -> QuirkTable:
        """Built-ins (unless ``builtin`` is False), then ``files`` in order.

        Raises:
            InputErrors: every problem in every file.
        """
        merged: dict[str, Quirk] = {}
        origins: dict[str, str] = {}
        errors: list[InputError] = []
        tables: list[tuple[str, list[Quirk]]] = []
        for name, text in builtin_sources() if builtin else []:
            try:
                tables.append((name, parse_table(parse_toml(text, name), name)))
            except InputError as e:
                errors.append(e)
            except InputErrors as e:
                errors.extend(e.errors)
        for path in files:
            try:
                tables.append((str(path), load_table_file(path)))
            except InputErrors as e:
                errors.extend(e.errors)
        if errors:
            raise InputErrors(errors)
        for source, quirks in tables:
            for quirk in quirks:
                merged[quirk.name] = quirk  # dict keeps the first position of a replaced name
                origins[quirk.name] = source
        return cls(tuple(merged.values()), origins)

    def for_device(self, identity: Identity) -> list[Quirk]:
        return [q for q in self.quirks if q.enabled and match_applies(q.match, identity)]
