"""A real PCI function through the kernel's VFIO, via the cffi shim (``cshim/``).

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
message. Interrupt eventfds go straight to VFIO_DEVICE_SET_IRQS; the client's
DMA memory is mmapped (by the DMA table) and mapped into the IOMMU.

Errors are ``VfioError``: the operation, the device, the errno, and what to
change (permissions, RLIMIT_MEMLOCK, a device busy elsewhere, a kernel
without the ioctl).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mediator._vfio_shim import ffi, lib
from mediator.backends import advice
from mediator.backends.base import BackendError, BarAccess, IrqInfo, RegionInfo
from mediator.backends.dma import DmaMapping, DmaTable
from mediator.backends.sysfs import PciFunction, find_function, group_blockers
from mediator.pci.address import format_bdf
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


class VfioDevice:
    """An open VFIO device fd and the IOMMU context that goes with it."""

    def __init__(self, function: PciFunction, *, prefer_cdev: bool = True, dev: Path = DEV_VFIO) -> None:
        self.function = function
        self.name = function.bdf
        self._fds: list[int] = []
        self._container: int | None = None
        self._group: int | None = None
        self._iommufd: int | None = None
        self._ioas = 0
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
    def _open(self, path: Path, purpose: str) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VfioError(
                self.name, f"opening {path} ({purpose})", errno.ENOENT, "Is the vfio-pci module loaded?"
            ) from None
        except PermissionError:
            raise VfioError(
                self.name,
                f"opening {path} ({purpose})",
                errno.EACCES,
                f"Let the daemon's user open {path}: run it as root, or add a udev rule such as "
                f'{_udev_match(path)}, GROUP="kvm", MODE="0660" and run it in that group',
            ) from None
        except OSError as e:
            raise VfioError(
                self.name,
                f"opening {path} ({purpose})",
                e.errno or errno.EIO,
                advice.for_errno(e.errno or 0, ""),
            ) from None
        self._fds.append(fd)
        return fd

    def _checked(self, result: int, operation: str, fix: str | None = None) -> int:
        """A shim call's result (-errno on failure) as a value, or the ``VfioError`` it stands for."""
        if result < 0:
            raise VfioError(
                self.name, operation, -result, advice.for_errno(-result, operation) if fix is None else fix
            )
        return result

    def _ioctl(self, fd: int, request: int, arg: Any, operation: str) -> int:
        return self._checked(int(lib.shim_ioctl(fd, request, arg)), operation)

    def _ioctl_value(self, fd: int, request: int, value: int, operation: str) -> int:
        return self._checked(int(lib.shim_ioctl_value(fd, request, value)), operation)

    def _open_group(self, dev: Path) -> int:
        function = self.function
        container = self._container = self._open(dev / "vfio", "the VFIO container")
        version = self._ioctl_value(container, lib.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
        if version != lib.VFIO_API_VERSION:
            raise VfioError(
                self.name, "VFIO_GET_API_VERSION", errno.EPROTO, f"unknown VFIO API version {version}"
            )
        if not self._ioctl_value(
            container, lib.VFIO_CHECK_EXTENSION, lib.VFIO_TYPE1v2_IOMMU, "VFIO_CHECK_EXTENSION"
        ):
            raise VfioError(
                self.name,
                "VFIO_CHECK_EXTENSION(TYPE1v2)",
                errno.ENOTSUP,
                "the kernel lacks the type1v2 IOMMU backend",
            )
        group_path = dev / str(function.iommu_group)
        group = self._group = self._open(group_path, f"IOMMU group {function.iommu_group}")
        status = ffi.new("struct vfio_group_status *", {"argsz": ffi.sizeof("struct vfio_group_status")})
        self._ioctl(group, lib.VFIO_GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS")
        if not status.flags & lib.VFIO_GROUP_FLAGS_VIABLE:
            blockers = (
                ", ".join(
                    f"{bdf} (bound to {driver})" for bdf, driver in group_blockers(function.group_members)
                )
                or "a device"
            )
            raise VfioError(
                self.name,
                f"using IOMMU group {function.iommu_group}",
                errno.EINVAL,
                f"The group is not viable: {blockers} shares it; {advice.SHARE_THE_GROUP}",
            )
        container_fd = ffi.new("int *", container)
        self._ioctl(group, lib.VFIO_GROUP_SET_CONTAINER, container_fd, "VFIO_GROUP_SET_CONTAINER")
        self._ioctl_value(container, lib.VFIO_SET_IOMMU, lib.VFIO_TYPE1v2_IOMMU, "VFIO_SET_IOMMU(TYPE1v2)")
        name = ffi.new("char[]", function.bdf.encode())
        device = self._ioctl(group, lib.VFIO_GROUP_GET_DEVICE_FD, name, "VFIO_GROUP_GET_DEVICE_FD")
        self._fds.append(device)
        return device

    def _open_cdev(self, path: Path) -> int:
        device = self._open(path, "the VFIO device cdev")
        iommufd = self._iommufd = self._open(DEV_IOMMU, "iommufd")
        bind = ffi.new(
            "struct vfio_device_bind_iommufd *",
            {"argsz": ffi.sizeof("struct vfio_device_bind_iommufd"), "iommufd": iommufd},
        )
        try:
            self._ioctl(device, lib.VFIO_DEVICE_BIND_IOMMUFD, bind, "VFIO_DEVICE_BIND_IOMMUFD")
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
        ioas = ffi.new("struct iommu_ioas_alloc *", {"size": ffi.sizeof("struct iommu_ioas_alloc")})
        self._ioctl(iommufd, lib.IOMMU_IOAS_ALLOC, ioas, "IOMMU_IOAS_ALLOC")
        self._ioas = ioas.out_ioas_id
        attach = ffi.new(
            "struct vfio_device_attach_iommufd_pt *",
            {"argsz": ffi.sizeof("struct vfio_device_attach_iommufd_pt"), "pt_id": self._ioas},
        )
        self._ioctl(device, lib.VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach, "VFIO_DEVICE_ATTACH_IOMMUFD_PT")
        return device

    # queries
    def _device_info(self) -> Any:
        info = ffi.new("struct vfio_device_info *", {"argsz": ffi.sizeof("struct vfio_device_info")})
        self._ioctl(self.fd, lib.VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO")
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
            self._ioctl(
                self.fd, lib.VFIO_DEVICE_GET_REGION_INFO, info, f"VFIO_DEVICE_GET_REGION_INFO({index})"
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
        self._ioctl(self.fd, lib.VFIO_DEVICE_GET_IRQ_INFO, info, f"VFIO_DEVICE_GET_IRQ_INFO({index})")
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
        self._ioctl(self.fd, lib.VFIO_DEVICE_SET_IRQS, request, f"VFIO_DEVICE_SET_IRQS(index {index})")

    def reset(self) -> None:
        if not self.info.flags & lib.VFIO_DEVICE_FLAGS_RESET:
            raise VfioError(self.name, "VFIO_DEVICE_RESET", errno.ENOTTY, "the device has no reset method")
        self._ioctl_value(self.fd, lib.VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET")

    def bus_reset(self) -> None:
        """A secondary bus (or slot) reset, VFIO_DEVICE_PCI_HOT_RESET.

        Every function the reset reaches must be ours: through the group fd
        we hold (legacy) or, for a cdev, bound to our iommufd (count 0).
        """
        group_fds = [self._group] if self._group is not None else []
        size = ffi.sizeof("struct vfio_pci_hot_reset") + 4 * len(group_fds)
        buffer = ffi.new("char[]", size)
        request = ffi.cast("struct vfio_pci_hot_reset *", buffer)
        request.argsz, request.count = size, len(group_fds)
        for i, fd in enumerate(group_fds):
            request.group_fds[i] = fd
        self._ioctl(self.fd, lib.VFIO_DEVICE_PCI_HOT_RESET, request, "VFIO_DEVICE_PCI_HOT_RESET")

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
            self._checked(
                result, "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", advice.for_errno(-result, "hot reset")
            )
            devices = ffi.cast("struct vfio_pci_dependent_device *", buffer + size)
            return [
                format_bdf(devices[i].segment, devices[i].bus, devices[i].devfn) for i in range(info.count)
            ]

    # DMA
    def map_dma(self, mapping: DmaMapping) -> None:
        assert mapping.memory is not None
        vaddr = int(ffi.cast("uintptr_t", ffi.from_buffer(mapping.memory)))
        writable = bool(mapping.flags & DMA_WRITE)
        if self._iommufd is not None:
            flags = lib.IOMMU_IOAS_MAP_FIXED_IOVA | lib.IOMMU_IOAS_MAP_READABLE
            flags |= lib.IOMMU_IOAS_MAP_WRITEABLE if writable else 0
            request = ffi.new(
                "struct iommu_ioas_map *",
                {
                    "size": ffi.sizeof("struct iommu_ioas_map"),
                    "flags": flags,
                    "ioas_id": self._ioas,
                    "user_va": vaddr,
                    "length": mapping.size,
                    "iova": mapping.iova,
                },
            )
            self._map(self._iommufd, lib.IOMMU_IOAS_MAP, request, "IOMMU_IOAS_MAP", mapping.size)
        else:
            assert self._container is not None
            flags = lib.VFIO_DMA_MAP_FLAG_READ | (lib.VFIO_DMA_MAP_FLAG_WRITE if writable else 0)
            request = ffi.new(
                "struct vfio_iommu_type1_dma_map *",
                {
                    "argsz": ffi.sizeof("struct vfio_iommu_type1_dma_map"),
                    "flags": flags,
                    "vaddr": vaddr,
                    "iova": mapping.iova,
                    "size": mapping.size,
                },
            )
            self._map(self._container, lib.VFIO_IOMMU_MAP_DMA, request, "VFIO_IOMMU_MAP_DMA", mapping.size)

    def _map(self, fd: int, request_code: int, request: Any, operation: str, size: int) -> None:
        result = int(lib.shim_ioctl(fd, request_code, request))
        self._checked(result, operation, advice.memlock(size) if result == -errno.ENOMEM else None)

    def unmap_dma(self, mapping: DmaMapping) -> None:
        if self._iommufd is not None:
            request = ffi.new(
                "struct iommu_ioas_unmap *",
                {
                    "size": ffi.sizeof("struct iommu_ioas_unmap"),
                    "ioas_id": self._ioas,
                    "iova": mapping.iova,
                    "length": mapping.size,
                },
            )
            self._ioctl(self._iommufd, lib.IOMMU_IOAS_UNMAP, request, "IOMMU_IOAS_UNMAP")
        else:
            assert self._container is not None
            request = ffi.new(
                "struct vfio_iommu_type1_dma_unmap *",
                {
                    "argsz": ffi.sizeof("struct vfio_iommu_type1_dma_unmap"),
                    "iova": mapping.iova,
                    "size": mapping.size,
                },
            )
            self._ioctl(self._container, lib.VFIO_IOMMU_UNMAP_DMA, request, "VFIO_IOMMU_UNMAP_DMA")

    def close(self) -> None:
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()


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
    """The ``Backend`` of a real function: the kernel's vfio-pci below the quirk table."""

    def __init__(
        self,
        bdf: str,
        *,
        bar_access: BarAccess = "mmap",
        prefer_cdev: bool = True,
        sysfs: Path = Path("/sys"),
        dev: Path = DEV_VFIO,
    ) -> None:
        self.function = find_function(bdf, sysfs)
        self.device = VfioDevice(self.function, prefer_cdev=prefer_cdev, dev=dev)
        self.bar_access = bar_access
        self.description = f"{self.function.bdf} through VFIO ({self.device.api})"
        # BARs, ROM and config; the VGA region (8) exists only on VGA devices and is never served.
        self._regions = {index: self.device.region(index) for index in range(VGA_REGION)}
        self.config_size = self._regions[CONFIG_REGION].size
        self.can_reset = bool(self.device.info.flags & lib.VFIO_DEVICE_FLAGS_RESET)
        self._noresize: dict[int, list[int]] = {}  # index -> eventfds the kernel has, for NORESIZE indexes

    # config and regions
    def _pread(self, index: int, offset: int, length: int) -> bytes:
        region = self._regions[index]
        if offset < 0 or length <= 0 or offset + length > region.size:
            raise BackendError(f"region {index} access {offset:#x}+{length} outside its {region.size} bytes")
        try:
            data = os.pread(self.device.fd, length, region.offset + offset)
        except OSError as e:
            raise VfioError(
                self.function.bdf, f"reading region {index} at {offset:#x}", e.errno or errno.EIO
            ) from None
        if len(data) != length:
            raise VfioError(
                self.function.bdf, f"reading region {index} at {offset:#x}", errno.EIO, "short read"
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
                self.function.bdf, f"writing region {index} at {offset:#x}", e.errno or errno.EIO
            ) from None
        if written != len(data):
            raise VfioError(
                self.function.bdf, f"writing region {index} at {offset:#x}", errno.EIO, "short write"
            )

    def read_config(self, offset: int, length: int) -> bytes:
        return self._pread(CONFIG_REGION, offset, length)

    def write_config(self, offset: int, data: bytes) -> None:
        self._pwrite(CONFIG_REGION, offset, data)

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
    def attach_dma(self, table: DmaTable) -> None:
        """The device reaches guest memory through the IOMMU; the table only feeds it mappings."""

    def dma_map(self, mapping: DmaMapping) -> None:
        if mapping.backed:
            self.device.map_dma(mapping)

    def dma_unmap(self, mapping: DmaMapping) -> None:
        if mapping.backed:
            self.device.unmap_dma(mapping)

    def reset(self) -> None:
        self.device.reset()

    def bus_reset_obstacle(self) -> str | None:
        try:
            reached = self.device.hot_reset_devices()
        except VfioError as e:
            return f"the kernel offers no bus or slot reset ({errno.errorcode.get(e.errno, e.errno)})"
        others = [bdf for bdf in reached if bdf != self.function.bdf]
        if others:
            return "a bus reset would also reset " + ", ".join(others)
        return None

    def bus_reset(self) -> None:
        self.device.bus_reset()

    def close(self) -> None:
        self.device.close()
