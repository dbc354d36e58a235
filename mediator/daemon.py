"""The daemon: every device of the config served on its socket, each with its own lifecycle.

Start-up opens each device (a real function through VFIO, or a simulated
profile), plans it with its quirk tables and tenancy, recovers what a
previous daemon left behind (a session it did not end, fabric partitions it
left active), and hands each device off once (reset, isolation, checks)
unless it is in quarantine. A device that cannot be opened is reported and
the others are served; its socket closes each client at once, and one the
host holds back (busy, unbound, missing) is tried again every
REOPEN_INTERVAL until it opens. Sockets come from systemd (socket
activation, matched by name) or are made here with the config's owner and
mode; READY, STATUS, RELOADING, STOPPING and the watchdog go to systemd.

``ManagedDevice`` is the lifecycle the server calls around each client: it
checks the peer's credentials, refuses quarantined devices (re-checking
after an operator's release), activates the fabric partition, and hands the
device off when the client goes. SIGHUP reloads the config and the quirk
tables: a device whose plan or settings changed gets them for its *next*
client, handed off again under the new policy (a live session never changes
its view); adding or removing a device needs a restart. SIGHUP also
re-syncs the fabric. SIGTERM and SIGINT stop it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from mediator._vfio_shim import lib as shim
from mediator.audit import audit_log
from mediator.backends.base import Backend, BackendError
from mediator.backends.profile import load_profile, resolve_profile
from mediator.backends.sim import SimBackend
from mediator.backends.space import IommuSpace
from mediator.backends.sysfs import DeviceNotReady
from mediator.backends.vfio import VfioBackend
from mediator.errors import InputErrors
from mediator.fabric import Fabric, FabricError
from mediator.handoff import OK, HandOff, HandOffReason, HandOffRecord, Owner
from mediator.metrics.exporters import serve_metrics, write_textfile_periodically
from mediator.metrics.series import Metrics
from mediator.pci.chain import ChainError
from mediator.quirks.table import QuirkTable
from mediator.settings import DeviceSpec, Settings, load_settings
from mediator.state import StateStore
from mediator.systemd import Notifier, listen_fds
from mediator.tenancy import device_context
from mediator.unix_listener import SocketError, bind_unix, give_access
from mediator.vfio_user.server import DeviceServer, Peer, UnservedDevice
from mediator.virt import fast_tables
from mediator.virt.device import VirtualDevice
from mediator.virt.errors import DeviceError
from mediator.virt.plan import DevicePlan, PlanError
from mediator.vms import VmId, Vms, vm_of

log = structlog.get_logger("mediator.daemon")

OPEN_ERRORS = (InputErrors, PlanError, ChainError, DeviceNotReady, BackendError)
# Failures of the host's state, which changes without the daemon (a VMM's fds closing, a driver
# bound, a udev rule applied): a serving daemon tries again. The config's errors wait for a restart.
HOST_STATE_ERRORS = (DeviceNotReady, BackendError)
REOPEN_INTERVAL = 10.0  # seconds between attempts
# (device server, or None for the metrics socket; listening socket; path we made and must remove)
Listener = tuple[DeviceServer | UnservedDevice | None, socket.socket, Path | None]


def forbid_core_dumps() -> None:
    """No core dump of the serving daemon: it maps its clients' guest RAM (for DMA), so a crash or
    a watchdog's SIGABRT would write a tenant's memory to disk, and a dump that large keeps the
    dying process, and the VFIO groups it holds, busy while it is written."""
    result = int(shim.shim_forbid_core_dumps())
    if result < 0:
        raise OSError(-result, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(-result)}")


def open_backend(spec: DeviceSpec) -> Backend:
    real = spec.bdf or spec.mdev
    if real is not None:
        return VfioBackend(real, bar_access=spec.bar_access)
    assert spec.profile is not None
    return SimBackend(load_profile(resolve_profile(spec.profile)), bar_access=spec.bar_access)


def quirk_table(spec: DeviceSpec) -> QuirkTable:
    return QuirkTable.load([Path(q) for q in spec.quirks], builtin=spec.builtin_quirks)


def open_device(settings: Settings, spec: DeviceSpec) -> tuple[VirtualDevice, QuirkTable]:
    """The planned device and its quirk table.

    Raises:
        InputErrors, PlanError, ChainError, DeviceNotReady, BackendError.
    """
    table = quirk_table(spec)
    backend = open_backend(spec)
    try:
        context = device_context(settings, spec, backend.peer_dma)
        return VirtualDevice.open(backend, table, context), table
    except BaseException:
        backend.close()
        raise


class ManagedDevice:
    """One served device: credentials, quarantine, fabric partition and hand-off around each client."""

    def __init__(self, spec: DeviceSpec, device: VirtualDevice, daemon: Daemon) -> None:
        self.spec = spec
        self.metrics = daemon.metrics.device(spec.name)
        self.device = device
        device.events = self.metrics
        device.name = spec.name
        self._daemon = daemon
        self._lock = threading.Lock()  # admit, release and reload take turns
        self._vm: VmId | None = None  # the client VM holding the device; None while no client is admitted
        self._pending: tuple[DeviceSpec, DevicePlan] | None = None  # a reload waiting for the client to go
        # Handed off without a reset while a function of its IOMMU group had a client: the group's
        # last function to leave resets it (set before that hand-off starts, read without the lock).
        self._reset_waits = False

    @property
    def owner(self) -> Owner:
        return Owner(self.spec.name, self.spec.bdf, self.spec.tenant, self.spec.mdev)

    def _hand_off(
        self, reason: HandOffReason, owner: Owner | None = None, detail: str = "", not_now: str | None = None
    ) -> HandOffRecord:
        return self._daemon.handoff.run(
            self.device,
            owner or self.owner,
            reason,
            self.spec.reset,
            detail,
            concluded=self._handed_off,
            not_now=not_now,
        )

    def _handed_off(self, record: HandOffRecord) -> None:
        """Before the hand-off's audit line: a reader of that line finds the metrics and state it implies."""
        self.metrics.handoff(record.ok)
        if record.ok:
            self._daemon.state.set_owner(self.spec.name, self.spec.tenant)
        self._publish_state()

    def _publish_state(self) -> None:
        quarantined = self._daemon.state.quarantined(self.spec.name) is not None
        self.metrics.set_state(
            "quarantined" if quarantined else "blocked" if self.device.refusal else "serving"
        )
        self._daemon.notifier.status(self._daemon.status())  # systemctl status shows it at once

    def start(self, left_session: dict[str, object] | None) -> None:
        """Before it is served: a quarantined device stays blocked, any other is handed off."""
        if self._quarantine_reason() is not None:
            return
        previous = self._daemon.state.owners().get(self.spec.name, self.spec.tenant)
        owner = Owner(self.spec.name, self.spec.bdf, previous, self.spec.mdev)
        # Opened late, beside a group-mate in its client's VM: the mate's hand-off resets the group.
        in_vm = [mate.spec.name for mate in self._group_mates() if mate.in_vm]
        self._reset_waits = bool(in_vm)
        not_now = f"{', '.join(in_vm)}, of its IOMMU group, has a client: the group is reset later"
        with self._daemon.group_turn(self.device.backend.iommu_group):
            if left_session is not None:
                reason, detail = HandOffReason.RECOVERY, str(left_session)
            else:
                reason, detail = HandOffReason.DAEMON_START, ""
            self._hand_off(reason, owner, detail, not_now=not_now if in_vm else None)
            if left_session is not None:
                self._daemon.state.session_ended(self.spec.name)

    def _quarantine_reason(self) -> str | None:
        record = self._daemon.state.quarantined(self.spec.name)
        if record is None:
            return None
        why = record.get("unreadable") or _failure_of(record)
        reason = (
            f"quarantined since {record.get('started', 'an earlier hand-off')}: {why}; "
            f"after fixing the cause run `vfio-mediator release --device {self.spec.name}`"
        )
        if self.device.refusal != reason:
            self.device.block(reason)
            self._publish_state()
        return reason

    def allows(self, peer: Peer) -> bool:
        return self._daemon.settings.access_for(self.spec.name).admits(peer.uid, peer.gids)

    def admit(self, peer: Peer) -> tuple[VirtualDevice, str | None]:
        with self._lock:
            reason = self._quarantine_reason()
            if reason is not None:
                return self.device, reason
            # Released by an operator, or a protection failed: start again.
            if self.device.refusal and not self._hand_off(HandOffReason.BLOCKED).ok:
                return self.device, self.device.refusal
            vm = vm_of(peer.pid)
            space, devices = self._daemon.vms.join(vm, self.spec.name)
            why = self._join(space) or self._start_session()
            if why is not None:
                self._leave(vm)
                return self.device, why
            self._vm = vm
            # The config's at the session's start: a reload changes it for the next client.
            self.device.resets.client_timeout = self._daemon.settings.client_timeout
            self.metrics.set_client(peer.pid)
            log.info("device joins its client's VM", vm=str(vm), devices=devices)
            return self.device, None

    def _join(self, space: IommuSpace) -> str | None:
        """Into the VM's IOMMU space; why not, if it cannot."""
        try:
            self.device.move_to(space)
        except DeviceError as e:
            why = f"the device cannot join its client's VM: {e}"
            log.error("client refused", why=why)
            return why
        return None

    def _start_session(self) -> str | None:
        """The session recorded and the fabric partition active; why not, if either fails."""
        # Recorded first: a daemon that dies with this client must hand the device off at its next start.
        try:
            self._daemon.state.session_started(self.spec.name, {"tenant": self.spec.tenant})
        except OSError as e:
            why = (
                f"the session cannot be recorded in the state directory ({e}): "
                "a restart could not recover the device"
            )
            log.error("client refused", why=why)
            return why
        fabric = self._daemon.fabric
        if fabric is not None:
            try:
                fabric.acquire(self.spec.name)
            except FabricError as e:
                audit_log.error("fabric partition refused", why=str(e))
                self._daemon.state.session_ended(self.spec.name)
                return str(e)
        return None

    def _leave(self, vm: VmId) -> None:
        """Back home from the VM's space, when no client came to use it; blocked if that fails."""
        try:
            self.device.move_to(self.device.backend.home)
        except DeviceError as e:
            self.device.block(f"the device cannot leave its client's VM: {e}")
        finally:
            self._daemon.vms.leave(vm, self.spec.name)

    def client_gone(self, requests: int) -> None:
        with self._lock:
            vm, self._vm = self._vm, None
            if vm is None:
                return
            self.metrics.set_client(0)
            try:
                self._after_client(requests)
            except Exception:  # fail closed: the next client is refused until a hand-off succeeds
                self.device.block("making the device ready after its last client failed; see the log")
                raise
            finally:
                self._daemon.vms.leave(vm, self.spec.name)  # the device is out of the VM's space by now

    def _after_client(self, requests: int) -> None:
        fabric = self._daemon.fabric
        if requests or (fabric is not None and fabric.holds(self.spec.name)):
            # Its first step takes the device out of the VM. A function of an IOMMU group is reset
            # with its group: by the last of them to leave, once, so that no reset hits a group-mate
            # under its client. The group's hand-offs take turns, and a mate whose client has just
            # gone is still in the VM until its own hand-off takes it home.
            mates = self._group_mates()
            with self._daemon.group_turn(self.device.backend.iommu_group):
                in_vm = [mate.spec.name for mate in mates if mate.in_vm]
                if in_vm:
                    self._reset_waits = True
                    why = (
                        f"{', '.join(in_vm)}, of its IOMMU group, is still in its client's VM: "
                        "the group is reset later"
                    )
                    self._hand_off(HandOffReason.CLIENT_GONE, not_now=why)
                    record = None
                else:
                    record = self._hand_off(HandOffReason.CLIENT_GONE)
            if record is not None:  # the waiting mates' hand-offs take their own turns
                self._reset_group(mates, record)
        else:  # it never spoke and holds no partition: the device is as it was, once back home
            self.device.move_to(self.device.backend.home)
        self._daemon.state.session_ended(self.spec.name)
        if self._pending is not None:
            self._adopt(*self._pending)

    @property
    def in_vm(self) -> bool:
        """A client holds the device, or it has not left its client's VM yet (read without the lock)."""
        return self._vm is not None or self.device.dma.space is not self.device.backend.home

    def _group_mates(self) -> list[ManagedDevice]:
        group = self.device.backend.iommu_group
        if group is None:
            return []
        return [m for m in self._daemon.managed if m is not self and m.device.backend.iommu_group == group]

    def _reset_group(self, mates: list[ManagedDevice], record: HandOffRecord) -> None:
        """After this function's hand-off, the group-mates whose reset waited for it get theirs."""
        waiting = [mate for mate in mates if mate._reset_waits]
        if not waiting:
            return
        reset = next((step for step in record.steps if step.name == "reset"), None)
        reached: set[str] = set()
        if reset is not None and reset.result == OK and reset.detail.startswith("bus reset"):
            with contextlib.suppress(BackendError):
                reached = set(self.device.backend.bus_reset_reaches())
        for mate in waiting:
            covered = (
                f"covered by the bus reset in {self.spec.name}'s hand-off"
                if mate.spec.bdf in reached
                else None
            )
            mate.reset_with_group(covered)

    def reset_with_group(self, covered: str | None) -> None:
        """The hand-off this function's reset waited for: none again when ``covered`` says it was reset."""
        with self._lock, structlog.contextvars.bound_contextvars(device=self.spec.name):
            if not self._reset_waits or self._vm is not None:
                return
            self._reset_waits = False
            with self._daemon.group_turn(self.device.backend.iommu_group):
                self._hand_off(HandOffReason.GROUP_RESET, not_now=covered)

    def reconfigure(self, spec: DeviceSpec, plan: DevicePlan) -> str:
        """Take a reloaded spec and plan, now when idle, else when the client goes."""
        with self._lock:
            if self._vm is not None:
                self._pending = (spec, plan)
                return "for the next client"
            self._adopt(spec, plan)
            return "now"

    def _adopt(self, spec: DeviceSpec, plan: DevicePlan) -> None:
        previous = self.owner
        self._pending = None
        self.spec = spec
        self.device = VirtualDevice(self.device.backend, plan, events=self.metrics)
        self.device.name = spec.name
        self._hand_off(HandOffReason.CONFIG_RELOADED, previous)


