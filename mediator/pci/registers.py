"""Type-0 configuration header: register offsets, sizes and bit definitions.

Offsets follow the PCI Local Bus and PCIe Base specifications (and the names
in the kernel's ``pci_regs.h``). ``HEADER_REGISTERS`` lists every register of
the 64-byte header so that the config view can split an access at register
boundaries, the way the kernel's per-byte permission map and libvfio-user's
``PCI_REG_SZ`` table do.
"""

from __future__ import annotations

from dataclasses import dataclass

CONFIG_SPACE_SIZE = 0x100
EXTENDED_CONFIG_SPACE_SIZE = 0x1000
HEADER_SIZE = 0x40

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09  # 3 bytes: prog-if, sub-class, base class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
BAR_COUNT = 6
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F

STATUS_CAP_LIST = 0x0010
HEADER_TYPE_MASK = 0x7F
HEADER_TYPE_MULTIFUNCTION = 0x80

COMMAND_IO = 0x0001
COMMAND_MEMORY = 0x0002
COMMAND_MASTER = 0x0004
COMMAND_PARITY = 0x0040
COMMAND_SERR = 0x0100
COMMAND_INTX_DISABLE = 0x0400

BAR_SPACE_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8
BAR_MEM_FLAGS_MASK = 0xF
BAR_IO_FLAGS_MASK = 0x3
ROM_ENABLE = 0x1
ROM_ADDRESS_MASK = 0xFFFFF800


@dataclass(frozen=True, slots=True)
class Register:
    name: str
    offset: int
    size: int


HEADER_REGISTERS: tuple[Register, ...] = (
    Register("Vendor ID", VENDOR_ID, 2),
    Register("Device ID", DEVICE_ID, 2),
    Register("Command", COMMAND, 2),
    Register("Status", STATUS, 2),
    Register("Revision ID", REVISION_ID, 1),
    Register("Class Code", CLASS_CODE, 3),
    Register("Cache Line Size", CACHE_LINE_SIZE, 1),
    Register("Latency Timer", LATENCY_TIMER, 1),
    Register("Header Type", HEADER_TYPE, 1),
    Register("BIST", BIST, 1),
    *(Register(f"BAR{i}", BAR0 + 4 * i, 4) for i in range(BAR_COUNT)),
    Register("CardBus CIS", CARDBUS_CIS, 4),
    Register("Subsystem Vendor ID", SUBSYSTEM_VENDOR_ID, 2),
    Register("Subsystem ID", SUBSYSTEM_ID, 2),
    Register("Expansion ROM", ROM_ADDRESS, 4),
    Register("Capabilities Pointer", CAPABILITY_LIST, 1),
    Register("Reserved", CAPABILITY_LIST + 1, 7),
    Register("Interrupt Line", INTERRUPT_LINE, 1),
    Register("Interrupt Pin", INTERRUPT_PIN, 1),
    Register("Min_Gnt", MIN_GNT, 1),
    Register("Max_Lat", MAX_LAT, 1),
)


def bar_offset(index: int) -> int:
    return BAR0 + 4 * index


def u8(image: bytes | bytearray, offset: int) -> int:
    return image[offset]


def u16(image: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(image[offset : offset + 2], "little")


def u32(image: bytes | bytearray, offset: int) -> int:
    return int.from_bytes(image[offset : offset + 4], "little")


@dataclass(frozen=True, slots=True)
class Identity:
    """What a quirk table matches a function on."""

    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    class_code: int  # 24 bits: base class, sub-class, prog-if
    revision: int

    @classmethod
    def of(cls, image: bytes | bytearray) -> Identity:
        return cls(
            vendor=u16(image, VENDOR_ID),
            device=u16(image, DEVICE_ID),
            subsystem_vendor=u16(image, SUBSYSTEM_VENDOR_ID),
            subsystem_device=u16(image, SUBSYSTEM_ID),
            class_code=int.from_bytes(image[CLASS_CODE : CLASS_CODE + 3], "little"),
            revision=image[REVISION_ID],
        )

    def __str__(self) -> str:
        return (
            f"{self.vendor:04x}:{self.device:04x} "
            f"(subsystem {self.subsystem_vendor:04x}:{self.subsystem_device:04x}, "
            f"class {self.class_code:06x}, rev {self.revision:02x})"
        )
