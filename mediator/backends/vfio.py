"""A real PCI function or mediated device through the kernel's VFIO, via the cffi shim (``cshim/``).

Opening. With a kernel that offers the VFIO device cdev and iommufd
(``/sys/bus/pci/devices/BDF/vfio-dev/vfioN`` and ``/dev/iommu``), the device
node is bound to an iommufd context with its own IO address space. Otherwise
the group/container API: ``/dev/vfio/vfio`` (type1v2 IOMMU), the group node
``/dev/vfio/N`` (which must be viable), and the device fd from the group.

Access. Config space and trapped BAR accesses are ``pread``/``pwrite`` on
the device fd at the kernel's region offsets (the kernel's own config
virtualization sits below ours). A client that may mmap BARs gets that same
device fd with the kernel's region offset and its sparse areas; with
``bar_access="trap"`` no fd leaves the daemon and every BAR access is a
message. Interrupt eventfds go straight to VFIO_DEVICE_SET_IRQS. DMA goes
through the IOMMU space the device is in (``backends.space``): its home, a
container or IOAS of its own with nothing mapped, or its VM's, whose
container or IOAS the first device to enter it creates.

A mediated device opens the same way, named by its UUID
(``/sys/bus/mdev/devices/UUID``): its vendor driver registers it with VFIO
in an IOMMU group (and cdev) of its own.

Migration. For a driver with the kernel's uAPI (VFIO_DEVICE_FEATURE
MIGRATION), each state change is one MIG_DEVICE_STATE SET: the kernel walks
its arcs and refuses with its own errno. The data fd a SET returns is the
copy's, read and written as the client asks, and closed when the device
leaves the copy's states or is reset.

Errors are ``VfioError``: the operation, the device, the errno, and what to
change (permissions, RLIMIT_MEMLOCK, a device busy elsewhere, a kernel
without the ioctl).
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mediator._vfio_shim import ffi, lib
from mediator.backends import advice
from mediator.backends.base import BackendError, BarAccess, DirectAccess, IrqInfo, RegionInfo
from mediator.backends.dma import DmaMapping
from mediator.backends.migration import STREAMS, MigrationError, MigState
from mediator.backends.pinning import memlock_refusal
from mediator.backends.space import IommuSpace
from mediator.backends.sysfs import DeviceNotReady, VfioTarget, find_target, group_blockers
from mediator.pci.address import format_bdf
from mediator.pci.registers import CONFIG_SPACE_SIZE
from mediator.vfio_abi import (
    CONFIG_REGION,
    DMA_WRITE,
    IRQ_INFO_NORESIZE,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_TYPE,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    VGA_REGION,
)

DEV_VFIO = Path("/dev/vfio")
DEV_IOMMU = Path("/dev/iommu")


class VfioError(BackendError):
    def __init__(self, device: str, operation: str, errno_value: int, advice: str = "") -> None:
        name = errno.errorcode.get(errno_value, str(errno_value))
        text = f"{device}: {operation} failed: {os.strerror(errno_value)} ({name})"
        super().__init__(f"{text}. {advice}" if advice else text)
        self.device = device
        self.operation = operation
        self.errno = errno_value


def _udev_match(path: Path) -> str:
    """The udev match for a VFIO node: the group nodes, the device cdevs and /dev/iommu differ."""
    if path.name == "iommu":
        return 'SUBSYSTEM=="misc", KERNEL=="iommu"'
    if path.parent.name == "devices":
        return 'SUBSYSTEM=="vfio-dev"'
    return 'SUBSYSTEM=="vfio"'


@dataclass(frozen=True)
class KernelRegion:
    index: int
    size: int
    offset: int  # the region's offset in the device fd
    flags: int
    mappable: tuple[tuple[int, int], ...]


def _open_node(who: str, path: Path, purpose: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VfioError(
            who, f"opening {path} ({purpose})", errno.ENOENT, "Is the vfio-pci module loaded?"
        ) from None
    except PermissionError:
        raise VfioError(
            who,
            f"opening {path} ({purpose})",
            errno.EACCES,
            f"Let the daemon's user open {path}: run it as root, or add a udev rule such as "
            f'{_udev_match(path)}, GROUP="kvm", MODE="0660" and run it in that group',
        ) from None
    except OSError as e:
        raise VfioError(
            who, f"opening {path} ({purpose})", e.errno or errno.EIO, advice.for_errno(e.errno or 0, "")
        ) from None


def _checked(who: str, result: int, operation: str, fix: str | None = None) -> int:
    """A shim call's result (-errno on failure) as a value, or the ``VfioError`` it stands for."""
    if result < 0:
        raise VfioError(who, operation, -result, advice.for_errno(-result, operation) if fix is None else fix)
    return result


def _ioctl(who: str, fd: int, request: int, arg: Any, operation: str) -> int:
    return _checked(who, int(lib.shim_ioctl(fd, request, arg)), operation)


def _ioctl_value(who: str, fd: int, request: int, value: int, operation: str) -> int:
    return _checked(who, int(lib.shim_ioctl_value(fd, request, value)), operation)


