"""The C shim against the kernel ABI, and VFIO discovery and errors that need no /dev/vfio."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from mediator._vfio_shim import ffi, lib

from mediator.backends.advice import memlock as memlock_advice
from mediator.backends.sysfs import DeviceNotReady, MediatedDevice, find_function, find_target, group_blockers
from mediator.backends.vfio import VfioDevice, VfioError, grow_noresize
from mediator.pci.address import AddressError, normalize_bdf
from mediator.vfio_abi import FEATURE_GET, FEATURE_MIG_DEVICE_STATE, FEATURE_MIGRATION, FEATURE_SET
from tests.fakesysfs import FakeSysfs

VFIO_TYPE = ord(";")
VFIO_BASE = 100


def io(nr: int) -> int:
    """_IO(type, nr) on Linux: no direction, no size."""
    return VFIO_TYPE << 8 | nr


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("VFIO_GET_API_VERSION", io(VFIO_BASE + 0)),
        ("VFIO_CHECK_EXTENSION", io(VFIO_BASE + 1)),
        ("VFIO_SET_IOMMU", io(VFIO_BASE + 2)),
        ("VFIO_GROUP_GET_STATUS", io(VFIO_BASE + 3)),
        ("VFIO_GROUP_SET_CONTAINER", io(VFIO_BASE + 4)),
        ("VFIO_GROUP_GET_DEVICE_FD", io(VFIO_BASE + 6)),
        ("VFIO_DEVICE_GET_INFO", io(VFIO_BASE + 7)),
        ("VFIO_DEVICE_GET_REGION_INFO", io(VFIO_BASE + 8)),
        ("VFIO_DEVICE_GET_IRQ_INFO", io(VFIO_BASE + 9)),
        ("VFIO_DEVICE_SET_IRQS", io(VFIO_BASE + 10)),
        ("VFIO_DEVICE_RESET", io(VFIO_BASE + 11)),
        ("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", io(VFIO_BASE + 12)),
        ("VFIO_DEVICE_PCI_HOT_RESET", io(VFIO_BASE + 13)),  # same number as MAP_DMA, on the device fd
        ("VFIO_IOMMU_MAP_DMA", io(VFIO_BASE + 13)),
        ("VFIO_IOMMU_UNMAP_DMA", io(VFIO_BASE + 14)),
        ("VFIO_DEVICE_BIND_IOMMUFD", io(VFIO_BASE + 18)),
        ("VFIO_DEVICE_ATTACH_IOMMUFD_PT", io(VFIO_BASE + 19)),
        ("IOMMU_DESTROY", io(0x80)),
        ("IOMMU_IOAS_ALLOC", io(0x81)),
        ("IOMMU_IOAS_MAP", io(0x85)),
        ("IOMMU_IOAS_UNMAP", io(0x86)),
    ],
)
def test_ioctl_numbers_are_the_kernel_abi(name: str, number: int) -> None:
    assert getattr(lib, name) == number


@pytest.mark.parametrize(
    ("struct", "size", "fields"),
    [
        ("vfio_group_status", 8, {"flags": 4}),
        ("vfio_device_info", 20, {"num_irqs": 12}),  # with cap_offset (Linux 5.x and later)
        ("vfio_region_info", 32, {"cap_offset": 12, "size": 16, "offset": 24}),
        ("vfio_info_cap_header", 8, {"next": 4}),
        ("vfio_region_sparse_mmap_area", 16, {"size": 8}),
        ("vfio_region_info_cap_sparse_mmap", 16, {"nr_areas": 8}),
        ("vfio_irq_info", 16, {"count": 12}),
        ("vfio_irq_set", 20, {"count": 16}),
        ("vfio_iommu_type1_dma_map", 32, {"vaddr": 8, "iova": 16, "size": 24}),
        ("vfio_iommu_type1_dma_unmap", 24, {"iova": 8, "size": 16}),
        ("vfio_pci_hot_reset_info", 12, {"count": 8}),
        ("vfio_pci_hot_reset", 12, {"count": 8, "group_fds": 12}),
        ("vfio_pci_dependent_device", 8, {"segment": 4, "bus": 6, "devfn": 7}),
        ("vfio_device_bind_iommufd", 16, {"iommufd": 8, "out_devid": 12}),
        ("vfio_device_attach_iommufd_pt", 12, {"pt_id": 8}),
        ("iommu_destroy", 8, {"id": 4}),
        ("iommu_ioas_alloc", 12, {"out_ioas_id": 8}),
        ("iommu_ioas_map", 40, {"ioas_id": 8, "user_va": 16, "length": 24, "iova": 32}),
        ("iommu_ioas_unmap", 24, {"iova": 8, "length": 16}),
    ],
)
def test_struct_layouts_are_the_kernel_abi(struct: str, size: int, fields: dict[str, int]) -> None:
    assert ffi.sizeof(f"struct {struct}") == size
    for field, offset in fields.items():
        assert ffi.offsetof(f"struct {struct}", field) == offset


def test_constants_are_the_kernel_abi() -> None:
    assert (lib.VFIO_API_VERSION, lib.VFIO_TYPE1v2_IOMMU) == (0, 3)
    assert (lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP, lib.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE) == (1, 3)
    assert (lib.IOMMU_IOAS_MAP_FIXED_IOVA, lib.IOMMU_IOAS_MAP_WRITEABLE, lib.IOMMU_IOAS_MAP_READABLE) == (
        1,
        2,
        4,
    )


def test_the_shim_returns_errno_negated() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        assert lib.shim_ioctl_value(fd, lib.VFIO_GET_API_VERSION, 0) == -errno.ENOTTY
        info = ffi.new("struct vfio_device_info *", {"argsz": 16})
        assert lib.shim_ioctl(fd, lib.VFIO_DEVICE_GET_INFO, info) == -errno.ENOTTY
    finally:
        os.close(fd)
    assert lib.shim_ioctl_value(-1, lib.VFIO_GET_API_VERSION, 0) == -errno.EBADF


def test_errors_name_the_device_the_operation_and_what_to_do() -> None:
    busy = VfioError("0000:3b:00.0", "VFIO_GROUP_GET_DEVICE_FD", errno.EBUSY, "in use elsewhere")
    assert (
        str(busy)
        == "0000:3b:00.0: VFIO_GROUP_GET_DEVICE_FD failed: Device or resource busy (EBUSY). in use elsewhere"
    )
    advice = memlock_advice(8 << 30)
    assert "8192 MiB" in advice and "LimitMEMLOCK" in advice and "CAP_IPC_LOCK" in advice


def make_sysfs(root: Path, devices: dict[str, str | None], group: int = 7) -> None:
    """A sysfs tree: every device in one IOMMU group, bound to the given drivers."""
    pci = root / "bus/pci/devices"
    groups = root / "kernel/iommu_groups" / str(group) / "devices"
    groups.mkdir(parents=True)
    for bdf, driver in devices.items():
        device = root / "devices/pci0000:00" / bdf
        device.mkdir(parents=True)
        (pci).mkdir(parents=True, exist_ok=True)
        (pci / bdf).symlink_to(device)
        (device / "iommu_group").symlink_to(root / "kernel/iommu_groups" / str(group))
        (groups / bdf).symlink_to(device)
        if driver:
            target = root / "bus/pci/drivers" / driver
            target.mkdir(parents=True, exist_ok=True)
            (device / "driver").symlink_to(target)


def test_a_vfio_bound_function_is_found_with_its_group(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"0000:3b:00.0": "vfio-pci", "0000:3b:00.1": "snd_hda_intel"})
    function = find_function("3b:00.0", tmp_path)
    assert (function.bdf, function.driver, function.iommu_group, function.vfio_cdev) == (
        "0000:3b:00.0",
        "vfio-pci",
        7,
        None,
    )
    assert group_blockers(function.group_members) == (("0000:3b:00.1", "snd_hda_intel"),)


def test_a_function_bound_elsewhere_gets_the_commands_to_rebind_it(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"0000:3b:00.0": "nvidia"})
    with pytest.raises(DeviceNotReady) as refused:
        find_function("0000:3b:00.0", tmp_path)
    message = str(refused.value)
    assert message.startswith("0000:3b:00.0 is bound to nvidia, not vfio-pci.")
    assert f"echo vfio-pci > {tmp_path}/bus/pci/devices/0000:3b:00.0/driver_override" in message
    assert f"echo 0000:3b:00.0 > {tmp_path}/bus/pci/devices/0000:3b:00.0/driver/unbind" in message
    assert f"echo 0000:3b:00.0 > {tmp_path}/bus/pci/drivers_probe" in message


def test_a_variant_driver_counts_as_vfio(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"0000:09:01.0": "nvgrace-gpu-vfio-pci"})
    assert find_function("0000:09:01.0", tmp_path).driver == "nvgrace-gpu-vfio-pci"


@pytest.mark.parametrize("text", ["3b:00", "0000:3b:00.8", "gpu0", ""])
def test_a_bad_address_is_refused(text: str) -> None:
    with pytest.raises(AddressError, match="not a PCI address"):
        normalize_bdf(text)
    with pytest.raises(DeviceNotReady, match="not a PCI address"):
        find_function(text)


def test_a_missing_function_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bus/pci/devices").mkdir(parents=True)
    with pytest.raises(DeviceNotReady, match=r"no PCI device 0000:3b:00\.0"):
        find_function("0000:3b:00.0", tmp_path)


def test_the_migration_features_the_wire_names_are_the_kernels() -> None:
    # vfio-user's DEVICE_FEATURE carries VFIO's own flags: the daemon passes them to the kernel as they are.
    assert (lib.VFIO_DEVICE_FEATURE_GET, lib.VFIO_DEVICE_FEATURE_SET) == (FEATURE_GET, FEATURE_SET)
    assert (lib.VFIO_DEVICE_FEATURE_MIGRATION, lib.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE) == (
        FEATURE_MIGRATION,
        FEATURE_MIG_DEVICE_STATE,
    )


MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


def test_an_absent_mdev_gets_the_command_that_creates_one(tmp_path: Path) -> None:
    sysfs = FakeSysfs(tmp_path)
    with pytest.raises(DeviceNotReady, match=f"no mediated device {MDEV}: the kernel has no mdev bus; load"):
        find_target(MDEV.upper(), tmp_path)
    sysfs.add_mdev_type("mtty", "mtty-1", "Single port serial", available=0)
    sysfs.add_mdev_type("mtty", "mtty-2", "Dual port serial", available=3)
    with pytest.raises(DeviceNotReady) as absent:
        find_target(MDEV, tmp_path)
    create = tmp_path / "class/mdev_bus/mtty/mdev_supported_types/mtty-2/create"
    assert f"create it with: echo {MDEV} > {create}" in str(absent.value)  # a type with room left
    assert "mtty/mtty-1 (0 available), mtty/mtty-2 (3 available)" in str(absent.value)


def test_a_mediated_device_is_found_by_its_uuid_with_its_parent_and_group(tmp_path: Path) -> None:
    sysfs = FakeSysfs(tmp_path)
    sysfs.add_mdev_type("mtty", "mtty-2", "Dual port serial")
    sysfs.add_mdev(MDEV, "mtty", "mtty-2", driver="mtty", group=14)
    found = find_target(MDEV, tmp_path)
    assert isinstance(found, MediatedDevice)
    assert (found.name, found.parent, found.mdev_type, found.driver, found.iommu_group) == (
        MDEV,
        "mtty",
        "mtty-2",
        "mtty",
        14,
    )
    sysfs.add_mdev("83b8f4f2-509f-382f-3c1e-e6bfe0fa1002", "mtty", "mtty-2", group=15)
    with pytest.raises(
        DeviceNotReady, match="is bound to no driver: its parent's vendor driver must bind it"
    ):
        find_target("83b8f4f2-509f-382f-3c1e-e6bfe0fa1002", tmp_path)


def test_no_vfio_nodes_is_a_clear_error(tmp_path: Path) -> None:
    make_sysfs(tmp_path, {"0000:3b:00.0": "vfio-pci"})
    with pytest.raises(VfioError) as refused:
        VfioDevice(find_function("0000:3b:00.0", tmp_path), dev=tmp_path / "dev-vfio")
    assert refused.value.errno == errno.ENOENT
    assert "vfio-pci module" in str(refused.value)


def test_a_noresize_index_grows_in_one_call_with_every_vector() -> None:
    vectors, calls = grow_noresize([], 0, [10])
    assert (vectors, calls) == ([10], [(0, [10])])
    vectors, calls = grow_noresize(vectors, 1, [11, 12])  # QEMU's second chunk
    assert (vectors, calls) == ([10, 11, 12], [(0, []), (0, [10, 11, 12])])
    vectors, calls = grow_noresize(vectors, 1, [-1])  # detaching one vector needs no resize
    assert (vectors, calls) == ([10, -1, 12], [(1, [-1])])
    vectors, calls = grow_noresize(vectors, 5, [15])  # a gap is filled with "no eventfd"
    assert (vectors, calls) == ([10, -1, 12, -1, -1, 15], [(0, []), (0, [10, -1, 12, -1, -1, 15])])
