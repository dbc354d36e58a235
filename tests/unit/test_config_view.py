"""The guest's config space on real dumps: what is hidden, how chains relink, what writes do."""

from __future__ import annotations

from pathlib import Path

import pytest

from mediator.pci import capabilities as caps
from mediator.pci.chain import walk
from mediator.pci.registers import u16, u32
from mediator.virt.errors import RegionAccessError
from tests.support import device, write_table


def guest_chain(name: str) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(offset, id, next) of the std and ext chains the guest walks."""
    dev, _ = device(name)
    chains = walk(dev.config.read(0, dev.config.size))
    return (
        [(c.offset, c.id, c.next) for c in chains.std],
        [(c.offset, c.id, c.next) for c in chains.ext],
    )


def test_skylake_pasid_head_becomes_a_placeholder_and_ats_pri_vanish() -> None:
    dev, _ = device("skylake-igd")
    std, ext = guest_chain("skylake-igd")
    # PASID at 0x100 was first, and ATS and PRI after it are hidden too: nothing
    # remains, so dword 0x100 reads 0 and the guest finds no extended capability.
    assert ext == []
    assert dev.config.read(0x100, 4) == bytes(4)
    placeholder = next(f for f in dev.plan.capabilities if f.placeholder_next is not None)
    assert (placeholder.capability.offset, placeholder.placeholder_next) == (0x100, 0)
    # ATS (0x200) and PRI (0x300) bodies read 0, including the host-enabled ATS control at 0x206.
    assert dev.plan.physical[0x206:0x208] != bytes(2)
    assert dev.config.read(0x200, 8) == bytes(8)
    assert dev.config.read(0x300, 16) == bytes(16)
    # PASID control (0x106, enabled by the host) reads 0 too.
    assert dev.plan.physical[0x106] != 0
    assert dev.config.read(0x104, 4) == bytes(4)
    assert [o for o, _, _ in std] == [0x40, 0x70, 0xAC, 0xD0]


def test_skylake_placeholder_points_at_the_next_exposed_capability(tmp_path: Path) -> None:
    """With ATS allowed by an operator, the PASID placeholder's next is 0x200."""
    table = write_table(
        tmp_path,
        '[[quirk]]\nname = "security/ats"\nreason = "this tenant is trusted"\nenabled = false\n',
    )
    dev, _ = device("skylake-igd", quirk_files=[table])
    chains = walk(dev.config.read(0, dev.config.size))
    assert [(c.offset, c.id, c.next) for c in chains.ext] == [(0x100, 0, 0x200), (0x200, caps.ATS, 0)]
    # PRI stays hidden: its body reads 0, and ATS's next pointer no longer leads to it.
    assert dev.config.read(0x300, 16) == bytes(16)


def test_gp108m_hides_l1ss_and_secondary_pcie_and_relinks_ltr() -> None:
    dev, _ = device("gp108m-mx150")
    _, ext = guest_chain("gp108m-mx150")
    assert ext == [
        (0x100, caps.VC, 0x250),
        (0x250, caps.LTR, 0x128),  # was 0x258, the hidden L1SS
        (0x128, caps.PWR, 0x420),
        (0x420, caps.AER, 0x600),
        (0x600, caps.VSEC, 0),  # was 0x900, the hidden Secondary PCIe
    ]
    assert dev.config.read(0x258, 0x10) == bytes(0x10)
    assert dev.config.read(0x900, 0x0C) == bytes(0x0C)


def test_the_aliasing_host_bridge_shows_no_bogus_capability() -> None:
    dev, _ = device("rs690-hostbridge")
    view = dev.config.read(0, dev.config.size)
    chains = walk(view)
    assert chains.std == () and chains.ext == ()
    assert view[0x100:] == bytes(0xF00)
    assert view[:4] == dev.plan.physical[:4]


def test_h100_hides_the_link_topology_vendor_capability_and_keeps_nvidia_vsec() -> None:
    dev, _ = device("h100-sxm5")
    std, ext = guest_chain("h100-sxm5")
    assert [(o, i) for o, i, _ in std] == [
        (0x40, caps.PM),
        (0x48, caps.MSI),
        (0x60, caps.EXP),
        (0xB0, caps.MSIX),
    ]
    assert dev.config.read(0x9C, 0x14) == bytes(0x14)
    assert ext[0] == (0x100, 0, 0x12C)  # Null head kept as the placeholder
    assert (0x2A4, caps.VSEC) in [(o, i) for o, i, _ in ext]


