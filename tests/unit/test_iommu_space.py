"""One IOMMU space per VM: guest RAM mapped through several connections is pinned once.

The connections of a VM (one per device) send the same RAM through their own
fds; the space programs the IOMMU once per identity, unmaps when the last
holder lets go, and lets a map of something else wait for its range.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediator.backends.dma import DmaError, DmaMapping, DmaTable, release
from mediator.backends.space import IommuSpace
from mediator.virt.device import VirtualDevice
from mediator.virt.errors import DeviceError
from tests.support import h100_in

RAM = 4 << 20
IOVA = 0x100000
ENGINE = 0x5000  # the H100 profile's dma-engine registers in BAR0
START, TO_GUEST, FAULT = 0x1, 0x2, 0x100


class RecordingIommu:
    """The kernel side of a space, as a list of what it was asked to do."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def map(self, mapping: DmaMapping, offset: int, size: int) -> None:
        self.calls.append(("map", mapping.iova + offset, size))

    def unmap(self, iova: int, size: int) -> None:
        self.calls.append(("unmap", iova, size))

    def refusal(self, size: int) -> str | None:
        return None

    def close(self) -> None:
        self.calls.append(("close", 0, 0))


class GuestRam:
    """A memfd of guest RAM, and the fds a client's connections send of it."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, RAM)
        self._sent: list[int] = []

    def sent(self) -> int:
        """Another open file of the same memory, as each connection of QEMU sends its own."""
        fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        self._sent.append(fd)
        return fd

    def close(self) -> None:
        for fd in (*self._sent, self.fd):
            os.close(fd)


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    memory = GuestRam()
    yield memory
    memory.close()


def mapping(iova: int, size: int, fd: int | None = None, offset: int = 0, flags: int = 3) -> DmaMapping:
    """One connection's mapping, as its DMA_MAP makes it (with its own mmap)."""
    return DmaTable().prepare(iova, size, flags, fd, offset)


@settings(max_examples=40, deadline=None)
@given(order=st.permutations(range(8)))
def test_ram_mapped_through_eight_connections_is_pinned_once_until_the_last_unmap(order: list[int]) -> None:
    iommu, ram = RecordingIommu(), GuestRam()
    space = IommuSpace("VM 1", iommu)
    try:
        mappings = [mapping(IOVA, RAM, ram.sent()) for _ in range(8)]
        for m in mappings:
            space.acquire(m)
        assert space.settle(10)
        assert len(space) == 1 and space.pinned_bytes == RAM and iommu.calls == [("map", IOVA, RAM)]
        for done, n in enumerate(order, 1):
            space.release([mappings[n]])
            release([mappings[n]])  # what the connection does next: its own mmap goes
            if done < 8:
                assert space.pinned_bytes == RAM and iommu.calls == [("map", IOVA, RAM)]
                space.write(IOVA + 8, b"still")  # the others' DMA still lands, whoever carried it
        assert len(space) == 0 and space.pinned_bytes == 0
        assert iommu.calls == [("map", IOVA, RAM), ("unmap", IOVA, RAM)]
        with mmap.mmap(ram.fd, RAM) as memory:
            assert memory[8:13] == b"still"
    finally:
        ram.close()


def test_a_map_of_other_memory_waits_until_the_other_connections_mapping_goes(ram: GuestRam) -> None:
    # QEMU's listeners are per device: one connection may still hold the old layout.
    iommu = RecordingIommu()
    space = IommuSpace("VM 1", iommu)
    rom = os.memfd_create("rom", os.MFD_CLOEXEC)
    os.ftruncate(rom, 0x40000)
    try:
        whole = mapping(0, RAM, ram.sent())
        space.acquire(whole)
        piece = mapping(0xC0000, 0x20000, rom, 0, flags=1)
        space.acquire(piece)  # no error: it waits
        assert space.settle(10)
        assert space.waiting == 1 and space.pinned_bytes == RAM
        space.write(0xC0000, b"ram")  # the devices reach the older mapping meanwhile
        space.release([whole])
        assert space.settle(10)
        assert space.waiting == 0 and space.pinned_bytes == 0x20000
        assert iommu.calls == [("map", 0, RAM), ("unmap", 0, RAM), ("map", 0xC0000, 0x20000)]
        with pytest.raises(DmaError) as read_only:
            space.write(0xC0000, b"rom")
        assert read_only.value.errno == errno.EPERM and space.read(0xC0000, 3) == b"\0\0\0"
    finally:
        os.close(rom)


def test_two_connections_changing_layout_out_of_step_end_in_one_shared_layout(ram: GuestRam) -> None:
    iommu = RecordingIommu()
    space = IommuSpace("VM 1", iommu)
    pieces = [(0, 0xC0000), (0x100000, RAM - 0x100000)]
    a_whole = mapping(0, RAM, ram.sent())
    space.acquire(a_whole)
    b_pieces = [mapping(iova, size, ram.sent(), iova) for iova, size in pieces]
    for m in b_pieces:
        space.acquire(m)
    assert space.waiting == 2
    space.release([a_whole])  # a catches up: its old layout goes...
    a_pieces = [mapping(iova, size, ram.sent(), iova) for iova, size in pieces]
    for m in a_pieces:
        space.acquire(m)  # ...and its new one joins b's
    assert space.settle(10)
    assert space.waiting == 0 and len(space) == 2 and space.pinned_bytes == RAM - 0x40000
    assert iommu.calls[-2:] == [("map", 0, 0xC0000), ("map", 0x100000, RAM - 0x100000)]


