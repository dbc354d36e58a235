"""Guest memory as the device sees it: IOVA ranges, and the rules for building them.

Each mapping is an IOVA range, its permissions, and, when the client sent a
file descriptor, the mmap of that fd (guest RAM in shared memory) and what
it maps (the file's device, inode and offset: two connections that send the
same RAM send different fds). Mappings without an fd (ROMs, the guest's view
of BARs, RAM that is not shared) are recorded as *unbacked*: they exist for
the bookkeeping the protocol requires but DMA into them fails.

A ``DmaTable`` is a sorted set of such mappings: a connection's own (what its
unmaps are checked against), and an IOMMU space's (``backends.space``: one
mapping of each identity, the one that carries it).

Rules, as VFIO type1 and the vfio-user specification have them: a new map
may not overlap an existing one (EEXIST); an unmap removes the mappings that
lie wholly inside its range and must find at least one (ENOENT), and may not
cut one in two (EINVAL); unmapping everything is one call. Errors are
``DmaError`` with the errno the client should get.
"""

from __future__ import annotations

import errno
import mmap
import os
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from mediator.vfio_abi import DMA_READ, DMA_WRITE

IOVA_LIMIT = 1 << 64


class DmaError(Exception):
    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value


# What a backed mapping maps: (st_dev, st_ino, file offset) of the client's fd.
MemorySource = tuple[int, int, int]


@dataclass(eq=False)
class DmaMapping:
    iova: int
    size: int
    flags: int  # DMA_READ | DMA_WRITE, what the device may do
    memory: mmap.mmap | None = field(default=None, repr=False)
    source: MemorySource | None = None

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def backed(self) -> bool:
        return self.memory is not None


