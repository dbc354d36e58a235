"""The guest half of ``bench/big_guest.py``: runs INSIDE the real-VFIO TCG guest.

Two measurements, one ``FIGURE {...}`` line each:

- ``map``: one VFIO_IOMMU_MAP_DMA of a fresh memfd of each size through a
  type1 container holding the edu function, in 4 KiB pages and in 2 MiB
  huge pages (``MFD_HUGETLB``, pages reserved through
  ``/proc/sys/vm/nr_hugepages``): the time the kernel takes to pin and map
  it, which is what the daemon's DMA_MAP reply waited for before it pinned
  in the background.
- ``qemu``: a nested QEMU 11.1 in qtest mode with that much guest RAM
  (``memory-backend-memfd``, default ``x-msg-timeout``) realizes the edu
  served by ``serve --config``; whether it realized without a timeout, when
  the daemon gave the device Bus Master Enable (after the guest set it),
  and whether an edu DMA round trip into the top of the guest's RAM worked.

Sizes double from 256 MiB to the most the guest can hold.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from mediator.backends.dma import DmaTable, release
from mediator.backends.sysfs import find_function
from mediator.backends.vfio import Ioas, Type1Container, VfioDevice
from tests.guest.vfio_guest import big_guest, bind_to_vfio, edu_config, find
from tests.support import DaemonProcess

MIB = 1 << 20
HUGE_PAGE = 2 * MIB
FIRST = 256 * MIB
IOVA = 1 << 32


def figure(**fields: object) -> None:
    print("FIGURE " + json.dumps(fields), flush=True)


def meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        if name == field:
            return int(value.split()[0]) * (1024 if value.strip().endswith("kB") else 1)
    raise KeyError(field)


def sizes(most: int) -> Iterator[int]:
    size = FIRST
    while size <= most:
        yield size
        size *= 2
    if size // 2 < most // FIRST * FIRST:
        yield most // FIRST * FIRST


def reserve_huge_pages(size: int) -> bool:
    Path("/proc/sys/vm/nr_hugepages").write_text(str(size // HUGE_PAGE))
    return meminfo("HugePages_Total") * HUGE_PAGE >= size


def map_seconds(container: Type1Container | Ioas, size: int, *, huge: bool) -> float:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | (os.MFD_HUGETLB if huge else 0))
    try:
        os.ftruncate(fd, size)
        mapping = DmaTable().prepare(IOVA, size, 3, fd, 0)
        started = time.perf_counter()
        container.map(mapping, 0, size)
        seconds = time.perf_counter() - started
        container.unmap(IOVA, size)
        release([mapping])
        return seconds
    finally:
        os.close(fd)


def measure_maps(edu: str, measured: list[int]) -> None:
    device = VfioDevice(find_function(edu))
    container = device.new_iommu("bench")
    device.move_to(container)
    try:
        for size in measured:
            figure(case="map", size=size, page="4K", seconds=map_seconds(container, size, huge=False))
        try:
            os.close(os.memfd_create("probe", os.MFD_HUGETLB))
        except OSError as e:
            figure(case="no-hugetlb", why=str(e))
            return
        for size in measured:
            if not reserve_huge_pages(size):
                figure(case="no-hugetlb", why=f"the kernel reserved fewer huge pages than {size >> 20} MiB")
                break
            figure(case="map", size=size, page="2M", seconds=map_seconds(container, size, huge=True))
    finally:
        Path("/proc/sys/vm/nr_hugepages").write_text("0")
        device.close()
        container.close()


def measure_realize(edu: str, measured: list[int]) -> None:
    config, sockets = edu_config("big", [edu])
    with DaemonProcess("--config", str(config), "--log-format", "json", devices=1, timeout=600) as served:
        for size in measured:
            figure(case="qemu", **big_guest(served, sockets[0], size))


def main() -> None:
    edu = find("edu")
    bind_to_vfio(edu)
    measured = list(sizes(meminfo("MemAvailable") - 1536 * MIB))  # room for the nested QEMU besides
    measure_maps(edu, measured)
    measure_realize(edu, measured)
    figure(case="done")


if __name__ == "__main__":
    main()
