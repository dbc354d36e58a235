"""Properties of the virtual config space over random and mutated images.

For any image the plan can be built for: the guest's chains are well formed
and hold exactly the exposed capabilities; every byte of a hidden capability
reads 0 in every access size and alignment; no write to a hidden byte
reaches the device; BAR sizing returns the mask of the virtual size.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mediator.backends.profile import Profile
from mediator.pci import capabilities as caps
from mediator.pci.bars import next_power_of_two, virtual_bar_size
from mediator.pci.capabilities import CapKind
from mediator.pci.chain import walk
from mediator.pci.registers import u32
from mediator.virt.device import VirtualDevice
from mediator.virt.plan import DevicePlan
from tests.support import device, image_profile, profile

BASES = ["gp108m-mx150", "h100-sxm5", "skylake-igd", "intel-0d93-many-ecaps", "intel-0b25-rciep", "v100-sxm2"]


@st.composite
def config_images(draw: st.DrawFn) -> Profile:
    """Real devices with a few hostile edits past the header, or sparse noise over a PCIe function.

    A real device keeps its BARs, so quirks that program BAR registers still apply.
    """
    if draw(st.booleans()):
        image = bytearray(4096)
        image[0x06] = 0x10
        image[0x34] = 0x40
        image[0x40:0x44] = bytes([caps.EXP, 0, 0x02, 0])  # a PCIe cap, so the extended space is walked
        count, bar_sizes, rom_size = 200, (0,) * 6, 0
    else:
        base = profile(draw(st.sampled_from(BASES)))
        image = bytearray(base.image)
        count, bar_sizes, rom_size = 12, base.bar_sizes, base.rom_size
    for _ in range(draw(st.integers(0, count))):
        image[draw(st.integers(0x34, 0xFFF))] = draw(st.integers(0, 255))
    return image_profile(bytes(image), bar_sizes, rom_size)


def planned(source: Profile) -> tuple[VirtualDevice, DevicePlan]:
    dev, _ = device(source)
    return dev, dev.plan


@settings(max_examples=150, deadline=None)
@given(config_images())
def test_guest_chains_are_well_formed_and_hold_exactly_the_exposed_capabilities(source: Profile) -> None:
    dev, plan = planned(source)
    view = walk(dev.config.read(0, dev.config.size))
    assert not [a for a in view.anomalies if "loops" in a or "points into" in a]
    exposed_std = [
        f.capability.offset for f in plan.capabilities if f.capability.kind is CapKind.STD and not f.hidden
    ]
    assert [c.offset for c in view.std] == exposed_std
    for cap in view.std:
        assert cap.next == 0 or cap.next in exposed_std
    pcie_exposed = any(
        f.capability.kind is CapKind.STD and f.capability.id == caps.EXP and not f.hidden
        for f in plan.capabilities
    )
    if pcie_exposed:
        exposed_ext = [
            f.capability.offset
            for f in plan.capabilities
            if f.capability.kind is CapKind.EXT and not f.hidden
        ]
        placeholder = [0x100] if any(f.placeholder_next for f in plan.capabilities) else []
        assert [c.offset for c in view.ext] == placeholder + exposed_ext
        for cap in view.ext:
            assert cap.next == 0 or cap.next in exposed_ext


def _hidden_spans(plan: DevicePlan) -> list[tuple[int, int]]:
    spans = []
    for fate in plan.capabilities:
        if fate.hidden:
            start = fate.capability.offset + (4 if fate.placeholder_next is not None else 0)
            if start < fate.capability.end:
                spans.append((start, fate.capability.end))
    return spans


@settings(max_examples=100, deadline=None)
@given(config_images())
def test_every_hidden_byte_reads_zero_in_every_size_and_alignment(source: Profile) -> None:
    dev, plan = planned(source)
    size = dev.config.size
    for start, end in _hidden_spans(plan):
        for width in (1, 2, 4):
            for offset in range(max(0, start - width + 1), end):
                if offset + width > size:
                    continue
                data = dev.config.read(offset, width)
                for i, byte in enumerate(data):
                    if start <= offset + i < end:
                        assert byte == 0, f"hidden byte {offset + i:#x} read {byte:#x}"


@settings(max_examples=100, deadline=None)
@given(config_images(), st.data())
def test_no_write_to_a_hidden_byte_reaches_the_device(source: Profile, data: st.DataObject) -> None:
    dev, backend = device(source)
    spans = _hidden_spans(dev.plan)
    for start, end in spans:
        for width in (1, 2, 4):
            for offset in range(start, end - width + 1, max(1, (end - start) // 8)):
                dev.config.write(offset, data.draw(st.binary(min_size=width, max_size=width)))
    for offset, written in backend.config_writes:
        for start, end in spans:
            assert offset + len(written) <= start or end <= offset, f"write at {offset:#x} reached the device"
    for start, end in spans:
        assert backend.config[start:end] == source.image[start:end]


BAR_TYPES = {
    "mem32": 0x0,
    "mem32-prefetch": 0x8,
    "mem64": 0x4,
    "mem64-prefetch": 0xC,
    "io": 0x1,
}


@st.composite
def bar_layouts(draw: st.DrawFn) -> tuple[bytes, list[int], int]:
    image = bytearray(profile("h100-sxm5").image)
    sizes = [0] * 6
    index = 0
    while index < 6:
        kind = draw(st.sampled_from([*BAR_TYPES, "none"]))
        if kind.startswith("mem64") and index == 5:
            kind = "mem32"
        register = 0 if kind == "none" else BAR_TYPES[kind]
        image[0x10 + 4 * index : 0x14 + 4 * index] = register.to_bytes(4, "little")
        if kind == "io":
            sizes[index] = draw(st.integers(1, 1 << 16))
        elif kind.startswith("mem64"):
            sizes[index] = draw(st.integers(1, 1 << 40))
            image[0x14 + 4 * index : 0x18 + 4 * index] = bytes(4)
            index += 1
        elif kind.startswith("mem32"):
            sizes[index] = draw(st.integers(1, 1 << 31))
        index += 1
    rom = draw(st.sampled_from([0, 2048, 0x10000, 0x20000, 0x30000]))
    return bytes(image), sizes, rom


@settings(max_examples=200, deadline=None)
@given(bar_layouts())
def test_bar_sizing_returns_the_virtual_size_mask(layout: tuple[bytes, list[int], int]) -> None:
    image, sizes, rom = layout
    dev, backend = device(image_profile(image, bar_sizes=sizes, rom_size=rom))
    for bar in dev.plan.bars:
        offset = 0x10 + 4 * bar.index
        dev.config.write(offset, b"\xff\xff\xff\xff")
        low = u32(dev.config.read(offset, 4), 0)
        expected = ~(bar.virtual_size - 1) & ((1 << 64) - 1)
        if bar.type.io:
            assert low == (expected & 0xFFFFFFFC) | 0x1
            assert bar.virtual_size == virtual_bar_size(bar.physical_size, bar.type)
            continue
        assert low == (expected & 0xFFFFFFF0) | bar.type.flags
        if bar.type.is_64:
            dev.config.write(offset + 4, b"\xff\xff\xff\xff")
            assert u32(dev.config.read(offset + 4, 4), 0) == expected >> 32
        assert bar.virtual_size >= bar.physical_size
        assert bar.virtual_size & (bar.virtual_size - 1) == 0
    for index in range(6):
        if all(b.index != index and not (b.type.is_64 and b.index + 1 == index) for b in dev.plan.bars):
            dev.config.write(0x10 + 4 * index, b"\xff\xff\xff\xff")
            assert dev.config.read(0x10 + 4 * index, 4) == bytes(4)
    dev.config.write(0x30, (0xFFFFF800).to_bytes(4, "little"))
    rom_value = u32(dev.config.read(0x30, 4), 0)
    if rom:
        assert rom_value == ~(next_power_of_two(rom) - 1) & 0xFFFFF800
    else:
        assert rom_value == 0
    # The guest's BAR values never reach the device.
    assert backend.config[0x10:0x28] == image[0x10:0x28]
    assert backend.config[0x30:0x34] == image[0x30:0x34]
