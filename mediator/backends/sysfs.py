"""What sysfs says about a PCI function: its driver, IOMMU group, VFIO nodes.

Everything an operator must fix before a device can be served is found here
and reported with the command that fixes it: a function bound to another
driver, an IOMMU group shared with devices that are not given to VFIO.
``root`` is the sysfs mount, so tests can point it at a tree of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
SHORT_BDF = re.compile(r"^[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class DeviceNotReady(Exception):
    """The function cannot be served as it is; the message says what to do."""


def normalize_bdf(text: str) -> str:
    """``3b:00.0`` or ``0000:3b:00.0`` -> ``0000:3b:00.0``."""
    bdf = text.strip().lower()
    if SHORT_BDF.match(bdf):
        bdf = "0000:" + bdf
    if not BDF.match(bdf):
        raise DeviceNotReady(f"{text!r} is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:3b:00.0)")
    return bdf


def is_vfio_driver(driver: str | None) -> bool:
    """vfio-pci itself, or one of its variant drivers (nvgrace-gpu-vfio-pci, mlx5-vfio-pci...)."""
    return driver is not None and (driver == "vfio-pci" or "vfio" in driver)


@dataclass(frozen=True)
class PciFunction:
    bdf: str
    driver: str | None
    iommu_group: int | None
    group_members: Members
    vfio_cdev: str | None  # e.g. "vfio0" when the kernel offers /dev/vfio/devices/vfio0

    def describe(self) -> str:
        return f"{self.bdf} (driver {self.driver or 'none'}, IOMMU group {self.iommu_group})"


Members = tuple[tuple[str, str | None], ...]  # (bdf, driver) of every function in an IOMMU group


def driver_of(device: Path) -> str | None:
    """The driver bound to the function at sysfs path ``device``."""
    link = device / "driver"
    return link.resolve().name if link.exists() else None


def iommu_group_of(device: Path) -> tuple[int | None, Members]:
    """The function's IOMMU group number and its members; (None, ()) without an IOMMU."""
    link = device / "iommu_group"
    if not link.exists():
        return None, ()
    group = link.resolve()
    return int(group.name), tuple(
        (member.name, driver_of(member)) for member in sorted((group / "devices").iterdir())
    )


def find_function(bdf_text: str, root: Path = Path("/sys")) -> PciFunction:
    """The function at ``bdf_text``, ready for VFIO.

    Raises:
        DeviceNotReady: no such function, no IOMMU group, or bound to a driver
            that is not vfio-pci (the message gives the commands to rebind it).
    """
    bdf = normalize_bdf(bdf_text)
    device = root / "bus/pci/devices" / bdf
    if not device.exists():
        raise DeviceNotReady(f"no PCI device {bdf} (nothing at {device})")
    driver = driver_of(device)
    if not is_vfio_driver(driver):
        current = f"is bound to {driver}" if driver else "has no driver"
        unbind = f"echo {bdf} > {device}/driver/unbind; " if driver else ""
        raise DeviceNotReady(
            f"{bdf} {current}, not vfio-pci. Hand it to vfio-pci with: "
            f"modprobe vfio-pci; echo vfio-pci > {device}/driver_override; "
            f"{unbind}echo {bdf} > {root}/bus/pci/drivers_probe"
        )
    group, members = iommu_group_of(device)
    if group is None:
        raise DeviceNotReady(
            f"{bdf} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on on the "
            f"kernel command line, VT-d/AMD-Vi in the firmware)"
        )
    cdevs = (
        sorted(p.name for p in (device / "vfio-dev").glob("vfio*")) if (device / "vfio-dev").is_dir() else []
    )
    return PciFunction(bdf, driver, group, members, cdevs[0] if cdevs else None)


def group_blockers(members: Members) -> Members:
    """Group members that keep it from being viable: bound elsewhere (bridges may stay)."""
    return tuple(
        (bdf, driver)
        for bdf, driver in members
        if driver is not None and not is_vfio_driver(driver) and driver != "pcieport"
    )
