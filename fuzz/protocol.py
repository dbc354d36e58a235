#!/usr/bin/env python3
"""Fuzzing the vfio-user protocol core (connection and service) with any bytes and any fds.

Run it with libFuzzer's flags (docs/fuzzing.md has the long run)::

    PATH=.venv/bin:$PATH fuzz/protocol.py /tmp/corpus fuzz/corpus/protocol -max_total_time=600

Theory of operation:

- Decoding. ``decode`` turns an input into the reads a socket could deliver
  (atheris's ``FuzzedDataProvider``): each read is one to four pieces (raw
  bytes, a message, or up to 2 MiB of zeros, enough to carry a message past
  the size limit) and the fds that came with it (memfds sized by the
  input, eventfds, blocking or not, /dev/null, either end of a pipe), maybe
  with its ancillary data marked truncated. A message's header is built
  from the input's msg id, command, flags and payload with a size that
  matches, unless the input chooses a size, so mutations spend their time
  in the handlers instead of hunting for a size that fits. An input may
  start with a valid VERSION, to reach the negotiated handlers at once.
- Serving. Every input gets a fresh simulated H100 (``SimBackend``,
  ``VirtualDevice``), ``Connection`` and ``DeviceService``: nothing one
  input does can be seen by the next. Only the plan is shared: it is
  immutable, and planning costs ten times the rest. Reads go in with
  ``receive`` and requests are served as ``transport.pump`` serves them,
  until the input ends, the stream is dropped (``ProtocolError``) or the
  service ends the session.
- The C fast path. The same reads then go over a real socketpair (fds as
  SCM_RIGHTS) to the daemon's ``pump`` twice, with the C loop and without
  it, on fresh devices: the two reply streams must be the same bytes. (A
  socket may deliver reads otherwise than they were sent: it attaches a long
  send's fds to its first part; so the C loop is held to Python on a socket.)
- Invariants, each an ``AssertionError`` (a crash to libFuzzer): nothing
  but ``ProtocolError`` leaves the connection or the service; no request
  reaches the service's last-resort EIO (a bug it caught) and no EIO comes
  from a device that was not blocked; every reply is a reply header with
  the request's msg id and command, its size, and the error flag exactly
  when it carries an errno; a request with FLAG_NO_REPLY gets no bytes and
  no fds; after ``close`` and ``detach_client`` no DMA mapping or eventfd
  is left, no client memory stays mapped, and once the simulator is closed
  the process holds exactly the fds it held before the input. An input
  that blocks the loop is a hang, which libFuzzer's ``-timeout`` (10 s
  unless given) reports.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import atheris  # type: ignore[import-untyped]
import structlog

with atheris.instrument_imports(include=["mediator"]):
    from mediator.backends.profile import load_profile, shipped_profiles
    from mediator.backends.sim import SimBackend
    from mediator.quirks.table import QuirkTable
    from mediator.vfio_user.connection import Connection, Limits, ProtocolError, Request
    from mediator.vfio_user.fast_loop import FastLoop
    from mediator.vfio_user.service import DeviceService
    from mediator.vfio_user.transport import MessageSocket, pump
    from mediator.vfio_user.wire import FLAG_ERROR, FLAG_NO_REPLY, HEADER, HEADER_SIZE, TYPE_REPLY, Command
    from mediator.virt.device import VirtualDevice

PROFILE = load_profile(shipped_profiles()["h100-sxm5"])
PLAN = VirtualDevice.plan_for(SimBackend(PROFILE), QuirkTable.load())
# The daemon's limits, with write_multiple on offer so REGION_WRITE_MULTI can be negotiated.
LIMITS = Limits(write_multiple=True)
# What QEMU 11.1 offers in its VERSION, as it sends it.
QEMU_CAPABILITIES = (
    b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, '
    b'"write_multiple": true}}'
)
VERSION_PAYLOAD = struct.pack("=HH", 0, 0) + QEMU_CAPABILITIES + b"\0"
VERSION = HEADER.pack(0, Command.VERSION, HEADER_SIZE + len(VERSION_PAYLOAD), 0, 0) + VERSION_PAYLOAD

# Decoding bounds: each keeps a choice to one or two bytes of input.
MAX_PIECES = 4
RAW, MESSAGE, FILLER = range(3)  # a read's pieces: bytes of the input, a message, zeros
PIECE_KINDS = 3
MAX_RAW = 0xFF
MAX_FILLER = 1 << 21  # enough to carry a message over the size limit to its end
MAX_PAYLOAD = 0x3FFF
ANY_COMMAND = 20  # commands 0-19 as they are; this one reads any 16-bit number
FLAG_CHOICES = (0, FLAG_NO_REPLY, FLAG_ERROR)  # or, past the end, any 32-bit flags
MAX_FDS = 17  # one more than the daemon takes in a message
MAX_MEMFD = 1 << 20
# 1 in (CHOSEN_SIZE_ODDS + 1) messages states a size of the input's choosing.
CHOSEN_SIZE_ODDS = 7
TRUNCATED = 15  # a read's ancillary data is cut when its 0-15 choice is this

MEMFD, EVENTFD, BLOCKING_EVENTFD, DEV_NULL, PIPE_READ, PIPE_WRITE = range(6)
FD_KINDS = 6
MEMFD_NAME = "fuzz-client-ram"

# What the service logs when a request raised something it did not expect.
UNEXPECTED = "request failed"


@dataclass(frozen=True)
class Fd:
    kind: int
    size: int = 0  # memfds only


@dataclass(frozen=True)
class Read:
    data: bytes
    fds: tuple[Fd, ...] = ()
    truncated: bool = False


def decode(data: bytes) -> list[Read]:
    """The reads an input stands for (``fuzz/seeds.py`` encodes them the other way)."""
    source = atheris.FuzzedDataProvider(data)
    reads = [Read(VERSION)] if source.ConsumeBool() else []
    while source.remaining_bytes():
        chunk = b""
        for _ in range(source.ConsumeIntInRange(1, MAX_PIECES)):
            piece = source.ConsumeIntInRange(0, PIECE_KINDS - 1)
            if piece == MESSAGE:
                chunk += _message(source)
            elif piece == FILLER:
                chunk += bytes(source.ConsumeIntInRange(0, MAX_FILLER))
            else:
                chunk += source.ConsumeBytes(source.ConsumeIntInRange(0, MAX_RAW))
        fds = tuple(_fd(source) for _ in range(source.ConsumeIntInRange(0, MAX_FDS)))
        reads.append(Read(chunk, fds, source.ConsumeIntInRange(0, TRUNCATED) == TRUNCATED))
    return reads


def _message(source: Any) -> bytes:
    msg_id = source.ConsumeIntInRange(0, 0xFFFF)
    command = source.ConsumeIntInRange(0, ANY_COMMAND)
    if command == ANY_COMMAND:
        command = source.ConsumeIntInRange(0, 0xFFFF)
    choice = source.ConsumeIntInRange(0, len(FLAG_CHOICES))
    flags = FLAG_CHOICES[choice] if choice < len(FLAG_CHOICES) else source.ConsumeIntInRange(0, 0xFFFFFFFF)
    payload = source.ConsumeBytes(source.ConsumeIntInRange(0, MAX_PAYLOAD))
    size = HEADER_SIZE + len(payload)
    if source.ConsumeIntInRange(0, CHOSEN_SIZE_ODDS) == CHOSEN_SIZE_ODDS:
        size = source.ConsumeIntInRange(0, 0xFFFFFFFF)
    return HEADER.pack(msg_id, command, size, flags, 0) + payload


def _fd(source: Any) -> Fd:
    kind = source.ConsumeIntInRange(0, FD_KINDS - 1)
    return Fd(kind, source.ConsumeIntInRange(0, MAX_MEMFD) if kind == MEMFD else 0)


@dataclass
class Client:
    """The fds one input makes: those handed to the daemon, and the ends it keeps (pipes)."""

    kept: list[int] = field(default_factory=list)

    def open(self, fd: Fd) -> int:
        if fd.kind == MEMFD:
            memfd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
            os.ftruncate(memfd, fd.size)
            return memfd
        if fd.kind in (EVENTFD, BLOCKING_EVENTFD):
            return os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if fd.kind == EVENTFD else 0))
        if fd.kind == DEV_NULL:
            return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        given, kept = (read_end, write_end) if fd.kind == PIPE_READ else (write_end, read_end)
        self.kept.append(kept)  # open while the daemon may use the other end: a read there would wait
        return given

    def close(self) -> None:
        for fd in self.kept:
            os.close(fd)
        self.kept.clear()


class Unexpected:
    """A structlog processor that keeps what the service's last resort caught, and drops every event."""

    def __init__(self) -> None:
        self.caught: list[BaseException] = []

    def __call__(self, logger: object, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("event") == UNEXPECTED:
            caught = sys.exc_info()[1]
            self.caught.append(caught or AssertionError(f"{UNEXPECTED}: {event}"))
        raise structlog.DropEvent


UNEXPECTED_EVENTS = Unexpected()


def check_reply(request: Request, reply: bytes, fds: list[int], device: VirtualDevice) -> None:
    if UNEXPECTED_EVENTS.caught:
        caught = UNEXPECTED_EVENTS.caught[0]
        raise AssertionError(f"request {request.command} reached the last resort: {caught!r}") from caught
    if request.flags & FLAG_NO_REPLY:
        assert reply == b"" and not fds, f"a posted request {request.command} was answered"
        return
    assert len(reply) >= HEADER_SIZE, f"a reply of {len(reply)} bytes"
    msg_id, command, size, flags, error = HEADER.unpack_from(reply)
    assert (msg_id, command) == (request.msg_id, request.command), "a reply to another request"
    assert size == len(reply), f"a reply header says {size} bytes for {len(reply)}"
    assert flags & ~FLAG_ERROR == TYPE_REPLY, f"reply flags {flags:#x}"
    assert bool(flags & FLAG_ERROR) == bool(error), f"error flag {flags:#x} with errno {error}"
    assert not error or error in errno.errorcode, f"errno {error}"
    assert not (error and (fds or size > HEADER_SIZE)), "an error reply with a payload or fds"
    assert error != errno.EIO or device.refusal, f"EIO from a working device for command {command}"


def serve(reads: list[Read], connection: Connection, service: DeviceService, client: Client) -> None:
    """Feed the reads and serve every whole request, as ``transport.pump`` does."""
    try:
        for read in reads:
            connection.receive(read.data, [client.open(fd) for fd in read.fds], fds_truncated=read.truncated)
            while (request := connection.next_request()) is not None:
                reply, fds = service.handle(request)
                check_reply(request, reply, fds, service.device)
                if connection.closing_reason is not None:
                    return
    except ProtocolError:
        return


def serve_over_a_socket(reads: list[Read], client: Client, *, fast: bool) -> bytes:
    """The same reads sent on a socketpair to the daemon's pump, ``fast`` with the C fast path; the replies.

    A client thread sends each read (fds in SCM_RIGHTS) and another reads the replies, closing
    the fds they carry, while the pump serves in this thread, as a session's does.
    """
    device = fresh_device()
    ours, theirs = socket.socketpair()
    connection = Connection(LIMITS)
    service = DeviceService(device, connection)
    tables = device.fast_path() if fast else None
    assert tables is not None or not fast, "the C fast path is not built"
    loop = FastLoop(theirs, tables, LIMITS, ()) if tables is not None else None
    received = bytearray()

    def send() -> None:
        with contextlib.suppress(OSError):  # the pump ended the session first
            for read in reads:
                fds = [client.open(fd) for fd in read.fds]
                try:
                    if read.data:  # a stream socket carries no fds without a byte
                        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                        ours.sendmsg([read.data], ancillary if fds else [])
                finally:
                    for fd in fds:
                        os.close(fd)
            ours.shutdown(socket.SHUT_WR)

    def receive() -> None:
        while True:
            try:
                data, ancillary, _, _ = ours.recvmsg(1 << 16, socket.CMSG_SPACE(16 * 4))
            except ConnectionResetError:  # the pump closed with requests unread: all is received
                return
            for _, _, raw in ancillary:
                for fd in array.array("i", raw[: len(raw) - len(raw) % 4]):
                    os.close(fd)
            if not data:
                return
            received.extend(data)

    threads = [threading.Thread(target=send), threading.Thread(target=receive)]
    for thread in threads:
        thread.start()
    pump(MessageSocket(theirs, LIMITS.max_msg_fds), connection, service, loop)
    theirs.close()
    for thread in threads:
        thread.join()
    ours.close()
    device.detach_client()
    device.backend.close()
    return bytes(received)


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, closed by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def client_memory_mapped() -> list[str]:
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return [line.strip() for line in maps if MEMFD_NAME in line]


def fresh_device() -> VirtualDevice:
    device = VirtualDevice(SimBackend(PROFILE), PLAN)
    device.apply_post_reset_writes()
    return device


def test_one_input(data: bytes) -> None:
    before = open_fds()
    device = fresh_device()
    backend = device.backend
    connection = Connection(LIMITS)
    service = DeviceService(device, connection)
    client = Client()
    UNEXPECTED_EVENTS.caught.clear()
    reads = decode(data)
    serve(reads, connection, service, client)
    connection.close()
    device.detach_client()
    assert len(device.dma) == 0, f"{len(device.dma)} DMA mappings left after the client"
    assert device.attached_eventfds == 0, f"{device.attached_eventfds} eventfds left after the client"
    backend.close()
    # Python served the reads as they came; a socket may deliver them otherwise (it attaches a
    # long send's fds to its first part), so the C loop is held to Python on the same socket.
    in_c = serve_over_a_socket(reads, client, fast=True)
    assert in_c == serve_over_a_socket(reads, client, fast=False), "the C fast path answered otherwise"
    client.close()
    assert not client_memory_mapped(), f"client memory still mapped: {client_memory_mapped()}"
    after = open_fds()
    assert after == before, f"fds left open: {sorted(set(after.items()) - set(before.items()))}"


def main() -> None:
    structlog.configure(processors=[UNEXPECTED_EVENTS])
    arguments = list(sys.argv)
    if not any(argument.startswith("-timeout=") for argument in arguments):
        arguments.append("-timeout=10")
    atheris.Setup(arguments, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
