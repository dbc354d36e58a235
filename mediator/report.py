"""What ``vfio-mediator inspect`` shows: the device and the guest's view of it.

``inspection`` gathers one JSON-ready dict (the ``--json`` output and the
source of the text form); ``render_text`` lays it out the way a reader of
``lspci -vvv`` expects: capability chains with what happened to each and why,
BARs with physical and virtual sizes, mmappable areas and trap windows, every
decision with its quirk, and a hex dump of the guest's config space with the
bytes that differ from the device's marked ``*``.
"""

from __future__ import annotations

from typing import Any

from mediator.pci.bars import BarType, format_size
from mediator.pci.chain import Capability, walk
from mediator.pci.hexdump import format_rows
from mediator.virt.device import VirtualDevice
from mediator.virt.plan import DevicePlan, VirtualBar


def _capabilities(caps: tuple[Capability, ...]) -> list[dict[str, Any]]:
    return [{"offset": c.offset, "kind": c.kind.value, "id": c.id, "name": c.name} for c in caps]


def _bar_type(bar_type: BarType) -> dict[str, Any]:
    if bar_type.io:
        return {"space": "io"}
    return {"space": "memory", "bits": 64 if bar_type.is_64 else 32, "prefetchable": bar_type.prefetchable}


def _bar(bar: VirtualBar) -> dict[str, Any]:
    return {
        "index": bar.index,
        "physical_size": bar.physical_size,
        "virtual_size": bar.virtual_size,
        "physical_type": _bar_type(bar.physical_type),
        "virtual_type": _bar_type(bar.type),
        "mmap_areas": [list(area) for area in bar.mmap_areas],
        "traps": [
            {"offset": t.offset, "size": t.size, "action": t.action, "quirk": t.quirk} for t in bar.traps
        ],
        "padding": list(bar.padding) if bar.padding else None,
    }


def inspection(
    device: VirtualDevice, *, name: str, source: str, quirk_origins: dict[str, str]
) -> dict[str, Any]:
    plan = device.plan
    virtual = device.config.read(0, plan.config_size)
    identity = plan.identity
    return {
        "profile": name,
        "source": source,
        "identity": {
            "vendor": identity.vendor,
            "device": identity.device,
            "subsystem_vendor": identity.subsystem_vendor,
            "subsystem_device": identity.subsystem_device,
            "class": identity.class_code,
            "revision": identity.revision,
        },
        "physical": {"config": plan.physical.hex(), "capabilities": _capabilities(plan.chains.all())},
        "virtual": {"config": virtual.hex(), "capabilities": _capabilities(walk(virtual).all())},
        "bars": [_bar(bar) for bar in plan.bars],
        "rom": _bar(plan.rom) if plan.rom else None,
        "decisions": [
            {"quirk": d.quirk, "action": d.action, "target": d.target, "detail": d.detail}
            for d in plan.decisions
        ],
        "rules": [
            {
                "start": s.start,
                "end": s.end,
                "owner": s.owner,
                "rule": s.kind.value,
                "virtual": s.virtual.hex(),
                "writable": s.writable.hex(),
                "quirk": s.decided_by,
            }
            for s in plan.segments
        ],
        "post_reset": [
            {
                "bar": w.bar,
                "offset": w.offset,
                "size": w.size,
                "op": w.op,
                "value": w.value,
                "verify": w.verify,
                "quirk": w.quirk,
            }
            for w in plan.post_reset
        ],
        "anomalies": list(plan.anomalies),
        "quirks": [{"name": q, "source": quirk_origins.get(q, "")} for q in plan.quirks],
    }


def _cap_line(cap: dict[str, Any], status: str) -> str:
    width = 4 if cap["kind"] == "ext" else 2
    ident = f"{cap['id']:#0{width + 2}x}"
    return f"  [{cap['offset']:03x}] {cap['kind']} {ident:<6}  {cap['name']:<40} {status}".rstrip()


def _chain_text(caps: list[dict[str, Any]], kind: str) -> str:
    steps = [f"{c['offset']:x}" + (" (Null)" if c["id"] == 0 else "") for c in caps if c["kind"] == kind]
    return " -> ".join(steps) if steps else "(none)"


