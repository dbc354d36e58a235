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

Bus Master Enable is the daemon's: the guest's bit lives in the shadow, and
the hardware's follows it only while the IOMMU space the device is in is
ready (every mapping pinned: ``backends.pinning``), so the device never
DMAs (MSI writes included) into guest memory the IOMMU does not map yet.
A pin that fails blocks the device with the reason.

The device also holds what a client attaches: DMA mappings (a ``DmaSpace``:
the connection's own, held in the IOMMU space of the client's VM, which the
device enters when the client is admitted and leaves in ``detach_client``)
and interrupt eventfds, validated
the way vfio-pci validates VFIO_DEVICE_SET_IRQS and owned here until they are
replaced or the client goes (``detach_client``). Every refusal is a
``DeviceError`` carrying the errno the client should get.

Migration (``migration``: the backend's state machine and the daemon's
stream) is where the uAPI's rules for the user are kept: outside RUNNING
and PRE_COPY no BAR access gets through (EBUSY, and the C fast path hands
every request to Python), and outside the P2P states and above the BARs
are no peer's target (``peer_bars``). A client that goes leaves the device
RUNNING, reset if its migration was left halfway.
"""

from __future__ import annotations

import errno
import mmap
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import structlog

from mediator.audit import Auditor
from mediator.backends.base import Backend, BackendError, IrqInfo, RegionInfo
from mediator.backends.migration import REACHABLE_BY_PEERS, RUNS
from mediator.backends.space import IommuSpace, PeerBar
from mediator.pci.registers import COMMAND, COMMAND_MASTER, COMMAND_MEMORY, Identity, bar_offset
from mediator.quirks.table import QuirkTable
from mediator.vfio_abi import (
    BAR_REGIONS,
    CONFIG_REGION,
    ROM_REGION,
)
from mediator.virt import fast_tables
from mediator.virt.config_view import ConfigView
from mediator.virt.dma_space import DmaSpace
from mediator.virt.errors import DeviceError, RegionAccessError, device_error
from mediator.virt.events import NO_EVENTS, DeviceEvents
from mediator.virt.fast_tables import FastTables
from mediator.virt.interrupts import Interrupts
from mediator.virt.migration import Migration, fingerprint
from mediator.virt.plan import DeviceContext, DevicePlan, TrapWindow, VirtualBar, build_plan
from mediator.virt.reset import Resets

log = structlog.get_logger("mediator.virt")

# The command register's decoding bit and the BAR registers: where a peer finds the BARs.
_BAR_REGISTERS = ((COMMAND, COMMAND + 2), (bar_offset(0), bar_offset(6)))


def _moves_bars(offset: int, length: int) -> bool:
    return any(offset < end and start < offset + length for start, end in _BAR_REGISTERS)


def _regions(backend: Backend) -> list[RegionInfo]:
    """The real size and mappable areas of BAR0-5 and the ROM, as the plan is built from them."""
    return [backend.region_info(index) for index in (*BAR_REGIONS, ROM_REGION)]


def _touches_command(offset: int, length: int) -> bool:
    return offset <= COMMAND < offset + length


_PADDING = "padding"
_DEVICE = "device"


@dataclass(frozen=True)
class RegionView:
    """A region as the guest sees it (the server's ``RegionDescription``)."""

    size: int
    writable: bool
    mmap_areas: tuple[tuple[int, int], ...] = ()
    mapping: tuple[int, int] | None = None


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
        self._fast: FastTables | None = None  # the tables of the C fast path while a client is served
        self._refusal: str | None = None
        self.name = backend.description  # the daemon names it after its config entry
        self.dma = DmaSpace(backend, max_dma_mappings, events)
        self.interrupts = Interrupts(backend)
        self.resets = Resets(backend, self.config, plan, events, self.block)
        self._events = events
        # The guest's command writes and the pinner's Bus Master changes take turns on the register.
        self._command_lock = threading.Lock()
        self._bus_master_held = False  # the guest set it, the hardware waits for pinning
        self.released = False  # let go for a wipe tool and not taken back yet
        rules = self.config.rules
        policy = fingerprint(rules.virtual, rules.writable, plan.initial_shadow)
        self.migration = Migration(backend, self.config.shadow, policy, self._migration_moved)

    @property
    def refusal(self) -> str | None:
        """Why the device must not be served (a protection that could not be established,
        quarantine); None while it may be. The C fast path follows it before its next request."""
        return self._refusal

    @refusal.setter
    def refusal(self, reason: str | None) -> None:
        self._refusal = reason
        self._sync_fast_path()

    def _sync_fast_path(self) -> None:
        """Python answers every request while the device is refused or stopped for migration."""
        if self._fast is not None:
            self._fast.refused = self._refusal is not None or self.migration.state not in RUNS

    def _migration_moved(self) -> None:
        """A migration state was reached: guest BAR accesses and peers' DMA follow it."""
        self._sync_fast_path()
        self.dma.space.refresh()
        log.info("migration state", state=self.migration.state.name)

    def fast_path(self) -> FastTables | None:
        """The device's accesses compiled for the C fast path (for one session); None without it."""
        if fast_tables.UNAVAILABLE is not None:
            return None
        tables = FastTables(
            self.config,
            self.plan,
            self.backend,
            python_writes=_BAR_REGISTERS,
            padding_answered=lambda count: self.events.trapped_access("padding", count),
        )
        self._fast = tables
        self._sync_fast_path()
        return tables

    @property
    def events(self) -> DeviceEvents:
        return self._events

    @events.setter
    def events(self, events: DeviceEvents) -> None:
        """Where what the device sees goes from now on (the daemon gives its metrics once it has them)."""
        self._events = self.dma.events = self.resets.events = events

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
        return build_plan(image, table.for_device(Identity.of(image)), _regions(backend), context)

    # what the server asks of a DeviceModel besides regions, interrupts, DMA and reset
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
            raise device_error(e) from None

    def _check_running(self, index: int) -> None:
        """The uAPI's rule outside RUNNING: the user must not touch the device (config excepted)."""
        state = self.migration.state
        if state not in RUNS:
            raise DeviceError(errno.EBUSY, f"region {index} is not reachable in migration state {state.name}")

    def _read_bar(self, index: int, offset: int, length: int) -> bytes:
        self._check_running(index)
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
                self._write_config(offset, data, "config write")
                return
            self._write_bar(index, offset, data)
        except BackendError as e:
            raise device_error(e) from None

    def _write_config(self, offset: int, data: bytes, how: str) -> None:
        """A guest's config write, directly or through a BAR mirror; ``how`` names the way, for a reset."""
        if _touches_command(offset, len(data)):
            with self._command_lock:
                reset = self.config.write(offset, data)
                self._sync_bus_master_locked()
        else:
            reset = self.config.write(offset, data)
        if reset:
            self._guest_reset(how)
        if _moves_bars(offset, len(data)):
            self.dma.space.refresh()  # peers' mappings of the BARs follow them

    def _write_bar(self, index: int, offset: int, data: bytes) -> None:
        if index == ROM_REGION:
            raise DeviceError(errno.EPERM, "the expansion ROM is read-only")
        self._check_running(index)
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
            if inside:
                self._write_config(first, data[:inside], "through the BAR0 config mirror")

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
        self.dma.map(iova, size, flags, fd, offset)

    def dma_unmap(self, iova: int, size: int) -> None:
        self.dma.unmap(iova, size)

    def dma_unmap_all(self) -> None:
        self.dma.unmap_all()

    # interrupts
    def irq_info(self, index: int) -> IrqInfo:
        return self.interrupts.info(index)

    def set_irqs(
        self, index: int, flags: int, start: int, count: int, *, fds: Sequence[int] = (), bools: bytes = b""
    ) -> None:
        self.interrupts.set(index, flags, start, count, fds=fds, bools=bools)

    @property
    def attached_eventfds(self) -> int:
        return self.interrupts.attached

    # resets
    def reset(self) -> None:
        """The client's DEVICE_RESET (which also returns a device to migration state RUNNING)."""
        before = self.migration.state
        self.resets.within_deadline("the client's DEVICE_RESET", "client")
        if self.migration.state != before:
            self._migration_moved()

    def _guest_reset(self, how: str) -> None:
        self.resets.within_deadline(f"the guest's function-level reset ({how})", "guest")

    # the client's VM
    def move_to(self, space: IommuSpace) -> None:
        """Enter an IOMMU space (the client's VM's, or home) with nothing of a client attached.

        The old space's peers stop reaching the device's BARs first: with type1 the move closes
        the device fd, which the daemon's own mappings of the BARs would keep open.
        """
        left = self.dma.space
        if space is left:
            return
        left.leave(self)
        try:
            reset = self.dma.move_to(space)
        except BaseException:
            left.join(self)
            raise
        if space is not self.backend.home:
            space.join(self)
        if reset:
            self.resets.apply_post_reset_writes()  # the move reset the device: protections first
        self.pinning_changed()

    def pinning_changed(self) -> None:
        """The space's pinning moved on (``Peer``): a failure blocks the device; Bus Master follows."""
        # Called from the VM's pinner thread too, whose log lines are nobody's device's.
        with structlog.contextvars.bound_contextvars(device=self.name):
            failure = self.dma.space.pin_failure
            if failure is not None and self.refusal is None:
                self.events.dma_pin_failed()  # first: whoever reads the log line finds the metrics say so
                self.block(f"{failure}; the device is handed off before it is served again")
            with self._command_lock:
                self._sync_bus_master_locked()

    def _sync_bus_master_locked(self) -> None:
        guest = bool(self.config.shadow[COMMAND] & COMMAND_MASTER)
        ready = self.dma.space.ready
        command = int.from_bytes(self.backend.read_config(COMMAND, 2), "little")
        wanted = command | COMMAND_MASTER if guest and ready else command & ~COMMAND_MASTER
        if wanted != command:
            self.backend.write_config(COMMAND, wanted.to_bytes(2, "little"))
        held = guest and not ready
        if held and not self._bus_master_held:
            log.info("bus master held until guest memory is pinned", pending=self.dma.space.pending_bytes)
        if wanted & ~command & COMMAND_MASTER:
            log.info("bus master on", waited_for_pinning=self._bus_master_held)
        self._bus_master_held = held

    def peer_bars(self) -> list[PeerBar]:
        """Where the guest put the BARs a peer may reach: memory BARs, with decoding on (``Peer``).

        None in a migration state where the device must not be reached by peers' DMA (STOP,
        STOP_COPY, RESUMING): the kernel's uAPI says so, and QEMU leaves a VM's other devices
        running their DMA meanwhile.
        """
        command = int.from_bytes(self.config.read(COMMAND, 2), "little")
        if not command & COMMAND_MEMORY or self.migration.state not in REACHABLE_BY_PEERS:
            return []
        bars = []
        for bar in self.plan.bars:
            if bar.type.io or not bar.mmap_areas:
                continue
            register = self.config.read(bar_offset(bar.index), 8 if bar.type.is_64 else 4)
            address = int.from_bytes(register, "little") & ~0xF
            if address:
                bars.append(PeerBar(bar.index, address, bar.virtual_size, bar.mmap_areas))
        return bars

    def bar_memory(self, index: int, offset: int, size: int) -> mmap.mmap:
        return self.backend.bar_memory(index, offset, size)

    # what a hand-off does (mediator.handoff.HandedOff)
    def detach_client(self) -> tuple[int, int, float | None]:
        """What a departing client leaves behind goes: (DMA mappings, eventfds) it had, and the
        seconds its reset that outlived its deadline still ran (None: there was none).

        That reset finishes first, so the hand-off's own reset is timed alone and a hand-off that
        does not reset still hands over a device at rest. The device then leaves the client's VM
        for its home space, where it can reach no memory; the hand-off (``mediator.handoff``)
        then resets and checks it.
        """
        waited = self.resets.finish_straggler()
        left = len(self.dma), self.interrupts.attached
        try:
            self.migration.back_to_running()
        except BackendError as e:  # a stream left halfway, or ERROR: only a reset returns to RUNNING
            log.warning("the client left a migration halfway: the device is reset", why=str(e))
            try:
                self.resets.reset_hardware("handoff")
            except BackendError as failed:
                raise device_error(failed) from None
            self.resets.apply_post_reset_writes()
        self.dma.unmap_all()
        self.interrupts.detach_all()
        self.move_to(self.backend.home)
        return (*left, waited)

    def let_go(self) -> None:
        """Close the backend's hold on the device (it is home, nothing attached): a tool may rebind it."""
        try:
            self.backend.let_go()
        except BackendError as e:
            raise device_error(e) from None
        self.released = True

    def take_back(self, timeout: float) -> None:
        """Open the device again once it is bound to vfio-pci; its regions must be what they were."""
        regions = _regions(self.backend)
        try:
            self.backend.take_back(timeout)
        except BackendError as e:
            raise device_error(e) from None
        self.released = False
        now = _regions(self.backend)
        if now != regions:
            raise DeviceError(errno.EIO, f"its regions changed: {now} instead of {regions}")
        self.config.restore_shadow()
        self.pinning_changed()  # the shadow says Bus Master is off: so is the reopened hardware

    def reset_hardware(self, *, bus: bool) -> str:
        return self.resets.reset_hardware("handoff", bus=bus)

    def restore_shadow(self) -> None:
        """The guest's view as at power-on, without touching the hardware."""
        self.config.restore_shadow()

    def apply_post_reset_writes(self) -> None:
        self.resets.apply_post_reset_writes()

    def read_physical_config(self) -> bytes:
        return self.backend.read_config(0, self.plan.config_size)

    def read_rom(self) -> bytes:
        assert self.plan.rom is not None
        return self.backend.read_region(ROM_REGION, 0, self.plan.rom.physical_size)

    def block(self, reason: str) -> None:
        """Refuse to serve the device until the cause is fixed."""
        self.refusal = reason
        log.error("device blocked", why=reason)

    def unblock(self) -> None:
        """Serve the device again: a hand-off found it clean."""
        self.refusal = None