def test_a_function_whose_every_std_capability_is_hidden_clears_caplist(tmp_path: Path) -> None:
    table = write_table(
        tmp_path,
        '[[quirk]]\nname = "hide-all"\nreason = "test"\nhide = [{ std = 0x05 }, { std = 0x01 }]\n',
    )
    dev, _ = device("gm965-igd", quirk_files=[table])
    assert u16(dev.config.read(0x06, 2), 0) & 0x10 == 0
    assert dev.config.read(0x34, 1) == b"\x00"
    assert dev.plan.physical[0x06] & 0x10


def test_reads_are_split_per_segment_yet_agree_with_the_whole_image() -> None:
    dev, _ = device("h100-sxm5")
    whole = dev.config.read(0, 4096)
    for size in (1, 2, 4):
        for offset in range(0, 0x300 - size, size):
            assert dev.config.read(offset, size) == whole[offset : offset + size], hex(offset)


def test_command_register_writes_reach_the_device_only_in_writable_bits() -> None:
    dev, sim = device("h100-sxm5")
    dev.config.write(0x04, (0xFFFF).to_bytes(2, "little"))
    assert u16(sim.config, 0x04) == 0x0547
    assert u16(dev.config.read(0x04, 2), 0) == 0x0547


def test_interrupt_line_is_virtual_and_pin_is_read_only() -> None:
    dev, sim = device("h100-sxm5")
    dev.config.write(0x3C, b"\x42\x07")
    assert dev.config.read(0x3C, 2) == b"\x42\x01"
    assert sim.config[0x3C:0x3E] == dev.plan.physical[0x3C:0x3E]


def test_power_state_changes_stay_virtual() -> None:
    dev, sim = device("h100-sxm5")
    dev.config.write(0x44, b"\x03\x00")  # D3hot
    assert dev.config.read(0x44, 2)[0] & 3 == 3
    assert sim.config[0x44] & 3 == 0


def test_msi_address_and_data_never_reach_the_device() -> None:
    dev, sim = device("h100-sxm5")
    dev.config.write(0x4C, (0xFEE00000).to_bytes(4, "little"))
    dev.config.write(0x4A, b"\x01\x00")  # enable
    assert u32(dev.config.read(0x4C, 4), 0) == 0xFEE00000
    assert u16(dev.config.read(0x4A, 2), 0) & 1 == 1
    assert sim.config[0x48:0x60] == dev.plan.physical[0x48:0x60]


def test_pcie_device_control_keeps_mps_virtual_and_phantom_functions_locked() -> None:
    dev, sim = device("h100-sxm5")
    before = u16(sim.config, 0x68)
    dev.config.write(0x68, (0xFFFF).to_bytes(2, "little"))
    guest = u16(dev.config.read(0x68, 2), 0)
    assert guest & 0x00E0 == 0x00E0  # MPS written, virtual
    assert guest & 0x8000 == 0  # FLR reads 0
    device_value = u16(sim.config, 0x68)
    assert device_value & 0xF0E0 == before & 0xF0E0  # MPS, MRRS, FLR never reach the device
    assert device_value & 0x0200 == before & 0x0200  # phantom functions untouched
    assert device_value & 0x000F == 0x000F  # error reporting enables do


def test_reset_restores_the_initial_shadow() -> None:
    dev, _ = device("h100-sxm5")
    initial = dev.config.read(0, 4096)
    dev.config.write(0x10, b"\xff\xff\xff\xff")
    dev.config.write(0x3C, b"\x42")
    assert dev.config.read(0, 4096) != initial
    dev.reset()
    assert dev.config.read(0, 4096) == initial


@pytest.mark.parametrize(("offset", "length"), [(-1, 4), (4095, 2), (0, 0), (0, 4097), (4096, 1)])
def test_accesses_outside_the_config_space_are_errors(offset: int, length: int) -> None:
    dev, _ = device("h100-sxm5")
    with pytest.raises(RegionAccessError, match="outside"):
        dev.config.read(offset, length)
    with pytest.raises(RegionAccessError, match="outside"):
        dev.config.write(offset, bytes(max(length, 0)))


def test_a_256_byte_device_refuses_extended_offsets() -> None:
    dev, _ = device("gm965-igd")
    assert dev.config.size == 256
    with pytest.raises(RegionAccessError):
        dev.config.read(0x100, 4)
