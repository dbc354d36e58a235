"""Guest memory pinned into an IOMMU in the background, one chunk at a time.

The kernel pins a mapping's pages as it maps them (type1's MAP_DMA, iommufd's
IOAS_MAP), at a rate the host and the page size set: minutes for a large
guest backed by 4 KiB pages. QEMU waits for a DMA_MAP's reply only
``x-msg-timeout`` (5 s), so an IOMMU space records a mapping at once and
its ``Pinner`` maps it on a thread of its own; the reply waits for that
only ``REPLY_WAIT_SECONDS``. Each chunk is its
own kernel mapping, sized from the rate measured so far to take about
``CHUNK_SECONDS``: an unmap of a mapping still being pinned waits for one
chunk, not the whole mapping, and then unmaps what was done.

A pin the kernel would refuse for RLIMIT_MEMLOCK fails before it starts
(the limit, the process's locked memory and what it is still pinning say so),
with the fix in the reason. While any mapping of the space is not pinned (or
failed to pin) the space is not ready and its devices do not get Bus Master Enable, so no device DMAs
into memory the IOMMU does not map yet (``mediator.virt.device``). A pin
that fails unmaps what it had done and is reported; the space then blocks
its devices rather than leave them unable to reach the guest's memory.

The pinner shares the space's condition: it holds the lock to pick a chunk
and to record it, never while the kernel pins, so the space keeps serving.
"""

from __future__ import annotations

import re
import resource
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from time import monotonic
from typing import Protocol

import structlog

from mediator.backends import advice
from mediator.backends.dma import DmaMapping

log = structlog.get_logger("mediator.backends")

# A chunk takes about this long to pin: what an unmap of memory being pinned waits at most.
CHUNK_SECONDS = 0.1
# A DMA_MAP's reply waits this long for the pins: memory that pins quickly is answered pinned,
# as vfio-pci's synchronous map is; a handful of QEMU's maps stays far inside x-msg-timeout.
REPLY_WAIT_SECONDS = 0.05
# The first chunk (the rate is unknown yet) and the smallest: at most 32768 kernel mappings
# for 2 TiB, half of type1's default dma_entry_limit.
MIN_CHUNK = 64 << 20
MAX_CHUNK = 4 << 30
# Chunk boundaries fall on huge-page boundaries of the mapping.
CHUNK_ALIGN = 2 << 20
CAP_IPC_LOCK = 14
PROC = Path("/proc")


class Iommu(Protocol):
    """The kernel's translation for one space."""

    def map(self, mapping: DmaMapping, offset: int, size: int) -> None:
        """Map (and pin) ``size`` bytes of ``mapping`` from ``offset``: one kernel mapping."""
        ...

    def unmap(self, iova: int, size: int) -> None:
        """Unmap every kernel mapping inside ``[iova, iova+size)``."""
        ...

    def refusal(self, size: int) -> str | None:
        """Why the kernel would refuse to pin ``size`` more bytes now; None when it would not."""
        ...

    def close(self) -> None: ...


@dataclass(eq=False)
class Pin:
    """One mapping being pinned: how far it has got, and whether it failed."""

    carrier: DmaMapping  # its identity's current carrier, whose mmap the next chunk pins
    iommu: Iommu
    done: int = 0  # bytes from the start that the IOMMU maps
    busy: bool = False  # the kernel is pinning (or unpinning) a chunk of it now
    held: int = 0  # releases waiting for it: no new chunk starts
    failure: str | None = None

    @property
    def workable(self) -> bool:
        return not (self.busy or self.held or self.failure) and self.done < self.carrier.size

    def pinned(self, iova: int, length: int) -> bool:
        return iova + length <= self.carrier.iova + self.done and self.failure is None


