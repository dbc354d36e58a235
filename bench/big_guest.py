"""Big guests against QEMU's x-msg-timeout: pinning time by size and page size, and realize.

QEMU 11.1 sends the guest's RAM as DMA_MAPs while it realizes a
vfio-user device and waits for each reply no longer than ``x-msg-timeout``
(5 s). Before the daemon pinned in the background its reply came after the
kernel had pinned the whole range, so realize failed for any guest whose RAM
took longer than that to pin. This boots the real-VFIO guest with 16 GiB and
one edu function and runs ``bench/big_guest_guest.py`` there (tens of
minutes under TCG), then prints, per size and page size, the measured
VFIO_IOMMU_MAP_DMA time (what the reply used to wait for), the realize result
that time meant, and what a nested QEMU 11.1 does now: realize, the time
until the device got Bus Master Enable, and an edu DMA round trip into the
top of the guest's RAM. The times are absolute because the timeout they are
held against is; the pinning rate of this TCG guest is far below a real
host's, which only moves the size at which realize used to fail.

    .venv/bin/python -m bench.big_guest [--memory 16G]
"""

from __future__ import annotations

import argparse

from bench.tools import guest_figures
from tests.guest.test_real_vfio import run_in_guest

X_MSG_TIMEOUT = 5.0  # QEMU's default, seconds
EDU = ("-device", "edu,addr=04.0,dma_mask=0xffffffffffffffff")  # DMA to anywhere in a big guest


def size_text(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="16G", help="the TCG guest's RAM (default 16G)")
    args = parser.parse_args()
    output = run_in_guest("bench.big_guest_guest", EDU, memory=args.memory, timeout=4 * 3600)
    figures = guest_figures(output)
    maps = {(f["size"], f["page"]): f["seconds"] for f in figures if f["case"] == "map"}
    qemu = {f["size"]: f for f in figures if f["case"] == "qemu"}
    print(f"x-msg-timeout: {X_MSG_TIMEOUT:g} s (QEMU's default)")
    for f in figures:
        if f["case"] == "no-hugetlb":
            print(f"huge pages: {f['why']}")
    header = (
        "size",
        "pages",
        "map (s)",
        "GiB/s",
        "realize before",
        "realize now",
        "bus master (s)",
        "DMA top",
    )
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for (size, page), seconds in sorted(maps.items(), key=lambda item: (item[0][1], item[0][0])):
        before = "fails (reply after the pin)" if seconds > X_MSG_TIMEOUT else "ok"
        now = qemu.get(size) if page == "4K" else None
        cells = (
            size_text(size),
            page,
            f"{seconds:.2f}",
            f"{size / seconds / (1 << 30):.2f}",
            before,
            ("ok" if now["realized"] else "FAILS") if now else "-",
            f"{now['bus_master_seconds']:.1f}" if now else "-",
            ("ok" if now["dma_top"] else "FAILS") if now else "-",
        )
        print(" | ".join(cells))
    slow = [size for (size, page), seconds in maps.items() if page == "4K" and seconds > X_MSG_TIMEOUT]
    four_k = {size: s for (size, page), s in maps.items() if page == "4K"}
    if slow:
        failing = min(slow)
        print(f"realize failed before from {size_text(failing)} of 4 KiB-page guest RAM (measured)")
    else:
        biggest = max(four_k)
        failing = int(X_MSG_TIMEOUT * biggest / four_k[biggest])
        print(f"realize failed before from about {size_text(failing)} of 4 KiB-page RAM (extrapolated)")
    served = [size for size, f in qemu.items() if f["realized"] and f["dma_top"]]
    if served:
        print(
            f"now: realized with {size_text(max(served))}, {max(served) / failing:.1f}x that, and DMA works"
        )


if __name__ == "__main__":
    main()
