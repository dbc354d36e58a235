"""Capability IDs, names and lengths, standard (0x40-0xFF) and extended (0x100-0xFFF).

Lengths follow the kernel's ``pci_cap_length``/``pci_ext_cap_length`` tables and
their variable-length rules (``vfio_cap_len``, ``vfio_ext_cap_len``,
``vfio_vc_cap_len``), extended to the IDs the kernel does not size (it only
hides those, so it never needs their length; we hide their *bodies*, so we do).
``None`` means the specification gives no length we can compute from the
capability itself: the chain walker then gives the capability every byte up
to the next capability in the same space.

Every length function reads only inside the image and returns a value of at
least the header size, so a hostile image cannot make it fail.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from mediator.pci.registers import u8, u16, u32


class CapKind(StrEnum):
    STD = "std"
    EXT = "ext"


STD_HEADER_SIZE = 2  # ID, next
EXT_HEADER_SIZE = 4  # ID (16), version (4), next (12)

# Standard capability IDs (PCI Code and ID Assignment Specification).
PM = 0x01
AGP = 0x02
VPD = 0x03
SLOT_ID = 0x04
MSI = 0x05
CHSWP = 0x06
PCIX = 0x07
HT = 0x08
VENDOR = 0x09
DEBUG = 0x0A
CCRC = 0x0B
SHPC = 0x0C
SSVID = 0x0D
AGP3 = 0x0E
SECURE = 0x0F
EXP = 0x10
MSIX = 0x11
SATA = 0x12
AF = 0x13
EA = 0x14
FPB = 0x15

STD_NAMES: dict[int, str] = {
    0x00: "Null",
    PM: "Power Management",
    AGP: "AGP",
    VPD: "Vital Product Data",
    SLOT_ID: "Slot Identification",
    MSI: "MSI",
    CHSWP: "CompactPCI Hot Swap",
    PCIX: "PCI-X",
    HT: "HyperTransport",
    VENDOR: "Vendor Specific",
    DEBUG: "Debug Port",
    CCRC: "CompactPCI Central Resource Control",
    SHPC: "PCI Hot-Plug (SHPC)",
    SSVID: "Bridge Subsystem Vendor ID",
    AGP3: "AGP 8x",
    SECURE: "Secure Device",
    EXP: "PCI Express",
    MSIX: "MSI-X",
    SATA: "SATA HBA",
    AF: "Advanced Features",
    EA: "Enhanced Allocation",
    FPB: "Flattening Portal Bridge",
}

# Extended capability IDs (pciutils lib/header.h, kernel pci_regs.h).
NULL = 0x00
AER = 0x01
VC = 0x02
DSN = 0x03
PWR = 0x04
RCLD = 0x05
RCILC = 0x06
RCEC = 0x07
MFVC = 0x08
VC9 = 0x09
RCRB = 0x0A
VSEC = 0x0B
CAC = 0x0C
ACS = 0x0D
ARI = 0x0E
ATS = 0x0F
SRIOV = 0x10
MRIOV = 0x11
MCAST = 0x12
PRI = 0x13
AMD_XXX = 0x14
REBAR = 0x15
DPA = 0x16
TPH = 0x17
LTR = 0x18
SECPCI = 0x19
PMUX = 0x1A
PASID = 0x1B
LNR = 0x1C
DPC = 0x1D
L1SS = 0x1E
PTM = 0x1F
MPCIE = 0x20
FRS = 0x21
RTR = 0x22
DVSEC = 0x23
VF_REBAR = 0x24
DLF = 0x25
PL_16GT = 0x26
LMR = 0x27
HIER_ID = 0x28
NPEM = 0x29
PL_32GT = 0x2A
ALT_PROT = 0x2B
SFI = 0x2C
SHADOW_FN = 0x2D
DOE = 0x2E
DEV3 = 0x2F
IDE = 0x30
PL_64GT = 0x31

EXT_NAMES: dict[int, str] = {
    NULL: "Null",
    AER: "Advanced Error Reporting",
    VC: "Virtual Channel",
    DSN: "Device Serial Number",
    PWR: "Power Budgeting",
    RCLD: "Root Complex Link Declaration",
    RCILC: "Root Complex Internal Link Control",
    RCEC: "Root Complex Event Collector Endpoint Association",
    MFVC: "Multi-Function Virtual Channel",
    VC9: "Virtual Channel (MFVC present)",
    RCRB: "RCRB Header",
    VSEC: "Vendor-Specific",
    CAC: "Configuration Access Correlation",
    ACS: "Access Control Services",
    ARI: "Alternative Routing-ID Interpretation",
    ATS: "Address Translation Service",
    SRIOV: "Single Root I/O Virtualization",
    MRIOV: "Multi-Root I/O Virtualization",
    MCAST: "Multicast",
    PRI: "Page Request Interface",
    AMD_XXX: "AMD Reserved",
    REBAR: "Resizable BAR",
    DPA: "Dynamic Power Allocation",
    TPH: "TPH Requester",
    LTR: "Latency Tolerance Reporting",
    SECPCI: "Secondary PCI Express",
    PMUX: "Protocol Multiplexing",
    PASID: "Process Address Space ID",
    LNR: "LN Requester",
    DPC: "Downstream Port Containment",
    L1SS: "L1 PM Substates",
    PTM: "Precision Time Measurement",
    MPCIE: "PCI Express over M-PHY",
    FRS: "FRS Queueing",
    RTR: "Readiness Time Reporting",
    DVSEC: "Designated Vendor-Specific",
    VF_REBAR: "VF Resizable BAR",
    DLF: "Data Link Feature",
    PL_16GT: "Physical Layer 16.0 GT/s",
    LMR: "Lane Margining at the Receiver",
    HIER_ID: "Hierarchy ID",
    NPEM: "Native PCIe Enclosure Management",
    PL_32GT: "Physical Layer 32.0 GT/s",
    ALT_PROT: "Alternate Protocol",
    SFI: "System Firmware Intermediary",
    SHADOW_FN: "Shadow Functions",
    DOE: "Data Object Exchange",
    DEV3: "Device 3",
    IDE: "Integrity and Data Encryption",
    PL_64GT: "Physical Layer 64.0 GT/s",
    0x32: "Flit Logging",
    0x33: "Flit Performance Measurement",
    0x34: "Flit Error Injection",
    0x35: "Streamlined Virtual Channel",
    0x36: "MMIO Register Block Locator",
    0x37: "NOP Flit",
    0x38: "Scalable I/O Virtualization",
    0x39: "Physical Layer 128.0 GT/s",
    0x3A: "Captured Data",
}

# PCI Express capability fields used to size other capabilities.
EXP_FLAGS = 0x02
EXP_FLAGS_VERSION = 0x000F
EXP_FLAGS_TYPE_SHIFT = 4
EXP_TYPE_ENDPOINT = 0x0
EXP_TYPE_LEGACY_ENDPOINT = 0x1
EXP_TYPE_ROOT_PORT = 0x4
EXP_TYPE_RC_END = 0x9
EXP_TYPE_RC_EC = 0xA
EXP_LNKCAP = 0x0C
EXP_LNKCAP_WIDTH_SHIFT = 4
MAX_LINK_WIDTH = 32


def capability_name(kind: CapKind, cap_id: int) -> str:
    names = STD_NAMES if kind is CapKind.STD else EXT_NAMES
    return names.get(cap_id, f"Unknown {cap_id:#04x}" if kind is CapKind.STD else f"Unknown {cap_id:#06x}")


def is_known(kind: CapKind, cap_id: int) -> bool:
    return cap_id in (STD_NAMES if kind is CapKind.STD else EXT_NAMES)


def header_size(kind: CapKind) -> int:
    return STD_HEADER_SIZE if kind is CapKind.STD else EXT_HEADER_SIZE


def body_offset(kind: CapKind, cap_id: int) -> int:
    """Where a capability's registers start, past the headers that describe it."""
    if kind is CapKind.STD:
        return 3 if cap_id == VENDOR else STD_HEADER_SIZE  # vendor: ID, next, length
    return {VSEC: 8, DVSEC: 10}.get(cap_id, EXT_HEADER_SIZE)


