"""NVSwitch fabric partitions, driven through an operator's command (Fabric Manager's ``fmpm``).

On NVSwitch systems NVLink isolation is Fabric Manager's routing: GPUs
exchange NVLink traffic only inside an active partition, and partitions are
a fixed menu. For a device's tenant the daemon picks the configured
partition that holds exactly the GPUs that tenant owns here, so a partition
is never activated unless every GPU in it belongs to the same tenant. It is
activated when the first of those GPUs gets a client and deactivated when
the last of them has been handed off (after its reset, as Fabric Manager
expects).

Fail closed: a device that is in some partition but cannot have its own (no
tenant, no exact partition, the command failed, the fabric out of sync) is
not served. Fabric Manager forgets activations when it restarts; ``resync``
(on SIGHUP) gives it the active list again, and while a resync has failed
no new session starts on a fabric device. The active list is kept on disk:
a daemon that restarts deactivates what its predecessor left active, so no
partition is stranded. Every command is audited (``mediator.commands``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, get_args

import structlog

from mediator.commands import run_command
from mediator.settings import FabricSpec, expand

log = structlog.get_logger("mediator.fabric")

FabricAction = Literal["activate", "deactivate", "resync"]
FABRIC_ACTIONS: tuple[FabricAction, ...] = get_args(FabricAction)


class FabricError(Exception):
    """The fabric step cannot be carried out; the device must not be served."""


class Fabric:
    def __init__(
        self,
        spec: FabricSpec,
        tenants: Mapping[str, str | None],
        on_change: Callable[[frozenset[int]], None] | None = None,
        on_command: Callable[[FabricAction, bool], None] | None = None,
    ) -> None:
        """``on_change`` is told the active partitions after every change (to keep them on disk),
        ``on_command`` every command's action and success (for the metrics)."""
        self._lock = threading.Lock()
        self._active: set[int] = set()
        self._held: dict[str, int] = {}  # device with a client -> its partition
        self._on_change = on_change
        self._on_command = on_command
        self.in_sync = True
        self.reconfigure(spec, tenants)

    def reconfigure(self, spec: FabricSpec, tenants: Mapping[str, str | None]) -> None:
        """New commands, partitions and tenancy for the next activation; active partitions stay."""
        with self._lock:
            self.spec = spec
            self._tenants = dict(tenants)
            self._partitions = {p.id: frozenset(p.devices) for p in spec.partition}
            self._on_fabric = frozenset().union(*self._partitions.values())

    def recover(self, left_active: Iterable[int]) -> None:
        """Deactivate what a previous daemon left active: no client holds those GPUs after a restart.

        A partition that cannot be deactivated stays listed and the fabric is
        out of sync (fabric devices are refused) until a resync succeeds.
        """
        for partition in sorted(left_active):
            with self._lock:
                self._active.add(partition)
                try:
                    self._call("deactivate", partition, "daemon start")
                except FabricError as e:
                    self.in_sync = False
                    log.error(
                        "a partition left active cannot be deactivated; send SIGHUP to retry", why=str(e)
                    )
                else:
                    self._active.discard(partition)
                self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(frozenset(self._active))

    @property
    def active(self) -> frozenset[int]:
        return frozenset(self._active)

    def partition_for(self, device: str) -> int | None:
        """The partition ``device``'s tenant may have; None for a device on no partition.

        Raises:
            FabricError: the device is on the fabric but no partition fits its tenant.
        """
        if device not in self._on_fabric:
            return None
        tenant = self._tenants.get(device)
        if tenant is None:
            raise FabricError(f"{device} has no tenant, so no fabric partition can be chosen for it")
        owned = frozenset(d for d in self._on_fabric if self._tenants.get(d) == tenant)
        for partition, members in sorted(self._partitions.items()):
            if members == owned:
                return partition
        raise FabricError(
            f"no fabric partition holds exactly tenant {tenant}'s GPUs ({', '.join(sorted(owned))}); "
            "partitions: "
            + "; ".join(f"{p}: {', '.join(sorted(m))}" for p, m in sorted(self._partitions.items()))
        )

    def acquire(self, device: str) -> str:
        """Make sure the device's partition is active before its client starts; what was done."""
        partition = self.partition_for(device)
        if partition is None:
            return "not on the fabric"
        with self._lock:
            if not self.in_sync:
                raise FabricError("the fabric is out of sync since a resync failed; send SIGHUP to retry")
            if partition not in self._active:
                self._call("activate", partition, device)
                self._active.add(partition)
                self._changed()
                done = f"partition {partition} activated"
            else:
                done = f"partition {partition} already active"
            self._held[device] = partition
        return done

    def holds(self, device: str) -> bool:
        """Whether ``device`` has a client in an active partition."""
        with self._lock:
            return device in self._held

    def release(self, device: str) -> str:
        """The device's client is gone and the device reset: deactivate when it was the last one."""
        with self._lock:
            partition = self._held.pop(device, None)
            if partition is None:
                return "no partition held"
            if partition in self._held.values():
                return f"partition {partition} stays active for its other GPUs"
            if partition in self._active:
                self._call("deactivate", partition, device)
                self._active.discard(partition)
                self._changed()
            return f"partition {partition} deactivated"

    def resync(self) -> str:
        """Give Fabric Manager the list of active partitions again (after it restarted)."""
        if self.spec.resync is None:
            return "no resync command configured"
        with self._lock:
            active = ",".join(str(p) for p in sorted(self._active))
            result = run_command(
                "fabric resync",
                expand(self.spec.resync, partitions=active),
                self.spec.timeout,
                partitions=active,
            )
            self.in_sync = result.ok
            self._counted("resync", result.ok)
            if not result.ok:
                raise FabricError(f"fabric resync failed: {result.summary}: {result.output}")
            return f"active partitions set: {active or 'none'}"

    def _counted(self, action: FabricAction, ok: bool) -> None:
        if self._on_command is not None:
            self._on_command(action, ok)

    def _call(self, action: FabricAction, partition: int, device: str) -> None:
        command = self.spec.activate if action == "activate" else self.spec.deactivate
        result = run_command(
            f"fabric {action}",
            expand(command, partition=str(partition)),
            self.spec.timeout,
            partition=partition,
            device=device,
        )
        self._counted(action, result.ok)
        if not result.ok:
            raise FabricError(
                f"fabric {action} of partition {partition} failed: {result.summary}: {result.output}"
            )
