"""What every backend offers the virtual device, in VFIO's terms.

Region indexes follow vfio-pci: 0-5 are BAR0-5, 6 the expansion ROM, 7 the
config space. Sizes are the *real* sizes; rounding to what a guest can take
is the virtual device's business. Interrupts follow VFIO_DEVICE_SET_IRQS
(index, action, data), so the real backend hands them to the kernel as they
are. DMA goes through an IOMMU space (``backends.space``): each backend opens
in a home space of its own with nothing mapped and is moved into its
client's VM space and back (``enter``); the real one's space programs the
IOMMU, the simulator reads and writes guest memory through the space.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from mediator.backends.space import IommuSpace

if TYPE_CHECKING:  # the state machine's errors are backend errors: it imports this module
    from mediator.backends.migration import MigState

# mmap: a client maps BAR pages outside trap windows through the VFIO device fd; trap: no fd leaves.
BarAccess = Literal["mmap", "trap"]
BAR_ACCESS_MODES: tuple[BarAccess, ...] = get_args(BarAccess)


@dataclass(frozen=True)
class IrqCounts:
    intx: int
    msi: int
    msix: int


@dataclass(frozen=True)
class RegionInfo:
    size: int
    # (offset, size) areas a client may mmap through ``region_fd``; page-aligned.
    mappable: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class DirectAccess:
    """Where code outside Python (the C fast path, ``mediator.virt.fast_tables``) finds a region's bytes.

    Either ``fd`` (``pread``/``pwrite`` at ``file_offset`` + offset: a VFIO
    device fd) or ``memory`` (a writable buffer of the region's real size).
    An access touching a ``special`` range ((start, end) pairs) must go
    through the backend's methods: a register with a behaviour, an injected fault.
    """

    fd: int = -1
    file_offset: int = 0
    memory: bytearray | mmap.mmap | None = None
    special: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class IrqInfo:
    count: int
    flags: int


class BackendError(Exception):
    """The device failed an operation (an I/O error, a reset that did not happen).

    ``errno`` is what a client is told: EIO unless the failure had a better one.
    """

    errno = 5  # EIO


class Backend(Protocol):
    description: str
    config_size: int
    can_reset: bool  # the device has a reset method (FLR, PM, bus reset)
    home: IommuSpace  # where the device's DMA goes while no client holds it: nowhere
    peer_dma: str | None  # why peers' DMA to its BARs cannot be mapped; None when it can

    @property
    def iommu_group(self) -> int | None:
        """The IOMMU group it shares with other functions the daemon serves; None when alone."""
        ...

    def read_config(self, offset: int, length: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def region_info(self, index: int) -> RegionInfo:
        """Real size (0: not implemented) and mappable areas of BAR0-5 or the ROM."""
        ...

    def region_fd(self, index: int) -> tuple[int, int] | None:
        """(fd, file offset of the region) a client may mmap, or None."""
        ...

    def read_region(self, index: int, offset: int, length: int) -> bytes: ...

    def direct_access(self, index: int) -> DirectAccess | None:
        """Where region ``index`` (BAR0-5, 6 the ROM, 7 config) may be reached directly; None: not at all.

        Valid until the device is let go, taken back or closed.
        """
        ...

    def bar_memory(self, index: int, offset: int, size: int) -> mmap.mmap:
        """The daemon's own mapping of part of a BAR (page-aligned), as a peer's DMA target."""
        ...

    def write_region(self, index: int, offset: int, data: bytes) -> None: ...

    def irq_info(self, index: int) -> IrqInfo: ...

    def set_irqs(self, index: int, flags: int, start: int, count: int, data: Sequence[int]) -> None:
        """VFIO_DEVICE_SET_IRQS, already validated; ``data`` holds fds (-1: none) or bools."""
        ...

    def enter(self, space: IommuSpace) -> bool:
        """The device's DMA goes through ``space`` from now on (its home or a VM's).

        True when the move reset the device (a type1 group moves only with the device closed).
        """
        ...

    def reset(self) -> None:
        """A function reset: FLR, PM or whatever VFIO_DEVICE_RESET picks."""
        ...

    def bus_reset_obstacle(self) -> str | None:
        """Why a secondary bus reset is impossible now; None when it is possible.

        Possible when it resets nothing but this function and idle functions of its IOMMU group.
        """
        ...

    def bus_reset_reaches(self) -> tuple[str, ...]:
        """The other functions (BDFs) a bus reset of this one resets too."""
        ...

    def bus_reset(self) -> None: ...

    migration_state: MigState  # RUNNING for a device that does not migrate

    def migration_flags(self) -> int:
        """VFIO_MIGRATION_* the device supports (``mediator.backends.migration``); 0: none."""
        ...

    def set_migration_state(self, target: MigState) -> None:
        """Walk the kernel's arcs to ``target``; MigrationError with the kernel's errno if it cannot."""
        ...

    def read_migration_data(self, size: int) -> bytes:
        """Up to ``size`` bytes of the device's saved state (STOP_COPY, PRE_COPY); b"": none now."""
        ...

    def write_migration_data(self, data: bytes) -> None:
        """More of the state to resume from (RESUMING)."""
        ...

    def let_go(self) -> None:
        """Close the device's VFIO fds, so that a tool may bind it to another driver and back.

        Raises BackendError when that would close what another served function needs (its group).
        """
        ...

    def take_back(self, timeout: float) -> None:
        """Open the device again once it is bound to vfio-pci again (waiting up to ``timeout``)."""
        ...

    def close(self) -> None: ...
