"""The virtual device: a plan carried out on a backend, for one client at a time.

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
have mapped it. A reset the guest or the client asks for resets the hardware
(``reset_hardware``), restores the shadow, and then makes the plan's
post-reset writes (``apply_post_reset_writes``) before anything else can
touch the device; a protection that does not hold blocks the device.

The device is the vfio-user server's ``DeviceModel``: a backend's failure
reaches the server as a ``DeviceError`` with the backend's errno, and what
the device sees (trapped accesses, DMA changes, resets) goes to the
``DeviceEvents`` it was given.

The device also holds what a client attaches: DMA mappings (a ``DmaTable``
the backend reaches guest memory through) and interrupt eventfds, validated
the way vfio-pci validates VFIO_DEVICE_SET_IRQS and owned here until they are
replaced or the client goes (``detach_client``). Every refusal is a
``DeviceError`` carrying the errno the client should get.
"""

from __future__ import annotations

import contextvars
import errno
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import structlog

from mediator.audit import Auditor, audit_log
from mediator.backends.base import Backend, BackendError, IrqInfo
from mediator.backends.dma import DmaError, DmaMapping, DmaTable, release
from mediator.pci.registers import Identity
from mediator.quirks.table import QuirkTable
from mediator.vfio_abi import (
    BAR_REGIONS,
    CONFIG_REGION,
    IRQ_COUNT,
    IRQ_ERR,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INTX,
    IRQ_REQ,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_TYPE,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    IRQ_SET_DATA_TYPE,
    ROM_REGION,
)
from mediator.virt.config_view import ConfigView
from mediator.virt.errors import DeviceError, RegionAccessError
from mediator.virt.events import NO_EVENTS, DeviceEvents, ResetCause
from mediator.virt.plan import DeviceContext, DevicePlan, PostResetWrite, TrapWindow, VirtualBar, build_plan

log = structlog.get_logger("mediator.virt")

# A guest's reset is answered within this, before QEMU gives up on the message (5 s).
GUEST_RESET_DEADLINE = 4.0
_PADDING = "padding"
_DEVICE = "device"


@dataclass(frozen=True)
class RegionView:
    """A region as the guest sees it (the server's ``RegionDescription``)."""

    size: int
    writable: bool
    mmap_areas: tuple[tuple[int, int], ...] = ()
    mapping: tuple[int, int] | None = None


def _device_error(error: BackendError) -> DeviceError:
    return DeviceError(error.errno, f"device error: {error}")


