"""The protocol core alone, as h11 is tested: bytes in, replies out, no socket and no thread.

A ``Connection`` and a ``DeviceService`` are paired with ``FakeDevice``, an
in-memory ``DeviceModel`` (config space and one BAR as byte arrays), so each
rule of the protocol is checked in one place, without the virtual device,
a backend or a transport.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from mediator.errors import Refused
from mediator.vfio_user.connection import Connection, Limits, State
from mediator.vfio_user.model import DeviceModel
from mediator.vfio_user.service import DeviceService
from mediator.vfio_user.wire import FLAG_ERROR, FLAG_NO_REPLY, HEADER, HEADER_SIZE, REGION_ACCESS, Command

CONFIG, BAR0 = 7, 0


@dataclass(frozen=True)
class FakeRegion:
    size: int
    writable: bool = True
    mmap_areas: tuple[tuple[int, int], ...] = ()
    mapping: tuple[int, int] | None = None


@dataclass(frozen=True)
class FakeIrq:
    count: int = 1
    flags: int = 1  # VFIO_IRQ_INFO_EVENTFD


@dataclass
class FakeDevice:
    """Regions in memory; DMA maps and resets recorded; fds it is given closed, as an owner would."""

    refusal: str | None = None
    can_reset: bool = True
    max_dma_mappings: int = 8
    memory: dict[int, bytearray] = field(
        default_factory=lambda: {CONFIG: bytearray(range(256)), BAR0: bytearray(4096)}
    )
    dma: list[tuple[int, int, int, bool]] = field(default_factory=list)
    resets: int = 0

    def region(self, index: int) -> FakeRegion:
        return FakeRegion(len(self.memory.get(index, b"")))

    def _region(self, index: int, offset: int, length: int) -> bytearray:
        memory = self.memory.get(index)
        if memory is None or offset + length > len(memory):
            raise Refused(errno.EINVAL, f"region {index} has no {length} bytes at {offset:#x}")
        return memory

    def read_region(self, index: int, offset: int, length: int) -> bytes:
        return bytes(self._region(index, offset, length)[offset : offset + length])

    def write_region(self, index: int, offset: int, data: bytes) -> None:
        self._region(index, offset, len(data))[offset : offset + len(data)] = data

    def irq_info(self, index: int) -> FakeIrq:
        return FakeIrq()

    def set_irqs(
        self, index: int, flags: int, start: int, count: int, *, fds: Sequence[int] = (), bools: bytes = b""
    ) -> None:
        for fd in fds:
            os.close(fd)

    def dma_map(self, iova: int, size: int, flags: int, fd: int | None, offset: int) -> None:
        self.dma.append((iova, size, flags, fd is not None))

    def dma_unmap(self, iova: int, size: int) -> None:
        self.dma = [m for m in self.dma if m[0] != iova]

    def dma_unmap_all(self) -> None:
        self.dma.clear()

    def reset(self) -> None:
        self.resets += 1

    def fast_path(self) -> None:
        return None  # Python serves it all


@dataclass(frozen=True)
class Answer:
    msg_id: int
    command: int
    error: int
    payload: bytes


class Peer:
    """The server side of one connection, driven by hand."""

    def __init__(self, device: FakeDevice | None = None, limits: Limits | None = None) -> None:
        self.device = device or FakeDevice()
        model: DeviceModel = self.device
        self.connection = Connection(limits)
        self.service = DeviceService(model, self.connection)
        self._next_id = 0

    def message(self, command: int, payload: bytes = b"", flags: int = 0) -> bytes:
        self._next_id += 1
        return HEADER.pack(self._next_id, command, HEADER_SIZE + len(payload), flags, 0) + payload

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Answer]:
        """Every answer the bytes bring, in order, as the transport would send them."""
        self.connection.receive(data, fds)
        answers = []
        while (request := self.connection.next_request()) is not None:
            reply, _ = self.service.handle(request)
            while reply:
                msg_id, command, size, flags, error = HEADER.unpack_from(reply)
                answers.append(Answer(msg_id, command, error if flags & FLAG_ERROR else 0, reply[16:size]))
                reply = reply[size:]
        return answers

    def version(self) -> Answer:
        (answer,) = self.feed(self.message(Command.VERSION, struct.pack("=HH", 0, 0) + b"{}\0"))
        return answer


def read(offset: int, count: int, region: int = CONFIG) -> bytes:
    return REGION_ACCESS.pack(offset, region, count)


def test_version_comes_first_and_only_once() -> None:
    peer = Peer()
    assert peer.connection.state is State.AWAITING_VERSION
    (early,) = peer.feed(peer.message(Command.REGION_READ, read(0, 4)))
    assert early.error == errno.EINVAL
    assert peer.version().error == 0
    assert peer.connection.state is State.READY
    assert peer.version().error == errno.EINVAL  # a second VERSION
    (config,) = peer.feed(peer.message(Command.REGION_READ, read(4, 4)))
    assert config.payload[16:] == bytes([4, 5, 6, 7])


def test_pipelined_requests_split_anywhere_are_answered_in_order() -> None:
    peer = Peer()
    peer.version()
    stream = b"".join(peer.message(Command.REGION_READ, read(offset, 2)) for offset in range(0, 64, 2))
    answers: list[Answer] = []
    for at in range(0, len(stream), 7):  # cut through headers and payloads alike
        answers += peer.feed(stream[at : at + 7])
    assert [a.payload[16:] for a in answers] == [bytes([o, o + 1]) for o in range(0, 64, 2)]
    assert [a.msg_id for a in answers] == sorted(a.msg_id for a in answers)


def test_fds_only_where_the_command_takes_them() -> None:
    peer = Peer()
    peer.version()
    a, b = os.pipe()
    (answer,) = peer.feed(peer.message(Command.REGION_READ, read(0, 4)), [a])
    assert answer.error == errno.EINVAL
    assert not os.path.exists(f"/proc/self/fd/{a}")  # the connection closed what the refused request carried
    os.close(b)
    memfd = os.memfd_create("ram")
    extra = os.dup(memfd)
    dma_map = struct.pack("=IIQQQ", 32, 3, 0, 0x1000, 0x1000)
    (two,) = peer.feed(peer.message(Command.DMA_MAP, dma_map), [memfd, extra])
    assert two.error == errno.EINVAL and peer.device.dma == []  # DMA_MAP takes one fd


def test_write_multi_needs_the_capability_both_sides_negotiated() -> None:
    write = struct.pack("=Q", 1) + struct.pack("=QII8s", 0x10, BAR0, 4, b"\xaa\xbb\xcc\xdd")
    refused = Peer()
    refused.version()  # the client asked for no write_multiple
    (answer,) = refused.feed(refused.message(Command.REGION_WRITE_MULTI, write))
    assert answer.error == errno.ENOTSUP and refused.device.memory[BAR0][0x10] == 0

    peer = Peer(limits=Limits(write_multiple=True))
    payload = struct.pack("=HH", 0, 0) + b'{"capabilities":{"write_multiple":true}}\0'
    assert peer.feed(peer.message(Command.VERSION, payload))[0].error == 0
    (done,) = peer.feed(peer.message(Command.REGION_WRITE_MULTI, write))
    assert done.error == 0 and peer.device.memory[BAR0][0x10:0x14] == b"\xaa\xbb\xcc\xdd"


def test_a_refused_device_gets_eperm_and_the_connection_closes() -> None:
    peer = Peer(FakeDevice(refusal="quarantined"))
    stream = peer.message(Command.VERSION, struct.pack("=HH", 0, 0)) + peer.message(
        Command.REGION_READ, read(0, 4)
    )
    (answer,) = peer.feed(stream)  # the second request is never handed out
    assert answer.error == errno.EPERM
    assert peer.connection.state is State.CLOSING
    assert peer.connection.closing_reason == "the device is not served: quarantined"


def test_an_oversized_message_is_refused_and_the_stream_goes_on() -> None:
    peer = Peer(limits=Limits(max_data_xfer_size=4096))
    peer.version()
    huge = peer.message(Command.REGION_WRITE, read(0, 1 << 20, BAR0) + bytes(1 << 20))
    tail = peer.message(Command.REGION_READ, read(0, 1))
    answers = peer.feed(huge + tail)
    assert [a.error for a in answers] == [errno.E2BIG, 0]


def test_a_posted_request_gets_no_reply_and_a_refusal_reaches_the_client() -> None:
    peer = Peer()
    peer.version()
    posted = peer.message(Command.REGION_WRITE, read(0, 2, BAR0) + b"\x01\x02", flags=FLAG_NO_REPLY)
    assert peer.feed(posted) == [] and peer.device.memory[BAR0][:2] == b"\x01\x02"
    (outside,) = peer.feed(peer.message(Command.REGION_READ, read(4095, 2, BAR0)))
    assert outside.error == errno.EINVAL  # the device's own Refused
    (reset,) = peer.feed(peer.message(Command.DEVICE_RESET))
    assert reset.error == 0 and peer.device.resets == 1