class DmaTable:
    """IOVA -> host memory, sorted by IOVA."""

    def __init__(self, max_mappings: int | None = 65535) -> None:
        self.max_mappings = max_mappings
        self._mappings: list[DmaMapping] = []
        self._starts: list[int] = []

    def __len__(self) -> int:
        return len(self._mappings)

    def mappings(self) -> list[DmaMapping]:
        return list(self._mappings)

    @property
    def backed_bytes(self) -> int:
        return sum(m.size for m in self._mappings if m.backed)

    def conflict(self, iova: int, size: int) -> DmaMapping | None:
        """A mapping that overlaps ``[iova, iova+size)``, if any."""
        i = bisect_right(self._starts, iova)
        for other in self._mappings[max(0, i - 1) : i + 1]:
            if other.iova < iova + size and iova < other.end:
                return other
        return None

    def check(self, iova: int, size: int, flags: int) -> None:
        """Refuse what ``insert`` would refuse, before anything is mmapped or pinned."""
        check_request(iova, size, flags)
        if self.max_mappings is not None and len(self._mappings) >= self.max_mappings:
            raise DmaError(errno.ENOSPC, f"already {self.max_mappings} DMA mappings")
        other = self.conflict(iova, size)
        if other is not None:
            raise DmaError(
                errno.EEXIST, f"DMA range {iova:#x}+{size:#x} overlaps {other.iova:#x}+{other.size:#x}"
            )

    def prepare(self, iova: int, size: int, flags: int, fd: int | None, offset: int) -> DmaMapping:
        """A mapping ``insert`` will take, with its own mmap of ``fd`` (which stays the caller's)."""
        self.check(iova, size, flags)
        if fd is None:
            return DmaMapping(iova, size, flags)
        source = source_of(fd, offset)
        return DmaMapping(iova, size, flags, map_memory(fd, size, offset, flags), source)

    def insert(self, mapping: DmaMapping) -> None:
        self.check(mapping.iova, mapping.size, mapping.flags)
        i = bisect_right(self._starts, mapping.iova)
        self._mappings.insert(i, mapping)
        self._starts.insert(i, mapping.iova)

    def unmap(self, iova: int, size: int) -> list[DmaMapping]:
        """Remove and return the mappings inside ``[iova, iova+size)``; the caller releases them."""
        end = iova + size
        inside = [m for m in self._mappings if iova <= m.iova and m.end <= end]
        for m in self._mappings:
            if m.iova < end and iova < m.end and m not in inside:
                raise DmaError(errno.EINVAL, f"unmap {iova:#x}+{size:#x} would split {m.iova:#x}+{m.size:#x}")
        if not inside:
            raise DmaError(errno.ENOENT, f"nothing mapped in {iova:#x}+{size:#x}")
        self.remove(inside)
        return inside

    def unmap_all(self) -> list[DmaMapping]:
        removed = list(self._mappings)
        self.remove(removed)
        return removed

    def replace(self, old: DmaMapping, new: DmaMapping) -> None:
        """Put ``new`` where ``old`` is: the same range, so the order holds."""
        i = bisect_left(self._starts, old.iova)
        same_place = i < len(self._mappings) and self._mappings[i] is old
        if not same_place or (new.iova, new.size) != (old.iova, old.size):
            raise ValueError(f"{new} cannot replace {old}")
        self._mappings[i] = new

    def remove(self, mappings: list[DmaMapping]) -> None:
        gone = set(map(id, mappings))
        self._mappings = [m for m in self._mappings if id(m) not in gone]
        self._starts = [m.iova for m in self._mappings]

    def _find(self, iova: int, length: int, need: int) -> tuple[DmaMapping, int]:
        i = bisect_right(self._starts, iova) - 1
        if i < 0 or iova + length > self._mappings[i].end:
            raise DmaError(errno.EFAULT, f"DMA to {iova:#x}+{length:#x} is not inside one mapping")
        mapping = self._mappings[i]
        if mapping.memory is None:
            raise DmaError(errno.EFAULT, f"DMA to {iova:#x}: the mapping has no memory (no fd was sent)")
        if not mapping.flags & need:
            raise DmaError(errno.EPERM, f"DMA to {iova:#x}: mapping does not allow it")
        return mapping, iova - mapping.iova

    def read(self, iova: int, length: int) -> bytes:
        """What the device reads from guest memory."""
        mapping, at = self._find(iova, length, DMA_READ)
        assert mapping.memory is not None
        return mapping.memory[at : at + length]

    def write(self, iova: int, data: bytes) -> None:
        """What the device writes to guest memory."""
        mapping, at = self._find(iova, len(data), DMA_WRITE)
        assert mapping.memory is not None
        mapping.memory[at : at + len(data)] = data


def check_request(iova: int, size: int, flags: int) -> None:
    if size <= 0 or iova < 0 or iova + size > IOVA_LIMIT:
        raise DmaError(errno.EINVAL, f"bad DMA range {iova:#x}+{size:#x}")
    if flags & ~(DMA_READ | DMA_WRITE) or not flags & DMA_READ:
        raise DmaError(errno.EINVAL, f"unsupported DMA_MAP flags {flags:#x}")


def source_of(fd: int, offset: int) -> MemorySource:
    """What an fd maps at ``offset``: equal for two fds of the same memory."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise DmaError(e.errno or errno.EBADF, f"cannot stat the DMA fd: {e.strerror}") from None
    return st.st_dev, st.st_ino, offset


def map_memory(fd: int, size: int, offset: int, flags: int) -> mmap.mmap:
    """The daemon's own mmap of client memory; the caller keeps ``fd``."""
    if offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
        raise DmaError(errno.EINVAL, f"DMA_MAP offset {offset:#x} is not page-aligned")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if flags & DMA_WRITE else 0)
    try:
        if os.fstat(fd).st_size < offset + size:
            raise DmaError(errno.EINVAL, f"DMA_MAP of {size:#x} bytes at {offset:#x} runs past the file")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
    except OSError as e:
        raise DmaError(e.errno or errno.EINVAL, f"cannot mmap the DMA fd: {e.strerror}") from None


def release(mappings: list[DmaMapping]) -> None:
    for mapping in mappings:
        if mapping.memory is not None:
            mapping.memory.close()
            mapping.memory = None
