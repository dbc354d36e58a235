"""Pinning a VM's RAM once: time from the first DMA_MAP until it is pinned, for 1, 2 and 4 devices.

Real pinning needs real type1, which this machine reaches only in the TCG
guest of the real-VFIO tests, so this boots that guest with four edu
functions and runs ``bench/vm_dma_map_guest.py`` there (about 3 minutes).
Per device count it prints the time to map 64 MiB of guest RAM through
every device of one VM as the daemon does it now (pinned once, the others
join) and as a container per device did (pinned by each; here at an IOVA
per device in one container), each as a ratio to the floor measured in the
same run: an fd-less DMA_MAP round trip. The memory is written before the
first case, so every case pins pages that exist and none pays for faulting
them in.

    .venv/bin/python -m bench.vm_dma_map
"""

from __future__ import annotations

from bench.tools import guest_figures
from tests.guest.test_real_vfio import run_in_guest

FUNCTIONS = tuple(
    arg
    for slot in ("04.0", "07.0", "09.0", "0a.0")
    for arg in ("-device", f"edu,addr={slot},dma_mask=0xffffffff")
)

WIDTHS = (7, 15, 8, 18, 8, 9)


def main() -> None:
    figures = guest_figures(run_in_guest("bench.vm_dma_map_guest", FUNCTIONS))
    floor = next(f["seconds"] for f in figures if f.get("case") == "floor")
    print(f"floor (an fd-less DMA_MAP round trip): {floor * 1e6:.0f} us")
    columns = ("devices", "pinned once (s)", "/floor", "pinned by each (s)", "/floor", "each/once")
    print("  ".join(f"{c:>{w}}" for c, w in zip(columns, WIDTHS, strict=True)))
    for devices in (1, 2, 4):
        once, each = (
            next(f["seconds"] for f in figures if f.get("devices") == devices and f["shared"] is shared)
            for shared in (True, False)
        )
        cells = (f"{devices}", f"{once:.3f}", f"{once / floor:.0f}", f"{each:.3f}", f"{each / floor:.0f}")
        print("  ".join(f"{c:>{w}}" for c, w in zip((*cells, f"{each / once:.2f}"), WIDTHS, strict=True)))


if __name__ == "__main__":
    main()
