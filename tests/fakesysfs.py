"""Fake sysfs, /proc and /dev trees for the preflight tests, laid out like the kernel's.

A function lives under ``devices/pci0000:00/`` below its parent bridges, and
``bus/pci/devices/BDF`` is a relative symlink to it, so resolving it gives
the upstream path as on a real machine; ``driver`` and ``iommu_group`` are
symlinks to ``bus/pci/drivers/NAME`` and ``kernel/iommu_groups/N``, whose
``devices/`` links back. Config files hold whole config images (the shipped
profiles' dumps, or a root port built here).

A mediated device's parent is a function added before or a virtual device
under ``devices/virtual/NAME/NAME`` (mtty's place), listed as
``class/mdev_bus/NAME``; its types are ``mdev_supported_types/TYPE`` with
``name``, ``device_api``, ``available_instances``, ``create`` and
``devices/``. An mdev is the directory ``UUID`` below its parent, and
``bus/mdev/devices/UUID`` a relative symlink to it; its ``mdev_type``,
``driver`` (to ``bus/mdev/drivers/NAME``) and ``iommu_group`` are symlinks,
and each of the type's and the group's ``devices/`` links back.
"""

from __future__ import annotations

import os
from pathlib import Path

from mediator.pci import capabilities as caps
from mediator.pci.capabilities import CapKind
from mediator.pci.chain import walk
from mediator.pci.registers import u16

ACS_ALL = 0x5F  # SV TB RR CR UF EC DT implemented
ACS_ISOLATED = 0x1D  # SV RR CR UF enabled


def _link(link: Path, target: Path) -> None:
    link.symlink_to(os.path.relpath(target, link.parent))


class FakeSysfs:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "bus/pci/devices").mkdir(parents=True)
        (root / "devices/pci0000:00").mkdir(parents=True)

    def _bind(self, device: Path, bus: str, driver: str) -> None:
        bound = self.root / "bus" / bus / "drivers" / driver
        bound.mkdir(parents=True, exist_ok=True)
        _link(device / "driver", bound)

    def _join_group(self, device: Path, group: int) -> None:
        members = self.root / "kernel/iommu_groups" / str(group) / "devices"
        members.mkdir(parents=True, exist_ok=True)
        _link(device / "iommu_group", members.parent)
        _link(members / device.name, device)

    def add(
        self,
        bdf: str,
        config: bytes,
        *,
        parent: str | None = None,
        driver: str | None = None,
        group: int | None = None,
        reset_method: str | None = None,
        rom: bytes | None = None,
    ) -> Path:
        """A function below ``parent`` (a BDF added before) or on the root bus."""
        above = (
            (self.root / "bus/pci/devices" / parent).resolve() if parent else self.root / "devices/pci0000:00"
        )
        device = above / bdf
        device.mkdir()
        (device / "config").write_bytes(config)
        _link(self.root / "bus/pci/devices" / bdf, device)
        if driver:
            self._bind(device, "pci", driver)
        if group is not None:
            self._join_group(device, group)
        if reset_method is not None:
            (device / "reset_method").write_text(reset_method + "\n")
        if rom is not None:
            (device / "rom").write_bytes(rom)
        return device

    def add_mdev_type(
        self,
        parent: str,
        kind: str,
        description: str,
        *,
        available: int = 1,
        device_api: str = "vfio-pci",
    ) -> Path:
        """A type of mediated device ``parent`` offers, e.g. ("mtty", "mtty-2", "Dual port serial").

        ``parent`` is a function added before or else a virtual device, made here; the first type
        makes it a parent (``class/mdev_bus``) and brings up the mdev bus, as loading its vendor
        driver does.
        """
        listed = self.root / "class/mdev_bus" / parent
        if not listed.exists():
            function = self.root / "bus/pci/devices" / parent
            device = (
                function.resolve() if function.exists() else self.root / "devices/virtual" / parent / parent
            )
            device.mkdir(parents=True, exist_ok=True)
            listed.parent.mkdir(parents=True, exist_ok=True)
            _link(listed, device)
            (self.root / "bus/mdev/devices").mkdir(parents=True, exist_ok=True)
        offered = listed.resolve() / "mdev_supported_types" / kind
        (offered / "devices").mkdir(parents=True)
        (offered / "name").write_text(description + "\n")
        (offered / "device_api").write_text(device_api + "\n")
        (offered / "available_instances").write_text(f"{available}\n")
        (offered / "create").touch()
        return offered

    def add_mdev(
        self,
        uuid: str,
        parent: str,
        kind: str,
        *,
        driver: str | None = None,
        group: int | None = None,
        vfio_cdev: str | None = None,
    ) -> Path:
        """A mediated device of type ``kind`` (added before) on ``parent``, as ``create`` makes it."""
        offered = (self.root / "class/mdev_bus" / parent).resolve() / "mdev_supported_types" / kind
        device = offered.parents[1] / uuid
        device.mkdir()
        _link(self.root / "bus/mdev/devices" / uuid, device)
        _link(device / "mdev_type", offered)
        _link(offered / "devices" / uuid, device)
        if driver:
            self._bind(device, "mdev", driver)
        if group is not None:
            self._join_group(device, group)
        if vfio_cdev:
            (device / "vfio-dev" / vfio_cdev).mkdir(parents=True)
        return device


def fake_proc(root: Path, cap_eff: int) -> Path:
    """A /proc whose ``self/status`` has these effective capabilities."""
    (root / "self").mkdir(parents=True)
    (root / "self/status").write_text(f"Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff:016x}\n")
    return root


def fake_dev(root: Path, *nodes: str) -> Path:
    """A /dev holding these nodes (empty files), e.g. ``vfio/vfio``, ``iommu``."""
    for node in nodes:
        (root / node).parent.mkdir(parents=True, exist_ok=True)
        (root / node).touch()
    root.mkdir(parents=True, exist_ok=True)
    return root


def root_port(acs_control: int | None, acs_capability: int = ACS_ALL) -> bytes:
    """A PCIe root port (type-1 header, PCIe capability at 0x40), with an ACS capability at 0x100
    whose control register is ``acs_control``, or none."""
    image = bytearray(0x1000)
    image[0:4] = bytes.fromhex("8680b29b")  # 8086:9bb2
    image[0x06] = 0x10  # Status: capability list
    image[0x09:0x0C] = bytes([0x00, 0x04, 0x06])  # PCI-to-PCI bridge
    image[0x0E] = 0x01
    image[0x34] = 0x40
    image[0x40:0x44] = bytes([caps.EXP, 0x00, 0x42, 0x00])  # version 2, root port
    if acs_control is not None:
        image[0x100:0x104] = (caps.ACS | 1 << 16).to_bytes(4, "little")
        image[0x104:0x106] = acs_capability.to_bytes(2, "little")
        image[0x106:0x108] = acs_control.to_bytes(2, "little")
    return bytes(image)


def with_ats(image: bytes, enabled: bool) -> bytes:
    """``image`` with the Enable bit of its ATS control register set or cleared."""
    ats = walk(image).find(CapKind.EXT, caps.ATS)
    assert ats is not None
    changed = bytearray(image)
    control = u16(image, ats.offset + 6) & 0x7FFF | (0x8000 if enabled else 0)
    changed[ats.offset + 6 : ats.offset + 8] = control.to_bytes(2, "little")
    return bytes(changed)
