"""A minimal vfio-user client for tests, and the server end of a socketpair.

``Client`` speaks vfio-user on any connected socket (also from inside the
real-VFIO guest). ``Session`` runs the daemon's own transport, connection
and service on one end of a real ``socketpair`` (fds need a real socket) in
a thread, and is the client on the other end.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from mediator.backends.profile import Profile
from mediator.vfio_abi import FEATURE_GET, FEATURE_MIG_DEVICE_STATE, FEATURE_MIGRATION, FEATURE_SET
from mediator.vfio_user.connection import Connection, Limits
from mediator.vfio_user.fast_loop import FastLoop
from mediator.vfio_user.model import NoRequestEvents, RequestEvents
from mediator.vfio_user.service import DeviceService
from mediator.vfio_user.transport import MessageSocket, pump
from mediator.vfio_user.wire import FLAG_ERROR, HEADER, Command
from tests.support import device

QEMU_CAPABILITIES = {
    "capabilities": {
        "pgsizes": 4096,
        "max_msg_fds": 16,
        "max_dma_maps": 65535,
        "max_data_xfer_size": 1048576,
        "migration": {"max_bitmap_size": 268435456, "pgsize": 4096},
        "write_multiple": True,
    }
}


@dataclass
class Reply:
    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes
    fds: list[int]

    @property
    def ok(self) -> bool:
        return not self.flags & FLAG_ERROR


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self.client = sock
        self.client.settimeout(10)
        self._next_id = 0

    # raw messages
    def send(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        flags: int = 0,
        size: int | None = None,
    ) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFF
        header = HEADER.pack(
            self._next_id, command, size if size is not None else 16 + len(payload), flags, 0
        )
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.client.sendmsg([header + payload], ancillary)
        return self._next_id

    def receive(self) -> Reply:
        data, ancillary, _, _ = self.client.recvmsg(16, socket.CMSG_SPACE(16 * 4))
        if not data:
            raise ConnectionError("the server closed the connection")
        while len(data) < 16:
            data += self.client.recv(16 - len(data))
        msg_id, command, size, flags, error = HEADER.unpack_from(data)
        payload = b""
        while len(payload) < size - 16:
            chunk = self.client.recv(size - 16 - len(payload))
            if not chunk:
                raise ConnectionError("short reply")
            payload += chunk
        fds = [fd for _, _, raw in ancillary for fd in array.array("i", raw[: len(raw) - len(raw) % 4])]
        return Reply(msg_id, command, flags, error, payload, fds)

    def request(self, command: int, payload: bytes = b"", fds: Sequence[int] = (), flags: int = 0) -> Reply:
        msg_id = self.send(command, payload, fds, flags)
        reply = self.receive()
        assert (reply.msg_id, reply.command) == (msg_id, command), "replies out of order"
        return reply

    # commands
    def version(self, capabilities: dict[str, object] | None = None, major: int = 0, minor: int = 0) -> Reply:
        blob = json.dumps(QEMU_CAPABILITIES if capabilities is None else capabilities).encode() + b"\0"
        return self.request(Command.VERSION, struct.pack("=HH", major, minor) + blob)

    def region_read(self, region: int, offset: int, count: int) -> Reply:
        return self.request(Command.REGION_READ, struct.pack("=QII", offset, region, count))

    def region_write(self, region: int, offset: int, data: bytes, flags: int = 0) -> Reply | None:
        payload = struct.pack("=QII", offset, region, len(data)) + data
        if flags:
            self.send(Command.REGION_WRITE, payload, flags=flags)
            return None
        return self.request(Command.REGION_WRITE, payload)

    def dma_map(self, iova: int, size: int, fd: int | None = None, offset: int = 0, flags: int = 3) -> Reply:
        payload = struct.pack("=IIQQQ", 32, flags, offset, iova, size)
        return self.request(Command.DMA_MAP, payload, [fd] if fd is not None else [])

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> Reply:
        return self.request(Command.DMA_UNMAP, struct.pack("=IIQQ", 24, flags, iova, size))

    def region_info(self, index: int) -> tuple[tuple[int, ...], bytes, list[int]]:
        """The two-step GET_REGION_INFO: (argsz, flags, index, cap_offset, size, offset), caps, fds."""
        first = self.request(Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", 32, 0, index, 0, 0, 0))
        argsz = struct.unpack_from("=I", first.payload)[0]
        reply = first
        if argsz > 32:
            for fd in first.fds:
                os.close(fd)
            reply = self.request(
                Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", argsz, 0, index, 0, 0, 0)
            )
        return struct.unpack_from("=IIIIQQ", reply.payload), reply.payload[32:], reply.fds

    def set_irqs(
        self, index: int, flags: int, start: int, count: int, *, fds: Sequence[int] = (), data: bytes = b""
    ) -> Reply:
        return self.request(
            Command.DEVICE_SET_IRQS,
            struct.pack("=IIIII", 20 + len(data), flags, index, start, count) + data,
            fds,
        )

    # migration v2: DEVICE_FEATURE, MIG_DATA_READ and MIG_DATA_WRITE as the spec lays them out
    def feature(self, flags: int, data: bytes = b"") -> Reply:
        return self.request(Command.DEVICE_FEATURE, struct.pack("=II", 8 + len(data), flags) + data)

    def migration_flags(self) -> Reply:
        return self.feature(FEATURE_GET | FEATURE_MIGRATION, bytes(8))

    def migration_state(self) -> int:
        reply = self.feature(FEATURE_GET | FEATURE_MIG_DEVICE_STATE, bytes(8))
        assert reply.ok, reply
        return int(struct.unpack_from("=I", reply.payload, 8)[0])

    def set_migration_state(self, state: int) -> Reply:
        return self.feature(FEATURE_SET | FEATURE_MIG_DEVICE_STATE, struct.pack("=II", state, 0xFFFFFFFF))

    def mig_data_read(self, size: int) -> Reply:
        return self.request(Command.MIG_DATA_READ, struct.pack("=II", 8, size))

    def mig_data_write(self, data: bytes) -> Reply:
        return self.request(Command.MIG_DATA_WRITE, struct.pack("=II", 8 + len(data), len(data)) + data)

    def save(self, chunk: int = 64 << 10) -> bytes:
        """The whole stream of a device in STOP_COPY: read until a short read."""
        stream = b""
        while True:
            reply = self.mig_data_read(chunk)
            assert reply.ok, reply
            data = reply.payload[8:]
            stream += data
            if len(data) < chunk:
                return stream

    def resume(self, stream: bytes, chunk: int = 64 << 10) -> None:
        """Write a stream to a device in RESUMING, ``chunk`` bytes at a time."""
        for at in range(0, len(stream), chunk):
            reply = self.mig_data_write(stream[at : at + chunk])
            assert reply.ok, reply


class Session(Client):
    """``fast``: with the C fast path, as the daemon serves by default."""

    def __init__(
        self,
        profile: str | Profile = "h100-sxm5",
        limits: Limits | None = None,
        *,
        fast: bool = True,
        events: RequestEvents | None = None,
    ) -> None:
        self.device, self.backend = device(profile)
        client, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        super().__init__(client)
        self.connection = Connection(limits or Limits())
        self.events = events or NoRequestEvents()
        self.service = DeviceService(self.device, self.connection, events=self.events)
        self.why: str | None = None
        tables = self.device.fast_path() if fast else None
        if fast:
            assert tables is not None, "the C fast path is not built"
        loop = (
            FastLoop(server, tables, self.connection.limits, self.events.latency_bounds) if tables else None
        )

        def run() -> None:
            self.why = pump(
                MessageSocket(server, self.connection.limits.max_msg_fds), self.connection, self.service, loop
            )
            server.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.client.close()
        self.thread.join(10)
        self.device.detach_client()
        self.backend.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_fds() -> dict[int, str]:
    """fd -> what it is (its /proc link)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def opened_since(before: dict[int, str]) -> list[tuple[int, str]]:
    """The fds open now that were not at ``before``; one another thread closed meanwhile does not count."""
    return sorted(set(open_fds().items()) - set(before.items()))
