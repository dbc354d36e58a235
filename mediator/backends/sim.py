"""The simulator: a device profile served from memory, with the kernel's VFIO semantics.

Config space is plain memory: every write that reaches the simulator lands,
so a write the policy should have stopped is visible in the image (and in
``config_writes``, the recent write log). BARs are memfds, created on first
use and sparse, so a 95.5 GiB device-memory BAR costs nothing until touched;
a client mmaps them through ``region_fd``.

Profile behaviours are hardware registers behind the mmappable pages (the
simulator never offers them for mmap, so every access reaches it):

- ``config-mirror``: the window reads and writes the *physical* config space,
  as NVIDIA GPUs do at BAR0+0x88000 - what the daemon's trap windows stop;
- ``irq-doorbell``: writing N raises vector N of the active interrupt index
  (MSI-X if it has eventfds, else MSI, else INTx);
- ``sticky-bits``: a register whose masked bits, once written as 1, stay
  set until a reset (NVLink link-disable bits: a guest cannot re-enable a link);
- ``read-only``: a window that ignores writes (to inject a register that
  does not hold what the daemon writes);
- ``dma-engine``: QEMU ``edu``-style registers (+0 source, +8 destination,
  +0x10 count, +0x18 command: bit 0 start, bit 1 BAR-to-guest, bit 2 raise
  vector 0 when done); a start copies between the BAR and guest memory at
  once, through the IOMMU space the device is in, and clears the start bit
  (bit 8 reports a fault: also when Bus Master Enable is off).

Interrupts follow VFIO_DEVICE_SET_IRQS as vfio-pci implements them: eventfd
triggers per vector, INTx automasked until unmasked, mask and unmask with a
pending bit, loopback triggers, and an INTx resample eventfd that unmasks.

Migration follows the kernel's v2 uAPI with STOP_COPY and P2P (the state
machine of ``mediator.backends.migration``): STOP_COPY snapshots the device's
state (its config image and the written extents of its BARs, found with
SEEK_DATA so a sparse BAR costs only what was written), RESUMING collects
one and the arc to STOP applies it; a stream that does not parse is EINVAL
and leaves the device in ERROR, which only a reset leaves.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from mediator.backends.base import BackendError, BarAccess, DirectAccess, IrqInfo, RegionInfo
from mediator.backends.dma import DmaError, DmaMapping
from mediator.backends.migration import MigrationError, MigState, path
from mediator.backends.profile import Behaviour, Faults, Profile, load_profile
from mediator.backends.space import IommuSpace
from mediator.errors import InputErrors
from mediator.pci.bars import BarType
from mediator.pci.registers import COMMAND, COMMAND_MASTER, Identity
from mediator.pci.rom import build_rom
from mediator.vfio_abi import (
    CONFIG_REGION,
    IRQ_COUNT,
    IRQ_ERR,
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE,
    IRQ_INTX,
    IRQ_MSI,
    IRQ_MSIX,
    IRQ_REQ,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    MIGRATION_P2P,
    MIGRATION_STOP_COPY,
    ROM_REGION,
)

CONFIG_WRITE_LOG = 1024
MIGRATION_FLAGS = MIGRATION_STOP_COPY | MIGRATION_P2P
MIGRATION_MAX = 64 << 20  # bytes of state a resume may bring: a client cannot fill our memory
_EXTENT = struct.Struct("<BQQ")  # region index, offset, length; then the bytes
PAGE = mmap.PAGESIZE
DMA_START = 0x1
DMA_TO_GUEST = 0x2
DMA_RAISE_IRQ = 0x4
DMA_FAULT = 0x100
DMA_MAX = 1 << 20


class _IrqLine:
    """One vector: its eventfd, mask and pending bits."""

    __slots__ = ("eventfd", "masked", "pending")

    def __init__(self) -> None:
        self.eventfd: int | None = None
        self.masked = False
        self.pending = False


class SimulatedFault(BackendError):
    """A failure the profile's ``[faults]`` asked for."""