class VirtualDevice:
    def __init__(
        self,
        backend: Backend,
        plan: DevicePlan,
        max_dma_mappings: int = 65535,
        events: DeviceEvents = NO_EVENTS,
    ) -> None:
        self.backend = backend
        self.plan = plan
        self.config = ConfigView(plan.segments, plan.initial_shadow, backend, plan.reset_triggers)
        self.auditor = Auditor()
        self.events = events
        self._straggler: threading.Thread | None = None  # a guest's reset still running past its deadline
        # Why the device must not be served (a protection that could not be
        # established, quarantine); None while it may be.
        self.blocked: str | None = None
        self.dma = DmaTable(max_dma_mappings)
        backend.attach_dma(self.dma)
        self._irq_fds: dict[tuple[int, int], int] = {}  # (index, vector) -> eventfd we own
        self._resample_fds: dict[int, int] = {}

    @classmethod
    def open(cls, backend: Backend, table: QuirkTable, context: DeviceContext | None = None) -> VirtualDevice:
        """Plan the device the backend presents with the quirks that match it.

        Nothing is written to the device yet: the daemon hands it off
        (``mediator.handoff``: reset, post-reset writes, checks) before its
        first client, and ``inspect`` only looks.

        Raises:
            PlanError: the policy cannot be carried out on this device.
        """
        return cls(backend, cls.plan_for(backend, table, context))

    @staticmethod
    def plan_for(
        backend: Backend, table: QuirkTable, context: DeviceContext | None = None, image: bytes | None = None
    ) -> DevicePlan:
        """The plan for the device the backend presents.

        A reload plans again for the next client from the first plan's
        ``image``: the live config space may hold what the current guest wrote.
        """
        image = image if image is not None else backend.read_config(0, backend.config_size)
        regions = [backend.region_info(index) for index in (*BAR_REGIONS, ROM_REGION)]
        return build_plan(image, table.for_device(Identity.of(image)), regions, context)

    # what the server asks of a DeviceModel besides regions, interrupts, DMA and reset
    @property
    def refusal(self) -> str | None:
        return self.blocked

    @property
    def can_reset(self) -> bool:
        return self.backend.can_reset

    @property
    def max_dma_mappings(self) -> int:
        return self.dma.max_mappings

    def region(self, index: int) -> RegionView:
        """The guest's view of a region: size, writability, what a client may mmap and through which fd."""
        if index == CONFIG_REGION:
            return RegionView(self.config.size, writable=True)
        bar = self.plan.bar(index) if index in (*BAR_REGIONS, ROM_REGION) else None
        if bar is None:
            return RegionView(0, writable=False)
        mapping = self.backend.region_fd(index) if bar.mmap_areas else None
        return RegionView(bar.virtual_size, index != ROM_REGION, bar.mmap_areas if mapping else (), mapping)

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
            return self._read_bar(index, offset, length)
        except BackendError as e:
            raise _device_error(e) from None

    def _read_bar(self, index: int, offset: int, length: int) -> bytes:
        bar = self._bar(index, offset, length)
        out = bytearray()
        for start, stop, handler in self._pieces(bar, offset, length):
            if handler == _DEVICE:
                out += self.backend.read_region(index, start, stop - start)
            elif handler == _PADDING:
                self.events.trapped_access("padding")
                out += b"\xff" * (stop - start)
            else:
                assert isinstance(handler, TrapWindow)
                out += self._trap_read(handler, start, stop)
        return bytes(out)

    def write_region(self, index: int, offset: int, data: bytes) -> None:
        try:
            if index == CONFIG_REGION:
                if self.config.write(offset, data):
                    self._reset_within_deadline("the guest's function-level reset (config write)", "guest")
                return
            self._write_bar(index, offset, data)
        except BackendError as e:
            raise _device_error(e) from None

    def _write_bar(self, index: int, offset: int, data: bytes) -> None:
        if index == ROM_REGION:
            raise DeviceError(errno.EPERM, "the expansion ROM is read-only")
        bar = self._bar(index, offset, len(data))
        for start, stop, handler in self._pieces(bar, offset, len(data)):
            piece = data[start - offset : stop - offset]
            if handler == _DEVICE:
                self.backend.write_region(index, start, piece)
            elif isinstance(handler, TrapWindow):
                self._trap_write(handler, start, piece)
            else:
                self.events.trapped_access("padding")

    def _config_span(self, window: TrapWindow, start: int, stop: int) -> tuple[int, int]:
        """The part of a config-mirror access that falls inside the config space."""
        first = start - window.offset
        return first, max(0, min(stop - window.offset, self.config.size) - first)

    def _trap_read(self, window: TrapWindow, start: int, stop: int) -> bytes:
        length = stop - start
        if window.action == "audit":
            data = self.backend.read_region(window.bar, start, length)
        elif window.action == "all-ones":
            data = b"\xff" * length
        elif window.action == "config-mirror":
            first, inside = self._config_span(window, start, stop)
            data = (self.config.read(first, inside) if inside else b"") + bytes(length - inside)
        else:
            data = bytes(length)
        self._audit(window, start, "read", data)
        return data

    def _trap_write(self, window: TrapWindow, start: int, data: bytes) -> None:
        self._audit(window, start, "write", data)
        if window.action == "audit":
            self.backend.write_region(window.bar, start, data)
        elif window.action == "config-mirror":
            first, inside = self._config_span(window, start, start + len(data))
            if inside and self.config.write(first, data[:inside]):
                self._reset_within_deadline(
                    "the guest's function-level reset (through the BAR0 config mirror)", "guest"
                )

    def _audit(self, window: TrapWindow, start: int, direction: str, data: bytes) -> None:
        self.events.trapped_access(window.action)
        event = "guest access" if window.action == "audit" else "guest access trapped"
        self.auditor.access(
            event,
            bar=window.bar,
            offset=start,
            size=len(data),
            direction=direction,
            value=data,
            action=window.action,
        )

    # DMA
    def dma_map(self, iova: int, size: int, flags: int, fd: int | None, offset: int) -> None:
        """Map guest memory; ``fd`` stays the caller's (the mapping keeps its own mmap)."""
        try:
            mapping = self.dma.map(iova, size, flags, fd, offset)
        except DmaError as e:
            raise DeviceError(e.errno, str(e)) from None
        try:
            self.backend.dma_map(mapping)
        except BackendError as e:
            release(self.dma.unmap(iova, size))
            raise _device_error(e) from None
        except Exception:
            release(self.dma.unmap(iova, size))
            raise
        self.events.dma_changed(len(self.dma), self.dma.backed_bytes)

    def dma_unmap(self, iova: int, size: int) -> None:
        try:
            removed = self.dma.unmap(iova, size)
        except DmaError as e:
            raise DeviceError(e.errno, str(e)) from None
        self._release_mappings(removed)

    def dma_unmap_all(self) -> None:
        self._release_mappings(self.dma.unmap_all())

    def _release_mappings(self, mappings: list[DmaMapping]) -> None:
        try:
            for mapping in mappings:
                self.backend.dma_unmap(mapping)
        except BackendError as e:
            raise _device_error(e) from None
        finally:
            release(mappings)
            self.events.dma_changed(len(self.dma), self.dma.backed_bytes)

    # interrupts
    def irq_info(self, index: int) -> IrqInfo:
        if not 0 <= index < IRQ_COUNT:
            raise DeviceError(errno.EINVAL, f"no interrupt index {index}")
        try:
            return self.backend.irq_info(index)
        except BackendError as e:
            raise _device_error(e) from None

    def set_irqs(
        self, index: int, flags: int, start: int, count: int, *, fds: Sequence[int] = (), bools: bytes = b""
    ) -> None:
        """VFIO_DEVICE_SET_IRQS. On success the device owns ``fds``; on error the caller does.

        ``fds`` empty with DATA_EVENTFD and a count means "detach those vectors"
        (how vfio-user clients send fd -1).
        """
        info = self.irq_info(index)
        data_type, action = flags & IRQ_SET_DATA_TYPE, flags & IRQ_SET_ACTION_TYPE
        if flags & ~(IRQ_SET_DATA_TYPE | IRQ_SET_ACTION_TYPE):
            raise DeviceError(errno.EINVAL, f"unknown SET_IRQS flags {flags:#x}")
        if data_type.bit_count() != 1 or action.bit_count() != 1:
            raise DeviceError(errno.EINVAL, "SET_IRQS needs exactly one data type and one action")
        if not info.flags & IRQ_INFO_EVENTFD or info.count == 0:
            raise DeviceError(errno.EINVAL, f"interrupt index {index} is not implemented")
        if count == 0:
            if data_type != IRQ_SET_DATA_NONE or action != IRQ_SET_ACTION_TRIGGER:
                raise DeviceError(errno.EINVAL, "count 0 only disables an index (DATA_NONE|TRIGGER)")
            if start:
                raise DeviceError(errno.EINVAL, "disabling an index takes start 0")
        elif start + count > info.count:
            raise DeviceError(
                errno.EINVAL, f"vectors {start}..{start + count - 1} past index {index}'s {info.count}"
            )
        if action != IRQ_SET_ACTION_TRIGGER and (
            index in (IRQ_ERR, IRQ_REQ) or not info.flags & IRQ_INFO_MASKABLE
        ):
            raise DeviceError(errno.EINVAL, f"interrupt index {index} cannot be masked")
        if data_type == IRQ_SET_DATA_BOOL and len(bools) != count:
            raise DeviceError(errno.EINVAL, f"{len(bools)} bools for {count} vectors")
        if data_type != IRQ_SET_DATA_BOOL and bools:
            raise DeviceError(errno.EINVAL, "data bytes without DATA_BOOL")
        if data_type == IRQ_SET_DATA_EVENTFD:
            if fds and len(fds) != count:
                raise DeviceError(errno.EINVAL, f"{len(fds)} eventfds for {count} vectors")
            if action == IRQ_SET_ACTION_MASK or (
                action == IRQ_SET_ACTION_UNMASK and (index != IRQ_INTX or count != 1)
            ):
                raise DeviceError(errno.EINVAL, "eventfds only trigger vectors or resample INTx")
        elif fds:
            raise DeviceError(errno.EINVAL, "file descriptors without DATA_EVENTFD")
        eventfds = list(fds) if fds else [-1] * count
        data: Sequence[int] = eventfds if data_type == IRQ_SET_DATA_EVENTFD else list(bools)
        try:
            self.backend.set_irqs(index, flags, start, count, data)
        except BackendError as e:
            raise _device_error(e) from None
        self._own_irq_fds(index, flags, start, count, data)

    def _own_irq_fds(self, index: int, flags: int, start: int, count: int, data: Sequence[int]) -> None:
        action = flags & IRQ_SET_ACTION_TYPE
        if count == 0:
            for key in [k for k in self._irq_fds if k[0] == index]:
                os.close(self._irq_fds.pop(key))
            if index in self._resample_fds:
                os.close(self._resample_fds.pop(index))
        elif flags & IRQ_SET_DATA_EVENTFD and action == IRQ_SET_ACTION_TRIGGER:
            for i, fd in enumerate(data):
                old = self._irq_fds.pop((index, start + i), None)
                if old is not None:
                    os.close(old)
                if fd >= 0:
                    self._irq_fds[(index, start + i)] = fd
        elif flags & IRQ_SET_DATA_EVENTFD and action == IRQ_SET_ACTION_UNMASK:
            old = self._resample_fds.pop(index, None)
            if old is not None:
                os.close(old)
            if data[0] >= 0:
                self._resample_fds[index] = data[0]

    @property
    def attached_eventfds(self) -> int:
        return len(self._irq_fds) + len(self._resample_fds)

    def detach_client(self) -> None:
        """What a departing client leaves behind goes: DMA mappings and eventfds.

        The hand-off (``mediator.handoff``) then resets and checks the device.
        """
        self.dma_unmap_all()
        for index in range(IRQ_COUNT):
            if any(k[0] == index for k in self._irq_fds) or index in self._resample_fds:
                self.backend.set_irqs(index, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, [])
                self._own_irq_fds(index, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, [])

    def reset_hardware(self, *, bus: bool = False) -> str:
        """Reset the hardware and restore the virtual state; no post-reset writes yet.

        A bus reset when ``bus`` is asked and the backend can reset this
        function alone, else a function reset. Returns which one was done
        (and why not a bus reset, when it was asked).

        Raises:
            DeviceError: ENOTTY when the device has no reset method at all.
        """
        straggler, self._straggler = self._straggler, None
        if straggler is not None:
            straggler.join()  # a guest's reset that outlived its deadline: the hardware is still in it
        obstacle = self.backend.bus_reset_obstacle() if bus else None
        if bus and obstacle is None:
            try:
                self.backend.bus_reset()
            except BackendError as e:
                # The kernel may give up waiting for the device after the reset
                # (ENOTTY from pci_bridge_wait_for_secondary_bus): the config
                # check after the reset shows whether the device came back.
                obstacle = f"the bus reset failed: {e}"
                log.warning("bus reset failed; falling back to a function reset", why=str(e))
            else:
                self.config.restore_shadow()
                return "bus reset"
        if self.backend.can_reset:
            self.backend.reset()
            self.config.restore_shadow()
            return "function reset" + (f" ({obstacle})" if obstacle else "")
        why = "the device has no reset method (no FLR, PM or bus reset)"
        raise DeviceError(errno.ENOTTY, why + (f"; {obstacle}" if obstacle else ""))

    def reset(self) -> None:
        """The client's DEVICE_RESET; see ``_reset_within_deadline``."""
        self._reset_within_deadline("the client's DEVICE_RESET", "client")

    def _reset_within_deadline(self, cause: str, source: ResetCause) -> None:
        """A reset the guest or the client (``source``) asked for, done by the daemon.

        Reset, restore the virtual state, make the post-reset writes, all
        within ``GUEST_RESET_DEADLINE``: the client waits for the answer and
        gives up soon after (QEMU's x-msg-timeout is 5 s). A reset still
        running then goes on in the background with the device blocked, and
        the next hand-off waits for it; a reset that fails blocks the device
        too. Either way the session ends and the device is handed off.

        Raises:
            DeviceError: ENOTTY (no reset method), EIO (the reset failed, or a
                verified post-reset write did not hold), ETIMEDOUT (still resetting).
        """
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._reset_now(cause, source)
            except BaseException as e:  # handed to the waiting caller
                failure.append(e)

        context = contextvars.copy_context()  # log lines keep their device and client
        worker = threading.Thread(target=context.run, args=(run,), name=f"reset {cause}", daemon=True)
        worker.start()
        worker.join(GUEST_RESET_DEADLINE)
        if worker.is_alive():
            self._straggler = worker
            self.block(
                f"a reset did not finish within {GUEST_RESET_DEADLINE:g} s; the device is handed off "
                "before it is served again"
            )
            raise DeviceError(errno.ETIMEDOUT, self.blocked or "")
        if failure:
            raise failure[0]

    def _reset_now(self, cause: str, source: ResetCause) -> None:
        try:
            done = self.reset_hardware()
        except BackendError as e:
            self.block(f"a reset failed ({e}); the device is handed off before it is served again")
            raise DeviceError(errno.EIO, self.blocked or "") from None
        self.events.reset(source)
        audit_log.info("guest reset", cause=cause, reset=done, post_reset_writes=len(self.plan.post_reset))
        self.apply_post_reset_writes()

    def apply_post_reset_writes(self) -> None:
        """Make the plan's post-reset writes and check the verified ones hold; block the device if not.

        Raises:
            DeviceError: EIO when a protection did not hold.
        """
        failures = []
        for write in self.plan.post_reset:
            self._post_reset_write(write)
            if write.verify:
                found = int.from_bytes(
                    self.backend.read_region(write.bar, write.offset, write.size), "little"
                )
                expected = write.value if write.op != "clear" else 0
                held = found == write.value if write.op == "write" else found & write.value == expected
                if not held:
                    where = f"BAR{write.bar}+{write.offset:#x}"
                    failures.append(
                        f"{where} reads {found:#x} after {write.op} {write.value:#x} ({write.quirk})"
                    )
        if failures:
            self.block("a required protection did not hold: " + "; ".join(failures))
            raise DeviceError(errno.EIO, self.blocked or "")

    def block(self, reason: str) -> None:
        """Refuse to serve the device until the cause is fixed."""
        self.blocked = reason
        log.error("device blocked", why=reason)

    def unblock(self) -> None:
        """Serve the device again: a hand-off found it clean."""
        self.blocked = None

    def _post_reset_write(self, write: PostResetWrite) -> None:
        if write.op == "write":
            value = write.value
        else:
            current = int.from_bytes(self.backend.read_region(write.bar, write.offset, write.size), "little")
            value = current | write.value if write.op == "set" else current & ~write.value
        self.backend.write_region(write.bar, write.offset, value.to_bytes(write.size, "little"))