def _capability_section(report: dict[str, Any], plan: DevicePlan) -> list[str]:
    lines = ["Capabilities (device -> guest)"]
    for fate, cap in zip(plan.capabilities, report["physical"]["capabilities"], strict=True):
        status = ("hidden" if fate.hidden else "kept").ljust(8) + (fate.decided_by or "")
        if fate.placeholder_next is not None:
            status += f"; ID-0 placeholder at 0x100, next {fate.placeholder_next:#x}"
        lines.append(_cap_line(cap, status))
    physical = {(c["kind"], c["offset"]) for c in report["physical"]["capabilities"]}
    for cap in report["virtual"]["capabilities"]:
        if (cap["kind"], cap["offset"]) not in physical:
            quirk = next((d.quirk for d in plan.synthesized if d.target.endswith(f"@{cap['offset']:#x}")), "")
            lines.append(_cap_line(cap, "added".ljust(8) + quirk))
    virtual = report["virtual"]["capabilities"]
    lines.append(f"  guest std chain: {_chain_text(virtual, 'std')}")
    if plan.config_size > 0x100:
        lines.append(f"  guest ext chain: {_chain_text(virtual, 'ext')}")
    return lines


def _bar_section(plan: DevicePlan) -> list[str]:
    lines = ["BARs                                          device    guest"]
    for bar in (*plan.bars, *([plan.rom] if plan.rom else [])):
        label = "ROM " if bar.index == 6 else f"BAR{bar.index}"
        kind = "expansion ROM" if bar.index == 6 else str(bar.type)
        changed = " (was " + str(bar.physical_type) + ")" if bar.type != bar.physical_type else ""
        sizes = f"{format_size(bar.physical_size):>8} {format_size(bar.virtual_size):>8}"
        lines.append(f"  {label}  {kind + changed:<38} {sizes}")
        if bar.mmap_areas:
            areas = ", ".join(f"{o:#x}-{o + s - 1:#x}" for o, s in bar.mmap_areas)
            lines.append(f"        mmap     {areas}")
        elif bar.index != 6:
            lines.append("        mmap     none (every access is a message)")
        for trap in bar.traps:
            lines.append(
                f"        trap     {trap.offset:#x}-{trap.end - 1:#x} {trap.action:<14} {trap.quirk}"
            )
        if bar.padding:
            start, size = bar.padding
            lines.append(f"        padding  {start:#x}-{start + size - 1:#x} reads 0xff, drops writes")
    if not plan.bars and not plan.rom:
        lines.append("  (none)")
    return lines


def render_text(report: dict[str, Any], plan: DevicePlan) -> str:
    identity = plan.identity
    lines = [
        f"{report['profile']}: {identity}, {plan.config_size}-byte config space",
        f"  profile {report['source']}",
        f"  {len(report['quirks'])} quirks match: " + ", ".join(q["name"] for q in report["quirks"]),
        "",
        *_capability_section(report, plan),
        "",
        *_bar_section(plan),
        "",
        "Decisions",
    ]
    for d in report["decisions"]:
        detail = f"  ({d['detail']})" if d["detail"] else ""
        lines.append(f"  {d['quirk']:<38} {d['action']:<12} {d['target']}{detail}")
    if report["post_reset"]:
        lines += ["", "After every reset"]
        for w in report["post_reset"]:
            lines.append(f"  BAR{w['bar']}+{w['offset']:#x}  {w['op']} {w['value']:#x}  ({w['quirk']})")
    if report["anomalies"]:
        lines += ["", "Anomalies in the device's config space"]
        lines += [f"  {a}" for a in report["anomalies"]]
    physical = plan.physical
    virtual = bytes.fromhex(report["virtual"]["config"])
    changed = [i for i, (a, b) in enumerate(zip(physical, virtual, strict=True)) if a != b]
    lines += ["", f"Guest config space ({len(changed)} bytes differ from the device, marked *)"]
    lines += ["  " + row for row in format_rows(virtual, changed)]
    return "\n".join(lines) + "\n"