class _SimulatedIommu:
    """An IOMMU whose pins are slow or fail, for the ``dma_map_*`` faults; DMA still goes by the tables."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults

    def map(self, mapping: DmaMapping, offset: int, size: int) -> None:
        if mapping.backed:  # only guest memory is pinned; a peer's BAR is mapped at once
            time.sleep(self.faults.dma_map_seconds_per_gib * size / (1 << 30))
            if self.faults.dma_map_fails:
                raise SimulatedFault("DMA map: Input/output error (injected)")

    def unmap(self, iova: int, size: int) -> None:
        """Nothing to undo."""

    def refusal(self, size: int) -> str | None:
        return None  # nothing is pinned

    def close(self) -> None:
        """Nothing to close."""


class SimBackend:
    def __init__(self, profile: Profile, bar_access: BarAccess = "mmap") -> None:
        self.profile = profile
        self.bar_access = bar_access
        self.description = f"simulated {profile.name} {Identity.of(profile.image)}"
        self.config = bytearray(profile.image)
        self.config_size = len(profile.image)
        self.can_reset = "function" in profile.resets
        self.config_writes: deque[tuple[int, bytes]] = deque(maxlen=CONFIG_WRITE_LOG)
        self.resets = 0  # every reset, bus resets included
        self.bus_resets = 0
        self.interrupts_raised = 0
        self._memory: dict[int, tuple[int, mmap.mmap]] = {}
        counts = {
            IRQ_INTX: profile.irqs.intx,
            IRQ_MSI: profile.irqs.msi,
            IRQ_MSIX: profile.irqs.msix,
            IRQ_ERR: 1,
            IRQ_REQ: 1,
        }
        self._irqs = {index: [_IrqLine() for _ in range(counts[index])] for index in range(IRQ_COUNT)}
        self._resample_fd: int | None = None
        self.home = IommuSpace(f"{profile.name}'s home", self._iommu())
        self.space = self.home
        self.peer_dma: str | None = None
        self.iommu_group: int | None = None
        self.migration_state = MigState.RUNNING
        self._saved = b""  # STOP_COPY's snapshot, as the client reads it
        self._saved_read = 0
        self._resumed = bytearray()  # RESUMING's incoming state

    # config space
    def _check_config(self, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > self.config_size:
            raise BackendError(f"config access {offset:#x}+{length} outside {self.config_size} bytes")

    def read_config(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset + length > self.config_size:
            self._check_config(offset, length)
        # Guest-sized reads only: the daemon's whole-space snapshots still work, as on a
        # device whose registers fail one by one.
        failing = self.profile.faults.config_read_eio
        if failing and length <= 8 and any(offset <= at < offset + length for at in failing):
            raise SimulatedFault(f"config read at {offset:#x}: Input/output error (injected)")
        return bytes(self.config[offset : offset + length])

    def write_config(self, offset: int, data: bytes) -> None:
        self._check_config(offset, len(data))
        self.config[offset : offset + len(data)] = data
        self.config_writes.append((offset, bytes(data)))

    # regions
    def _size(self, index: int) -> int:
        if index == ROM_REGION:
            return self.profile.rom_size
        if 0 <= index < len(self.profile.bar_sizes):
            return self.profile.bar_sizes[index]
        return 0

    def region_info(self, index: int) -> RegionInfo:
        size = self._size(index)
        if not size or index == ROM_REGION or BarType.of(self.profile.image, index).io:
            return RegionInfo(size)
        if self.bar_access == "trap":
            return RegionInfo(size)
        end = size - size % PAGE
        holes = sorted(
            (b.offset - b.offset % PAGE, -(-(b.offset + b.size) // PAGE) * PAGE)
            for b in self.profile.behaviours
            if b.bar == index
        )
        areas, cursor = [], 0
        for start, stop in holes:
            if start > cursor:
                areas.append((cursor, min(start, end) - cursor))
            cursor = max(cursor, stop)
        if cursor < end:
            areas.append((cursor, end - cursor))
        return RegionInfo(size, tuple(a for a in areas if a[1] > 0))

    def _region(self, index: int) -> tuple[int, mmap.mmap]:
        """The memfd and its mapping behind a BAR or the ROM, created on first use."""
        if index not in self._memory:
            size = self._size(index)
            if not size:
                raise BackendError(f"region {index} is not implemented")
            fd = os.memfd_create(f"vfio-mediator-{self.profile.name}-region{index}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                self._memory[index] = (fd, mmap.mmap(fd, size))
            except OSError:
                os.close(fd)
                raise
            if index == ROM_REGION and self.profile.rom_contents == "image":
                self._memory[index][1][:] = build_rom(Identity.of(self.profile.image), size)
        return self._memory[index]

    def memory(self, index: int) -> mmap.mmap:
        return self._region(index)[1]

    def region_fd(self, index: int) -> tuple[int, int] | None:
        if not self.region_info(index).mappable:
            return None
        return self._region(index)[0], 0

    def bar_memory(self, index: int, offset: int, size: int) -> mmap.mmap:
        return mmap.mmap(self._region(index)[0], size, offset=offset)

    def direct_access(self, index: int) -> DirectAccess | None:
        """The memory itself; the behaviours' registers and the injected config faults are special.

        Config writes made there are not in ``config_writes``, which logs ``write_config``'s.
        """
        if index == CONFIG_REGION:
            faulty = sorted(self.profile.faults.config_read_eio)
            return DirectAccess(memory=self.config, special=tuple((at, at + 1) for at in faulty))
        if not self._size(index):
            return None
        special = tuple((b.offset, b.offset + b.size) for b in self.profile.behaviours if b.bar == index)
        return DirectAccess(memory=self.memory(index), special=special)

    def _check_region(self, index: int, offset: int, length: int) -> None:
        size = self._size(index)
        if offset < 0 or length <= 0 or offset + length > size:
            raise BackendError(f"region {index} access {offset:#x}+{length} outside its {size} bytes")

    def _behaviour(self, index: int, offset: int, length: int) -> Behaviour | None:
        for behaviour in self.profile.behaviours:
            if behaviour.bar == index and behaviour.offset <= offset < behaviour.offset + behaviour.size:
                return behaviour
        return None

    def read_region(self, index: int, offset: int, length: int) -> bytes:
        self._check_region(index, offset, length)
        behaviour = self._behaviour(index, offset, length)
        if behaviour is not None and behaviour.kind == "config-mirror":
            config_offset = offset - behaviour.offset
            if config_offset + length <= self.config_size:
                return self.read_config(config_offset, length)
        return self.memory(index)[offset : offset + length]

    def write_region(self, index: int, offset: int, data: bytes) -> None:
        self._check_region(index, offset, len(data))
        if index == ROM_REGION:
            raise BackendError("the expansion ROM is read-only")
        behaviour = self._behaviour(index, offset, len(data))
        if behaviour is not None and behaviour.kind == "config-mirror":
            config_offset = offset - behaviour.offset
            if config_offset + len(data) <= self.config_size:
                self.write_config(config_offset, data)
            return
        memory = self.memory(index)
        if behaviour is not None and behaviour.kind == "read-only":
            return
        if behaviour is not None and behaviour.kind == "sticky-bits":
            at = behaviour.offset
            old = int.from_bytes(memory[at : at + 4], "little")
            memory[offset : offset + len(data)] = data
            new = int.from_bytes(memory[at : at + 4], "little")
            memory[at : at + 4] = ((new & ~behaviour.mask) | ((old | new) & behaviour.mask)).to_bytes(
                4, "little"
            )
            return
        memory[offset : offset + len(data)] = data
        if behaviour is not None and behaviour.kind == "irq-doorbell":
            self.raise_vector(int.from_bytes(memory[behaviour.offset : behaviour.offset + 4], "little"))
        elif behaviour is not None and behaviour.kind == "dma-engine":
            self._run_dma(index, behaviour.offset, memory)

    def _run_dma(self, index: int, base: int, memory: mmap.mmap) -> None:
        def register(n: int) -> int:
            return int.from_bytes(memory[base + 8 * n : base + 8 * n + 8], "little")

        command = register(3)
        if not command & DMA_START:
            return
        source, destination, count = register(0), register(1), register(2)
        command &= ~(DMA_START | DMA_FAULT)
        try:
            if not int.from_bytes(self.config[COMMAND : COMMAND + 2], "little") & COMMAND_MASTER:
                raise DmaError(0, "bus mastering is off")  # a function without it issues no requests
            if count > DMA_MAX:
                raise DmaError(0, "transfer too long")
            if command & DMA_TO_GUEST:
                self._check_region(index, source, count)
                self.space.write(destination, memory[source : source + count])
            else:
                self._check_region(index, destination, count)
                memory[destination : destination + count] = self.space.read(source, count)
        except (DmaError, BackendError):
            command |= DMA_FAULT
        memory[base + 0x18 : base + 0x20] = command.to_bytes(8, "little")
        if command & DMA_RAISE_IRQ and not command & DMA_FAULT:
            self.raise_vector(0)

    # interrupts
    def irq_info(self, index: int) -> IrqInfo:
        if index not in self._irqs:
            return IrqInfo(0, 0)
        flags = IRQ_INFO_EVENTFD
        if index == IRQ_INTX:
            flags |= IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED
        elif index in (IRQ_MSI, IRQ_MSIX):
            flags |= IRQ_INFO_NORESIZE
        return IrqInfo(len(self._irqs[index]), flags)

    def set_irqs(self, index: int, flags: int, start: int, count: int, data: Sequence[int]) -> None:
        lines = self._irqs[index]
        action = flags & (IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER)
        if action == IRQ_SET_ACTION_TRIGGER and flags & IRQ_SET_DATA_NONE and count == 0:
            for line in lines:
                line.eventfd, line.masked, line.pending = None, False, False
            return
        if flags & IRQ_SET_DATA_EVENTFD:
            if action == IRQ_SET_ACTION_TRIGGER:
                for i, fd in enumerate(data):
                    lines[start + i].eventfd = fd if fd >= 0 else None
            elif action == IRQ_SET_ACTION_UNMASK:  # INTx resample eventfd
                self._resample_fd = data[0] if data[0] >= 0 else None
            return
        chosen = (
            range(start, start + count)
            if flags & IRQ_SET_DATA_NONE
            else [start + i for i, on in enumerate(data) if on]
        )
        for vector in chosen:
            line = lines[vector]
            if action == IRQ_SET_ACTION_MASK:
                line.masked = True
            elif action == IRQ_SET_ACTION_UNMASK:
                line.masked = False
                if line.pending:
                    line.pending = False
                    self._signal(index, line)
            else:
                self._signal(index, line)

    def _signal(self, index: int, line: _IrqLine) -> None:
        if index == IRQ_INTX and line.masked and self._resample_fd is not None:
            try:
                os.eventfd_read(self._resample_fd)  # the guest's EOI arrived: unmask
                line.masked = False
            except BlockingIOError:
                pass
        if line.masked or line.eventfd is None:
            line.pending = True
            return
        os.eventfd_write(line.eventfd, 1)
        self.interrupts_raised += 1
        if index == IRQ_INTX:
            line.masked = True

    def raise_vector(self, vector: int) -> None:
        """The device signals ``vector`` of its active interrupt mode."""
        for index in (IRQ_MSIX, IRQ_MSI, IRQ_INTX):
            lines = self._irqs[index]
            if any(line.eventfd is not None for line in lines):
                if vector < len(lines):
                    self._signal(index, lines[vector])
                return

    # DMA
    def _iommu(self) -> _SimulatedIommu | None:
        faults = self.profile.faults
        return _SimulatedIommu(faults) if faults.dma_map_fails or faults.dma_map_seconds_per_gib else None

    def enter(self, space: IommuSpace) -> bool:
        if space.iommu is None:
            space.iommu = self._iommu()  # the first device sets the VM's IOMMU, as a real one's does
        self.space = space
        return False

    def bus_reset_obstacle(self) -> str | None:
        return None if "bus" in self.profile.resets else "the profile has no bus reset"

    def bus_reset_reaches(self) -> tuple[str, ...]:
        return ()

    def bus_reset(self) -> None:
        """A secondary bus reset; to the simulator the same as a function reset."""
        self.reset()
        self.bus_resets += 1

    def reset(self) -> None:
        """A function-level reset: config registers and sticky bits return to their power-on values."""
        faults = self.profile.faults
        if faults.reset_seconds:
            time.sleep(faults.reset_seconds)
        if faults.reset_fails:
            raise SimulatedFault("reset: Input/output error (injected)")
        self.config[:] = self.profile.image
        for behaviour in self.profile.behaviours:
            if behaviour.kind == "sticky-bits":
                self.memory(behaviour.bar)[behaviour.offset : behaviour.offset + 4] = bytes(4)
        for lines in self._irqs.values():
            for line in lines:
                line.masked = line.pending = False
        self.migration_state = MigState.RUNNING  # VFIO: a reset returns the device to RUNNING
        self._saved, self._resumed = b"", bytearray()
        self.resets += 1

    # migration
    def migration_flags(self) -> int:
        return MIGRATION_FLAGS

    def set_migration_state(self, target: MigState) -> None:
        for step in path(self.migration_state, target, MIGRATION_FLAGS):
            if step == MigState.STOP_COPY:
                self._saved, self._saved_read = self._snapshot(), 0
            elif step == MigState.RESUMING:
                self._resumed = bytearray()
            elif self.migration_state == MigState.RESUMING:
                try:
                    self._restore(bytes(self._resumed))
                except MigrationError:
                    self.migration_state = MigState.ERROR
                    raise
                finally:
                    self._resumed = bytearray()
            elif self.migration_state == MigState.STOP_COPY:
                self._saved = b""
            self.migration_state = step

    def read_migration_data(self, size: int) -> bytes:
        if self.migration_state != MigState.STOP_COPY:
            raise MigrationError(errno.EINVAL, f"no migration data to read in {self.migration_state.name}")
        chunk = self._saved[self._saved_read : self._saved_read + size]
        self._saved_read += len(chunk)
        return chunk

    def write_migration_data(self, data: bytes) -> None:
        if self.migration_state != MigState.RESUMING:
            raise MigrationError(errno.EINVAL, f"no migration data to write in {self.migration_state.name}")
        if len(self._resumed) + len(data) > MIGRATION_MAX:
            raise MigrationError(errno.EFBIG, f"more than {MIGRATION_MAX} bytes of state for this device")
        self._resumed += data

    def _snapshot(self) -> bytes:
        out = bytearray(struct.pack("<I", self.config_size) + self.config)
        for index, (fd, memory) in sorted(self._memory.items()):
            if index == ROM_REGION:
                continue
            for start, stop in _written_extents(fd, self._size(index)):
                out += _EXTENT.pack(index, start, stop - start) + memory[start:stop]
        return bytes(out)

    def _restore(self, state: bytes) -> None:
        (size,) = struct.unpack_from("<I", state) if len(state) >= 4 else (-1,)
        if size != self.config_size or len(state) < 4 + size:
            raise MigrationError(errno.EINVAL, "the device state does not fit this device's config space")
        config, at = state[4 : 4 + size], 4 + size
        extents = []
        while at < len(state):
            if len(state) - at < _EXTENT.size:
                raise MigrationError(errno.EINVAL, "the device state ends inside an extent")
            index, offset, length = _EXTENT.unpack_from(state, at)
            at += _EXTENT.size
            if index == ROM_REGION or offset + length > self._size(index) or at + length > len(state):
                raise MigrationError(errno.EINVAL, f"the device state has bytes outside region {index}")
            extents.append((index, offset, state[at : at + length]))
            at += length
        self.config[:] = config
        for index, offset, data in extents:
            self.memory(index)[offset : offset + len(data)] = data

    def let_go(self) -> None:
        """Nothing to close: the simulator holds no kernel fds."""

    def take_back(self, timeout: float) -> None:
        """The device as its profile file says now: a wipe tool may have changed it (identity, ROM)."""
        del timeout
        try:
            profile = load_profile(Path(self.profile.source))
        except InputErrors as e:
            raise BackendError(f"the profile cannot be read again: {e}") from None
        self.profile = profile
        self.config[:] = profile.image
        self.config_size = len(profile.image)
        if ROM_REGION in self._memory:  # built again, from what the device says it is now
            fd, memory = self._memory.pop(ROM_REGION)
            memory.close()
            os.close(fd)

    def close(self) -> None:
        for fd, memory in self._memory.values():
            memory.close()
            os.close(fd)
        self._memory.clear()


def _written_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) runs of a memfd that hold data: a sparse BAR's untouched pages are holes."""
    extents, at = [], 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past ``at``
                break
            raise
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, stop))
        at = stop
    return extents