class LengthContext:
    """What sizing some capabilities needs to know about the rest of the function."""

    __slots__ = ("image", "pcie_offset")

    def __init__(self, image: bytes, pcie_offset: int | None) -> None:
        self.image = image
        self.pcie_offset = pcie_offset

    def byte(self, offset: int) -> int:
        return u8(self.image, offset) if offset < len(self.image) else 0

    def word(self, offset: int) -> int:
        return u16(self.image, offset) if offset + 2 <= len(self.image) else 0

    def dword(self, offset: int) -> int:
        return u32(self.image, offset) if offset + 4 <= len(self.image) else 0

    def pcie_type(self) -> int | None:
        if self.pcie_offset is None:
            return None
        return (self.word(self.pcie_offset + EXP_FLAGS) >> EXP_FLAGS_TYPE_SHIFT) & 0xF

    def link_width(self) -> int:
        """Maximum link width from the PCIe capability; the widest possible if unknown."""
        if self.pcie_offset is None:
            return MAX_LINK_WIDTH
        width = (self.dword(self.pcie_offset + EXP_LNKCAP) >> EXP_LNKCAP_WIDTH_SHIFT) & 0x3F
        return width or MAX_LINK_WIDTH


Sizer = Callable[[LengthContext, int], int | None]


def _fixed(length: int) -> Sizer:
    return lambda _ctx, _pos: length


