"""cffi build script (API mode) for mediator._vfio_shim.

The cdef names the structs, fields and constants the Python side uses; the
compiler fills in the real layouts from <linux/vfio.h> (and the vendored
iommufd definitions), so a mismatch is a build error, not a silent
corruption. There are no callbacks into Python: they would need writable
and executable memory, which systemd's MemoryDenyWriteExecute forbids.
"""

from cffi import FFI

# setuptools wants paths relative to setup.py, which sits in the parent folder.
HERE = "cshim"

CDEF = """
long shim_ioctl(int fd, unsigned long request, void *arg);
long shim_ioctl_value(int fd, unsigned long request, unsigned long value);
long shim_forbid_core_dumps(void);

static const unsigned long VFIO_GET_API_VERSION;
static const unsigned long VFIO_CHECK_EXTENSION;
static const unsigned long VFIO_SET_IOMMU;
static const unsigned long VFIO_GROUP_GET_STATUS;
static const unsigned long VFIO_GROUP_SET_CONTAINER;
static const unsigned long VFIO_GROUP_UNSET_CONTAINER;
static const unsigned long VFIO_GROUP_GET_DEVICE_FD;
static const unsigned long VFIO_DEVICE_GET_INFO;
static const unsigned long VFIO_DEVICE_GET_REGION_INFO;
static const unsigned long VFIO_DEVICE_GET_IRQ_INFO;
static const unsigned long VFIO_DEVICE_SET_IRQS;
static const unsigned long VFIO_DEVICE_RESET;
static const unsigned long VFIO_DEVICE_GET_PCI_HOT_RESET_INFO;
static const unsigned long VFIO_DEVICE_PCI_HOT_RESET;
static const unsigned long VFIO_DEVICE_FEATURE;
static const unsigned long VFIO_IOMMU_MAP_DMA;
static const unsigned long VFIO_IOMMU_UNMAP_DMA;
static const unsigned long VFIO_DEVICE_BIND_IOMMUFD;
static const unsigned long VFIO_DEVICE_ATTACH_IOMMUFD_PT;
static const unsigned long IOMMU_DESTROY;
static const unsigned long IOMMU_IOAS_ALLOC;
static const unsigned long IOMMU_IOAS_MAP;
static const unsigned long IOMMU_IOAS_UNMAP;

#define VFIO_API_VERSION ...
#define VFIO_TYPE1v2_IOMMU ...
#define VFIO_GROUP_FLAGS_VIABLE ...
#define VFIO_GROUP_FLAGS_CONTAINER_SET ...
#define VFIO_DEVICE_FLAGS_RESET ...
#define VFIO_DEVICE_FLAGS_PCI ...
#define VFIO_REGION_INFO_FLAG_READ ...
#define VFIO_REGION_INFO_FLAG_WRITE ...
#define VFIO_REGION_INFO_FLAG_MMAP ...
#define VFIO_REGION_INFO_FLAG_CAPS ...
#define VFIO_REGION_INFO_CAP_SPARSE_MMAP ...
#define VFIO_REGION_INFO_CAP_TYPE ...
#define VFIO_REGION_INFO_CAP_MSIX_MAPPABLE ...
#define VFIO_DEVICE_FEATURE_GET ...
#define VFIO_DEVICE_FEATURE_SET ...
#define VFIO_DEVICE_FEATURE_MIGRATION ...
#define VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE ...
#define VFIO_DMA_MAP_FLAG_READ ...
#define VFIO_DMA_MAP_FLAG_WRITE ...
#define IOMMU_IOAS_MAP_FIXED_IOVA ...
#define IOMMU_IOAS_MAP_WRITEABLE ...
#define IOMMU_IOAS_MAP_READABLE ...

struct vfio_group_status { uint32_t argsz; uint32_t flags; ...; };
struct vfio_device_info { uint32_t argsz; uint32_t flags; uint32_t num_regions; uint32_t num_irqs; ...; };
struct vfio_region_info {
    uint32_t argsz; uint32_t flags; uint32_t index; uint32_t cap_offset; uint64_t size; uint64_t offset; ...;
};
struct vfio_info_cap_header { uint16_t id; uint16_t version; uint32_t next; };
struct vfio_region_sparse_mmap_area { uint64_t offset; uint64_t size; };
struct vfio_region_info_cap_sparse_mmap {
    struct vfio_info_cap_header header; uint32_t nr_areas; uint32_t reserved;
    struct vfio_region_sparse_mmap_area areas[];
};
struct vfio_region_info_cap_type { struct vfio_info_cap_header header; uint32_t type; uint32_t subtype; };
struct vfio_irq_info { uint32_t argsz; uint32_t flags; uint32_t index; uint32_t count; ...; };
struct vfio_irq_set { uint32_t argsz; uint32_t flags; uint32_t index; uint32_t start; uint32_t count; ...; };
struct vfio_pci_dependent_device { uint32_t group_id; uint16_t segment; uint8_t bus; uint8_t devfn; ...; };
struct vfio_pci_hot_reset_info { uint32_t argsz; uint32_t flags; uint32_t count; ...; };
struct vfio_pci_hot_reset { uint32_t argsz; uint32_t flags; uint32_t count; int32_t group_fds[]; };
struct vfio_device_feature { uint32_t argsz; uint32_t flags; uint8_t data[]; };
struct vfio_device_feature_migration { uint64_t flags; };
struct vfio_device_feature_mig_state { uint32_t device_state; int32_t data_fd; };
struct vfio_iommu_type1_dma_map {
    uint32_t argsz; uint32_t flags; uint64_t vaddr; uint64_t iova; uint64_t size; ...;
};
struct vfio_iommu_type1_dma_unmap { uint32_t argsz; uint32_t flags; uint64_t iova; uint64_t size; ...; };
struct vfio_device_bind_iommufd { uint32_t argsz; uint32_t flags; int32_t iommufd; uint32_t out_devid; ...; };
struct vfio_device_attach_iommufd_pt { uint32_t argsz; uint32_t flags; uint32_t pt_id; ...; };
struct iommu_destroy { uint32_t size; uint32_t id; ...; };
struct iommu_ioas_alloc { uint32_t size; uint32_t flags; uint32_t out_ioas_id; ...; };
struct iommu_ioas_map {
    uint32_t size; uint32_t flags; uint32_t ioas_id; uint64_t user_va; uint64_t length; uint64_t iova; ...;
};
struct iommu_ioas_unmap { uint32_t size; uint32_t ioas_id; uint64_t iova; uint64_t length; ...; };
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "mediator._vfio_shim",
    '#include "vfio_shim.h"',
    sources=[f"{HERE}/vfio_shim.c"],
    include_dirs=[HERE],
    extra_compile_args=["-Wall", "-Wextra", "-Werror", "-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
