"""Guest memory pinned in the background: DMA_MAP answers at once, Bus Master waits for the pins.

A ``GatedIommu`` pins one chunk each time the test lets it, so every state
in between (a map recorded but not pinned, half pinned, unmapped mid-pin,
failed) can be looked at. The devices are simulated H100s, whose DMA
engine faults without Bus Master Enable, as hardware does.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mediator.backends.dma import DmaError, DmaMapping, DmaTable
from mediator.backends.pinning import MIN_CHUNK, memlock_refusal
from mediator.backends.space import IommuSpace
from mediator.pci.registers import COMMAND, COMMAND_MASTER
from mediator.vfio_abi import CONFIG_REGION
from mediator.virt.device import VirtualDevice
from tests.support import h100_in
from tests.unit.test_iommu_space import RecordingIommu

RAM = 4 * MIN_CHUNK  # four chunks at the first chunk size
IOVA = 0x1_0000_0000
ENGINE = 0x5000  # the H100 profile's dma-engine registers in BAR0
START, TO_GUEST, FAULT = 0x1, 0x2, 0x100


class GatedIommu(RecordingIommu):
    """Pins a chunk each time ``let`` allows one; ``fail`` makes the next chunk fail."""

    def __init__(self) -> None:
        super().__init__()
        self._allowed = threading.Semaphore(0)
        self.fail: str | None = None
        self._entered = threading.Semaphore(0)
        self.pinned_from: list[DmaMapping] = []  # whose memory each chunk was pinned from

    def let(self, chunks: int = 1) -> None:
        for _ in range(chunks):
            self._allowed.release()

    def next_chunk_started(self) -> bool:
        """Wait until the pinner has started its next chunk (the one after those seen so far)."""
        return self._entered.acquire(timeout=10)

    def map(self, mapping: DmaMapping, offset: int, size: int) -> None:
        self._entered.release()
        assert self._allowed.acquire(timeout=10), "the test never let this chunk be pinned"
        if self.fail:
            raise DmaError(errno.ENOMEM, self.fail)
        self.pinned_from.append(mapping)
        super().map(mapping, offset, size)


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)  # sparse: nothing here touches the pages
    yield fd
    os.close(fd)


@pytest.fixture
def iommu() -> GatedIommu:
    return GatedIommu()


@pytest.fixture
def space(iommu: GatedIommu) -> Iterator[IommuSpace]:
    space = IommuSpace("VM 1", iommu)
    yield space
    iommu.let(100)  # whatever still waits goes through, so the pinner ends
    space.close()


def engine(dev: VirtualDevice, source: int, destination: int, count: int, command: int) -> bool:
    """Start the device's DMA engine; True when the transfer faulted."""
    for n, value in enumerate((source, destination, count, command)):
        dev.write_region(0, ENGINE + 8 * n, value.to_bytes(8, "little"))
    return bool(int.from_bytes(dev.read_region(0, ENGINE + 0x18, 8), "little") & FAULT)


def hardware_bus_master(dev: VirtualDevice) -> bool:
    return bool(int.from_bytes(dev.backend.read_config(COMMAND, 2), "little") & COMMAND_MASTER)


def guest_bus_master(dev: VirtualDevice) -> bool:
    return bool(int.from_bytes(dev.read_region(CONFIG_REGION, COMMAND, 2), "little") & COMMAND_MASTER)


