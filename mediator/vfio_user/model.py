"""The device model: all the vfio-user server knows of a device (rust-vmm's ``ServerBackend``).

The service turns each command into calls on a ``DeviceModel`` and each
answer into a reply; it never sees what is behind it (the virtual device,
its plan, its backend). A model refuses a request by raising
``mediator.errors.Refused`` with the errno the client gets; anything else it
raises is a bug, answered EIO and logged. Region and interrupt indexes are
vfio-pci's (``mediator.vfio_abi``). ``RequestEvents`` is what the service
reports of each request (the daemon's metrics implement it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class RegionDescription(Protocol):
    @property
    def size(self) -> int:
        """The size the guest sees; 0: the region is not implemented."""
        ...

    @property
    def writable(self) -> bool: ...

    @property
    def mmap_areas(self) -> tuple[tuple[int, int], ...]:
        """(offset, size) areas a client may mmap through ``mapping``; page-aligned."""
        ...

    @property
    def mapping(self) -> tuple[int, int] | None:
        """(fd, file offset of the region) to mmap the areas through, borrowed; None: not mappable."""
        ...


class IrqDescription(Protocol):
    @property
    def count(self) -> int: ...

    @property
    def flags(self) -> int:
        """VFIO_IRQ_INFO_* flags."""
        ...


class MigrationModel(Protocol):
    """A device's VFIO migration v2: state by the kernel's arcs, and the stream a client copies."""

    @property
    def flags(self) -> int:
        """VFIO_MIGRATION_* offered; 0: the device does not migrate."""
        ...

    @property
    def state(self) -> int: ...

    def set_state(self, value: int) -> None: ...

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the stream; fewer: no more now (STOP_COPY: the end)."""
        ...

    def write(self, data: bytes) -> None: ...


class DeviceModel(Protocol):
    @property
    def refusal(self) -> str | None:
        """Why the device must not be served now (every request is refused); None while it may be."""
        ...

    @property
    def can_reset(self) -> bool: ...

    @property
    def max_dma_mappings(self) -> int: ...

    def region(self, index: int) -> RegionDescription: ...

    def read_region(self, index: int, offset: int, length: int) -> bytes: ...

    def write_region(self, index: int, offset: int, data: bytes) -> None: ...

    def irq_info(self, index: int) -> IrqDescription: ...

    def set_irqs(
        self, index: int, flags: int, start: int, count: int, *, fds: Sequence[int] = (), bools: bytes = b""
    ) -> None:
        """VFIO_DEVICE_SET_IRQS; on success the model owns ``fds``, on a refusal the caller does."""
        ...

    def dma_map(self, iova: int, size: int, flags: int, fd: int | None, offset: int) -> None:
        """Map client memory (``fd`` stays the caller's), or record an fd-less mapping."""
        ...

    def dma_unmap(self, iova: int, size: int) -> None: ...

    def dma_unmap_all(self) -> None: ...

    def reset(self) -> None:
        """The client's DEVICE_RESET."""
        ...

    @property
    def migration(self) -> MigrationModel: ...

    def fast_path(self) -> FastPathTables | None:
        """The device's accesses compiled for the C fast path, for one session; None: Python serves all."""
        ...


class FastPathTables(Protocol):
    """What the C loop executes for a device (``mediator.virt.fast_tables``)."""

    @property
    def device(self) -> Any:
        """The ``struct fp_device *``."""
        ...

    def publish(self) -> None:
        """Report what the loop counted for the device (it is not running)."""
        ...

    def close(self) -> None:
        """The session is over: the tables give back what they point at."""
        ...


class RequestEvents(Protocol):
    def request(self, command: int, seconds: float) -> None:
        """One request handled, taking ``seconds``."""
        ...

    def requests(self, command: int, count: int, buckets: Sequence[int], seconds: float) -> None:
        """``count`` requests handled elsewhere (the C fast path) taking ``seconds`` in all,
        by bucket of ``latency_bounds`` (the overflow last)."""
        ...

    @property
    def latency_bounds(self) -> tuple[float, ...]:
        """The upper bounds (seconds) of the buckets ``requests`` counts in."""
        ...

    def request_failed(self, command: int, errno_value: int) -> None:
        """One request answered with ``errno_value``."""
        ...


class NoRequestEvents:
    latency_bounds: tuple[float, ...] = ()

    def request(self, command: int, seconds: float) -> None:
        pass

    def requests(self, command: int, count: int, buckets: Sequence[int], seconds: float) -> None:
        pass

    def request_failed(self, command: int, errno_value: int) -> None:
        pass