class Pinner:
    def __init__(self, name: str, condition: threading.Condition, settled: Callable[[], None]) -> None:
        """``settled`` is told (without the lock) when a pin finishes or fails."""
        self.name = name
        self._condition = condition
        self._settled = settled
        self._pins: dict[int, Pin] = {}  # id(carrier) -> its pin, in the order they came
        self._thread: threading.Thread | None = None
        self._chunk = MIN_CHUNK
        self.announcing = 0  # pins finished or failed whose ``settled`` call has not returned

    # every method but the worker's runs with the condition's lock held
    def add(self, carrier: DmaMapping, iommu: Iommu) -> None:
        pin = Pin(carrier, iommu)
        refusal = iommu.refusal(self.pending_bytes + carrier.size)
        if refusal is not None:
            log.error(
                "DMA pin refused", space=self.name, iova=hex(carrier.iova), size=carrier.size, why=refusal
            )
            pin.failure = _failure(carrier, refusal)
        self._pins[id(carrier)] = pin
        self._start()

    def _start(self) -> None:
        if self._thread is None and any(pin.workable for pin in self._pins.values()):
            # No device's log context: the pins are the VM's, and each member names itself.
            self._thread = threading.Thread(target=self._work, name=f"pin {self.name}", daemon=True)
            self._thread.start()

    def pin_of(self, carrier: DmaMapping) -> Pin | None:
        """The carrier's pin while it is being pinned or has failed; None once it is pinned."""
        return self._pins.get(id(carrier))

    def replace(self, old: DmaMapping, new: DmaMapping) -> None:
        """Another holder carries the identity on: the next chunk pins from its memory."""
        pin = self._pins.pop(id(old), None)
        if pin is not None:
            pin.carrier = new
            self._pins[id(new)] = pin

    def hold(self, carriers: Iterable[DmaMapping]) -> list[Pin]:
        """Stop the carriers' pins between chunks: wait for the chunks in progress (lock released)."""
        pins = [pin for carrier in carriers if (pin := self._pins.get(id(carrier))) is not None]
        for pin in pins:
            pin.held += 1
        self._condition.wait_for(lambda: not any(pin.busy for pin in pins))
        return pins

    def let_go(self, pins: list[Pin]) -> None:
        for pin in pins:
            pin.held -= 1
        self._start()  # the worker stops when only held pins are left

    def forget(self, carrier: DmaMapping) -> int:
        """The carrier is gone (held, so idle): how much of it the IOMMU maps, to unmap."""
        pin = self._pins.pop(id(carrier), None)
        return carrier.size if pin is None else pin.done

    @property
    def ready(self) -> bool:
        """Every mapping is pinned."""
        return not self._pins

    @property
    def pending_bytes(self) -> int:
        """Still to be pinned."""
        return sum(p.carrier.size - p.done for p in self._pins.values() if p.failure is None)

    @property
    def unpinned_bytes(self) -> int:
        """Still to be pinned, or failed."""
        return sum(p.carrier.size - p.done for p in self._pins.values())

    @property
    def failure(self) -> str | None:
        return next((p.failure for p in self._pins.values() if p.failure), None)

    def _work(self) -> None:
        while True:
            with self._condition:
                pin = next((p for p in self._pins.values() if p.workable), None)
                if pin is None:
                    self._thread = None
                    return
                pin.busy = True
                carrier, offset = pin.carrier, pin.done
                size = min(self._chunk, carrier.size - offset)
            started = monotonic()
            try:
                pin.iommu.map(carrier, offset, size)
            except Exception as e:
                self._failed(pin, e)
                continue
            with self._condition:
                pin.busy = False
                pin.done += size
                self._chunk = _next_chunk(size, monotonic() - started)
                finished = pin.done == carrier.size
                if finished:
                    self._pins.pop(id(pin.carrier), None)
                    self.announcing += 1
                self._condition.notify_all()
            if finished:
                self._announce()

    def _announce(self) -> None:
        try:
            self._settled()
        finally:
            with self._condition:
                self.announcing -= 1
                self._condition.notify_all()

    def _failed(self, pin: Pin, error: Exception) -> None:
        """What the pin had done is unmapped (still busy: a release waits for that)."""
        carrier = pin.carrier
        log.error(
            "DMA pin failed", space=self.name, iova=hex(carrier.iova), size=carrier.size, why=str(error)
        )
        if pin.done:
            try:
                pin.iommu.unmap(carrier.iova, pin.done)
            except Exception as e:  # the space's teardown unmaps it with the rest
                log.warning("unmapping a failed pin failed", iova=hex(carrier.iova), why=str(e))
            else:
                pin.done = 0
        with self._condition:
            pin.busy = False
            pin.failure = _failure(carrier, str(error))
            self.announcing += 1
            self._condition.notify_all()
        self._announce()


def _failure(carrier: DmaMapping, why: str) -> str:
    return f"guest memory {carrier.iova:#x}+{carrier.size:#x} could not be pinned for DMA: {why}"


def has_cap_ipc_lock(proc: Path = PROC) -> bool:
    """The process may pin memory whatever RLIMIT_MEMLOCK says."""
    try:
        status = (proc / "self/status").read_text()
    except OSError:
        return False
    effective = re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.MULTILINE)
    return effective is not None and bool(int(effective.group(1), 16) >> CAP_IPC_LOCK & 1)


def lockable_bytes(proc: Path = PROC) -> int | None:
    """What this process may still lock under RLIMIT_MEMLOCK (pins count as VmLck); None: no limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or has_cap_ipc_lock(proc):
        return None
    try:
        status = (proc / "self/status").read_text()
    except OSError:
        status = ""
    locked = re.search(r"^VmLck:\s*(\d+) kB$", status, re.MULTILINE)
    return max(0, soft - (int(locked.group(1)) << 10 if locked else 0))


def memlock_refusal(size: int, proc: Path = PROC) -> str | None:
    """Why pinning ``size`` more bytes would exceed RLIMIT_MEMLOCK, with the fix; None if it would not."""
    room = lockable_bytes(proc)
    return None if room is None or size <= room else advice.memlock(size)


def _next_chunk(size: int, seconds: float) -> int:
    rate = size / max(seconds, 1e-6)
    return max(MIN_CHUNK, min(MAX_CHUNK, int(rate * CHUNK_SECONDS) // CHUNK_ALIGN * CHUNK_ALIGN))
