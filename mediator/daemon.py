"""The daemon: every device of the config served on its socket, each with its own lifecycle.

Start-up opens each device (a real function through VFIO, or a simulated
profile), plans it with the quirk tables and its tenancy context, and hands
it off once (reset, isolation, checks) before its socket exists, unless it
is in quarantine. A device that cannot be opened or planned is reported and
left out; the others are served. ``ManagedDevice`` is the per-device
lifecycle the server calls around each client: it refuses quarantined
devices (re-checking after an operator's release), activates the fabric
partition, and hands the device off when the client goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from mediator.audit import audit_log
from mediator.backends.base import Backend, BackendError
from mediator.backends.profile import load_profile, resolve_profile
from mediator.backends.sim import SimBackend
from mediator.backends.sysfs import DeviceNotReady
from mediator.backends.vfio import VfioBackend
from mediator.errors import InputErrors
from mediator.fabric import Fabric, FabricError
from mediator.handoff import HandOff, HandOffRecord, Owner
from mediator.pci.chain import ChainError
from mediator.quirks.table import QuirkTable
from mediator.settings import DeviceSpec, Settings
from mediator.state import StateStore
from mediator.tenancy import device_context
from mediator.vfio_user.server import DeviceServer, serve_until_signalled
from mediator.virt.device import VirtualDevice
from mediator.virt.plan import PlanError

log = structlog.get_logger("mediator.daemon")


def open_backend(spec: DeviceSpec) -> Backend:
    if spec.bdf is not None:
        return VfioBackend(spec.bdf, bar_access=spec.bar_access)
    assert spec.profile is not None
    return SimBackend(load_profile(resolve_profile(spec.profile)))


def open_device(settings: Settings, spec: DeviceSpec) -> tuple[VirtualDevice, QuirkTable]:
    """The planned device and its quirk table.

    Raises:
        InputErrors, PlanError, ChainError, DeviceNotReady, BackendError.
    """
    table = QuirkTable.load([Path(q) for q in spec.quirks], builtin=spec.builtin_quirks)
    backend = open_backend(spec)
    try:
        return VirtualDevice.open(backend, table, device_context(settings, spec)), table
    except BaseException:
        backend.close()
        raise


class ManagedDevice:
    """One served device: quarantine, fabric partition and hand-off around each client."""

    def __init__(
        self,
        spec: DeviceSpec,
        device: VirtualDevice,
        handoff: HandOff,
        state: StateStore,
        fabric: Fabric | None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.owner = Owner(spec.name, spec.bdf, spec.tenant)
        self._handoff = handoff
        self._state = state
        self._fabric = fabric
        self._admitted = False

    def start(self) -> HandOffRecord | None:
        """Before the socket exists: a quarantined device stays blocked, any other is handed off."""
        if self._quarantine_reason() is None:
            return self._handoff.run(self.device, self.owner, "daemon start", self.spec.reset)
        return None

    def _quarantine_reason(self) -> str | None:
        record = self._state.quarantined(self.spec.name)
        if record is None:
            return None
        why = record.get("unreadable") or _failure_of(record)
        reason = (
            f"quarantined since {record.get('started', 'an earlier hand-off')}: {why}; "
            f"after fixing the cause run `vfio-mediator release --device {self.spec.name}`"
        )
        if self.device.blocked != reason:
            self.device.block(reason)
        return reason

    def admit(self) -> str | None:
        reason = self._quarantine_reason()
        if reason is not None:
            return reason
        if self.device.blocked:  # released by an operator, or a protection failed: try again from the start
            record = self._handoff.run(
                self.device, self.owner, "before serving a blocked device", self.spec.reset
            )
            if not record.ok:
                return self.device.blocked
        if self._fabric is not None:
            try:
                self._fabric.acquire(self.spec.name)
            except FabricError as e:
                audit_log.error("fabric partition refused", why=str(e))
                return str(e)
        self._admitted = True
        return None

    def release(self) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._handoff.run(self.device, self.owner, "client gone", self.spec.reset)


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
    fabric: Fabric | None
    managed: list[ManagedDevice]
    failed: dict[str, str]  # device -> why it cannot be served at all

    @classmethod
    def open(cls, settings: Settings) -> Daemon:
        """Open, plan and hand off every device; a device that fails is reported, not fatal."""
        state = StateStore(settings.state_directory)
        state.prepare()
        fabric = (
            Fabric(settings.fabric, {d.name: d.tenant for d in settings.devices}) if settings.fabric else None
        )
        handoff = HandOff(settings.handoff, state, fabric.release if fabric else None)
        managed, failed = [], {}
        for spec in settings.devices:
            with structlog.contextvars.bound_contextvars(device=spec.name):
                try:
                    device, _ = open_device(settings, spec)
                except (InputErrors, PlanError, ChainError, DeviceNotReady, BackendError) as e:
                    failed[spec.name] = str(e)
                    log.error("device not served", why=str(e))
                    continue
                managed_device = ManagedDevice(spec, device, handoff, state, fabric)
                managed_device.start()
                managed.append(managed_device)
        return cls(settings, state, fabric, managed, failed)

    def servers(self) -> list[tuple[DeviceServer, Path]]:
        return [(DeviceServer(m.device, m.spec.name, m), Path(m.spec.socket)) for m in self.managed]

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

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_until_signalled(self.servers(), self.resync_fabric, task_status=task_status)

    def close(self) -> None:
        for managed in self.managed:
            managed.device.backend.close()
