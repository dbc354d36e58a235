"""What sysfs says about a PCI function: its driver, IOMMU group, VFIO nodes.

Everything an operator must fix before a device can be served is found here
and reported with the command that fixes it: a function bound to another
driver, an IOMMU group shared with devices that are not given to VFIO.
``root`` is the sysfs mount, so tests can point it at a tree of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mediator.backends.advice import ENABLE_IOMMU, rebind_to_vfio
from mediator.pci.address import AddressError, normalize_bdf


class DeviceNotReady(Exception):
    """The function cannot be served as it is; the message says what to do."""


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
    try:
        bdf = normalize_bdf(bdf_text)
    except AddressError as e:
        raise DeviceNotReady(str(e)) from None
    device = root / "bus/pci/devices" / bdf
    if not device.exists():
        raise DeviceNotReady(f"no PCI device {bdf} (nothing at {device})")
    driver = driver_of(device)
    if not is_vfio_driver(driver):
        current = f"is bound to {driver}" if driver else "has no driver"
        raise DeviceNotReady(
            f"{bdf} {current}, not vfio-pci. Hand it to vfio-pci with: "
            + rebind_to_vfio(bdf, device, driver, root)
        )
    group, members = iommu_group_of(device)
    if group is None:
        raise DeviceNotReady(f"{bdf} has no IOMMU group: {ENABLE_IOMMU}")
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