def _failure_of(record: dict[str, object]) -> str:
    steps = record.get("steps")
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and step.get("result") == "failed":
            return f"{step.get('name')}: {step.get('detail')}"
    return "a failed hand-off"


@dataclass
class Daemon:
    settings: Settings
    state: StateStore
    handoff: HandOff
    fabric: Fabric | None
    config: Path | None = None  # the file SIGHUP reloads; None: the command line's one device
    managed: list[ManagedDevice] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # device -> why it cannot be served
    reopening: set[str] = field(default_factory=set)  # failed devices tried again while serving
    notifier: Notifier = field(default_factory=Notifier)
    metrics: Metrics = field(default_factory=Metrics)
    vms: Vms = field(default_factory=Vms)  # which devices each client VM holds
    _group_turns: dict[int, threading.Lock] = field(default_factory=dict)
    _group_turns_lock: threading.Lock = field(default_factory=threading.Lock)

    def group_turn(self, group: int | None) -> contextlib.AbstractContextManager[object]:
        """The hand-offs of one IOMMU group's functions take turns; a lone function's need none."""
        if group is None:
            return contextlib.nullcontext()
        with self._group_turns_lock:
            return self._group_turns.setdefault(group, threading.Lock())

    @classmethod
    def open(cls, settings: Settings, config: Path | None = None, *, reopen: bool = False) -> Daemon:
        """Open, plan, recover and hand off every device; a device that fails is reported, not fatal.

        ``reopen``: a device that fails for the host's state is tried again while the daemon serves.

        Raises:
            StateError: the state directory cannot be used.
        """
        state = StateStore(settings.state_directory)
        state.prepare()
        metrics = Metrics()
        fabric = (
            Fabric(
                settings.fabric,
                _tenants(settings),
                on_change=lambda active: state.set_fabric_active(list(active)),
                on_command=metrics.fabric_command,
            )
            if settings.fabric
            else None
        )
        handoff = HandOff(settings.handoff, state, fabric.release if fabric else None)
        daemon = cls(settings, state, handoff, fabric, config, metrics=metrics, vms=Vms(metrics))
        left = state.left_sessions()
        for spec in settings.devices:
            with structlog.contextvars.bound_contextvars(device=spec.name):
                try:
                    device, _ = open_device(settings, spec)
                except OPEN_ERRORS as e:
                    daemon.failed[spec.name] = str(e)
                    if reopen and isinstance(e, HOST_STATE_ERRORS):
                        daemon.reopening.add(spec.name)
                        log.error("device not served yet", why=str(e), retry_every_s=REOPEN_INTERVAL)
                    else:
                        log.error("device not served", why=str(e))
                    continue
                daemon.managed.append(ManagedDevice(spec, device, daemon))
        for managed in daemon.managed:  # all open first: a bus reset may cover an IOMMU group's functions
            with structlog.contextvars.bound_contextvars(device=managed.spec.name):
                managed.start(left.get(managed.spec.name))
        if fabric is not None:
            fabric.recover(state.fabric_active())
        return daemon

    def status(self) -> str:
        blocked = sum(1 for m in self.managed if m.device.refusal)
        parts = [f"serving {len(self.managed)} device{'s' if len(self.managed) != 1 else ''}"]
        if blocked:
            parts.append(f"{blocked} refused (quarantine or protection)")
        if self.failed:
            parts.append(f"{len(self.failed)} not opened: {', '.join(sorted(self.failed))}")
        return "; ".join(parts)

    def _listeners(self) -> list[Listener]:
        """(server, listening socket, path we made and must remove) for every device.

        Raises:
            SocketError: a socket cannot be made, or given its owner and mode.
        """
        inherited = listen_fds()
        single = len(self.settings.devices) == 1 and len(inherited) == 1 and self.config is None
        managed = {m.spec.name: m for m in self.managed}
        made: list[Listener] = []
        try:
            for spec in self.settings.devices:
                server: DeviceServer | UnservedDevice
                if spec.name in managed:
                    server = self._server_of(managed[spec.name])
                elif spec.name in self.failed:
                    reopen = self._opened_later if spec.name in self.reopening else None
                    server = UnservedDevice(spec.name, self.failed[spec.name], reopen)
                else:
                    continue
                given = next(iter(inherited.values())) if single else inherited.pop(spec.name, None)
                if given:
                    made.append((server, given[0], None))
                    continue
                if not spec.socket:
                    if isinstance(server, UnservedDevice):
                        continue  # no socket to close its clients on
                    raise SocketError(f"{spec.name}: no --socket and no socket passed by systemd")
                path = Path(spec.socket)
                listener = bind_unix(path)
                made.append((server, listener, path))
                access = self.settings.access_for(spec.name)
                give_access(path, access.mode, access.uid, access.gid)
        except BaseException:
            _close(made)
            raise
        if not single:
            for name in inherited:
                log.warning("systemd passed a socket for no device of the config", name=name)
        return made

    def _server_of(self, managed: ManagedDevice) -> DeviceServer:
        return DeviceServer(managed.spec.name, managed, managed.metrics, fast_path=self.settings.fast_path)

    async def _opened_later(self, unserved: UnservedDevice) -> DeviceServer:
        """Try again every REOPEN_INTERVAL to open a device the host held back; its server once open."""
        name = unserved.name
        spec = self.settings.device(name)
        attempt = 1
        with structlog.contextvars.bound_contextvars(device=name):
            while True:
                await trio.sleep(REOPEN_INTERVAL)
                attempt += 1
                with contextlib.suppress(KeyError):  # a reload that drops it changes nothing before a restart
                    spec = self.settings.device(name)
                try:
                    device, _ = await trio.to_thread.run_sync(open_device, self.settings, spec)
                except OPEN_ERRORS as e:
                    if str(e) != unserved.why:  # the same failure again says nothing new
                        log.error("device not served yet", why=str(e), attempt=attempt)
                    unserved.why = self.failed[name] = str(e)
                    continue
                managed = ManagedDevice(spec, device, self)
                self.managed.append(managed)
                del self.failed[name]
                self.reopening.discard(name)
                await trio.to_thread.run_sync(managed.start, self.state.left_sessions().get(name))
                log.info("device opened: served from now on", attempt=attempt)
                self.notifier.status(self.status())
                return self._server_of(managed)

    def _say_request_path(self) -> None:
        if not self.settings.fast_path:
            log.info("every request is answered in Python", why="--no-fast-path, or fast_path = false")
        elif fast_tables.UNAVAILABLE is not None:
            log.warning("every request is answered in Python", why=fast_tables.UNAVAILABLE)
        else:
            log.info("config and plain BAR accesses are answered by the C fast path")

    def _metrics_listener(self, listeners: list[Listener]) -> socket.socket | None:
        """The metrics socket, when the config asks for one; added to ``listeners`` for the clean-up."""
        if not self.settings.metrics.socket:
            return None
        path = Path(self.settings.metrics.socket)
        try:
            listener = bind_unix(path)
        except BaseException:
            _close(listeners)
            raise
        listeners.append((None, listener, path))
        return listener

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM or SIGINT; the socket files made here are removed on the way out.

        The signal handlers are in place before the sockets exist, so a client or
        a service manager that sees a socket can always stop the daemon cleanly.
        """
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            self._say_request_path()
            listeners = self._listeners()
            metrics_listener = self._metrics_listener(listeners)
            reload_lock = trio.Lock()
            try:
                async with trio.open_nursery() as nursery:
                    for server, listener, _ in listeners:
                        if server is not None:
                            nursery.start_soon(server.serve, listener)
                    nursery.start_soon(self.notifier.keep_watchdog_fed)
                    if metrics_listener is not None:
                        nursery.start_soon(serve_metrics, metrics_listener, self.metrics.render)
                    if self.settings.metrics.textfile:
                        textfile = Path(self.settings.metrics.textfile)
                        interval = self.settings.metrics.interval
                        nursery.start_soon(
                            write_textfile_periodically, textfile, self.metrics.render, interval
                        )
                    task_status.started()
                    self.notifier.ready(self.status())
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            nursery.start_soon(self._reload, reload_lock)
                            continue
                        log.info("stopping", signal=signal.Signals(signum).name)
                        self.notifier.stopping()
                        nursery.cancel_scope.cancel()
                        break
            finally:
                _close(listeners)
                log.info("stopped", devices=[m.spec.name for m in self.managed])

    async def _reload(self, lock: trio.Lock) -> None:
        async with lock:
            self.notifier.reloading()
            log.info("reloading", config=str(self.config) if self.config else "the command line")
            if self.config is not None:
                await trio.to_thread.run_sync(self.reload_config)
            await self.resync_fabric()
            self.notifier.ready(self.status())

    def reload_config(self) -> None:
        """Re-read the config and quirk tables; a bad config changes nothing."""
        assert self.config is not None
        try:
            settings = load_settings(self.config)
        except InputErrors as e:
            log.error(
                "reload refused: the config has errors, the running one stays",
                errors=[str(x) for x in e.errors],
            )
            return
        before, after = {d.name for d in self.settings.devices}, {d.name for d in settings.devices}
        if before != after:
            log.warning(
                "devices added or removed: that takes a restart",
                added=sorted(after - before),
                removed=sorted(before - after),
            )
        if (settings.fabric is None) != (
            self.fabric is None
        ) or settings.state_directory != self.settings.state_directory:
            log.warning("the fabric section or the state directory changed: that takes a restart")
        elif self.fabric is not None and settings.fabric is not None:
            self.fabric.reconfigure(settings.fabric, _tenants(settings))
        if settings.fast_path != self.settings.fast_path:
            log.warning("fast_path changed: that takes a restart")
        self.handoff.policy = settings.handoff
        self.settings = settings
        for managed in self.managed:
            if managed.spec.name not in after:
                continue
            with structlog.contextvars.bound_contextvars(device=managed.spec.name):
                spec = settings.device(managed.spec.name)
                try:
                    plan = VirtualDevice.plan_for(
                        managed.device.backend,
                        quirk_table(spec),
                        device_context(settings, spec, managed.device.backend.peer_dma),
                        managed.device.plan.physical,
                    )
                except OPEN_ERRORS as e:
                    log.error(
                        "reload: the new policy cannot be planned; the device keeps its old one", why=str(e)
                    )
                    continue
                if spec == managed.spec and plan == managed.device.plan:
                    continue
                when = managed.reconfigure(spec, plan)
                log.info("new policy", takes_effect=when)

    async def resync_fabric(self) -> None:
        if self.fabric is None:
            return
        try:
            done = await trio.to_thread.run_sync(self.fabric.resync)
        except FabricError as e:
            log.error(
                "fabric resync failed; fabric devices refuse new clients until one succeeds", why=str(e)
            )
        else:
            log.info("fabric resynced", result=done)

    def close(self) -> None:
        for managed in self.managed:
            managed.device.backend.close()


def _tenants(settings: Settings) -> dict[str, str | None]:
    return {d.name: d.tenant for d in settings.devices}


def _close(listeners: list[Listener]) -> None:
    for _, listener, path in listeners:
        listener.close()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
