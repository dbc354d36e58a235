"""Client VMs: which devices each client process holds (docs/vm-space.md).

QEMU connects once per device, so the connections of one client process
are the devices of one VM, and those share what a VM shares (its IOMMU
space, its peers' BARs). A VM is the client's pid together with that
process's start time, so a pid the kernel hands to a later process is
another VM. Where /proc hides the client (the shipped units' ProtectProc=
invisible hides other users' processes), the start time reads 0 and a VM
is its pid alone; that only matters if a connection outlives its process
long enough for the pid to be reused. ``Vms`` is the registry; devices join
and leave it from their session threads, hence the lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

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


class Vms:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[VmId, set[str]] = {}

    def join(self, vm: VmId, device: str) -> tuple[str, ...]:
        """``device`` is now held by ``vm``; every device the VM holds, sorted."""
        with self._lock:
            held = self._devices.setdefault(vm, set())
            held.add(device)
            return tuple(sorted(held))

    def leave(self, vm: VmId, device: str) -> tuple[str, ...]:
        """``device`` is no longer held by ``vm``; the devices the VM still holds."""
        with self._lock:
            held = self._devices.get(vm, set())
            held.discard(device)
            if not held:
                self._devices.pop(vm, None)
            return tuple(sorted(held))
