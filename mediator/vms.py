"""Client VMs: which devices each client process holds (docs/vm-space.md).

QEMU connects once per device, so the connections of one client process
are the devices of one VM, and those share what a VM shares (its IOMMU
space, its peers' BARs). A VM is the client's pid together with that
process's start time, so a pid the kernel hands to a later process is
another VM. Where /proc hides the client (the shipped units' ProtectProc=
invisible hides other users' processes), the start time reads 0 and a VM
is its pid alone; that only matters if a connection outlives its process
long enough for the pid to be reused. ``Vms`` is the registry: each VM has
one IOMMU space (``backends.space``), made with its first device and torn
down when its last one has left it; devices join and leave from their
session threads, hence the lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mediator.backends.space import IommuSpace

# /proc/PID/stat: the fields after the command's closing parenthesis start at field 3;
# starttime is field 22 (proc(5)).
_STARTTIME = 22 - 3


@dataclass(frozen=True)
class VmId:
    pid: int
    started: int  # clock ticks after boot; 0 when the process had gone before it could be read

    def __str__(self) -> str:
        return str(self.pid)


def vm_of(pid: int, proc: Path = Path("/proc")) -> VmId:
    try:
        stat = (proc / str(pid) / "stat").read_text()
        return VmId(pid, int(stat[stat.rindex(")") + 2 :].split()[_STARTTIME]))
    except (OSError, ValueError, IndexError):  # gone already: its session ends at once
        return VmId(pid, 0)


@dataclass(frozen=True)
class VmFigures:
    """A VM's devices and what its IOMMU space holds, each mapping counted once."""

    devices: int
    mappings: int
    pinned_bytes: int
    pending_bytes: int  # mapped, still being pinned
    peer_mappings: int


class VmEvents(Protocol):
    """Where a VM's devices and IOMMU space are reported (``mediator.metrics.series.Metrics``)."""

    def vm_changed(self, vm: str, space: VmFigures) -> None: ...

    def vm_gone(self, vm: str) -> None: ...


class _Unreported:
    def vm_changed(self, vm: str, space: VmFigures) -> None:
        """Nobody asked."""

    def vm_gone(self, vm: str) -> None:
        """Nobody asked."""


class Vms:
    def __init__(self, events: VmEvents | None = None) -> None:
        self.events = events or _Unreported()
        self._lock = threading.Lock()
        # A VM's figures are reported under this lock, so a report computed just before the VM
        # goes cannot land after its ``vm_gone`` and bring its series back.
        self._reporting = threading.Lock()
        self._devices: dict[VmId, set[str]] = {}
        self._spaces: dict[VmId, IommuSpace] = {}

    def join(self, vm: VmId, device: str) -> tuple[IommuSpace, tuple[str, ...]]:
        """``device`` is now held by ``vm``: the VM's IOMMU space, and every device the VM holds, sorted."""
        with self._lock:
            held = self._devices.setdefault(vm, set())
            held.add(device)
            space = self._spaces.get(vm)
            if space is None:
                space = self._spaces[vm] = IommuSpace(
                    f"VM {vm}'s IOMMU space", changed=lambda space: self._report(vm, space)
                )
            devices = tuple(sorted(held))
        self._report(vm, space)
        return space, devices

    def leave(self, vm: VmId, device: str) -> tuple[str, ...]:
        """``device`` (already out of the VM's space) is no longer held; the devices the VM still holds.

        The last device to leave tears the VM's space down.
        """
        with self._lock:
            held = self._devices.get(vm, set())
            held.discard(device)
            devices = tuple(sorted(held))
            space = self._spaces.get(vm) if devices else self._spaces.pop(vm, None)
            if not devices:
                self._devices.pop(vm, None)
        if devices:
            if space is not None:
                self._report(vm, space)
            return devices
        if space is not None:
            space.close()
        with self._reporting:
            self.events.vm_gone(str(vm))
        return ()

    def _report(self, vm: VmId, space: IommuSpace) -> None:
        # Called outside the space's lock (the space's own reads take it).
        with self._reporting:
            with self._lock:
                if self._spaces.get(vm) is not space:  # a late change of a VM that has gone
                    return
                devices = len(self._devices[vm])
            figures = VmFigures(
                devices, len(space), space.pinned_bytes, space.pending_bytes, space.peer_mappings
            )
            self.events.vm_changed(str(vm), figures)
