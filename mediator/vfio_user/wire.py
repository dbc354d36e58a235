"""vfio-user messages on the wire (QEMU docs/interop/vfio-user.rst).

The construct schemas below are the readable description of every layout, as
the specification's tables give them; cold messages are decoded with them.
``Codec`` derives a ``struct.Struct`` from a schema of fixed-size fields for
the hot path (the header and REGION_READ/WRITE): construct takes ~100x
longer per message, and its compiled mode must never see untrusted input.
A test checks that both decode the same bytes to the same fields.

All values are in the host's byte order, as the specification says.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any

import construct as cs

HEADER_SIZE = 16

FLAG_TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20


class Command(IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


U16, U32, U64 = cs.Int16un, cs.Int32un, cs.Int64un

Header = cs.Struct("msg_id" / U16, "command" / U16, "size" / U32, "flags" / U32, "error" / U32)
Version = cs.Struct("major" / U16, "minor" / U16)  # then optional NUL-terminated JSON
DmaMap = cs.Struct("argsz" / U32, "flags" / U32, "offset" / U64, "addr" / U64, "size" / U64)
DmaUnmap = cs.Struct("argsz" / U32, "flags" / U32, "addr" / U64, "size" / U64)
DeviceInfo = cs.Struct("argsz" / U32, "flags" / U32, "num_regions" / U32, "num_irqs" / U32)
RegionInfo = cs.Struct(
    "argsz" / U32, "flags" / U32, "index" / U32, "cap_offset" / U32, "size" / U64, "offset" / U64
)
CapabilityHeader = cs.Struct("id" / U16, "version" / U16, "next" / U32)
SparseMmap = cs.Struct("nr_areas" / U32, "reserved" / U32)
SparseArea = cs.Struct("offset" / U64, "size" / U64)
IrqInfo = cs.Struct("argsz" / U32, "flags" / U32, "index" / U32, "count" / U32)
SetIrqs = cs.Struct("argsz" / U32, "flags" / U32, "index" / U32, "start" / U32, "count" / U32)
RegionAccess = cs.Struct("offset" / U64, "region" / U32, "count" / U32)  # then data
WriteMultiCount = cs.Struct("wr_cnt" / U64)
WriteMultiEntry = cs.Struct("offset" / U64, "region" / U32, "count" / U32, "data" / cs.Bytes(8))
DeviceFeature = cs.Struct("argsz" / U32, "flags" / U32)  # then feature data
FeatureMigration = cs.Struct("flags" / U64)  # VFIO_DEVICE_FEATURE_MIGRATION's data
FeatureMigState = cs.Struct("device_state" / U32, "data_fd" / U32)  # MIG_DEVICE_STATE's; no fd here
MigData = cs.Struct("argsz" / U32, "size" / U32)  # MIG_DATA_READ/WRITE; then the data
NO_DATA_FD = 0xFFFF_FFFF

# DEVICE_GET_INFO flags
DEVICE_FLAGS_RESET = 0x1
DEVICE_FLAGS_PCI = 0x2
# DEVICE_GET_REGION_INFO flags and capability IDs
REGION_FLAG_READ = 0x1
REGION_FLAG_WRITE = 0x2
REGION_FLAG_MMAP = 0x4
REGION_FLAG_CAPS = 0x8
REGION_CAP_SPARSE_MMAP = 1
# DMA_UNMAP flags
DMA_UNMAP_GET_DIRTY_BITMAP = 0x1
DMA_UNMAP_ALL = 0x2


class Codec:
    """A ``struct.Struct`` for a construct schema of fixed-size fields, in field order."""

    def __init__(self, schema: Any) -> None:
        formats = []
        self.fields: list[str] = []
        for field in schema.subcons:
            inner = field.subcon
            if isinstance(inner, cs.FormatField):
                formats.append(inner.fmtstr[1:])
            elif isinstance(inner, cs.Bytes):
                formats.append(f"{inner.length}s")
            else:
                raise TypeError(f"{field.name}: only fixed-size fields have a struct codec")
            self.fields.append(field.name)
        self.schema = schema
        self.struct = struct.Struct("=" + "".join(formats))
        self.size = self.struct.size
        self.unpack_from = self.struct.unpack_from
        self.pack = self.struct.pack
        self.pack_into = self.struct.pack_into


HEADER = Codec(Header)
VERSION = Codec(Version)
WRITE_MULTI_COUNT = Codec(WriteMultiCount)
REGION_ACCESS = Codec(RegionAccess)
WRITE_MULTI_ENTRY = Codec(WriteMultiEntry)
assert HEADER.size == HEADER_SIZE


def header(msg_id: int, command: int, size: int, flags: int, error: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, size, flags, error)