def _msi_length(ctx: LengthContext, pos: int) -> int:
    flags = ctx.word(pos + 2)
    length = 10
    if flags & 0x0080:  # 64-bit address
        length += 4
    if flags & 0x0100:  # per-vector masking
        length += 10
    return length


def _pcix_length(ctx: LengthContext, pos: int) -> int:
    return 24 if (ctx.word(pos + 2) >> 12) & 0x3 else 8


def _ht_length(ctx: LengthContext, pos: int) -> int:
    return 24 if ctx.byte(pos + 3) & 0xE0 else 28


def _vendor_length(ctx: LengthContext, pos: int) -> int:
    return ctx.byte(pos + 2)


def _pcie_length(ctx: LengthContext, pos: int) -> int:
    flags = ctx.word(pos + EXP_FLAGS)
    rc_endpoint = (flags >> EXP_FLAGS_TYPE_SHIFT) & 0xF == EXP_TYPE_RC_END
    if flags & EXP_FLAGS_VERSION == 1:
        return 0x0C if rc_endpoint else 0x14
    if rc_endpoint:
        return 0x2C
    port_types = {EXP_TYPE_ROOT_PORT, 0x5, 0x6, 0x7, 0x8, EXP_TYPE_RC_EC}
    return 0x3C if (flags >> EXP_FLAGS_TYPE_SHIFT) & 0xF in port_types else 0x34


def _sata_length(ctx: LengthContext, pos: int) -> int:
    return 16 if ctx.byte(pos + 4) & 0xF == 0xF else 8


def _ea_length(ctx: LengthContext, pos: int) -> int:
    entries = ctx.byte(pos + 2) & 0x3F
    length = 4
    for _ in range(entries):
        entry_size = (ctx.dword(pos + length) & 0x7) + 1
        length += 4 * entry_size
        if pos + length >= 0x100:
            break
    return length


STD_SIZERS: dict[int, Sizer] = {
    NULL: _fixed(STD_HEADER_SIZE),
    PM: _fixed(8),
    AGP: _fixed(12),
    VPD: _fixed(8),
    SLOT_ID: _fixed(4),
    MSI: _msi_length,
    CHSWP: _fixed(4),
    PCIX: _pcix_length,
    HT: _ht_length,
    VENDOR: _vendor_length,
    DEBUG: _fixed(4),
    SHPC: _fixed(8),
    SSVID: _fixed(8),
    AGP3: _fixed(12),
    EXP: _pcie_length,
    MSIX: _fixed(12),
    SATA: _sata_length,
    AF: _fixed(6),
    EA: _ea_length,
}


def _aer_length(ctx: LengthContext, _pos: int) -> int:
    # 0x2C for functions, 0x38 with the Root Port registers; the TLP prefix log
    # that may follow is left to the extent rule (the next capability bounds it).
    return 0x38 if ctx.pcie_type() in (EXP_TYPE_ROOT_PORT, EXP_TYPE_RC_EC) else 0x2C


def _vc_length(ctx: LengthContext, pos: int) -> int:
    extended_vcs = ctx.dword(pos + 4) & 0x7
    cap2 = ctx.dword(pos + 8)
    phases = 128 if cap2 & 0x4 else 64 if cap2 & 0x2 else 32 if cap2 & 0x1 else 0
    length = 0x10 + (1 + extended_vcs) * 0x0C
    if phases:
        length = (length + 15) // 16 * 16 + phases * 4 // 8
    return length


