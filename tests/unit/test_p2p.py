"""Peer-to-peer DMA between the devices of one VM, resolved from the BARs the guest programmed.

Two simulated H100s in one IOMMU space: A's DMA engine reaches B's BAR
through an fd-less DMA_MAP (as QEMU sends one for every mmapped BAR), only
where B decodes, only its mmappable parts, only within the VM, and only
while B's migration state lets peers reach it.
"""

from __future__ import annotations

import errno
import struct

import pytest

from mediator.backends.migration import MigState
from mediator.backends.space import IommuSpace
from mediator.virt.device import VirtualDevice
from mediator.virt.errors import DeviceError
from tests.support import h100_in

CONFIG = 7
ENGINE = 0x5000  # the H100 profile's dma-engine registers in BAR0
MIRROR = 0x88000  # its config mirror, a trap window
START, FAULT = 0x1, 0x100
BAR0, BAR2 = 0xE0000000, 0x40_0000_0000  # the H100's BARs are 0, 2 and 4, all 64-bit


def place(dev: VirtualDevice, index: int, address: int, *, decoding: bool = True) -> None:
    """What the guest does: the BAR register(s), then memory decoding."""
    dev.write_region(CONFIG, 0x10 + 4 * index, struct.pack("<Q", address))  # both halves
    dev.write_region(CONFIG, 0x04, struct.pack("<H", 0x0006 if decoding else 0x0004))


def read_peer(dev: VirtualDevice, iova: int, count: int = 16) -> bytes | None:
    """A's engine copies from ``iova`` into its own BAR0 at 0x1000; None when the DMA faulted."""
    for n, value in enumerate((iova, 0x1000, count, START)):
        dev.write_region(0, ENGINE + 8 * n, value.to_bytes(8, "little"))
    if int.from_bytes(dev.read_region(0, ENGINE + 0x18, 8), "little") & FAULT:
        return None
    return dev.read_region(0, 0x1000, count)


@pytest.fixture
def vm() -> tuple[IommuSpace, VirtualDevice, VirtualDevice]:
    space = IommuSpace("VM 1")
    a, b = h100_in(space), h100_in(space)
    b.write_region(0, 0x100, b"B's device memory")
    place(b, 0, BAR0)
    return space, a, b


def test_a_peers_dma_reaches_the_bar_through_an_fd_less_map(vm: tuple[IommuSpace, ...]) -> None:
    space, a, b = vm
    assert read_peer(a, BAR0 + 0x100) is None  # nothing mapped yet: the IOMMU faults
    a.dma_map(BAR0, 16 << 20, 3, None, 0)
    assert read_peer(a, BAR0 + 0x100) == b"B's device memor"
    a.write_region(0, 0x100, b"from A")
    for n, value in enumerate((0x100, BAR0 + 0x200, 6, START | 0x2)):  # A's BAR -> B's BAR
        a.write_region(0, ENGINE + 8 * n, value.to_bytes(8, "little"))
    assert b.read_region(0, 0x200, 6) == b"from A"
    assert space.peer_mappings >= 1


def test_a_trap_window_inside_the_range_never_becomes_a_peer_target(vm: tuple[IommuSpace, ...]) -> None:
    _space, a, b = vm
    a.dma_map(BAR0, 16 << 20, 3, None, 0)
    assert b.read_region(0, MIRROR, 4) == b.read_region(CONFIG, 0, 4)  # the guest's CPU gets the mirror...
    assert read_peer(a, BAR0 + MIRROR, 4) is None  # ...a peer gets nothing
    assert read_peer(a, BAR0 + ENGINE, 8) is None  # nor B's engine registers, which are not mmappable


def test_the_mapping_follows_decoding_and_the_bar(vm: tuple[IommuSpace, ...]) -> None:
    space, a, b = vm
    a.dma_map(BAR0, 16 << 20, 3, None, 0)
    place(b, 0, BAR0, decoding=False)
    assert read_peer(a, BAR0 + 0x100) is None and space.peer_mappings == 0
    place(b, 0, BAR0)
    assert read_peer(a, BAR0 + 0x100) == b"B's device memor"
    place(b, 0, 0xD0000000)  # moved: the old IOVA reaches nothing
    assert read_peer(a, BAR0 + 0x100) is None
    a.dma_map(0xD0000000, 16 << 20, 3, None, 0)  # what QEMU sends for the new place
    assert read_peer(a, 0xD0000000 + 0x100) == b"B's device memor"


def test_a_64_bit_bar_high_in_the_address_space(vm: tuple[IommuSpace, ...]) -> None:
    _space, a, b = vm
    b.write_region(2, 0x3000, b"in B's BAR2")
    place(b, 2, BAR2)
    a.dma_map(BAR2 + (1 << 30), 2 << 20, 3, None, 0)  # a map inside the BAR maps that part of it
    assert read_peer(a, BAR2 + 0x3000, 11) is None
    a.dma_map(BAR2, 2 << 20, 3, None, 0)
    assert read_peer(a, BAR2 + 0x3000, 11) == b"in B's BAR2"


def test_a_map_spanning_two_bars_or_a_bar_and_ram_is_refused(vm: tuple[IommuSpace, ...]) -> None:
    _space, a, b = vm
    place(b, 4, BAR0 + (16 << 20))  # BAR4 right after BAR0
    for iova, size in ((BAR0 + (15 << 20), 2 << 20), (BAR0 - 0x1000, 0x2000)):
        with pytest.raises(DeviceError) as refused:
            a.dma_map(iova, size, 3, None, 0)
        assert refused.value.errno == errno.EINVAL and "inside one BAR" in str(refused.value)
    assert len(a.dma) == 0


def test_another_vms_bar_is_never_reached() -> None:
    ours, theirs = IommuSpace("VM 1"), IommuSpace("VM 2")
    a, stranger = h100_in(ours), h100_in(theirs)
    stranger.write_region(0, 0x100, b"another tenant's")
    place(stranger, 0, BAR0)
    a.dma_map(BAR0, 16 << 20, 3, None, 0)
    assert read_peer(a, BAR0 + 0x100) is None and ours.peer_mappings == 0


def test_a_device_leaving_the_vm_takes_its_bars_out_of_its_peers_reach(vm: tuple[IommuSpace, ...]) -> None:
    space, a, b = vm
    a.dma_map(BAR0, 16 << 20, 3, None, 0)
    assert read_peer(a, BAR0 + 0x100) is not None
    b.detach_client()  # B's client went: B goes home
    assert read_peer(a, BAR0 + 0x100) is None and space.peer_mappings == 0


def test_a_device_stopped_for_migration_is_out_of_its_peers_reach(vm: tuple[IommuSpace, ...]) -> None:
    """The kernel's rule QEMU does not keep: outside RUNNING_P2P and above, no peer reaches the device."""
    space, a, b = vm
    a.dma_map(BAR0, 16 << 20, 3, None, 0)
    b.migration.set_state(MigState.RUNNING_P2P)  # B starts no P2P, but may still be reached
    assert read_peer(a, BAR0 + 0x100) == b"B's device memor"
    for state in (MigState.STOP, MigState.STOP_COPY):
        b.migration.set_state(state)
        assert read_peer(a, BAR0 + 0x100) is None and space.peer_mappings == 0, state
    b.migration.set_state(MigState.RUNNING)
    assert read_peer(a, BAR0 + 0x100) == b"B's device memor"
