"""The virtual device: a plan carried out on a backend.

Region accesses arrive by vfio-pci region index (0-5 BARs, 6 ROM, 7 config).
Config goes through the ``ConfigView``. A BAR access is cut into pieces at
trap-window and padding boundaries:

- a trap window answers itself: ``raz-wi`` (0, writes dropped), ``all-ones``,
  ``config-mirror`` (the *virtual* config space at window offset 0, zeros
  past it), ``audit`` (passed to the device, and reported);
- padding between the real and the virtual (power-of-two) size reads 0xFF
  and drops writes, as nvgrace-gpu does;
- everything else goes to the backend.

An access past the virtual size is a ``RegionAccessError``: the guest cannot
have mapped it. ``reset`` resets the backend, restores the shadow, and then
makes the plan's post-reset writes before anything else can touch the device.
"""

from __future__ import annotations

from collections.abc import Iterator

from mediator.backends.base import CONFIG_REGION, ROM_REGION, Backend
from mediator.virt.config_view import ConfigAccessError, ConfigView
from mediator.virt.plan import DevicePlan, PostResetWrite, TrapWindow, VirtualBar


class RegionAccessError(Exception):
    """An access to a region that does not exist or outside its virtual size."""


_PADDING = "padding"
_DEVICE = "device"


class VirtualDevice:
    def __init__(self, backend: Backend, plan: DevicePlan) -> None:
        self.backend = backend
        self.plan = plan
        self.config = ConfigView(plan.segments, plan.initial_shadow, backend)
        self.trapped_accesses = 0

    def region_size(self, index: int) -> int:
        """The size the guest sees."""
        if index == CONFIG_REGION:
            return self.config.size
        bar = self.plan.bar(index)
        return bar.virtual_size if bar else 0

    def _bar(self, index: int, offset: int, length: int) -> VirtualBar:
        bar = self.plan.bar(index)
        if bar is None:
            raise RegionAccessError(f"region {index} is not implemented")
        if offset < 0 or length <= 0 or offset + length > bar.virtual_size:
            raise RegionAccessError(
                f"region {index} access at {offset:#x}, {length} bytes, "
                f"is outside its {bar.virtual_size:#x} bytes"
            )
        return bar

    def _pieces(
        self, bar: VirtualBar, offset: int, length: int
    ) -> Iterator[tuple[int, int, TrapWindow | str]]:
        """(start, end, handler) pieces of an access, in order; the last matching window wins."""
        end = offset + length
        while offset < end:
            window = next((t for t in reversed(bar.traps) if t.offset <= offset < t.end), None)
            if window is not None:
                stop = min(end, window.end)
                yield offset, stop, window
            elif offset >= bar.physical_size:
                yield offset, end, _PADDING
                return
            else:
                stop = min([end, bar.physical_size, *(t.offset for t in bar.traps if t.offset > offset)])
                yield offset, stop, _DEVICE
            offset = stop

    def read_region(self, index: int, offset: int, length: int) -> bytes:
        try:
            if index == CONFIG_REGION:
                return self.config.read(offset, length)
        except ConfigAccessError as e:
            raise RegionAccessError(str(e)) from None
        bar = self._bar(index, offset, length)
        out = bytearray()
        for start, stop, handler in self._pieces(bar, offset, length):
            if handler == _DEVICE:
                out += self.backend.read_region(index, start, stop - start)
            elif handler == _PADDING:
                out += b"\xff" * (stop - start)
            else:
                assert isinstance(handler, TrapWindow)
                out += self._trap_read(handler, start, stop)
        return bytes(out)

    def write_region(self, index: int, offset: int, data: bytes) -> None:
        try:
            if index == CONFIG_REGION:
                self.config.write(offset, data)
                return
        except ConfigAccessError as e:
            raise RegionAccessError(str(e)) from None
        if index == ROM_REGION:
            raise RegionAccessError("the expansion ROM is read-only")
        bar = self._bar(index, offset, len(data))
        for start, stop, handler in self._pieces(bar, offset, len(data)):
            piece = data[start - offset : stop - offset]
            if handler == _DEVICE:
                self.backend.write_region(index, start, piece)
            elif isinstance(handler, TrapWindow):
                self._trap_write(handler, start, piece)

    def _config_span(self, window: TrapWindow, start: int, stop: int) -> tuple[int, int]:
        """The part of a config-mirror access that falls inside the config space."""
        first = start - window.offset
        return first, max(0, min(stop - window.offset, self.config.size) - first)

    def _trap_read(self, window: TrapWindow, start: int, stop: int) -> bytes:
        self.trapped_accesses += 1
        length = stop - start
        if window.action == "audit":
            return self.backend.read_region(window.bar, start, length)
        if window.action == "all-ones":
            return b"\xff" * length
        if window.action == "config-mirror":
            first, inside = self._config_span(window, start, stop)
            data = self.config.read(first, inside) if inside else b""
            return data + bytes(length - inside)
        return bytes(length)

    def _trap_write(self, window: TrapWindow, start: int, data: bytes) -> None:
        self.trapped_accesses += 1
        if window.action == "audit":
            self.backend.write_region(window.bar, start, data)
        elif window.action == "config-mirror":
            first, inside = self._config_span(window, start, start + len(data))
            if inside:
                self.config.write(first, data[:inside])

    def reset(self) -> None:
        self.backend.reset()
        self.config.reset()
        for write in self.plan.post_reset:
            self._post_reset_write(write)

    def _post_reset_write(self, write: PostResetWrite) -> None:
        if write.op == "write":
            value = write.value
        else:
            current = int.from_bytes(self.backend.read_region(write.bar, write.offset, write.size), "little")
            value = current | write.value if write.op == "set" else current & ~write.value
        self.backend.write_region(write.bar, write.offset, value.to_bytes(write.size, "little"))