def _rcld_length(ctx: LengthContext, pos: int) -> int:
    return 0x10 + 0x10 * ((ctx.dword(pos + 4) >> 8) & 0xFF)


def _vendor_header_length(ctx: LengthContext, pos: int) -> int:
    return ctx.dword(pos + 4) >> 20


def _acs_length(ctx: LengthContext, pos: int) -> int:
    if ctx.byte(pos + 4) & 0x20:  # egress control vector present
        bits = ctx.byte(pos + 5) or 256
        return 8 + (bits + 31) // 32 * 4
    return 8


def _rebar_length(ctx: LengthContext, pos: int) -> int:
    return 4 + 8 * ((ctx.byte(pos + 8) & 0xE0) >> 5)


def _dpa_length(ctx: LengthContext, pos: int) -> int:
    return 0x10 + (ctx.byte(pos + 4) & 0x1F) + 1


def _tph_length(ctx: LengthContext, pos: int) -> int:
    cap = ctx.dword(pos + 4)
    if cap & 0x600 == 0x200:  # steering-tag table lives in the capability
        return 0x0C + ((cap >> 16) & 0x7FF) * 2 + 2
    return 0x0C


def _secpci_length(ctx: LengthContext, _pos: int) -> int:
    return 0x0C + 2 * ctx.link_width()


def _dpc_length(ctx: LengthContext, pos: int) -> int:
    return 0x5C if ctx.word(pos + 4) & 0x20 else 0x18


def _per_lane_length(base: int, bytes_per_lane: int) -> Sizer:
    return lambda ctx, _pos: base + (bytes_per_lane * ctx.link_width() + 3) // 4 * 4


EXT_SIZERS: dict[int, Sizer] = {
    NULL: _fixed(EXT_HEADER_SIZE),
    AER: _aer_length,
    VC: _vc_length,
    DSN: _fixed(12),
    PWR: _fixed(16),
    RCLD: _rcld_length,
    RCILC: _fixed(12),
    RCEC: _fixed(12),
    MFVC: _vc_length,
    VC9: _vc_length,
    RCRB: _fixed(0x14),
    VSEC: _vendor_header_length,
    CAC: _fixed(8),
    ACS: _acs_length,
    ARI: _fixed(8),
    ATS: _fixed(8),
    SRIOV: _fixed(0x40),
    MCAST: _fixed(0x30),
    PRI: _fixed(0x10),
    REBAR: _rebar_length,
    DPA: _dpa_length,
    TPH: _tph_length,
    LTR: _fixed(8),
    SECPCI: _secpci_length,
    PASID: _fixed(8),
    LNR: _fixed(8),
    DPC: _dpc_length,
    L1SS: _fixed(0x10),
    PTM: _fixed(0x0C),
    FRS: _fixed(0x10),
    RTR: _fixed(0x0C),
    DVSEC: _vendor_header_length,
    VF_REBAR: _rebar_length,
    DLF: _fixed(0x0C),
    PL_16GT: _per_lane_length(0x20, 1),
    LMR: _per_lane_length(0x08, 4),
    NPEM: _fixed(0x10),
    PL_32GT: _per_lane_length(0x20, 1),
    DOE: _fixed(0x18),
    DEV3: _fixed(0x10),
    PL_64GT: _per_lane_length(0x20, 1),
}


def specified_length(kind: CapKind, cap_id: int, ctx: LengthContext, pos: int) -> int | None:
    """The capability's length from its ID and contents, or None when unknown.

    Never shorter than the capability header: a vendor capability that claims
    a length of 0 still owns its ID and next pointer.
    """
    sizer = (STD_SIZERS if kind is CapKind.STD else EXT_SIZERS).get(cap_id)
    if sizer is None:
        return None
    length = sizer(ctx, pos)
    if length is None:
        return None
    return max(length, header_size(kind))


def vsec_id(image: bytes, pos: int) -> tuple[int, int]:
    """(VSEC ID, revision) of an extended vendor-specific capability."""
    header = LengthContext(image, None).dword(pos + 4)
    return header & 0xFFFF, (header >> 16) & 0xF


def dvsec_id(image: bytes, pos: int) -> tuple[int, int]:
    """(DVSEC vendor ID, DVSEC ID) of a designated vendor-specific capability."""
    ctx = LengthContext(image, None)
    return ctx.word(pos + 4), ctx.word(pos + 8)
