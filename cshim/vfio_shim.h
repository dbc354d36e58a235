/*
 * vfio_shim.h: the kernel interfaces vfio-mediator uses, for cffi's API mode.
 *
 * Everything comes from the system's <linux/vfio.h>, so the compiler checks
 * every struct and ioctl number against the kernel headers. The iommufd
 * character-device interface (Linux 6.6) is missing from older headers
 * (Debian 12 ships 6.1): its definitions are vendored below behind guards,
 * copied from include/uapi/linux/iommufd.h and vfio.h, and used only when the
 * system headers lack them.
 */
#ifndef VFIO_MEDIATOR_SHIM_H
#define VFIO_MEDIATOR_SHIM_H

#include <stdint.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/vfio.h>

#ifndef VFIO_DEVICE_BIND_IOMMUFD
struct vfio_device_bind_iommufd {
    __u32 argsz;
    __u32 flags;
    __s32 iommufd;
    __u32 out_devid;
};
#define VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)

struct vfio_device_attach_iommufd_pt {
    __u32 argsz;
    __u32 flags;
    __u32 pt_id;
};
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
#endif

#if defined(__has_include) && __has_include(<linux/iommufd.h>)
#include <linux/iommufd.h>
#endif

#ifndef IOMMU_IOAS_ALLOC
#define IOMMUFD_TYPE (';')

struct iommu_destroy {
    __u32 size;
    __u32 id;
};
#define IOMMU_DESTROY _IO(IOMMUFD_TYPE, 0x80)

struct iommu_ioas_alloc {
    __u32 size;
    __u32 flags;
    __u32 out_ioas_id;
};
#define IOMMU_IOAS_ALLOC _IO(IOMMUFD_TYPE, 0x81)

enum iommufd_ioas_map_flags {
    IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0,
    IOMMU_IOAS_MAP_WRITEABLE = 1 << 1,
    IOMMU_IOAS_MAP_READABLE = 1 << 2,
};

struct iommu_ioas_map {
    __u32 size;
    __u32 flags;
    __u32 ioas_id;
    __u32 __reserved;
    __aligned_u64 user_va;
    __aligned_u64 length;
    __aligned_u64 iova;
};
#define IOMMU_IOAS_MAP _IO(IOMMUFD_TYPE, 0x85)

struct iommu_ioas_unmap {
    __u32 size;
    __u32 ioas_id;
    __aligned_u64 iova;
    __aligned_u64 length;
};
#define IOMMU_IOAS_UNMAP _IO(IOMMUFD_TYPE, 0x86)
#endif

/*
 * Returns the ioctl's result (>= 0; some return an fd) or -errno.
 * The GIL is released by cffi around the call.
 */
long shim_ioctl(int fd, unsigned long request, void *arg);
long shim_ioctl_value(int fd, unsigned long request, unsigned long value);

/* The process makes no core dump and cannot be ptraced by its own user: 0 or -errno. */
long shim_forbid_core_dumps(void);

#endif
