"""The VFIO PCI ABI that the kernel, the vfio-user wire and every layer between share.

Region indexes follow vfio-pci: 0-5 are BAR0-5, 6 the expansion ROM, 7 the
config space, 8 VGA. Interrupt indexes and the VFIO_IRQ_INFO_* and
VFIO_IRQ_SET_* flags are <linux/vfio.h>'s, which vfio-user takes unchanged,
as it does the DMA permission flags. Numbers only: what they mean to a
device is the backends' and the virtual device's business.
"""

from __future__ import annotations

BAR_REGIONS = range(6)
ROM_REGION = 6
CONFIG_REGION = 7
VGA_REGION = 8
REGION_COUNT = 9

IRQ_INTX = 0
IRQ_MSI = 1
IRQ_MSIX = 2
IRQ_ERR = 3
IRQ_REQ = 4
IRQ_COUNT = 5

# VFIO_IRQ_INFO_* (include/uapi/linux/vfio.h)
IRQ_INFO_EVENTFD = 0x1
IRQ_INFO_MASKABLE = 0x2
IRQ_INFO_AUTOMASKED = 0x4
IRQ_INFO_NORESIZE = 0x8

# VFIO_IRQ_SET_* (include/uapi/linux/vfio.h)
IRQ_SET_DATA_NONE = 0x01
IRQ_SET_DATA_BOOL = 0x02
IRQ_SET_DATA_EVENTFD = 0x04
IRQ_SET_ACTION_MASK = 0x08
IRQ_SET_ACTION_UNMASK = 0x10
IRQ_SET_ACTION_TRIGGER = 0x20
IRQ_SET_DATA_TYPE = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_TYPE = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER

# VFIO_DMA_MAP_FLAG_READ/WRITE, as vfio-user's DMA_MAP flags
DMA_READ = 0x1
DMA_WRITE = 0x2

# VFIO_DEVICE_FEATURE_* (include/uapi/linux/vfio.h), as vfio-user's DEVICE_FEATURE flags
FEATURE_MASK = 0xFFFF
FEATURE_GET = 1 << 16
FEATURE_SET = 1 << 17
FEATURE_PROBE = 1 << 18
FEATURE_MIGRATION = 1
FEATURE_MIG_DEVICE_STATE = 2

# struct vfio_device_feature_migration flags
MIGRATION_STOP_COPY = 1 << 0
MIGRATION_P2P = 1 << 1
MIGRATION_PRE_COPY = 1 << 2