def test_a_map_is_recorded_at_once_and_pinned_chunk_by_chunk(
    space: IommuSpace, iommu: GatedIommu, ram: int
) -> None:
    dev = h100_in(space)
    dev.dma_map(IOVA, RAM, 3, ram, 0)  # returns with nothing pinned
    assert len(space) == 1 and space.pending_bytes == RAM and space.pinned_bytes == 0 and not space.ready
    assert guest_bus_master(dev) and not hardware_bus_master(dev)
    assert engine(dev, 0x100, IOVA, 16, START | TO_GUEST)  # no bus mastering: the engine faults
    assert iommu.next_chunk_started()
    iommu.let()
    assert iommu.next_chunk_started()  # the first chunk is done and the second one is in the kernel
    assert space.pinned_bytes == MIN_CHUNK and not hardware_bus_master(dev)
    iommu.let(100)
    assert space.settle(10) and space.ready and space.pinned_bytes == RAM
    chunks = [call for call in iommu.calls if call[0] == "map"]
    assert chunks[0] == ("map", IOVA, MIN_CHUNK)
    assert sum(size for _, _, size in chunks) == RAM  # in order, end to end
    assert all(a[1] + a[2] == b[1] for a, b in itertools.pairwise(chunks))
    assert hardware_bus_master(dev) and not engine(dev, 0x100, IOVA, 16, START | TO_GUEST)


def half_pinned(space: IommuSpace, iommu: GatedIommu, ram: int) -> VirtualDevice:
    """A device that mapped the guest's RAM: its first chunk is pinned, the second in the kernel."""
    dev = h100_in(space)
    dev.dma_map(IOVA, RAM, 3, ram, 0)
    assert iommu.next_chunk_started()
    iommu.let()
    assert iommu.next_chunk_started()
    return dev


def test_the_simulators_dma_into_memory_not_pinned_yet_faults(
    space: IommuSpace, iommu: GatedIommu, ram: int
) -> None:
    half_pinned(space, iommu, ram)
    space.write(IOVA, b"pinned chunk")
    with pytest.raises(DmaError) as unpinned:
        space.write(IOVA + MIN_CHUNK, b"not yet")
    assert unpinned.value.errno == errno.EFAULT and "not pinned yet" in str(unpinned.value)


def test_an_unmap_of_memory_being_pinned_waits_for_one_chunk_and_unmaps_what_was_done(
    space: IommuSpace, iommu: GatedIommu, ram: int
) -> None:
    dev = half_pinned(space, iommu, ram)
    unmapped = threading.Thread(target=dev.dma_unmap, args=(IOVA, RAM))
    unmapped.start()
    unmapped.join(0.2)
    assert unmapped.is_alive()  # it waits for the chunk in progress...
    iommu.let()
    unmapped.join(10)
    assert not unmapped.is_alive()  # ...and no more
    first, second, unmap = iommu.calls
    assert first == ("map", IOVA, MIN_CHUNK) and second[:2] == ("map", IOVA + MIN_CHUNK)
    assert unmap == ("unmap", IOVA, MIN_CHUNK + second[2])  # exactly the two chunks
    assert len(space) == 0 and space.ready and space.pending_bytes == 0
    iommu.let(100)
    assert iommu.calls[-1][0] == "unmap"  # nothing more was pinned
    dev.dma_map(IOVA, MIN_CHUNK, 3, ram, 0)  # the range is free again


def test_bus_mastering_follows_the_guest_once_everything_is_pinned(
    space: IommuSpace, iommu: GatedIommu, ram: int
) -> None:
    a, b = h100_in(space), h100_in(space)
    a.dma_map(IOVA, MIN_CHUNK, 3, ram, 0)
    assert not hardware_bus_master(a) and not hardware_bus_master(b)  # one VM: both wait
    iommu.let()
    assert space.settle(10)
    assert hardware_bus_master(a) and hardware_bus_master(b)
    b.write_region(CONFIG_REGION, COMMAND, b"\x00\x00")  # the guest turns it off: the hardware follows
    assert not hardware_bus_master(b) and not guest_bus_master(b)
    b.write_region(CONFIG_REGION, COMMAND, COMMAND_MASTER.to_bytes(2, "little"))
    assert hardware_bus_master(b)
    # more memory while bus mastering is on: it is taken away until that memory is pinned too
    a.dma_map(IOVA + MIN_CHUNK, MIN_CHUNK, 3, ram, MIN_CHUNK)
    assert not hardware_bus_master(a) and guest_bus_master(a)
    iommu.let()
    assert space.settle(10) and hardware_bus_master(a) and hardware_bus_master(b)


