"""The client's DMA: its own mappings, placed in the IOMMU space the device is in.

The connection's ``DmaTable`` is what the protocol's rules are checked
against (an overlap with its own maps is EEXIST, an unmap must find its own
maps whole); the space (``backends.space``) programs the IOMMU, once for
RAM that several devices of one VM map, pinning in the background: a map
is answered once pinned or after ``REPLY_WAIT_SECONDS``, whichever is first. The device sits in
its backend's home space, where nothing is mapped, until it is moved into
its client's VM space, and goes home again when the client's references are
gone. A map the space refuses leaves nothing behind; an unmap releases the
connection's references whatever the IOMMU says.
"""

from __future__ import annotations

import errno

from mediator.backends.base import Backend, BackendError
from mediator.backends.dma import DmaError, DmaMapping, DmaTable, release
from mediator.backends.pinning import REPLY_WAIT_SECONDS
from mediator.backends.space import IommuSpace
from mediator.virt.errors import DeviceError, device_error
from mediator.virt.events import DeviceEvents


class DmaSpace:
    def __init__(self, backend: Backend, max_mappings: int, events: DeviceEvents) -> None:
        self.backend = backend
        self.max_mappings = max_mappings
        self.table = DmaTable(max_mappings)
        self.events = events
        self.space: IommuSpace = backend.home

    def __len__(self) -> int:
        return len(self.table)

    def move_to(self, space: IommuSpace) -> bool:
        """Put the device (and its DMA) into ``space``, only while the client has nothing mapped.

        True when the move reset the device.
        """
        if len(self.table):
            raise DeviceError(
                errno.EBUSY, f"{len(self.table)} DMA mappings are still held in {self.space.name}"
            )
        if space is self.space:
            return False
        try:
            reset = self.backend.enter(space)
        except BackendError as e:
            raise device_error(e) from None
        self.space = space
        return reset

    def map(self, iova: int, size: int, flags: int, fd: int | None, offset: int) -> None:
        """Map client memory; ``fd`` stays the caller's (the mapping keeps its own mmap)."""
        try:
            mapping = self.table.prepare(iova, size, flags, fd, offset)
        except DmaError as e:
            raise DeviceError(e.errno, str(e)) from None
        try:
            self.space.acquire(mapping)
        except BaseException as e:
            release([mapping])
            if isinstance(e, DmaError):
                raise DeviceError(e.errno, str(e)) from None
            if isinstance(e, BackendError):
                raise device_error(e) from None
            raise
        self.table.insert(mapping)
        self._changed()
        self.space.settle(REPLY_WAIT_SECONDS)  # memory that pins quickly is answered pinned

    def unmap(self, iova: int, size: int) -> None:
        try:
            removed = self.table.unmap(iova, size)
        except DmaError as e:
            raise DeviceError(e.errno, str(e)) from None
        self._release(removed)

    def unmap_all(self) -> None:
        self._release(self.table.unmap_all())

    def _release(self, mappings: list[DmaMapping]) -> None:
        try:
            self.space.release(mappings)
        except BackendError as e:
            raise device_error(e) from None
        finally:
            release(mappings)
            self._changed()

    def _changed(self) -> None:
        self.events.dma_changed(len(self.table), self.table.backed_bytes)