def test_fd_less_maps_are_shared_and_never_pinned(ram: GuestRam) -> None:
    iommu = RecordingIommu()
    space = IommuSpace("VM 1", iommu)
    for _ in range(3):
        space.acquire(mapping(0xFFFC0000, 0x40000, flags=1))
    assert len(space) == 1 and space.pinned_bytes == 0 and iommu.calls == []


def test_a_pin_the_iommu_refuses_is_the_spaces_failure_until_its_mapping_goes(ram: GuestRam) -> None:
    class FullIommu(RecordingIommu):
        def map(self, mapping: DmaMapping, offset: int, size: int) -> None:
            raise DmaError(errno.ENOMEM, "the IOMMU is full")

    space = IommuSpace("VM 1", FullIommu())
    refused = mapping(IOVA, RAM, ram.sent())
    space.acquire(refused)  # recorded at once: the pin fails later, on the pinner's thread
    assert space.settle(10) and not space.ready and space.pinned_bytes == space.pending_bytes == 0
    assert (
        space.pin_failure == f"guest memory {IOVA:#x}+{RAM:#x} could not be pinned for DMA: the IOMMU is full"
    )
    space.release([refused])
    assert space.ready and space.pin_failure is None and len(space) == 0
    space.acquire(mapping(IOVA, RAM))  # the range is free again
    assert len(space) == 1


def start_engine(dev: VirtualDevice, source: int, destination: int, count: int, command: int) -> int:
    for n, value in enumerate((source, destination, count, command)):
        dev.write_region(0, ENGINE + 8 * n, value.to_bytes(8, "little"))
    return int.from_bytes(dev.read_region(0, ENGINE + 0x18, 8), "little")


def test_a_vms_devices_reach_the_ram_any_of_them_mapped_and_a_crash_drops_only_its_own(ram: GuestRam) -> None:
    space = IommuSpace("VM 1")
    a, b = h100_in(space), h100_in(space)
    a.dma_map(IOVA, RAM, 3, ram.sent(), 0)
    b.dma_map(IOVA, RAM, 3, ram.sent(), 0)
    assert space.pinned_bytes == RAM and len(a.dma) == len(b.dma) == 1
    a.write_region(0, 0x100, b"from a's BAR")
    assert not start_engine(a, 0x100, IOVA + 0x2000, 12, START | TO_GUEST) & FAULT
    a.detach_client()  # a's connection ended (cleanly or not): its references go, b's stay
    assert a.dma.space is a.backend.home and space.pinned_bytes == RAM
    assert not start_engine(b, IOVA + 0x2000, 0x200, 12, START) & FAULT
    assert b.read_region(0, 0x200, 12) == b"from a's BAR"
    with mmap.mmap(ram.fd, RAM) as memory:
        assert memory[0x2000:0x200C] == b"from a's BAR"
    assert start_engine(a, 0x100, IOVA + 0x2000, 12, START | TO_GUEST) & FAULT  # home: no memory at all
    b.detach_client()
    assert len(space) == 0 and space.pinned_bytes == 0


def test_a_device_moves_only_with_nothing_mapped(ram: GuestRam) -> None:
    space, elsewhere = IommuSpace("VM 1"), IommuSpace("VM 2")
    dev = h100_in(space)
    dev.dma_map(IOVA, RAM, 3, ram.sent(), 0)
    with pytest.raises(DeviceError) as busy:
        dev.move_to(elsewhere)
    assert busy.value.errno == errno.EBUSY and dev.dma.space is space
    dev.dma_unmap(IOVA, RAM)
    dev.move_to(elsewhere)
    assert dev.dma.space is elsewhere and len(space) == 0


def test_unmapping_through_one_connection_keeps_the_unmap_rules_per_connection(ram: GuestRam) -> None:
    space = IommuSpace("VM 1")
    a, b = h100_in(space), h100_in(space)
    a.dma_map(IOVA, RAM, 3, ram.sent(), 0)
    with pytest.raises(DeviceError) as nothing:
        b.dma_unmap(IOVA, RAM)  # b never mapped it: ENOENT, as for a lone device
    assert nothing.value.errno == errno.ENOENT and space.pinned_bytes == RAM
    with pytest.raises(DeviceError) as twice:
        a.dma_map(IOVA, RAM, 3, ram.sent(), 0)  # one connection's own overlap
    assert twice.value.errno == errno.EEXIST


def test_tearing_a_space_down_closes_its_iommu(ram: GuestRam) -> None:
    iommu = RecordingIommu()
    space = IommuSpace("VM 1", iommu)
    space.acquire(mapping(IOVA, RAM, ram.sent()))
    space.close()
    assert len(space) == 0 and iommu.calls[-1] == ("close", 0, 0) and space.iommu is None