def _pin(who: str, fd: int, request_code: int, request: Any, operation: str, *, size: int) -> None:
    result = int(lib.shim_ioctl(fd, request_code, request))
    _checked(who, result, operation, advice.memlock(size) if result == -errno.ENOMEM else None)


def _vaddr(mapping: DmaMapping, offset: int) -> int:
    assert mapping.memory is not None
    return int(ffi.cast("uintptr_t", ffi.from_buffer(mapping.memory))) + offset


class Type1Container:
    """A type1v2 container: one IOMMU context for every group set into it (a space's ``Iommu``).

    The kernel drops a container's IOMMU when its last group leaves, so the
    first group of each generation sets it again.
    """

    def __init__(self, who: str, dev: Path = DEV_VFIO) -> None:
        self.who = who
        self.fd = _open_node(who, dev / "vfio", "the VFIO container")
        self.groups = 0
        try:
            version = _ioctl_value(who, self.fd, lib.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
            if version != lib.VFIO_API_VERSION:
                raise VfioError(
                    who, "VFIO_GET_API_VERSION", errno.EPROTO, f"unknown VFIO API version {version}"
                )
            if not _ioctl_value(
                who, self.fd, lib.VFIO_CHECK_EXTENSION, lib.VFIO_TYPE1v2_IOMMU, "VFIO_CHECK_EXTENSION"
            ):
                raise VfioError(
                    who,
                    "VFIO_CHECK_EXTENSION(TYPE1v2)",
                    errno.ENOTSUP,
                    "the kernel lacks the type1v2 IOMMU backend",
                )
        except BaseException:
            os.close(self.fd)
            raise

    def add(self, group: int) -> None:
        _ioctl(
            self.who,
            group,
            lib.VFIO_GROUP_SET_CONTAINER,
            ffi.new("int *", self.fd),
            "VFIO_GROUP_SET_CONTAINER",
        )
        if not self.groups:
            try:
                _ioctl_value(
                    self.who, self.fd, lib.VFIO_SET_IOMMU, lib.VFIO_TYPE1v2_IOMMU, "VFIO_SET_IOMMU(TYPE1v2)"
                )
            except BaseException:
                lib.shim_ioctl_value(group, lib.VFIO_GROUP_UNSET_CONTAINER, 0)
                raise
        self.groups += 1

    def remove(self, group: int) -> None:
        """Take a group out; the kernel refuses (EBUSY) while any fd of one of its devices is open."""
        _ioctl_value(self.who, group, lib.VFIO_GROUP_UNSET_CONTAINER, 0, "VFIO_GROUP_UNSET_CONTAINER")
        self.groups -= 1

    def map(self, mapping: DmaMapping, offset: int, size: int) -> None:
        flags = lib.VFIO_DMA_MAP_FLAG_READ | (lib.VFIO_DMA_MAP_FLAG_WRITE if mapping.flags & DMA_WRITE else 0)
        request = ffi.new(
            "struct vfio_iommu_type1_dma_map *",
            {
                "argsz": ffi.sizeof("struct vfio_iommu_type1_dma_map"),
                "flags": flags,
                "vaddr": _vaddr(mapping, offset),
                "iova": mapping.iova + offset,
                "size": size,
            },
        )
        _pin(self.who, self.fd, lib.VFIO_IOMMU_MAP_DMA, request, "VFIO_IOMMU_MAP_DMA", size=mapping.size)

    def refusal(self, size: int) -> str | None:
        return memlock_refusal(size)

    def unmap(self, iova: int, size: int) -> None:
        request = ffi.new(
            "struct vfio_iommu_type1_dma_unmap *",
            {
                "argsz": ffi.sizeof("struct vfio_iommu_type1_dma_unmap"),
                "iova": iova,
                "size": size,
            },
        )
        _ioctl(self.who, self.fd, lib.VFIO_IOMMU_UNMAP_DMA, request, "VFIO_IOMMU_UNMAP_DMA")

    def close(self) -> None:
        os.close(self.fd)


class Ioas:
    """An iommufd IO address space (a space's ``Iommu``), in the daemon's one iommufd context.

    A device binds to one iommufd for the life of its fd and can only move
    between the IOAS objects of that context, so the process keeps a single
    context, opened by the first device that needs it and never closed.
    """

    _context: int | None = None

    def __init__(self, who: str) -> None:
        self.who = who
        self.fd = Ioas.context(who)
        alloc = ffi.new("struct iommu_ioas_alloc *", {"size": ffi.sizeof("struct iommu_ioas_alloc")})
        _ioctl(who, self.fd, lib.IOMMU_IOAS_ALLOC, alloc, "IOMMU_IOAS_ALLOC")
        self.id = int(alloc.out_ioas_id)

    @classmethod
    def context(cls, who: str) -> int:
        if cls._context is None:
            cls._context = _open_node(who, DEV_IOMMU, "iommufd")
        return cls._context

    def map(self, mapping: DmaMapping, offset: int, size: int) -> None:
        flags = lib.IOMMU_IOAS_MAP_FIXED_IOVA | lib.IOMMU_IOAS_MAP_READABLE
        flags |= lib.IOMMU_IOAS_MAP_WRITEABLE if mapping.flags & DMA_WRITE else 0
        request = ffi.new(
            "struct iommu_ioas_map *",
            {
                "size": ffi.sizeof("struct iommu_ioas_map"),
                "flags": flags,
                "ioas_id": self.id,
                "user_va": _vaddr(mapping, offset),
                "length": size,
                "iova": mapping.iova + offset,
            },
        )
        _pin(self.who, self.fd, lib.IOMMU_IOAS_MAP, request, "IOMMU_IOAS_MAP", size=mapping.size)

    def refusal(self, size: int) -> str | None:
        return memlock_refusal(size)

    def unmap(self, iova: int, size: int) -> None:
        request = ffi.new(
            "struct iommu_ioas_unmap *",
            {
                "size": ffi.sizeof("struct iommu_ioas_unmap"),
                "ioas_id": self.id,
                "iova": iova,
                "length": size,
            },
        )
        _ioctl(self.who, self.fd, lib.IOMMU_IOAS_UNMAP, request, "IOMMU_IOAS_UNMAP")

    def close(self) -> None:
        destroy = ffi.new(
            "struct iommu_destroy *", {"size": ffi.sizeof("struct iommu_destroy"), "id": self.id}
        )
        _ioctl(self.who, self.fd, lib.IOMMU_DESTROY, destroy, "IOMMU_DESTROY")


_MIXED_APIS = "the VM's devices must all use the same VFIO API (all iommufd, or all type1 groups)"
_HELD_ELSEWHERE = (
    'another process still holds the device fd: a previous client (bar_access = "mmap" gives '
    "the client the device fd), or a process it passed the fd to; stop it, then run "
    "`vfio-mediator release` for the device"
)


class VfioGroup:
    """An IOMMU group node, opened once and shared by the functions of it the daemon serves.

    A group node opens once per process, and its functions share one IOMMU
    context at all times, so the group, not the function, is what moves
    between spaces: it goes into a VM's container with the first of its
    functions admitted to that VM and home with the last to leave, and a
    function may only join the VM its group is already in. The move closes
    the fd of every function of the group (the kernel lets a group leave its
    container only then) and opens them again.
    """

    _opened: ClassVar[dict[tuple[Path, int], VfioGroup]] = {}

    def __init__(self, function: VfioTarget, dev: Path) -> None:
        assert function.iommu_group is not None
        self.number = function.iommu_group
        self.key = (dev, self.number)
        self.who = f"IOMMU group {self.number}"
        self.home = Type1Container(f"{self.who}'s home", dev)
        try:
            self.fd = _open_node(function.name, dev / str(self.number), self.who)
        except BaseException:
            self.home.close()
            raise
        self.iommu: Type1Container = self.home
        self.devices: list[VfioDevice] = []
        self.held: dict[str, Type1Container] = {}  # function -> the VM container it has joined
        try:
            self._check_viable(function)
            self.home.add(self.fd)
        except BaseException:
            os.close(self.fd)
            self.home.close()
            raise

    @classmethod
    def of(cls, function: VfioTarget, dev: Path) -> VfioGroup:
        key = (dev, function.iommu_group or 0)
        group = cls._opened.get(key)
        if group is None:
            group = cls._opened[key] = cls(function, dev)
        return group

    def _check_viable(self, function: VfioTarget) -> None:
        status = ffi.new("struct vfio_group_status *", {"argsz": ffi.sizeof("struct vfio_group_status")})
        _ioctl(function.name, self.fd, lib.VFIO_GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS")
        if not status.flags & lib.VFIO_GROUP_FLAGS_VIABLE:
            blockers = (
                ", ".join(
                    f"{bdf} (bound to {driver})" for bdf, driver in group_blockers(function.group_members)
                )
                or "a device"
            )
            raise VfioError(
                function.name,
                f"using {self.who}",
                errno.EINVAL,
                f"The group is not viable: {blockers} shares it; {advice.SHARE_THE_GROUP}",
            )

    def device_fd(self, name: str) -> int:
        wanted = ffi.new("char[]", name.encode())
        return _ioctl(name, self.fd, lib.VFIO_GROUP_GET_DEVICE_FD, wanted, "VFIO_GROUP_GET_DEVICE_FD")

    def attach(self, device: VfioDevice) -> int:
        fd = self.device_fd(device.name)
        self.devices.append(device)
        return fd

    def detach(self, device: VfioDevice) -> None:
        """The device's fd is closed; the last one out closes the group and its home."""
        self.devices = [d for d in self.devices if d is not device]
        self.held.pop(device.name, None)
        if self.devices:
            return
        VfioGroup._opened.pop(self.key, None)
        os.close(self.fd)  # the group leaves whatever container it is in
        self.home.close()

    def move(self, device: VfioDevice, container: Type1Container) -> bool:
        """``device`` joins ``container`` (a VM's) or goes home.

        True when the group moved, which resets its functions.
        """
        if container is self.home:
            self.held.pop(device.name, None)
            if self.held:  # another function of the group is still in the VM: the group stays
                return False
        else:
            holders = [bdf for bdf, c in self.held.items() if c is not container]
            if holders:
                raise VfioError(
                    device.name,
                    "joining a VM's IOMMU space",
                    errno.EBUSY,
                    f"{self.who} is in another VM's IOMMU space, where {', '.join(holders)} is served: "
                    "the functions of a group go to one VM together",
                )
            self.held[device.name] = container
        if container is self.iommu:
            return False
        try:
            self._move(container)
        except BaseException:
            if container is not self.home:
                self.held.pop(device.name, None)
            raise
        return True

    def _move(self, container: Type1Container) -> None:
        for member in self.devices:
            os.close(member.fd)
            member.fd = -1
        try:
            self.iommu.remove(self.fd)
        except VfioError as e:
            self._reopen()
            if e.errno != errno.EBUSY:
                raise
            raise VfioError(self.who, "moving to another IOMMU space", errno.EBUSY, _HELD_ELSEWHERE) from None
        try:
            container.add(self.fd)
        except BaseException:
            self.iommu.add(self.fd)
            self._reopen()
            raise
        self.iommu = container
        self._reopen()

    def _reopen(self) -> None:
        for member in self.devices:
            member.fd = self.device_fd(member.name)


class VfioDevice:
    """An open VFIO device fd and the IOMMU context it is in (its home's, or a VM's).

    Moving a device between contexts: iommufd re-attaches it (the kernel
    replaces the IOAS while the fd stays open); with type1 the group moves
    (``VfioGroup``), closing and reopening the fds of its functions, which
    vfio-pci takes as a close and an open of each (it resets them).
    """

    def __init__(self, function: VfioTarget, *, prefer_cdev: bool = True, dev: Path = DEV_VFIO) -> None:
        self.function = function
        self.name = function.name
        self._dev = dev
        self.fd = -1
        self.group: VfioGroup | None = None
        self.home: Type1Container | Ioas | None = None
        self._ioas: Ioas | None = None
        try:
            if prefer_cdev and function.vfio_cdev and DEV_IOMMU.exists():
                self.fd = self._open_cdev(dev / "devices" / function.vfio_cdev)
                self.api = "iommufd"
            else:
                self.fd = self._open_group(dev)
                self.api = "group"
            self.info = self._device_info()
        except BaseException:
            self.close()
            raise

    # opening
    def _open_group(self, dev: Path) -> int:
        self.group = VfioGroup.of(self.function, dev)
        self.home = self.group.home
        return self.group.attach(self)

    @property
    def iommu(self) -> Type1Container | Ioas | None:
        """The IOMMU context the device is in now: its group's (type1), or its IOAS."""
        return self.group.iommu if self.group is not None else self._ioas

    def _open_cdev(self, path: Path) -> int:
        self.fd = _open_node(self.name, path, "the VFIO device cdev")
        bind = ffi.new(
            "struct vfio_device_bind_iommufd *",
            {"argsz": ffi.sizeof("struct vfio_device_bind_iommufd"), "iommufd": Ioas.context(self.name)},
        )
        try:
            _ioctl(self.name, self.fd, lib.VFIO_DEVICE_BIND_IOMMUFD, bind, "VFIO_DEVICE_BIND_IOMMUFD")
        except VfioError as e:
            if e.errno != errno.EINVAL:
                raise
            # A cdev opens any number of times but binds once: while another fd (another
            # daemon, a VMM) has the device, the kernel answers EINVAL where the group gives EBUSY.
            raise VfioError(
                self.name,
                "VFIO_DEVICE_BIND_IOMMUFD",
                errno.EBUSY,
                advice.for_errno(errno.EBUSY, "")
                + " (the kernel answers EINVAL: the device is already bound)",
            ) from None
        self.home = Ioas(self.name)
        self._attach(self.home)
        return self.fd

    def _attach(self, ioas: Ioas) -> None:
        attach = ffi.new(
            "struct vfio_device_attach_iommufd_pt *",
            {"argsz": ffi.sizeof("struct vfio_device_attach_iommufd_pt"), "pt_id": ioas.id},
        )
        _ioctl(self.name, self.fd, lib.VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach, "VFIO_DEVICE_ATTACH_IOMMUFD_PT")
        self._ioas = ioas

    def new_iommu(self, who: str) -> Type1Container | Ioas:
        """An empty IOMMU context of this device's kind, for a space that has none yet."""
        return Ioas(who) if isinstance(self.home, Ioas) else Type1Container(who, self._dev)

    def move_to(self, iommu: object) -> bool:
        """Put the device into ``iommu``'s context; True when that reopened (and so reset) the device."""
        if self.group is None:
            if not isinstance(iommu, Ioas):
                raise VfioError(self.name, "joining the VM's IOMMU space", errno.EINVAL, _MIXED_APIS)
            if iommu is not self._ioas:
                self._attach(iommu)
            return False
        if not isinstance(iommu, Type1Container):
            raise VfioError(self.name, "joining the VM's IOMMU space", errno.EINVAL, _MIXED_APIS)
        # Always through the group, even when it is there already: it must know who holds it there.
        return self.group.move(self, iommu)

    # queries
    def _device_info(self) -> Any:
        info = ffi.new("struct vfio_device_info *", {"argsz": ffi.sizeof("struct vfio_device_info")})
        _ioctl(self.name, self.fd, lib.VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO")
        if not info.flags & lib.VFIO_DEVICE_FLAGS_PCI:
            raise VfioError(self.name, "VFIO_DEVICE_GET_INFO", errno.ENODEV, "not a PCI device")
        return info

    def region(self, index: int) -> KernelRegion:
        """GET_REGION_INFO with its capability chain (sparse mmap, MSI-X mappable)."""
        argsz = ffi.sizeof("struct vfio_region_info")
        while True:
            buffer = ffi.new("char[]", argsz)
            info = ffi.cast("struct vfio_region_info *", buffer)
            info.argsz, info.index = argsz, index
            _ioctl(
                self.name,
                self.fd,
                lib.VFIO_DEVICE_GET_REGION_INFO,
                info,
                f"VFIO_DEVICE_GET_REGION_INFO({index})",
            )
            if info.argsz <= argsz:
                break
            argsz = info.argsz
        mappable: tuple[tuple[int, int], ...] = ()
        if info.flags & lib.VFIO_REGION_INFO_FLAG_MMAP:
            mappable = ((0, int(info.size)),)
        if info.flags & lib.VFIO_REGION_INFO_FLAG_CAPS:
            offset, seen = int(info.cap_offset), set()
            while offset and offset not in seen and offset + 8 <= argsz:
                seen.add(offset)
                header = ffi.cast("struct vfio_info_cap_header *", buffer + offset)
                if (
                    header.id == lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP
                    and info.flags & lib.VFIO_REGION_INFO_FLAG_MMAP
                ):
                    sparse = ffi.cast("struct vfio_region_info_cap_sparse_mmap *", buffer + offset)
                    mappable = tuple(
                        (int(sparse.areas[i].offset), int(sparse.areas[i].size))
                        for i in range(min(sparse.nr_areas, (argsz - offset) // 16))
                        if sparse.areas[i].size
                    )
                offset = int(header.next)
        return KernelRegion(index, int(info.size), int(info.offset), int(info.flags), mappable)

    def irq_info(self, index: int) -> IrqInfo:
        info = ffi.new(
            "struct vfio_irq_info *", {"argsz": ffi.sizeof("struct vfio_irq_info"), "index": index}
        )
        _ioctl(self.name, self.fd, lib.VFIO_DEVICE_GET_IRQ_INFO, info, f"VFIO_DEVICE_GET_IRQ_INFO({index})")
        return IrqInfo(int(info.count), int(info.flags))

    def set_irqs(self, index: int, flags: int, start: int, count: int, data: Sequence[int]) -> None:
        item = 4 if flags & IRQ_SET_DATA_EVENTFD else 1 if flags & IRQ_SET_DATA_BOOL else 0
        size = ffi.sizeof("struct vfio_irq_set") + item * count
        buffer = ffi.new("char[]", size)
        request = ffi.cast("struct vfio_irq_set *", buffer)
        request.argsz, request.flags, request.index, request.start, request.count = (
            size,
            flags,
            index,
            start,
            count,
        )
        payload = buffer + ffi.sizeof("struct vfio_irq_set")
        if item == 4:
            ffi.cast("int32_t *", payload)[0:count] = list(data)
        elif item == 1:
            ffi.cast("uint8_t *", payload)[0:count] = [1 if b else 0 for b in data]
        _ioctl(self.name, self.fd, lib.VFIO_DEVICE_SET_IRQS, request, f"VFIO_DEVICE_SET_IRQS(index {index})")

    def reset(self) -> None:
        if not self.info.flags & lib.VFIO_DEVICE_FLAGS_RESET:
            raise VfioError(self.name, "VFIO_DEVICE_RESET", errno.ENOTTY, "the device has no reset method")
        _ioctl_value(self.name, self.fd, lib.VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET")

    def bus_reset(self) -> None:
        """A secondary bus (or slot) reset, VFIO_DEVICE_PCI_HOT_RESET.

        Every function the reset reaches must be ours: through the group fd
        we hold (legacy) or, for a cdev, bound to our iommufd (count 0).
        """
        group_fds = [self.group.fd] if self.group is not None else []
        size = ffi.sizeof("struct vfio_pci_hot_reset") + 4 * len(group_fds)
        buffer = ffi.new("char[]", size)
        request = ffi.cast("struct vfio_pci_hot_reset *", buffer)
        request.argsz, request.count = size, len(group_fds)
        for i, fd in enumerate(group_fds):
            request.group_fds[i] = fd
        _ioctl(self.name, self.fd, lib.VFIO_DEVICE_PCI_HOT_RESET, request, "VFIO_DEVICE_PCI_HOT_RESET")

    def hot_reset_devices(self) -> list[str]:
        """Functions a bus/slot reset of this device would reset too (GET_PCI_HOT_RESET_INFO)."""
        size = ffi.sizeof("struct vfio_pci_hot_reset_info")
        count = 0
        while True:
            buffer = ffi.new("char[]", size + count * ffi.sizeof("struct vfio_pci_dependent_device"))
            info = ffi.cast("struct vfio_pci_hot_reset_info *", buffer)
            info.argsz = size + count * ffi.sizeof("struct vfio_pci_dependent_device")
            result = int(lib.shim_ioctl(self.fd, lib.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, info))
            if result == -errno.ENOSPC and info.count > count:
                count = info.count
                continue
            _checked(
                self.name,
                result,
                "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO",
                advice.for_errno(-result, "hot reset"),
            )
            devices = ffi.cast("struct vfio_pci_dependent_device *", buffer + size)
            return [
                format_bdf(devices[i].segment, devices[i].bus, devices[i].devfn) for i in range(info.count)
            ]

    # migration (VFIO_DEVICE_FEATURE)
    def _feature(self, feature: int, flags: int, payload: str, operation: str, **fields: int) -> Any:
        """VFIO_DEVICE_FEATURE ``feature`` with its ``payload`` struct (``fields`` set); the payload after."""
        size = ffi.sizeof("struct vfio_device_feature") + ffi.sizeof(payload)
        buffer = ffi.new("char[]", size)
        header = ffi.cast("struct vfio_device_feature *", buffer)
        header.argsz, header.flags = size, flags | feature
        data = ffi.cast(f"{payload} *", buffer + ffi.sizeof("struct vfio_device_feature"))
        for name, value in fields.items():
            setattr(data, name, value)
        _ioctl(self.name, self.fd, lib.VFIO_DEVICE_FEATURE, header, operation)
        return data

    def migration_flags(self) -> int:
        """VFIO_MIGRATION_* the kernel driver offers; 0 when it has no migration (ENOTTY)."""
        try:
            data = self._feature(
                lib.VFIO_DEVICE_FEATURE_MIGRATION,
                lib.VFIO_DEVICE_FEATURE_GET,
                "struct vfio_device_feature_migration",
                "VFIO_DEVICE_FEATURE(GET MIGRATION)",
            )
        except VfioError:
            return 0
        return int(data.flags)

    def migration_state(self) -> MigState:
        data = self._feature(
            lib.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            lib.VFIO_DEVICE_FEATURE_GET,
            "struct vfio_device_feature_mig_state",
            "VFIO_DEVICE_FEATURE(GET MIG_DEVICE_STATE)",
        )
        return MigState(int(data.device_state))

    def set_migration_state(self, target: MigState) -> int:
        """Move to ``target`` (the kernel walks the arcs); the data fd the move opened, or -1."""
        data = self._feature(
            lib.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            lib.VFIO_DEVICE_FEATURE_SET,
            "struct vfio_device_feature_mig_state",
            f"VFIO_DEVICE_FEATURE(SET MIG_DEVICE_STATE {target.name})",
            device_state=int(target),
            data_fd=-1,
        )
        return int(data.data_fd)

    def close(self) -> None:
        """The device fd, then its group's share (the last function closes the group) or its IOAS."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.group is not None:
            self.group.detach(self)
        elif self.home is not None:
            self.home.close()
        self.group = self.home = None


def grow_noresize(
    vectors: list[int], start: int, data: list[int]
) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """The eventfds of a NORESIZE index after an update, and the SET_IRQS calls that get there.

    Each call is (start, eventfds), or (0, []) to disable the index. An update
    inside what the kernel has is one call for that block; one that reaches
    past it disables the index and enables it with every vector in one call.
    """
    wanted = vectors + [-1] * max(0, start + len(data) - len(vectors))
    wanted[start : start + len(data)] = data
    if start + len(data) <= len(vectors):
        return wanted, [(start, data)]
    return wanted, [*([(0, [])] if vectors else []), (0, wanted)]


class VfioBackend:
    """The ``Backend`` of a real function or mdev: the kernel's VFIO driver below the quirk table."""

    def __init__(
        self,
        name: str,
        *,
        bar_access: BarAccess = "mmap",
        prefer_cdev: bool = True,
        sysfs: Path = Path("/sys"),
        dev: Path = DEV_VFIO,
    ) -> None:
        self._sysfs, self._prefer_cdev, self._dev = sysfs, prefer_cdev, dev
        self._data_fd = -1  # the kernel's file of the current copy (saving or resuming)
        self._opened(find_target(name, sysfs))
        self.bar_access = bar_access
        self.description = f"{self.function.name} through VFIO ({self.device.api})"
        # A config space has at least its 256-byte header; mtty's region says 255 (the sample's
        # off-by-one): the rest reads as zeros, as registers a device does not implement do.
        self.config_size = max(self._regions[CONFIG_REGION].size, CONFIG_SPACE_SIZE)
        self.can_reset = bool(self.device.info.flags & lib.VFIO_DEVICE_FLAGS_RESET)
        assert self.device.home is not None
        self.home = IommuSpace(f"{self.function.name}'s home", self.device.home)
        # type1 maps the daemon's mmap of a peer's BAR (a PFN mapping); iommufd needs dma-buf for it.
        self.peer_dma = (
            None
            if self.device.api == "group"
            else "iommufd cannot map another device's memory without dma-buf support, which the daemon lacks"
        )

    def _opened(self, target: VfioTarget) -> None:
        """Open ``target`` and learn what the kernel offers of it."""
        self.device = VfioDevice(target, prefer_cdev=self._prefer_cdev, dev=self._dev)
        self.function = self.device.function
        # BARs, ROM and config; the VGA region (8) exists only on VGA devices and is never served.
        self._regions = {index: self.device.region(index) for index in range(VGA_REGION)}
        self._noresize: dict[int, list[int]] = {}  # index -> eventfds the kernel has, for NORESIZE indexes
        self._migration_flags = self.device.migration_flags()
        self.migration_state = self.device.migration_state() if self._migration_flags else MigState.RUNNING

    # config and regions
    def _pread(self, index: int, offset: int, length: int) -> bytes:
        region = self._regions[index]
        if offset < 0 or length <= 0 or offset + length > region.size:
            raise BackendError(f"region {index} access {offset:#x}+{length} outside its {region.size} bytes")
        try:
            data = os.pread(self.device.fd, length, region.offset + offset)
        except OSError as e:
            raise VfioError(
                self.function.name, f"reading region {index} at {offset:#x}", e.errno or errno.EIO
            ) from None
        if len(data) != length:
            raise VfioError(
                self.function.name, f"reading region {index} at {offset:#x}", errno.EIO, "short read"
            )
        return data

    def _pwrite(self, index: int, offset: int, data: bytes) -> None:
        region = self._regions[index]
        if offset < 0 or not data or offset + len(data) > region.size:
            raise BackendError(
                f"region {index} access {offset:#x}+{len(data)} outside its {region.size} bytes"
            )
        try:
            written = os.pwrite(self.device.fd, data, region.offset + offset)
        except OSError as e:
            raise VfioError(
                self.function.name, f"writing region {index} at {offset:#x}", e.errno or errno.EIO
            ) from None
        if written != len(data):
            raise VfioError(
                self.function.name, f"writing region {index} at {offset:#x}", errno.EIO, "short write"
            )

    def _config_inside(self, offset: int, length: int) -> int:
        """How much of a config access lies in the kernel's region (which may be short of 256 bytes)."""
        if offset < 0 or length <= 0 or offset + length > self.config_size:
            raise BackendError(f"config access {offset:#x}+{length} outside its {self.config_size} bytes")
        return max(0, min(length, self._regions[CONFIG_REGION].size - offset))

    def read_config(self, offset: int, length: int) -> bytes:
        """The kernel's bytes; zeros past a short region, as an absent register reads."""
        inside = self._config_inside(offset, length)
        return (self._pread(CONFIG_REGION, offset, inside) if inside else b"") + bytes(length - inside)

    def write_config(self, offset: int, data: bytes) -> None:
        inside = self._config_inside(offset, len(data))
        if inside:
            self._pwrite(CONFIG_REGION, offset, data[:inside])

    def region_info(self, index: int) -> RegionInfo:
        region = self._regions.get(index)
        if region is None:
            return RegionInfo(0)
        return RegionInfo(region.size, region.mappable if self.bar_access == "mmap" else ())

    def region_fd(self, index: int) -> tuple[int, int] | None:
        region = self._regions.get(index)
        if self.bar_access != "mmap" or region is None or not region.mappable:
            return None
        return self.device.fd, region.offset

    def read_region(self, index: int, offset: int, length: int) -> bytes:
        return self._pread(index, offset, length)

    def direct_access(self, index: int) -> DirectAccess | None:
        """The device fd at the kernel's region offset: the kernel's own config virtualization stays below."""
        region = self._regions.get(index)
        if region is None or not region.size:
            return None
        short = (
            ((region.size, self.config_size),)
            if index == CONFIG_REGION and region.size < self.config_size
            else ()
        )
        return DirectAccess(fd=self.device.fd, file_offset=region.offset, special=short)

    def bar_memory(self, index: int, offset: int, size: int) -> mmap.mmap:
        """Through the device fd, as a client maps it; the fd stays open while the mapping lives."""
        return mmap.mmap(self.device.fd, size, mmap.MAP_SHARED, offset=self._regions[index].offset + offset)

    def write_region(self, index: int, offset: int, data: bytes) -> None:
        self._pwrite(index, offset, data)

    # interrupts
    def irq_info(self, index: int) -> IrqInfo:
        return self.device.irq_info(index)

    def set_irqs(self, index: int, flags: int, start: int, count: int, data: Sequence[int]) -> None:
        """As the client asks, except that a NORESIZE index grows in one call with every vector.

        The kernel cannot add vectors to an enabled NORESIZE index piecemeal; a
        client sending eventfds in chunks (QEMU sends at most max_msg_fds per
        message) would fail. The daemon keeps the index's eventfds and, when an
        update reaches past what the kernel has, disables and re-enables the
        index with all of them in one call.
        """
        info = self.device.irq_info(index)
        action = flags & IRQ_SET_ACTION_TYPE
        if not info.flags & IRQ_INFO_NORESIZE or action != IRQ_SET_ACTION_TRIGGER:
            self.device.set_irqs(index, flags, start, count, data)
            return
        if flags & IRQ_SET_DATA_NONE and count == 0:
            self.device.set_irqs(index, flags, 0, 0, ())
            self._noresize.pop(index, None)
            return
        if not flags & IRQ_SET_DATA_EVENTFD:
            self.device.set_irqs(index, flags, start, count, data)
            return
        vectors, calls = grow_noresize(self._noresize.get(index, []), start, list(data))
        for call_start, values in calls:
            if values:
                self.device.set_irqs(index, flags, call_start, len(values), values)
            else:
                self.device.set_irqs(index, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, ())
        self._noresize[index] = vectors

    # DMA
    def enter(self, space: IommuSpace) -> bool:
        if space.iommu is None:
            if len(space):
                raise VfioError(self.function.name, f"joining {space.name}", errno.EINVAL, _MIXED_APIS)
            space.iommu = self.device.new_iommu(space.name)
        return self.device.move_to(space.iommu)

    def reset(self) -> None:
        """VFIO_DEVICE_RESET, which also ends a migration: the kernel's device is RUNNING again."""
        self.device.reset()
        self._close_data()
        if self._migration_flags:
            self.migration_state = self.device.migration_state()

    @property
    def iommu_group(self) -> int | None:
        group = self.device.group
        return group.number if group is not None and len(group.devices) > 1 else None

    def bus_reset_obstacle(self) -> str | None:
        try:
            reached = self.bus_reset_reaches()
        except VfioError as e:
            return f"the kernel offers no bus or slot reset ({errno.errorcode.get(e.errno, e.errno)})"
        group = self.device.group
        idle_mates = {d.name for d in group.devices} - set(group.held) if group is not None else set()
        others = [bdf for bdf in reached if bdf not in idle_mates]
        if others:
            return "a bus reset would also reset " + ", ".join(others)
        return None

    def bus_reset_reaches(self) -> tuple[str, ...]:
        return tuple(bdf for bdf in self.device.hot_reset_devices() if bdf != self.function.name)

    def bus_reset(self) -> None:
        self.device.bus_reset()

    # migration: the kernel's uAPI. The kernel walks the arcs and refuses what its driver cannot do,
    # with its own errno; the data fd of a copy is read and written as the client asks.
    def migration_flags(self) -> int:
        return self._migration_flags

    def _refused(self, e: VfioError) -> MigrationError:
        """The kernel's failure, as the client is told it, once the state it left is known again."""
        try:
            self.migration_state = self.device.migration_state()
        except (VfioError, ValueError):
            self.migration_state = MigState.ERROR
        return MigrationError(e.errno, str(e))

    def set_migration_state(self, target: MigState) -> None:
        if not self._migration_flags:
            raise MigrationError(errno.ENOTSUP, f"{self.function.name}'s kernel driver does not migrate")
        try:
            data_fd = self.device.set_migration_state(target)
        except VfioError as e:
            raise self._refused(e) from None
        if data_fd >= 0:
            self._close_data()
            self._data_fd = data_fd
        elif target not in STREAMS:  # the kernel has closed its side of the copy
            self._close_data()
        self.migration_state = target

    def read_migration_data(self, size: int) -> bytes:
        """The data fd's next bytes; b"" when it has none now (PRE_COPY) or no more (STOP_COPY)."""
        if self._data_fd < 0:
            raise MigrationError(errno.EINVAL, f"no migration data to read in {self.migration_state.name}")
        try:
            return os.read(self._data_fd, size)
        except OSError as e:
            failed = VfioError(self.function.name, "reading migration data", e.errno or errno.EIO)
            raise self._refused(failed) from None

    def write_migration_data(self, data: bytes) -> None:
        if self._data_fd < 0:
            raise MigrationError(errno.EINVAL, f"no migration data to write in {self.migration_state.name}")
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._data_fd, view) :]
            except OSError as e:
                failed = VfioError(self.function.name, "writing migration data", e.errno or errno.EIO)
                raise self._refused(failed) from None

    def _close_data(self) -> None:
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1

    def let_go(self) -> None:
        group = self.device.group
        others = [d.name for d in group.devices if d is not self.device] if group is not None else []
        if others:
            raise VfioError(
                self.function.name,
                "releasing the device for the wipe command",
                errno.EBUSY,
                f"{', '.join(others)} of {group.who if group else ''} stays open in the daemon: a function "
                "can be given to another driver only when the daemon holds nothing else of its group",
            )
        self._close_data()
        self.device.close()

    def take_back(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                target = find_target(self.function.name, self._sysfs)
                break
            except DeviceNotReady as e:
                if time.monotonic() > deadline:
                    raise VfioError(
                        self.function.name,
                        "taking the device back after the wipe command",
                        errno.ENODEV,
                        f"{e} (waited {timeout:g} s): whoever had it must give it back to VFIO",
                    ) from None
            time.sleep(0.1)
        self._opened(target)
        self.home.iommu = self.device.home

    def close(self) -> None:
        self._close_data()
        self.device.close()
