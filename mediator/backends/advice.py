"""What an operator runs to fix a function or mediated device the daemon cannot serve, phrased once.

The daemon's refusals (``sysfs``, ``vfio``) and the preflight's findings
(``mediator.preflight``) give the same fixes in the same words, so what
``doctor`` says before serving is what the log says when serving fails.
"""

from __future__ import annotations

import errno
import resource
from pathlib import Path

ENABLE_IOMMU = (
    "enable the IOMMU: intel_iommu=on or amd_iommu=on on the kernel command line, VT-d/AMD-Vi in the firmware"
)

SHARE_THE_GROUP = "bind every device of the group to vfio-pci, or unbind it from its driver"

LOAD_MDEV = "load the parent device's vendor driver (the kernel's sample: modprobe mtty), which loads mdev"


def bind_mdev(uuid: str, sysfs: Path) -> str:
    """What binds the mediated device ``uuid`` to its vendor driver, which registers it with VFIO."""
    return f"{LOAD_MDEV}; with it loaded, bind the device again: echo {uuid} > {sysfs}/bus/mdev/drivers_probe"


def rebind_to_vfio(bdf: str, device: Path, driver: str | None, sysfs: Path) -> str:
    """The shell commands that hand the function at sysfs path ``device`` to vfio-pci."""
    unbind = f"echo {bdf} > {device}/driver/unbind; " if driver else ""
    return (
        f"modprobe vfio-pci; echo vfio-pci > {device}/driver_override; "
        f"{unbind}echo {bdf} > {sysfs}/bus/pci/drivers_probe"
    )


def memlock(size: int) -> str:
    """Why pinning ``size`` bytes of guest memory fails under this process's RLIMIT_MEMLOCK, and the fix."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft >> 10} KiB"
    return (
        f"Pinning {size >> 20} MiB of guest memory for DMA needs RLIMIT_MEMLOCK above all guest RAM "
        f"(now {limit}): set LimitMEMLOCK= in the unit (or ulimit -l), or give the daemon CAP_IPC_LOCK"
    )


def for_errno(errno_value: int, operation: str) -> str:
    """What to do about a VFIO operation that failed with ``errno_value``; empty: nothing general helps."""
    if errno_value == errno.EBUSY:
        return (
            "The device or its IOMMU group is in use by another process (another daemon or a VMM): "
            "stop it first"
        )
    if errno_value == errno.ENOTTY and operation == "VFIO_DEVICE_PCI_HOT_RESET":
        return (
            "The kernel could not complete the bus reset; most often the device did not answer "
            "in time after it (see dmesg)"
        )
    if errno_value == errno.ENOTTY:
        return f"This kernel does not implement {operation}: it needs a newer vfio-pci"
    return ""
