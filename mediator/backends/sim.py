"""The simulator: a device profile served from memory.

Config space is plain memory: every write that reaches the simulator lands,
so a write the policy should have stopped is visible in the image (and in
``config_writes``, the recent write log). BARs are memfds, created on first
use and sparse, so a 95.5 GiB device-memory BAR costs nothing until touched
and can later be handed to a VMM to mmap. Profile behaviours model what real
hardware does behind the config filter: a ``config-mirror`` window reads and
writes the *physical* config space through a BAR, as NVIDIA GPUs do at
BAR0+0x88000, which is exactly what the daemon's trap windows must stop.
"""

from __future__ import annotations

import mmap
import os
from collections import deque

from mediator.backends.base import ROM_REGION, BackendError, IrqCounts
from mediator.backends.profile import Profile
from mediator.pci.registers import Identity

CONFIG_WRITE_LOG = 1024


class SimBackend:
    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.description = f"simulated {profile.name} {Identity.of(profile.image)}"
        self.config = bytearray(profile.image)
        self.config_size = len(profile.image)
        self.irqs: IrqCounts = profile.irqs
        self.config_writes: deque[tuple[int, bytes]] = deque(maxlen=CONFIG_WRITE_LOG)
        self.resets = 0
        self._memory: dict[int, mmap.mmap] = {}

    def _check_config(self, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > self.config_size:
            raise BackendError(f"config access {offset:#x}+{length} outside {self.config_size} bytes")

    def read_config(self, offset: int, length: int) -> bytes:
        self._check_config(offset, length)
        return bytes(self.config[offset : offset + length])

    def write_config(self, offset: int, data: bytes) -> None:
        self._check_config(offset, len(data))
        self.config[offset : offset + len(data)] = data
        self.config_writes.append((offset, bytes(data)))

    def region_size(self, index: int) -> int:
        if index == ROM_REGION:
            return self.profile.rom_size
        if 0 <= index < len(self.profile.bar_sizes):
            return self.profile.bar_sizes[index]
        return 0

    def memory(self, index: int) -> mmap.mmap:
        """The memfd-backed memory of a BAR or the ROM, created on first use."""
        if index not in self._memory:
            size = self.region_size(index)
            if not size:
                raise BackendError(f"region {index} is not implemented")
            fd = os.memfd_create(f"vfio-mediator-{self.profile.name}-region{index}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                self._memory[index] = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        return self._memory[index]

    def _check_region(self, index: int, offset: int, length: int) -> None:
        size = self.region_size(index)
        if offset < 0 or length <= 0 or offset + length > size:
            raise BackendError(f"region {index} access {offset:#x}+{length} outside its {size} bytes")

    def _mirror(self, index: int, offset: int, length: int) -> int | None:
        """The config offset a config-mirror window maps this access to, if any."""
        for behaviour in self.profile.behaviours:
            if behaviour.bar == index and behaviour.offset <= offset < behaviour.offset + behaviour.size:
                config_offset = offset - behaviour.offset
                if config_offset + length <= self.config_size:
                    return config_offset
        return None

    def read_region(self, index: int, offset: int, length: int) -> bytes:
        self._check_region(index, offset, length)
        mirrored = self._mirror(index, offset, length)
        if mirrored is not None:
            return self.read_config(mirrored, length)
        return self.memory(index)[offset : offset + length]

    def write_region(self, index: int, offset: int, data: bytes) -> None:
        self._check_region(index, offset, len(data))
        if index == ROM_REGION:
            raise BackendError("the expansion ROM is read-only")
        mirrored = self._mirror(index, offset, len(data))
        if mirrored is not None:
            self.write_config(mirrored, data)
            return
        self.memory(index)[offset : offset + len(data)] = data

    def reset(self) -> None:
        """A function-level reset: config registers return to their power-on values."""
        self.config[:] = self.profile.image
        self.resets += 1

    def close(self) -> None:
        for memory in self._memory.values():
            memory.close()
        self._memory.clear()
