"""IOMMU spaces: what the devices in one space reach by DMA, each mapping pinned once.

A space is a VM's (every device its client holds) or a device's *home*
(nothing mapped: where it sits between clients, docs/vm-space.md). Each
connection of a VM maps the guest's RAM through its own fds; a mapping is
identified by what it maps (IOVA, size, permissions, and the fd's device,
inode and offset). The first connection's mapping of an identity is
programmed into the IOMMU and *carries* it (its mmap is what the simulator
reads); the others only join it, and the kernel's unmap happens when the
last one lets go. When the carrier goes first, another holder carries on
with nothing reprogrammed: the IOMMU holds the pages, not the address.

The connections of a VM do not change their maps in step: QEMU gives each
device its own memory listener, so while the guest's memory layout changes
(the firmware shadowing its ROMs, a BAR moving) one connection still holds
the old layout while the next sends the new one. A map that overlaps
another connection's mapping of something else therefore *waits*: it is
recorded, and programmed as soon as the range is free. Meanwhile the VM's
devices reach the older mapping, which is the same guest's memory; within
one connection an overlap stays an error (the connection's own table).

Peer-to-peer. QEMU also sends every device a map *without an fd* for each
mmapped BAR in the guest's address space, its peers' included. The space's
members (the devices in it) say where the guest put their BARs while memory
decoding is on (``Peer.peer_bars``); an fd-less mapping that lies inside one
of them is mapped to that BAR's memory (the daemon's own mmap of it), one
IOMMU mapping per mmappable area it covers, so a trap window or the padding
of a BAR never becomes a peer's target. ``refresh`` follows the guest's BAR
and command writes: a BAR that moves or stops decoding is unmapped, and
mapped again when it is back. Only the space's own members are looked at:
a client never reaches another client's devices. A range that spans two
BARs, or a BAR and anything else, is refused (EINVAL): QEMU gives each BAR
its own memory region, so only a hostile client sends one.

The kernel side is the space's ``Iommu`` (a type1 container, an iommufd
IOAS), into which guest memory is pinned in the background
(``backends.pinning``): the space is *ready* once every mapping is pinned,
and tells its members when that changes, or when a pin failed. The
simulator has no IOMMU unless a fault asks for one, and reads and writes
guest memory through the space's tables, as a real device's DMA goes
through the IOMMU's: memory not pinned yet faults. The devices of one VM
are served from their own session threads, and the pinner has its own,
hence the lock.
"""

from __future__ import annotations

import errno
import mmap
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from mediator.backends.dma import DmaError, DmaMapping, DmaTable, release
from mediator.backends.pinning import Iommu, Pinner

log = structlog.get_logger("mediator.backends")


@dataclass(frozen=True)
class PeerBar:
    """Where the guest put one of a device's memory BARs, with decoding on."""

    index: int
    start: int  # guest-physical address
    size: int  # as the guest sees it (padding included)
    areas: tuple[tuple[int, int], ...]  # (offset, size) a peer may reach: the mmappable parts


class Peer(Protocol):
    """A device in a space, as a target of its peers' DMA."""

    name: str

    def peer_bars(self) -> Sequence[PeerBar]: ...

    def bar_memory(self, index: int, offset: int, size: int) -> mmap.mmap:
        """The daemon's own mapping of part of a BAR; the caller closes it."""
        ...

    def pinning_changed(self) -> None:
        """The space became ready, or stopped being ready, or a pin failed (told without the lock)."""
        ...


# What a peer mapping maps: (the device, BAR, offset in it, IOVA, size).
_PeerKey = tuple[int, int, int, int, int]


def _identity(mapping: DmaMapping) -> tuple[object, ...]:
    return mapping.iova, mapping.size, mapping.flags, mapping.source


