"""BARs as the guest sees them: trap windows, config mirrors, non-power-of-two padding."""

from __future__ import annotations

import errno

import pytest

from mediator.virt.errors import DeviceError, RegionAccessError
from mediator.virt.plan import PAGE_SIZE
from tests.support import device


def test_the_simulated_gpu_really_mirrors_its_config_in_bar0() -> None:
    """The hazard the NVIDIA quirk exists for: the hardware mirror shows the hidden capability."""
    _, sim = device("h100-sxm5")
    assert sim.read_region(0, 0x88000 + 0x9C, 4) == bytes([0x09, 0xB0, 0x14, 0x01])


def test_bar0_config_mirror_serves_the_virtual_config_space() -> None:
    dev, _ = device("h100-sxm5")
    mirrored = dev.read_region(0, 0x88000, 0x1000)
    assert mirrored == dev.config.read(0, 0x1000)
    assert dev.read_region(0, 0x88000 + 0x9C, 0x14) == bytes(0x14)  # the hidden vendor capability
    assert dev.read_region(0, 0x1800, 0x100) == dev.config.read(0, 0x100)
    assert dev.read_region(0, 0x89000, 0x2000) == bytes(0x2000)  # past the config space: zeros


def test_writes_through_the_mirror_obey_the_config_policy() -> None:
    dev, sim = device("h100-sxm5")
    before = bytes(sim.config)
    dev.write_region(0, 0x88000 + 0x9C, b"\xff" * 4)  # hidden capability
    dev.write_region(0, 0x88000 + 0x00, b"\xff" * 4)  # IDs
    dev.write_region(0, 0x1800 + 0x10, b"\xff" * 4)  # BAR0 register through the legacy mirror
    assert bytes(sim.config) == before
    assert dev.config.read(0x10, 4) == (0xFF00000C).to_bytes(4, "little")  # a virtual sizing write
    dev.write_region(0, 0x88000 + 0x04, b"\x06\x00")  # Command: writable bits reach the device
    assert sim.config[0x04:0x06] == b"\x06\x00"


def test_mmap_areas_never_cover_a_trap_window() -> None:
    dev, _ = device("h100-sxm5")
    bar0 = dev.plan.bar(0)
    assert bar0 is not None
    for offset, size in bar0.mmap_areas:
        assert offset % PAGE_SIZE == 0 and size % PAGE_SIZE == 0
        for trap in bar0.traps:
            assert offset + size <= trap.offset or trap.end <= offset
    covered = sum(size for _, size in bar0.mmap_areas)
    # Trapped by the policy: 0x1000-0x1fff and 0x88000-0x8afff; the simulator's own
    # registers (doorbell at 0x4000, DMA engine at 0x5000) are not mappable either.
    assert covered == bar0.physical_size - 6 * PAGE_SIZE
    for register in (0x4000, 0x5000):
        assert not any(o <= register < o + s for o, s in bar0.mmap_areas)


def test_outside_trap_windows_bar_accesses_reach_the_device() -> None:
    dev, sim = device("h100-sxm5")
    dev.write_region(0, 0x100, b"\x12\x34\x56\x78")
    assert sim.read_region(0, 0x100, 4) == b"\x12\x34\x56\x78"
    assert dev.read_region(0, 0x100, 4) == b"\x12\x34\x56\x78"


def test_gh200_device_memory_is_a_power_of_two_bar_with_padding() -> None:
    dev, sim = device("gh200")
    bar4 = dev.plan.bar(4)
    assert bar4 is not None
    real = 0x17E0000000
    assert (bar4.physical_size, bar4.virtual_size) == (real, 128 << 30)
    assert bar4.type.is_64 and bar4.type.prefetchable
    assert bar4.mmap_areas == ((0, real),)
    sim.write_region(4, real - 1, b"\x5a")
    assert dev.read_region(4, real - 1, 1) == b"\x5a"
    assert dev.read_region(4, real, 1) == b"\xff"
    assert dev.read_region(4, real - 2, 4) == b"\x00\x5a\xff\xff"
    dev.write_region(4, real, b"\x00" * 8)  # dropped
    assert dev.read_region(4, real, 8) == b"\xff" * 8
    assert dev.read_region(4, (128 << 30) - 8, 8) == b"\xff" * 8
    with pytest.raises(RegionAccessError, match="outside"):
        dev.read_region(4, 128 << 30, 1)
    with pytest.raises(RegionAccessError, match="outside"):
        dev.write_region(4, (128 << 30) - 2, b"\0" * 4)


def test_guest_sizing_of_the_gh200_bar_pair() -> None:
    dev, _ = device("gh200")
    dev.config.write(0x20, b"\xff\xff\xff\xff")
    dev.config.write(0x24, b"\xff\xff\xff\xff")
    size_mask = int.from_bytes(dev.config.read(0x20, 8), "little")
    assert size_mask == (~((128 << 30) - 1) & (1 << 64) - 1) | 0xC


def test_unimplemented_regions_and_rom_writes_are_errors() -> None:
    dev, _ = device("h100-sxm5")
    with pytest.raises(RegionAccessError, match="not implemented"):
        dev.read_region(1, 0, 4)  # the upper half of 64-bit BAR0
    with pytest.raises(DeviceError, match="read-only") as refused:
        dev.write_region(6, 0, b"\0")
    assert refused.value.errno == errno.EPERM
    assert dev.read_region(6, 0, 2) == b"\x55\xaa"  # the simulated ROM is a real image
    assert dev.read_region(6, 0x1FFFC, 4) == b"\xff" * 4  # past the last image, as erased flash reads
