"""Tenant hand-off: making a device ready for its next tenant, or quarantining it.

Run when the daemon starts, when a client goes, and on demand (``vfio-mediator
scrub``). The steps, in order, each timed and recorded:

  release    the DMA mappings and eventfds the client left go
  reset      a secondary bus reset when the policy prefers it and it reaches
             nothing but the function and idle functions of its IOMMU group
             (an FLR can leave stale firmware state), else a function reset;
             a device with no reset method fails here unless its config opts
             out (reset = "none"); a function whose IOMMU group-mate still has
             a client waits for the group's reset (``not_now``)
  config     identity, capability layout and BAR types read back as before
  isolation  the policy's post-reset writes (NVLink link disable...), verified
  rom        the expansion ROM is well formed, for this vendor, and on the
             allow-list when there is one
  wipe       the operator's sanitisation command exits 0; one that needs the
             device (``release_device``) gets it closed for the command, and
             it must come back bound to vfio-pci and pass the config, ROM and
             isolation steps again
  fabric     the NVSwitch partition is released when this was its last GPU

The first failure ends the hand-off: later steps are recorded as not run,
except the fabric release, which runs anyway so a partition is never left
behind. A failed hand-off puts the device in quarantine (``mediator.state``):
it is refused until an operator releases it. The record goes to the audit
log and the state directory, where the device's records past the policy's
``keep`` limits are then removed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import structlog

from mediator.audit import audit_log
from mediator.commands import run_command
from mediator.pci.bars import BarType
from mediator.pci.chain import ChainError, walk
from mediator.pci.registers import Identity
from mediator.pci.rom import RomError, check_rom
from mediator.settings import HandoffSpec, expand
from mediator.state import StateStore
from mediator.virt.errors import DeviceError
from mediator.virt.plan import DevicePlan
from mediator.virt.reset import ResetMode

log = structlog.get_logger("mediator.handoff")

OK, FAILED, SKIPPED, NOT_RUN = "ok", "failed", "skipped", "not run"
# A wipe tool that had the device leaves it bound to vfio-pci again within this (udev may lag).
REBIND_SECONDS = 30.0


class HandOffReason(StrEnum):
    """Why a device is handed off, as its record and the audit log say."""

    DAEMON_START = "daemon start"
    RECOVERY = "recovery: the daemon stopped with a client attached"
    CLIENT_GONE = "client gone"
    BLOCKED = "before serving a blocked device"
    CONFIG_RELOADED = "config reloaded"
    ON_DEMAND = "on demand"
    GROUP_RESET = "its IOMMU group was handed off"


class StepFailed(Exception):
    """A hand-off step did not succeed; the message says what was found."""


@dataclass
class Step:
    name: str
    result: str  # ok, failed, skipped (nothing to do), not run (an earlier step failed)
    detail: str
    seconds: float = 0.0


@dataclass
class HandOffRecord:
    device: str
    bdf: str | None
    tenant: str | None  # the tenant the device is being taken from
    reason: str  # a HandOffReason, and what it is about where there is more to say
    started: str  # ISO 8601, UTC
    seconds: float = 0.0
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(step.result in (OK, SKIPPED) for step in self.steps)

    @property
    def failure(self) -> str | None:
        failed = next((s for s in self.steps if s.result == FAILED), None)
        return f"{failed.name}: {failed.detail}" if failed else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def reset_seconds(record: dict[str, Any]) -> float | None:
    """How long the hardware reset of a kept record (``HandOffRecord.to_json``) took; None: it had none."""
    steps = record.get("steps")
    for step in steps if isinstance(steps, list) else []:
        if isinstance(step, dict) and step.get("name") == "reset" and step.get("result") in (OK, FAILED):
            seconds = step.get("seconds")
            return float(seconds) if isinstance(seconds, int | float) else None
    return None


@dataclass(frozen=True)
class Owner:
    """Whose device it is, for the record and the wipe command."""

    name: str
    bdf: str | None = None
    tenant: str | None = None
    mdev: str | None = None


class HandedOff(Protocol):
    """What a hand-off does to a device (``mediator.virt.device.VirtualDevice`` is one)."""

    @property
    def plan(self) -> DevicePlan: ...

    def detach_client(self) -> tuple[int, int, float | None]:
        """Drop the client's DMA mappings and eventfds, once its reset still running is done;
        how many of each there were, and the seconds waited for that reset (None: there was none)."""
        ...

    def reset_hardware(self, *, bus: bool) -> str: ...

    def restore_shadow(self) -> None: ...

    def apply_post_reset_writes(self) -> None: ...

    def read_physical_config(self) -> bytes: ...

    def read_rom(self) -> bytes: ...

    released: bool  # let go, and not taken back yet

    def let_go(self) -> None:
        """Close what the daemon holds of the device, for a tool that binds it to another driver."""
        ...

    def take_back(self, timeout: float) -> None:
        """Open it again once it is bound to vfio-pci (within ``timeout``), with the regions it had."""
        ...

    def block(self, reason: str) -> None: ...

    def unblock(self) -> None: ...


class HandOff:
    def __init__(
        self,
        policy: HandoffSpec,
        state: StateStore,
        release_fabric: Callable[[str], str] | None = None,
    ) -> None:
        self.policy = policy
        self.state = state
        self._release_fabric = release_fabric

    def run(
        self,
        device: HandedOff,
        owner: Owner,
        reason: HandOffReason,
        reset: ResetMode | None = None,
        detail: str = "",
        *,
        concluded: Callable[[HandOffRecord], None] | None = None,
        not_now: str | None = None,
    ) -> HandOffRecord:
        """Every step; on a failure the device is blocked and quarantined.

        ``reset`` overrides the policy's reset mode for this device; ``detail`` goes after the reason;
        ``not_now`` says why the hardware is not reset in this hand-off (its IOMMU group's is).
        ``concluded`` runs once the device is unblocked or quarantined and before the audit line
        announces the result, so that whoever acts on that line finds the metrics and state it implies.
        """
        started = datetime.now(UTC)
        why = f"{reason} ({detail})" if detail else str(reason)
        record = HandOffRecord(
            owner.name, owner.bdf, owner.tenant, why, started.isoformat(timespec="seconds")
        )
        steps: list[tuple[str, Callable[[], str]]] = [
            ("release", lambda: _release(device)),
            ("reset", lambda: _reset(device, reset or self.policy.reset, not_now)),
            ("config", lambda: _config_as_before(device)),
            ("isolation", lambda: _isolation(device)),
            ("rom", lambda: _rom_check(device, self.policy)),
            ("wipe", lambda: self._wipe(device, owner)),
        ]
        clock = time.monotonic()
        for name, action in steps:
            if record.failure:
                record.steps.append(Step(name, NOT_RUN, "an earlier step failed"))
                continue
            record.steps.append(_timed(name, action))
        if self._release_fabric is not None:
            release_fabric = self._release_fabric
            record.steps.append(_timed("fabric", lambda: release_fabric(owner.name)))
        record.seconds = round(time.monotonic() - clock, 3)
        self._conclude(device, owner, record, started, concluded)
        return record

    def _wipe(self, device: HandedOff, owner: Owner) -> str:
        wiping = self.policy.wiping
        if wiping is None:
            raise _Skip("no wipe command configured")
        argv = expand(
            wiping.command,
            device=owner.name,
            bdf=owner.bdf or "",
            mdev=owner.mdev or "",
            tenant=owner.tenant or "",
        )
        if not wiping.release_device:
            return self._run_wipe(argv, owner)
        device.let_go()
        try:
            ran = self._run_wipe(argv, owner)
        finally:
            try:
                device.take_back(REBIND_SECONDS)
            except DeviceError as e:  # over the command's own failure: the device is not back
                raise StepFailed(f"the device did not come back from {argv[0]}: {e}") from None
        checks = []
        for check in (_config_as_before, lambda d: _rom_check(d, self.policy), _isolation):
            try:
                checks.append(check(device))
            except _Skip as e:
                checks.append(str(e))
            except (StepFailed, DeviceError, RomError, ChainError) as e:
                raise StepFailed(f"{ran}, but the device came back changed: {e}") from None
        return f"{ran}; the device was released to it and came back: " + "; ".join(checks)

    def _run_wipe(self, argv: list[str], owner: Owner) -> str:
        result = run_command("device wipe", argv, self.policy.wipe_timeout, device=owner.name)
        if not result.ok:
            raise StepFailed(f"{argv[0]}: {result.summary}" + (f": {result.output}" if result.output else ""))
        return f"{argv[0]}: {result.summary}"

    def _conclude(
        self,
        device: HandedOff,
        owner: Owner,
        record: HandOffRecord,
        started: datetime,
        concluded: Callable[[HandOffRecord], None] | None,
    ) -> None:
        document = record.to_json()
        try:
            where = self.state.keep_record(owner.name, started, document)
        except OSError as e:
            where = None
            audit_log.error("hand-off record not kept", device=owner.name, why=str(e))
        try:
            # Ages count to this hand-off's start: its own record is never too old, however long it ran.
            pruned = self.state.prune_records(owner.name, self.policy.retention, started)
        except OSError as e:
            audit_log.error("old hand-off records not pruned", device=owner.name, why=str(e))
        else:
            if pruned:
                log.info("old hand-off records pruned", device=owner.name, removed=pruned)
        failure = record.failure
        if failure is None:
            device.unblock()
        else:
            device.block(f"quarantined: {failure}")
            try:
                self.state.quarantine(owner.name, document)
            except OSError as e:
                audit_log.error("quarantine not recorded on disk", device=owner.name, why=str(e))
        if concluded is not None:
            concluded(record)
        announce = audit_log.info if failure is None else audit_log.error
        announce("hand-off", ok=failure is None, record=document, path=str(where) if where else None)


class _Skip(Exception):
    """Nothing to do for this step on this device."""


def _timed(name: str, action: Callable[[], str]) -> Step:
    clock = time.monotonic()
    try:
        result, detail = OK, action()
    except _Skip as e:
        result, detail = SKIPPED, str(e)
    except (StepFailed, DeviceError, RomError, ChainError) as e:
        result, detail = FAILED, str(e)
    except Exception as e:  # a step must never take the daemon down; the device is quarantined
        result, detail = FAILED, f"{type(e).__name__}: {e}"
    return Step(name, result, detail, round(time.monotonic() - clock, 3))


def _reset(device: HandedOff, mode: ResetMode, not_now: str | None) -> str:
    if mode == "none" or not_now:
        device.restore_shadow()
        raise _Skip(not_now or 'the config says this device is not reset between tenants (reset = "none")')
    return device.reset_hardware(bus=mode == "bus")


def _release(device: HandedOff) -> str:
    taken_back = ""
    if device.released:  # a wipe tool had it and did not give it back: it must be back by now
        device.take_back(0)
        taken_back = "; taken back from the wipe tool that had it"
    mappings, eventfds, waited = device.detach_client()
    left = f"{mappings} DMA mappings, {eventfds} eventfds{taken_back}"
    if waited is None:
        return left
    return f"{left}; the client's reset that outlived its deadline ran {waited:.1f} s more"


def _config_as_before(device: HandedOff) -> str:
    before = device.plan.physical
    now = device.read_physical_config()
    if now[:2] == b"\xff\xff":
        raise StepFailed("the device does not answer: its config space reads all ones")
    if Identity.of(now) != Identity.of(before):
        raise StepFailed(f"the device now reads as {Identity.of(now)}, it was {Identity.of(before)}")
    layout_before = [(c.kind.name, c.id, c.offset) for c in walk(before).all()]
    layout_now = [(c.kind.name, c.id, c.offset) for c in walk(now).all()]
    if layout_now != layout_before:
        raise StepFailed(f"the capability layout changed: {layout_now} instead of {layout_before}")
    for bar in device.plan.bars:  # implemented BARs only: an upper half holds address bits
        if BarType.of(now, bar.index) != bar.physical_type:
            raise StepFailed(
                f"BAR{bar.index} is now {BarType.of(now, bar.index)}, it was {bar.physical_type}"
            )
    return f"identity, {len(layout_now)} capabilities and BAR types as before"


def _isolation(device: HandedOff) -> str:
    writes = device.plan.post_reset
    if not writes:
        raise _Skip("the policy has no post-reset writes for this device")
    device.apply_post_reset_writes()
    verified = sum(1 for w in writes if w.verify)
    return f"{len(writes)} post-reset writes made, {verified} verified"


def _rom_check(device: HandedOff, policy: HandoffSpec) -> str:
    rom = device.plan.rom
    if rom is None:
        raise _Skip("no expansion ROM")
    allowed = frozenset(h.lower() for h in policy.rom_sha256)
    data = device.read_rom()
    checked = check_rom(data, device.plan.identity, allowed)
    listed = ", on the allow-list" if allowed else ""
    return f"{len(checked.images)} image(s), {checked.length} bytes, SHA-256 {checked.sha256}{listed}"
