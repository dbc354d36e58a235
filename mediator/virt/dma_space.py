"""The client's DMA space: the mappings it made with DMA_MAP, and the backend's IOMMU programming.

Each map is recorded in the ``DmaTable`` (which checks overlaps and mmaps a
backed mapping's memory) and then handed to the backend (the real one maps
it into the IOMMU; the simulator reaches guest memory through the table). A
map the backend refuses is taken out of the table again, so nothing is ever
half-mapped; an unmap releases the memory whatever the backend says.
"""

from __future__ import annotations

from mediator.backends.base import Backend, BackendError
from mediator.backends.dma import DmaError, DmaMapping, DmaTable, release
from mediator.virt.errors import DeviceError, device_error
from mediator.virt.events import DeviceEvents


class DmaSpace:
    def __init__(self, backend: Backend, max_mappings: int, events: DeviceEvents) -> None:
        self.backend = backend
        self.table = DmaTable(max_mappings)
        self.events = events
        backend.attach_dma(self.table)

    def __len__(self) -> int:
        return len(self.table)

    def map(self, iova: int, size: int, flags: int, fd: int | None, offset: int) -> None:
        """Map client memory; ``fd`` stays the caller's (the mapping keeps its own mmap)."""
        try:
            mapping = self.table.map(iova, size, flags, fd, offset)
        except DmaError as e:
            raise DeviceError(e.errno, str(e)) from None
        try:
            self.backend.dma_map(mapping)
        except BaseException as e:
            release(self.table.unmap(iova, size))
            if isinstance(e, BackendError):
                raise device_error(e) from None
            raise
        self._changed()

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
            for mapping in mappings:
                self.backend.dma_unmap(mapping)
        except BackendError as e:
            raise device_error(e) from None
        finally:
            release(mappings)
            self._changed()

    def _changed(self) -> None:
        self.events.dma_changed(len(self.table), self.table.backed_bytes)
