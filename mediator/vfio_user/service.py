"""Serving one client's requests from a device model (``mediator.vfio_user.model``).

``DeviceService.handle`` takes one request from the ``Connection`` and
returns the reply bytes and the fds to send with them (borrowed: the sender
must not close them). Every refusal becomes an error reply with an errno
(``mediator.errors.Refused``: the protocol's ``CommandError``, the device's
own); anything else raised is a bug, answered EIO and logged, so nothing a
client sends escapes as an exception. Each handler checks its
payload length and ``argsz`` before it reads a field. The client's fds are
input too: interrupt fds must be eventfds and are made non-blocking.

What is served, in vfio-pci's terms: a PCI device with reset, nine regions
(BAR0-5, ROM, config, VGA) of power-of-two sizes with mmappable areas handed
out as one fd and a sparse-mmap capability in the second step of the
``argsz`` exchange, five interrupt indexes, DMA mappings, region reads
and writes through the quirk table's view, and migration v2 (DEVICE_FEATURE
MIGRATION and MIG_DEVICE_STATE, MIG_DATA_READ and MIG_DATA_WRITE) for a
device whose model migrates.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Callable
from time import perf_counter
from typing import Any

import structlog

from mediator.audit import Auditor
from mediator.errors import Refused
from mediator.vfio_abi import (
    DMA_READ,
    DMA_WRITE,
    FEATURE_GET,
    FEATURE_MASK,
    FEATURE_MIG_DEVICE_STATE,
    FEATURE_MIGRATION,
    FEATURE_PROBE,
    FEATURE_SET,
    IRQ_COUNT,
    REGION_COUNT,
)
from mediator.vfio_user import wire
from mediator.vfio_user.connection import CommandError, Connection, Request
from mediator.vfio_user.model import DeviceModel, NoRequestEvents, RequestEvents
from mediator.vfio_user.wire import REGION_ACCESS, WRITE_MULTI_COUNT, WRITE_MULTI_ENTRY, Command

log = structlog.get_logger("mediator.vfio_user")

Reply = tuple[bytes, list[int]]
# The most writes QEMU batches into one REGION_WRITE_MULTI.
WRITE_MULTI_MAX = 200


def _fields(schema: Any, payload: bytes, name: str) -> Any:
    """Parse a fixed-size struct at the start of ``payload``; its argsz must cover it."""
    size = schema.sizeof()
    if len(payload) < size:
        raise CommandError(errno.EINVAL, f"{name} payload of {len(payload)} bytes, need {size}")
    parsed = schema.parse(payload[:size])
    if parsed.argsz < size:
        raise CommandError(errno.EINVAL, f"{name} argsz {parsed.argsz} is below {size}")
    return parsed


class DeviceService:
    def __init__(
        self,
        device: DeviceModel,
        connection: Connection,
        refusal: str | None = None,
        *,
        events: RequestEvents | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        """``refusal``: why this client must not be served at all (quarantine, fabric); None to serve it.

        ``auditor`` writes the audit events of refused requests; the device's
        server keeps one across sessions, so reconnecting does not refill its budget.
        """
        self.device = device
        self.connection = connection
        self.refusal = refusal
        self.events = events or NoRequestEvents()
        self.auditor = auditor or Auditor()
        self._observe = self.events.request  # bound once: it runs for every request
        self.counts: Counter[int] = Counter()  # requests by command
        self._handlers: dict[int, Callable[[Request], Reply]] = {
            Command.VERSION: self._version,
            Command.DMA_MAP: self._dma_map,
            Command.DMA_UNMAP: self._dma_unmap,
            Command.DEVICE_GET_INFO: self._device_info,
            Command.DEVICE_GET_REGION_INFO: self._region_info,
            Command.DEVICE_GET_IRQ_INFO: self._irq_info,
            Command.DEVICE_SET_IRQS: self._set_irqs,
            Command.REGION_READ: self._region_read,
            Command.REGION_WRITE: self._region_write,
            Command.DEVICE_RESET: self._reset,
            Command.REGION_WRITE_MULTI: self._write_multi,
            Command.DEVICE_FEATURE: self._feature,
            Command.MIG_DATA_READ: self._mig_data_read,
            Command.MIG_DATA_WRITE: self._mig_data_write,
        }
        self._refused: dict[int, tuple[int, str]] = {
            Command.DEVICE_GET_REGION_IO_FDS: (errno.ENOTSUP, "region I/O fds are not offered"),
            Command.DMA_READ: (errno.EINVAL, "DMA_READ goes from server to client"),
            Command.DMA_WRITE: (errno.EINVAL, "DMA_WRITE goes from server to client"),
        }

    def handle(self, request: Request) -> Reply:
        """The reply to one request: (bytes, fds to send with them)."""
        started = perf_counter()
        reply = self._handle(request)
        self._observe(request.command, perf_counter() - started)
        return reply

    def _handle(self, request: Request) -> Reply:
        self.counts[request.command] += 1
        refusal = self.refusal or self.device.refusal
        if refusal:
            # Fail closed: every request, VERSION included, until the session ends.
            why = f"the device is not served: {refusal}"
            self.connection.close_after(why)
            return self._refuse(request, errno.EPERM, why)
        if request.violation is not None:
            return self._refuse(request, *request.violation)
        try:
            handler = self._handlers.get(request.command) or self._unhandled(request.command)
            payload, fds = handler(request)
        except Refused as e:
            return self._refuse(request, e.errno, str(e))
        except Exception:  # a bug must not take the daemon down: the client gets EIO
            log.exception("request failed", msg_id=request.msg_id, command=request.command)
            self.events.request_failed(request.command, errno.EIO)
            return self.connection.error(request, errno.EIO), []
        return self.connection.reply(request, payload), fds

    def _refuse(self, request: Request, errno_value: int, why: str) -> Reply:
        self.events.request_failed(request.command, errno_value)
        self.auditor.refused(
            msg_id=request.msg_id,
            command=_command_name(request.command),
            errno=errno.errorcode.get(errno_value, str(errno_value)),
            why=why,
        )
        return self.connection.error(request, errno_value), []

    @property
    def handled(self) -> int:
        return self.counts.total()

    @property
    def serves(self) -> bool:
        """Whether this client is served at all (else every request is refused, here)."""
        return self.refusal is None

    def answered_elsewhere(self, command: int, count: int, buckets: list[int], seconds: float) -> None:
        """``count`` requests the C fast path answered, by latency bucket, ``seconds`` in all."""
        self.counts[command] += count
        self.events.requests(command, count, buckets, seconds)

    def _unhandled(self, command: int) -> Callable[[Request], Reply]:
        """Raises the CommandError for a command this service does not carry out."""
        refused = self._refused.get(command)
        if refused is not None:
            raise CommandError(*refused)
        raise CommandError(errno.ENOSYS, f"unknown command {command}")

    def _version(self, request: Request) -> Reply:
        return self.connection.negotiate(request), []

    def _dma_map(self, request: Request) -> Reply:
        p = _fields(wire.DmaMap, request.payload, "DMA_MAP")
        if p.flags & ~(DMA_READ | DMA_WRITE):
            raise CommandError(errno.EINVAL, f"DMA_MAP flags {p.flags:#x}")
        fd = request.fds[0] if request.fds else None
        self.device.dma_map(p.addr, p.size, p.flags, fd, p.offset)
        return b"", []

    def _dma_unmap(self, request: Request) -> Reply:
        p = _fields(wire.DmaUnmap, request.payload, "DMA_UNMAP")
        flags, addr, size = p.flags, p.addr, p.size
        if flags & wire.DMA_UNMAP_GET_DIRTY_BITMAP:
            raise CommandError(errno.ENOTSUP, "dirty page tracking is not supported")
        if flags & ~wire.DMA_UNMAP_ALL:
            raise CommandError(errno.EINVAL, f"DMA_UNMAP flags {flags:#x}")
        if flags & wire.DMA_UNMAP_ALL:
            if addr or size:
                raise CommandError(errno.EINVAL, "DMA_UNMAP_ALL takes address and size 0")
            self.device.dma_unmap_all()
        else:
            self.device.dma_unmap(addr, size)
        return request.payload[: wire.DmaUnmap.sizeof()], []

    def _device_info(self, request: Request) -> Reply:
        _fields(wire.DeviceInfo, request.payload, "DEVICE_GET_INFO")
        flags = wire.DEVICE_FLAGS_PCI | (wire.DEVICE_FLAGS_RESET if self.device.can_reset else 0)
        return wire.DeviceInfo.build(
            {
                "argsz": wire.DeviceInfo.sizeof(),
                "flags": flags,
                "num_regions": REGION_COUNT,
                "num_irqs": IRQ_COUNT,
            }
        ), []

    def _region_info(self, request: Request) -> Reply:
        p = _fields(wire.RegionInfo, request.payload, "DEVICE_GET_REGION_INFO")
        index, argsz = p.index, p.argsz
        if index >= REGION_COUNT:
            raise CommandError(errno.EINVAL, f"no region {index}")
        region = self.device.region(index)
        size = region.size
        flags = 0
        if size:
            flags = wire.REGION_FLAG_READ | (wire.REGION_FLAG_WRITE if region.writable else 0)
        caps = b""
        fd_offset = region.mapping
        if fd_offset is not None:
            flags |= wire.REGION_FLAG_MMAP
            if region.mmap_areas != ((0, size),):
                caps = _sparse_mmap(region.mmap_areas)
        needed = wire.RegionInfo.sizeof() + len(caps)
        info = {"index": index, "size": size, "offset": fd_offset[1] if fd_offset else 0}
        if argsz < needed:  # first step: say how much room the caps need; no caps, no fd
            return wire.RegionInfo.build(dict(info, argsz=needed, flags=flags, cap_offset=0)), []
        if caps:
            flags |= wire.REGION_FLAG_CAPS
        cap_offset = wire.RegionInfo.sizeof() if caps else 0
        reply = wire.RegionInfo.build(dict(info, argsz=needed, flags=flags, cap_offset=cap_offset)) + caps
        # A posted request gets no reply, so no fd either: there would be no bytes to carry it.
        return reply, [fd_offset[0]] if fd_offset and request.wants_reply else []

    def _irq_info(self, request: Request) -> Reply:
        p = _fields(wire.IrqInfo, request.payload, "DEVICE_GET_IRQ_INFO")
        index = p.index
        info = self.device.irq_info(index)
        return wire.IrqInfo.build(
            {"argsz": wire.IrqInfo.sizeof(), "flags": info.flags, "index": index, "count": info.count}
        ), []

    def _set_irqs(self, request: Request) -> Reply:
        p = _fields(wire.SetIrqs, request.payload, "DEVICE_SET_IRQS")
        data = request.payload[wire.SetIrqs.sizeof() :]
        _check_eventfds(request.fds)
        self.device.set_irqs(
            p.index,
            p.flags,
            p.start,
            p.count,
            fds=request.fds,
            bools=data,
        )
        request.take_fds()  # the device owns them now
        return b"", []

    def _region_read(self, request: Request) -> Reply:
        payload = request.payload
        if len(payload) != REGION_ACCESS.size:
            raise CommandError(errno.EINVAL, f"REGION_READ payload of {len(payload)} bytes, need 16")
        offset, region, count = REGION_ACCESS.unpack_from(payload)
        if count > self.connection.limits.max_data_xfer_size:
            raise CommandError(errno.EINVAL, f"REGION_READ of {count} bytes, over max_data_xfer_size")
        return payload + self.device.read_region(region, offset, count), []

    def _region_write(self, request: Request) -> Reply:
        payload = request.payload
        if len(payload) < REGION_ACCESS.size:
            raise CommandError(errno.EINVAL, f"REGION_WRITE payload of {len(payload)} bytes, need 16+")
        offset, region, count = REGION_ACCESS.unpack_from(payload)
        if len(payload) != REGION_ACCESS.size + count:
            raise CommandError(
                errno.EINVAL, f"REGION_WRITE says {count} bytes but carries {len(payload) - 16}"
            )
        self.device.write_region(region, offset, payload[REGION_ACCESS.size :])
        return payload[: REGION_ACCESS.size], []

    def _write_multi(self, request: Request) -> Reply:
        payload = request.payload
        if len(payload) < WRITE_MULTI_COUNT.size:
            raise CommandError(errno.EINVAL, "REGION_WRITE_MULTI without a count")
        (count,) = WRITE_MULTI_COUNT.unpack_from(payload)
        if count > WRITE_MULTI_MAX or len(payload) != WRITE_MULTI_COUNT.size + count * WRITE_MULTI_ENTRY.size:
            raise CommandError(errno.EINVAL, f"REGION_WRITE_MULTI of {count} writes in {len(payload)} bytes")
        writes = [
            WRITE_MULTI_ENTRY.unpack_from(payload, WRITE_MULTI_COUNT.size + i * WRITE_MULTI_ENTRY.size)
            for i in range(count)
        ]
        for offset, region, length, data in writes:
            if not 0 < length <= 8:
                raise CommandError(errno.EINVAL, f"REGION_WRITE_MULTI entry of {length} bytes")
            self.device.write_region(region, offset, data[:length])
        return payload[: WRITE_MULTI_COUNT.size], []

    def _reset(self, request: Request) -> Reply:
        del request
        self.device.reset()
        return b"", []

    def _feature(self, request: Request) -> Reply:
        """DEVICE_FEATURE, checked as the kernel's ``vfio_check_feature`` checks it: MIGRATION (GET,
        PROBE) and MIG_DEVICE_STATE (GET, SET, PROBE); none for a device that does not migrate."""
        p = _fields(wire.DeviceFeature, request.payload, "DEVICE_FEATURE")
        feature, operations = p.flags & FEATURE_MASK, p.flags & ~FEATURE_MASK
        migration = self.device.migration
        if feature not in _FEATURE_OPERATIONS or not migration.flags:
            raise CommandError(errno.ENOTSUP, f"device feature {feature} is not supported")
        if operations & ~(FEATURE_GET | FEATURE_SET | FEATURE_PROBE):
            raise CommandError(errno.EINVAL, f"DEVICE_FEATURE flags {p.flags:#x}")
        if operations & FEATURE_GET and operations & FEATURE_SET and not operations & FEATURE_PROBE:
            raise CommandError(errno.EINVAL, "DEVICE_FEATURE GET and SET together need PROBE")
        schema, allowed = _FEATURE_OPERATIONS[feature]
        if operations & (FEATURE_GET | FEATURE_SET) & ~allowed:
            raise CommandError(errno.EINVAL, f"device feature {feature} does not take flags {p.flags:#x}")
        if operations & FEATURE_PROBE:
            return request.payload, []
        if not operations & (FEATURE_GET | FEATURE_SET):
            raise CommandError(errno.EINVAL, "DEVICE_FEATURE without GET, SET or PROBE")
        head, data = request.payload[:8], request.payload[8:]
        if len(data) < schema.sizeof() or p.argsz < 8 + schema.sizeof():
            raise CommandError(
                errno.EINVAL, f"device feature {feature} needs {schema.sizeof()} bytes of data"
            )
        if feature == FEATURE_MIGRATION:
            answer = wire.FeatureMigration.build({"flags": migration.flags})
        else:
            if operations & FEATURE_SET:
                migration.set_state(schema.parse(data).device_state)
            answer = wire.FeatureMigState.build({"device_state": migration.state, "data_fd": wire.NO_DATA_FD})
        return head + answer, []

    def _mig_data(self, request: Request, name: str) -> tuple[int, bytes]:
        p = _fields(wire.MigData, request.payload, name)
        if p.size > self.connection.limits.max_data_xfer_size:
            raise CommandError(errno.EINVAL, f"{name} of {p.size} bytes, over max_data_xfer_size")
        return p.size, request.payload[wire.MigData.sizeof() :]

    def _mig_data_read(self, request: Request) -> Reply:
        size, _ = self._mig_data(request, "MIG_DATA_READ")
        data = self.device.migration.read(size)
        return wire.MigData.build({"argsz": wire.MigData.sizeof() + len(data), "size": len(data)}) + data, []

    def _mig_data_write(self, request: Request) -> Reply:
        size, data = self._mig_data(request, "MIG_DATA_WRITE")
        if len(data) != size:
            raise CommandError(errno.EINVAL, f"MIG_DATA_WRITE says {size} bytes and carries {len(data)}")
        self.device.migration.write(data)
        return b"", []


# The migration features: their data and the operations (besides PROBE) each takes.
_FEATURE_OPERATIONS = {
    FEATURE_MIGRATION: (wire.FeatureMigration, FEATURE_GET),
    FEATURE_MIG_DEVICE_STATE: (wire.FeatureMigState, FEATURE_GET | FEATURE_SET),
}


def _check_eventfds(fds: list[int]) -> None:
    """Refuse an fd that is not an eventfd, as vfio-pci does, and make each one non-blocking.

    The client chose their flags: a blocking resample eventfd would stall the
    backend that reads it (the simulator does) and with it the session, which
    shutting the socket cannot then end.
    """
    for fd in fds:
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
            raise CommandError(errno.EINVAL, "an interrupt fd that is not an eventfd")
        os.set_blocking(fd, False)


def _sparse_mmap(areas: tuple[tuple[int, int], ...]) -> bytes:
    header: bytes = wire.CapabilityHeader.build({"id": wire.REGION_CAP_SPARSE_MMAP, "version": 1, "next": 0})
    body: bytes = wire.SparseMmap.build({"nr_areas": len(areas), "reserved": 0})
    return header + body + b"".join(wire.SparseArea.build({"offset": o, "size": s}) for o, s in areas)


def _command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return str(command)
