"""What sysfs says about a VFIO device: a PCI function or a mediated device, its driver, IOMMU group, nodes.

A PCI function is named by its address and served once bound to vfio-pci (or
a variant driver); a mediated device (mdev: a vGPU, the kernel's mtty sample)
is named by its UUID and lives below its parent under ``bus/mdev``, bound to
the parent's vendor driver, which registers it with VFIO in an IOMMU group
of its own. Everything an operator must fix before a device can be served is
found here and reported with the command that fixes it: a function bound to
another driver, an IOMMU group shared with devices that are not given to
VFIO, an mdev not created yet. ``root`` is the sysfs mount, so tests can
point it at a tree of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mediator.backends.advice import ENABLE_IOMMU, LOAD_MDEV, bind_mdev, rebind_to_vfio
from mediator.pci.address import AddressError, normalize_bdf

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


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

    @property
    def name(self) -> str:
        """What VFIO calls it (VFIO_GROUP_GET_DEVICE_FD) and errors name it by."""
        return self.bdf

    def describe(self) -> str:
        return f"{self.bdf} (driver {self.driver or 'none'}, IOMMU group {self.iommu_group})"


@dataclass(frozen=True)
class MediatedDevice:
    uuid: str
    parent: str  # the parent device: a PCI address, or a virtual device's name ("mtty")
    mdev_type: str  # the type's directory under the parent's mdev_supported_types, e.g. "mtty-2"
    type_name: str  # what the type's ``name`` file calls it, e.g. "Dual port serial"; may be empty
    device_api: str  # "vfio-pci" for the ones the daemon serves
    driver: str | None
    iommu_group: int | None
    group_members: Members
    vfio_cdev: str | None

    @property
    def name(self) -> str:
        return self.uuid

    def describe(self) -> str:
        return (
            f"{self.uuid} (mediated device of type {self.mdev_type} on {self.parent}, "
            f"driver {self.driver or 'none'}, IOMMU group {self.iommu_group})"
        )


@dataclass(frozen=True)
class MdevType:
    """A kind of mediated device a parent offers: ``create`` makes one."""

    parent: str
    name: str  # the directory's name, e.g. "mtty-2"
    description: str  # its ``name`` file, e.g. "Dual port mtty"
    available: int
    device_api: str
    path: Path


VfioTarget = PciFunction | MediatedDevice
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


def _vfio_cdev(device: Path) -> str | None:
    """The device's VFIO cdev (``vfio-dev/vfioN``), when the kernel offers one."""
    cdevs = (
        sorted(p.name for p in (device / "vfio-dev").glob("vfio*")) if (device / "vfio-dev").is_dir() else []
    )
    return cdevs[0] if cdevs else None


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def is_mdev_name(text: str) -> bool:
    """``text`` names a mediated device (a UUID) rather than a PCI function."""
    return bool(UUID.match(text.strip().lower()))


def find_target(name: str, root: Path = Path("/sys")) -> VfioTarget:
    """The PCI function or the mediated device ``name`` (an address or a UUID) names, ready for VFIO."""
    return find_mdev(name, root) if is_mdev_name(name) else find_function(name, root)


def mdev_types(root: Path = Path("/sys")) -> list[MdevType]:
    """Every mediated device type the host's parents offer."""
    found = []
    for kind in sorted((root / "class/mdev_bus").glob("*/mdev_supported_types/*")):
        available = _text(kind / "available_instances")
        found.append(
            MdevType(
                parent=kind.parents[1].name,
                name=kind.name,
                description=_text(kind / "name"),
                available=int(available) if available.isdigit() else 0,
                device_api=_text(kind / "device_api"),
                path=kind,
            )
        )
    return found


def _create_advice(uuid: str, root: Path) -> str:
    offered = [t for t in mdev_types(root) if t.device_api == "vfio-pci"]
    if not offered:
        return f"no device here offers vfio-pci mediated devices: {LOAD_MDEV}"
    free = [t for t in offered if t.available] or offered
    kinds = ", ".join(f"{t.parent}/{t.name} ({t.available} available)" for t in offered)
    return f"create it with: echo {uuid} > {free[0].path}/create (types offered here: {kinds})"


def missing_mdev(uuid: str, root: Path = Path("/sys")) -> tuple[str, str] | None:
    """Why there is no mediated device ``uuid`` and how to make it; None when it is there."""
    if not (root / "bus/mdev").is_dir():
        return "the kernel has no mdev bus", LOAD_MDEV
    device = root / "bus/mdev/devices" / uuid
    if not device.exists():
        return f"nothing at {device}", _create_advice(uuid, root)
    return None


def read_mdev(device: Path) -> MediatedDevice:
    """What sysfs says of the mediated device at ``device`` (``bus/mdev/devices/UUID``), unchecked."""
    kind = device / "mdev_type"
    group, members = iommu_group_of(device)
    return MediatedDevice(
        uuid=device.name,
        parent=device.resolve().parent.name,
        mdev_type=kind.resolve().name if kind.exists() else "unknown",
        type_name=_text(kind / "name"),
        device_api=_text(kind / "device_api"),
        driver=driver_of(device),
        iommu_group=group,
        group_members=members,
        vfio_cdev=_vfio_cdev(device),
    )


def list_mdevs(root: Path = Path("/sys")) -> list[MediatedDevice]:
    return [read_mdev(device) for device in sorted((root / "bus/mdev/devices").glob("*"))]


def find_mdev(text: str, root: Path = Path("/sys")) -> MediatedDevice:
    """The mediated device whose UUID is ``text``, ready for VFIO.

    Raises:
        DeviceNotReady: no mdev bus, no such device (the message says how to
            create one of the types offered), no driver, not a PCI mdev, no IOMMU group.
    """
    uuid = text.strip().lower()
    if not UUID.match(uuid):
        raise DeviceNotReady(f"{text!r} is not a mediated device's UUID")
    missing = missing_mdev(uuid, root)
    if missing is not None:
        why, fix = missing
        raise DeviceNotReady(f"no mediated device {uuid}: {why}; {fix}")
    mdev = read_mdev(root / "bus/mdev/devices" / uuid)
    if mdev.device_api and mdev.device_api != "vfio-pci":
        raise DeviceNotReady(
            f"{uuid} is a {mdev.device_api} mediated device (type {mdev.mdev_type}); "
            "the daemon serves PCI ones (device_api vfio-pci)"
        )
    if mdev.driver is None:
        raise DeviceNotReady(
            f"{uuid} (type {mdev.mdev_type} on {mdev.parent}) is bound to no driver: "
            f"its parent's vendor driver must bind it; {bind_mdev(uuid, root)}"
        )
    if mdev.iommu_group is None:
        raise DeviceNotReady(
            f"{uuid} has no IOMMU group: its driver ({mdev.driver}) did not register it with VFIO"
        )
    return mdev


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
    return PciFunction(bdf, driver, group, members, _vfio_cdev(device))


def group_blockers(members: Members) -> Members:
    """Group members that keep it from being viable: bound elsewhere (bridges may stay)."""
    return tuple(
        (bdf, driver)
        for bdf, driver in members
        if driver is not None and not is_vfio_driver(driver) and driver != "pcieport"
    )