class IommuSpace:
    def __init__(
        self, name: str, iommu: Iommu | None = None, changed: Callable[[IommuSpace], None] | None = None
    ) -> None:
        """``changed`` is told after the space's mappings change (for the VM's metrics)."""
        self.name = name
        self.iommu = iommu
        self._changed = changed
        self._lock = threading.Condition()
        self._pinner = Pinner(name, self._lock, self._notify)
        self._told_ready = True  # what the members were last told
        # No bound of its own: every connection's own table bounds what it adds.
        self._carriers = DmaTable(max_mappings=None)
        self._holders: dict[int, list[DmaMapping]] = {}  # id(carrier) -> every mapping of that identity
        self._carrier_of: dict[int, DmaMapping] = {}  # id(mapping) -> the carrier of its identity
        self._waiting: list[DmaMapping] = []  # in arrival order
        self._members: list[Peer] = []
        # id(fd-less carrier) -> the peer mappings it resolved to, keyed by what they map
        self._resolved: dict[int, dict[_PeerKey, DmaMapping]] = {}
        self._peer_mappings = DmaTable(max_mappings=None)  # every resolved piece, for the simulator
        self._unresolved_logged: set[tuple[int, int]] = set()

    def __repr__(self) -> str:
        return f"IommuSpace({self.name!r})"

    def __len__(self) -> int:
        """Mappings in the IOMMU, each counted once."""
        with self._lock:
            return len(self._carriers)

    @property
    def pinned_bytes(self) -> int:
        """Client memory mapped in the IOMMU, counted once however many connections mapped it."""
        with self._lock:
            return self._carriers.backed_bytes - self._pinner.unpinned_bytes

    @property
    def pending_bytes(self) -> int:
        """Client memory mapped but not pinned yet."""
        with self._lock:
            return self._pinner.pending_bytes

    @property
    def ready(self) -> bool:
        """Every mapping is pinned: the devices may be given bus mastering."""
        with self._lock:
            return self._pinner.ready

    @property
    def pin_failure(self) -> str | None:
        """Why memory of the space could not be pinned, until that mapping is released."""
        with self._lock:
            return self._pinner.failure

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until every mapping is pinned or a pin has failed, and the members know; False on timeout."""
        pinner = self._pinner
        with self._lock:
            return bool(
                self._lock.wait_for(
                    lambda: (pinner.ready or pinner.failure) and not pinner.announcing, timeout
                )
            )

    def acquire(self, mapping: DmaMapping) -> None:
        """A connection's new mapping: pinned in the background, joined to the same one, or waiting.

        Raises DmaError for a range it refuses; then nothing of the mapping stays in the space.
        """
        with self._lock:
            self._place(mapping)
        self._notify()

    def release(self, mappings: list[DmaMapping]) -> None:
        """A connection lets go of ``mappings`` (the caller then closes their memory).

        What nobody holds any more is unmapped; what waited for the range is placed. An IOMMU
        unmap that fails still takes the mapping out of the space; the first failure is raised.
        A mapping still being pinned is unmapped once the chunk in progress is done.
        """
        try:
            with self._lock:
                carriers = [c for m in mappings if (c := self._carrier_of.get(id(m))) is not None]
                held = self._pinner.hold(carriers)
                try:
                    self._release(mappings)
                finally:
                    self._pinner.let_go(held)
        finally:
            self._notify()

    def _place(self, mapping: DmaMapping) -> None:
        other = self._carriers.conflict(mapping.iova, mapping.size)
        if other is None:
            if mapping.backed and self.iommu is not None:
                self._pinner.add(mapping, self.iommu)
            self._carriers.insert(mapping)
            self._holders[id(mapping)] = [mapping]
            self._carrier_of[id(mapping)] = mapping
            if not mapping.backed:
                try:
                    self._resolve(mapping, self._bars(), refusing=True)
                except DmaError:
                    self._unresolve(mapping)
                    self._carriers.remove([mapping])
                    del self._holders[id(mapping)], self._carrier_of[id(mapping)]
                    raise
        elif _identity(other) == _identity(mapping):
            self._holders[id(other)].append(mapping)
            self._carrier_of[id(mapping)] = other
        else:
            self._waiting.append(mapping)

    def _release(self, mappings: list[DmaMapping]) -> None:
        leaving = {id(m) for m in mappings}
        if self._waiting:
            self._waiting = [m for m in self._waiting if id(m) not in leaving]
        carriers = {id(c): c for m in mappings if (c := self._carrier_of.pop(id(m), None)) is not None}
        failure: Exception | None = None
        gone = []
        for carrier in carriers.values():
            staying = [m for m in self._holders.pop(id(carrier)) if id(m) not in leaving]
            if staying:  # another holder carries on: the IOMMU keeps the pages it pinned
                self._carriers.replace(carrier, staying[0])
                self._pinner.replace(carrier, staying[0])
                self._holders[id(staying[0])] = staying
                for m in staying:
                    self._carrier_of[id(m)] = staying[0]
                if id(carrier) in self._resolved:
                    self._resolved[id(staying[0])] = self._resolved.pop(id(carrier))
                continue
            gone.append(carrier)
            self._unresolve(carrier)
            pinned = self._pinner.forget(carrier)
            if carrier.backed and self.iommu is not None and pinned:
                try:
                    self.iommu.unmap(carrier.iova, pinned)
                except Exception as e:  # the rest still goes; the first failure is raised
                    failure = failure or e
        self._carriers.remove(gone)
        self._place_waiting()
        if failure is not None:
            raise failure

    def _place_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for mapping in waiting:
            try:
                self._place(mapping)
            except DmaError:  # it spans BARs as they are now: it waits for the next change
                self._waiting.append(mapping)

    @property
    def peer_mappings(self) -> int:
        with self._lock:
            return len(self._peer_mappings)

    def join(self, member: Peer) -> None:
        """A device enters the space: its BARs become its peers' targets."""
        with self._lock:
            self._members.append(member)
            self._refresh()
        self._notify()

    def leave(self, member: Peer) -> None:
        """A device leaves: nothing maps its BARs any more (so its fd can close)."""
        with self._lock:
            self._members = [m for m in self._members if m is not member]
            self._refresh()
        self._notify()

    def refresh(self) -> None:
        """A member's BARs or decoding may have changed: peer mappings follow."""
        with self._lock:
            self._refresh()
        self._notify()

    def _refresh(self) -> None:
        bars = self._bars()  # read once: each member's are its config registers
        for carrier in self._carriers.mappings():
            if not carrier.backed:
                self._resolve(carrier, bars, refusing=False)

    def _bars(self) -> list[tuple[Peer, PeerBar]]:
        return [(member, bar) for member in self._members for bar in member.peer_bars()]

    def _resolve(self, carrier: DmaMapping, bars: list[tuple[Peer, PeerBar]], *, refusing: bool) -> None:
        """Make the carrier's peer mappings what ``bars`` say now; ``refusing``: a bad span is EINVAL."""
        targets = [(m, b) for m, b in bars if b.start < carrier.end and carrier.iova < b.start + b.size]
        wanted: dict[_PeerKey, tuple[Peer, PeerBar, int, int]] = {}
        if (
            len(targets) == 1
            and targets[0][1].start <= carrier.iova
            and carrier.end <= sum((targets[0][1].start, targets[0][1].size))
        ):
            member, bar = targets[0]
            for offset, size in bar.areas:
                start, end = (
                    max(carrier.iova, bar.start + offset),
                    min(carrier.end, bar.start + offset + size),
                )
                if start < end:
                    key = (id(member), bar.index, start - bar.start, start, end - start)
                    wanted[key] = (member, bar, start, end - start)
        elif targets:
            why = f"DMA range {carrier.iova:#x}+{carrier.size:#x} spans " + ", ".join(
                f"{member.name} BAR{bar.index}" for member, bar in targets
            )
            if refusing:
                raise DmaError(errno.EINVAL, why + ": a map must lie inside one BAR")
            self._log_unresolved(carrier, why)
        else:
            self._log_unresolved(carrier, "no device of this VM has a BAR there (or a vIOMMU remaps it)")
        have = self._resolved.setdefault(id(carrier), {})
        for key in [k for k in have if k not in wanted]:
            self._unmap_peer(have.pop(key))
        for key, (member, bar, start, size) in wanted.items():
            if key not in have:
                peer = self._map_peer(carrier, member, bar, start, size)
                if peer is not None:
                    have[key] = peer
        if not have:
            del self._resolved[id(carrier)]

    def _map_peer(
        self, carrier: DmaMapping, member: Peer, bar: PeerBar, start: int, size: int
    ) -> DmaMapping | None:
        try:
            memory = member.bar_memory(bar.index, start - bar.start, size)
        except (OSError, ValueError) as e:
            log.warning("peer BAR not mapped", peer=member.name, bar=bar.index, why=str(e))
            return None
        peer = DmaMapping(start, size, carrier.flags, memory)
        try:
            if self.iommu is not None:
                self.iommu.map(peer, 0, size)
        except Exception as e:  # the IOMMU cannot map device memory here: DMA to it faults, as before
            release([peer])
            log.warning("peer BAR not mapped", peer=member.name, bar=bar.index, iova=hex(start), why=str(e))
            return None
        self._peer_mappings.insert(peer)
        log.info("peer BAR mapped", peer=member.name, bar=bar.index, iova=hex(start), size=size)
        return peer

    def _unmap_peer(self, peer: DmaMapping) -> None:
        self._peer_mappings.remove([peer])
        try:
            if self.iommu is not None:
                self.iommu.unmap(peer.iova, peer.size)
        finally:
            release([peer])

    def _unresolve(self, carrier: DmaMapping) -> None:
        for peer in self._resolved.pop(id(carrier), {}).values():
            self._unmap_peer(peer)

    def _log_unresolved(self, carrier: DmaMapping, why: str) -> None:
        key = (carrier.iova, carrier.size)
        if key not in self._unresolved_logged:  # once per range: QEMU sends the same map to every device
            self._unresolved_logged.add(key)
            log.info("fd-less DMA range left unbacked", iova=hex(carrier.iova), size=carrier.size, why=why)

    def _notify(self) -> None:
        """After a change: the metrics, and the members when readiness changed or a pin failed."""
        if self._changed is not None:
            self._changed(self)
        with self._lock:
            ready = self._pinner.ready
            members = list(self._members) if ready != self._told_ready or self._pinner.failure else []
            self._told_ready = ready
        for member in members:
            member.pinning_changed()

    # the simulator's DMA: through the space, as a real device's goes through the IOMMU
    def read(self, iova: int, length: int) -> bytes:
        with self._lock:
            self._check_pinned(iova, length)
            return self._table_for(iova).read(iova, length)

    def write(self, iova: int, data: bytes) -> None:
        with self._lock:
            self._check_pinned(iova, len(data))
            self._table_for(iova).write(iova, data)

    def _check_pinned(self, iova: int, length: int) -> None:
        carrier = self._carriers.conflict(iova, length)
        pin = self._pinner.pin_of(carrier) if carrier is not None else None
        if pin is not None and not pin.pinned(iova, length):
            raise DmaError(errno.EFAULT, f"DMA to {iova:#x}+{length:#x}: not pinned yet")

    def _table_for(self, iova: int) -> DmaTable:
        """A peer's BAR where one is mapped (its fd-less carrier has no memory), else the carriers."""
        return self._peer_mappings if self._peer_mappings.conflict(iova, 1) is not None else self._carriers

    def close(self) -> None:
        """Tear the space down: the kernel's context goes (its mappings with it)."""
        with self._lock:
            self._pinner.hold(self._carriers.mappings())
            for carrier in self._carriers.unmap_all():
                self._unresolve(carrier)
                self._pinner.forget(carrier)
            self._holders.clear()
            self._carrier_of.clear()
            self._waiting.clear()
            if self.iommu is not None:
                self.iommu.close()
                self.iommu = None