def test_a_failed_pin_blocks_every_device_of_the_vm_with_the_reason(
    space: IommuSpace, iommu: GatedIommu, ram: int
) -> None:
    a, b = h100_in(space), h100_in(space)
    iommu.fail = "Cannot allocate memory (RLIMIT_MEMLOCK)"
    a.dma_map(IOVA, RAM, 3, ram, 0)
    assert a.refusal is None  # the reply said nothing: the pin had not run yet
    iommu.let()
    assert space.settle(10) and space.pin_failure is not None
    for dev in (a, b):
        assert dev.refusal is not None
        assert f"guest memory {IOVA:#x}+{RAM:#x} could not be pinned for DMA" in dev.refusal
        assert "RLIMIT_MEMLOCK" in dev.refusal and not hardware_bus_master(dev)
    assert space.pinned_bytes == 0 and iommu.calls == []
    late = h100_in(space)  # a device joining the VM now is refused as well
    assert late.refusal is not None and "could not be pinned" in late.refusal
    a.detach_client()
    assert space.pin_failure is None and space.ready  # the mapping went with the client


def test_a_carrier_that_leaves_mid_pin_hands_the_rest_of_the_pin_to_another_holder(
    space: IommuSpace, iommu: GatedIommu, ram: int
) -> None:
    first, second = (DmaTable().prepare(IOVA, 2 * MIN_CHUNK, 3, ram, 0) for _ in range(2))
    space.acquire(first)
    space.acquire(second)  # the same memory through another connection: it joins the pin
    assert iommu.next_chunk_started()  # the first chunk, from the first connection's mmap
    leaving = threading.Thread(target=space.release, args=([first],))
    leaving.start()  # waits for that chunk, which needs the mmap it is closing next
    iommu.let()
    leaving.join(10)
    assert not leaving.is_alive()
    first.memory.close()  # type: ignore[union-attr]
    iommu.let()
    assert space.settle(10) and space.pinned_bytes == 2 * MIN_CHUNK
    assert iommu.pinned_from == [first, second]  # the second chunk came from the holder that stayed
    space.release([second])
    assert iommu.calls[-1] == ("unmap", IOVA, 2 * MIN_CHUNK)


@pytest.mark.parametrize(
    ("locked_kib", "capabilities", "size", "refused"),
    [
        (512, "0000000000000000", 256 << 10, False),  # fits under the limit
        (512, "0000000000000000", 1 << 20, True),  # 512 KiB locked + 1 MiB > 1 MiB
        (512, f"{1 << 14:016x}", 1 << 20, False),  # CAP_IPC_LOCK: no limit
    ],
)
def test_a_pin_over_rlimit_memlock_is_refused_before_it_starts_with_the_fix(
    tmp_path: Path, locked_kib: int, capabilities: str, size: int, refused: bool
) -> None:
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "status").write_text(
        f"Name:\ttest\nVmLck:\t{locked_kib} kB\nCapEff:\t{capabilities}\n"
    )
    limits = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, limits[1]))
    try:
        refusal = memlock_refusal(size, tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, limits)
    assert (refusal is not None) == refused
    if refusal is not None:
        assert "RLIMIT_MEMLOCK" in refusal and "LimitMEMLOCK=" in refusal


def test_a_map_the_kernel_would_refuse_blocks_the_vms_devices_at_once(ram: int) -> None:
    class Limited(GatedIommu):
        def refusal(self, size: int) -> str | None:
            return f"Pinning {size >> 20} MiB needs RLIMIT_MEMLOCK above all guest RAM"

    limited = IommuSpace("VM 2", Limited())
    dev = h100_in(limited)
    dev.dma_map(IOVA, RAM, 3, ram, 0)
    assert dev.refusal is not None and "Pinning 256 MiB needs RLIMIT_MEMLOCK" in dev.refusal
    dev.detach_client()
    limited.close()
