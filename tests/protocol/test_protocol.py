"""Every command and its error paths over a real socket: errnos, fds, and a connection that stays usable."""

from __future__ import annotations

import errno
import mmap
import os
import struct

import pytest
from structlog.testing import capture_logs

from mediator.vfio_abi import (
    IRQ_INTX,
    IRQ_MSIX,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
)
from mediator.vfio_user.connection import Limits
from mediator.vfio_user.wire import FLAG_NO_REPLY, TYPE_REPLY, Command
from tests.protocol.client import Session, open_fds, opened_since

CONFIG = 7


@pytest.fixture
def session() -> Session:
    with Session() as s:
        assert s.version().ok
        yield s


def still_usable(s: Session) -> None:
    reply = s.region_read(CONFIG, 0, 4)
    assert reply.ok and reply.payload[16:] == bytes.fromhex("de103023")


def test_version_reply_is_0_0_and_fits_qemus_buffer() -> None:
    with Session() as s:
        request_size = 16 + 4 + len(b'{"capabilities": {}}')
        reply = s.version()
        assert reply.ok
        major, minor = struct.unpack_from("=HH", reply.payload)
        assert (major, minor) == (0, 0)
        caps = reply.payload[4:].rstrip(b"\0").decode()
        assert caps.startswith('{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576')
        assert reply.payload.endswith(b"\0")
        assert 16 + len(reply.payload) <= 214  # QEMU 11.1's request, hence its reply buffer
        assert request_size < 214


def test_a_tiny_version_request_gets_a_reply_that_fits_it() -> None:
    with Session() as s:
        reply = s.request(Command.VERSION, struct.pack("=HH", 0, 0) + b"{}\0")
        assert reply.ok and len(reply.payload) <= 4 + 3


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (struct.pack("=HH", 1, 0), errno.ENOTSUP),
        (b"\0\0", errno.EINVAL),
        (struct.pack("=HH", 0, 0) + b"{not json\0", errno.EINVAL),
        (struct.pack("=HH", 0, 0) + b'{"capabilities": 3}\0', errno.EINVAL),
    ],
)
def test_a_bad_version_is_refused(payload: bytes, code: int) -> None:
    with Session() as s:
        reply = s.request(Command.VERSION, payload)
        assert (reply.ok, reply.error) == (False, code)
        assert s.version().ok  # and negotiation can still succeed


def test_commands_before_version_and_a_second_version_are_refused() -> None:
    with Session() as s:
        reply = s.region_read(CONFIG, 0, 4)
        assert reply.error == errno.EINVAL
        assert s.version().ok
        assert s.version().error == errno.EINVAL
        still_usable(s)


@pytest.mark.parametrize(
    ("command", "payload", "code"),
    [
        (Command.REGION_READ, b"\0" * 8, errno.EINVAL),  # short
        (Command.DMA_MAP, b"\0" * 20, errno.EINVAL),  # short
        (Command.DEVICE_GET_INFO, struct.pack("=IIII", 8, 0, 0, 0), errno.EINVAL),  # argsz too small
        (Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", 16, 0, 0, 0, 0, 0), errno.EINVAL),
        (Command.DEVICE_GET_IRQ_INFO, struct.pack("=IIII", 16, 0, 9, 0), errno.EINVAL),  # no such index
        (Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", 32, 0, 12, 0, 0, 0), errno.EINVAL),
        (Command.REGION_WRITE, struct.pack("=QII", 0, CONFIG, 4) + b"\0\0", errno.EINVAL),  # count vs data
        (Command.DEVICE_GET_REGION_IO_FDS, struct.pack("=IIII", 16, 0, 0, 0), errno.ENOTSUP),
        (Command.DEVICE_FEATURE, struct.pack("=II", 8, 0x10001), errno.EINVAL),  # GET MIGRATION, no data
        (Command.DEVICE_FEATURE, struct.pack("=II", 8, 0x10006), errno.ENOTSUP),  # dirty page logging
        (Command.MIG_DATA_READ, struct.pack("=II", 8, 4096), errno.EINVAL),  # RUNNING: nothing to read
        (Command.DMA_READ, b"\0" * 16, errno.EINVAL),
        (Command.REGION_WRITE_MULTI, struct.pack("=Q", 0), errno.ENOTSUP),  # not negotiated
        (14, b"", errno.ENOSYS),
        (99, b"", errno.ENOSYS),
    ],
)
def test_malformed_or_unsupported_commands_get_an_errno(
    session: Session, command: int, payload: bytes, code: int
) -> None:
    reply = session.request(command, payload)
    assert (reply.ok, reply.error, reply.payload) == (False, code, b"")
    still_usable(session)


@pytest.mark.parametrize(
    ("region", "offset", "count"),
    [
        (CONFIG, 4096, 4),
        (CONFIG, 4094, 4),
        (0, 16 << 20, 4),
        (1, 0, 4),
        (6, 0x20000, 1),
        (8, 0, 4),
        (42, 0, 4),
    ],
)
def test_region_accesses_out_of_range_are_einval(
    session: Session, region: int, offset: int, count: int
) -> None:
    assert session.region_read(region, offset, count).error == errno.EINVAL
    still_usable(session)


def test_a_message_over_the_size_limit_is_refused_and_skipped() -> None:
    limits = Limits(max_data_xfer_size=4096)
    with Session(limits=limits) as s:
        assert s.version().ok
        big = limits.max_message_size + 1
        msg_id = s.send(Command.REGION_WRITE, b"\xaa" * (big - 16))
        reply = s.receive()
        assert (reply.msg_id, reply.error) == (msg_id, errno.E2BIG)
        still_usable(s)
        assert s.region_read(CONFIG, 0, 8192).error == errno.EINVAL  # count over max_data_xfer_size


def test_fds_where_none_belong_are_refused_and_closed(session: Session) -> None:
    before = open_fds()
    r, w = os.pipe()
    reply = session.request(Command.DEVICE_GET_INFO, struct.pack("=IIII", 16, 0, 0, 0), [r, w])
    assert reply.error == errno.EINVAL
    os.close(r)
    os.close(w)
    still_usable(session)
    assert opened_since(before) == []


def test_too_many_fds_are_refused_and_every_one_closed(session: Session) -> None:
    before = open_fds()
    fds = [os.eventfd(0) for _ in range(20)]
    reply = session.set_irqs(
        IRQ_MSIX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 9, fds=fds[:9] + fds[9:]
    )
    assert reply.error == errno.EINVAL
    for fd in fds:
        os.close(fd)
    still_usable(session)
    assert opened_since(before) == []


def test_a_dma_map_with_two_fds_is_refused(session: Session) -> None:
    memfd = os.memfd_create("ram")
    os.ftruncate(memfd, 1 << 20)
    msg = struct.pack("=IIQQQ", 32, 3, 0, 0, 1 << 20)
    assert session.request(Command.DMA_MAP, msg, [memfd, memfd]).error == errno.EINVAL
    assert len(session.device.dma) == 0
    os.close(memfd)


def test_dma_map_bookkeeping(session: Session) -> None:
    ram = os.memfd_create("ram")
    os.ftruncate(ram, 4 << 20)
    assert session.dma_map(0, 2 << 20, ram).ok
    assert session.dma_map(2 << 20, 2 << 20, ram, offset=2 << 20).ok
    assert session.dma_map(1 << 20, 4096, ram).error == errno.EEXIST
    assert session.dma_map(0xFFFC0000, 0x40000).ok  # no fd: a ROM, recorded unbacked
    assert session.dma_unmap(1 << 30, 4096).error == errno.ENOENT
    assert session.dma_unmap(0, 1 << 20).error == errno.EINVAL  # would split a mapping
    unmapped = session.dma_unmap(0, 2 << 20)
    assert unmapped.ok and unmapped.payload == struct.pack("=IIQQ", 24, 0, 0, 2 << 20)
    assert session.dma_unmap(0, 0, flags=0x2).ok  # unmap all
    assert len(session.device.dma) == 0
    assert session.dma_unmap(0, 4096, flags=0x2).error == errno.EINVAL
    assert session.dma_unmap(0, 0, flags=0x1).error == errno.ENOTSUP
    os.close(ram)
    still_usable(session)


def test_device_dma_goes_through_the_clients_memory(session: Session) -> None:
    ram = os.memfd_create("ram")
    os.ftruncate(ram, 1 << 20)
    assert session.dma_map(0x100000, 1 << 20, ram).ok
    session.backend.memory(0)[0x8000:0x8004] = b"PING"
    engine = 0x5000
    for register, value in ((0, 0x8000), (8, 0x100010), (0x10, 4), (0x18, 0x3)):
        assert session.region_write(0, engine + register, struct.pack("=Q", value)).ok
    view = mmap.mmap(ram, 1 << 20)
    assert view[0x10:0x14] == b"PING"
    view.close()
    os.close(ram)


def test_region_info_two_step_exchange_hands_out_one_mappable_fd(session: Session) -> None:
    first = session.request(Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", 32, 0, 0, 0, 0, 0))
    argsz, flags, _, cap_offset, size, offset = struct.unpack("=IIIIQQ", first.payload)
    assert (len(first.payload), first.fds, flags & 0x8, cap_offset) == (32, [], 0, 0)
    assert flags & 0x7 == 0x7 and size == 16 << 20 and argsz > 32
    second = session.request(Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", argsz, 0, 0, 0, 0, 0))
    assert len(second.payload) == argsz and len(second.fds) == 1
    _, flags, _, cap_offset, _, offset = struct.unpack_from("=IIIIQQ", second.payload)
    assert flags == 0xF and cap_offset == 32
    cap_id, version, nxt, count = struct.unpack_from("=HHII", second.payload, 32)
    areas = [struct.unpack_from("=QQ", second.payload, 48 + 16 * i) for i in range(count)]
    assert (cap_id, version, nxt) == (1, 1, 0)
    bar0 = session.device.plan.bar(0)
    assert bar0 is not None and tuple(areas) == bar0.mmap_areas
    session.backend.memory(0)[0x100:0x104] = b"BAR0"
    mapped = mmap.mmap(second.fds[0], 0x1000, offset=offset)
    assert mapped[0x100:0x104] == b"BAR0"  # the client maps the very memory the device uses
    mapped.close()
    os.close(second.fds[0])


def test_small_and_unmappable_regions_answer_in_one_step(session: Session) -> None:
    config = session.request(Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", 32, 0, 7, 0, 0, 0))
    assert struct.unpack("=IIIIQQ", config.payload) == (32, 0x3, 7, 0, 4096, 0) and config.fds == []
    rom = session.request(Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", 32, 0, 6, 0, 0, 0))
    assert struct.unpack("=IIIIQQ", rom.payload)[1:5] == (0x1, 6, 0, 0x20000)
    vga = session.request(Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", 32, 0, 8, 0, 0, 0))
    assert struct.unpack("=IIIIQQ", vga.payload)[4] == 0


def test_interrupt_eventfds_attach_fire_and_detach(session: Session) -> None:
    session.backend.memory(0)  # the simulator's BAR memfd, made on first use, is not a leak
    before = open_fds()
    vectors = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    trigger = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
    assert session.set_irqs(IRQ_MSIX, trigger, 0, 2, fds=vectors).ok
    assert session.device.attached_eventfds == 2
    assert session.region_write(0, 0x4000, struct.pack("=I", 1)).ok  # doorbell: vector 1
    assert os.eventfd_read(vectors[1]) == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(vectors[0])
    assert session.set_irqs(IRQ_MSIX, trigger, 0, 2).ok  # count 2, no fds: detach
    assert session.device.attached_eventfds == 0
    assert session.set_irqs(IRQ_MSIX, trigger, 8, 2, fds=vectors).error == errno.EINVAL  # past 9 vectors
    assert session.set_irqs(IRQ_MSIX, trigger, 0, 3, fds=vectors).error == errno.EINVAL  # 2 fds for 3
    assert session.set_irqs(IRQ_MSIX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 0, 1).error == errno.EINVAL
    for fd in vectors:
        os.close(fd)
    assert opened_since(before) == []


def test_intx_is_automasked_until_unmasked_and_the_resample_fd_unmasks(session: Session) -> None:
    line = os.eventfd(0, os.EFD_NONBLOCK)
    resample = os.eventfd(0, os.EFD_NONBLOCK)
    assert session.set_irqs(IRQ_INTX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1, fds=[line]).ok
    doorbell = struct.pack("=I", 0)
    session.region_write(0, 0x4000, doorbell)
    assert os.eventfd_read(line) == 1
    session.region_write(0, 0x4000, doorbell)  # masked now: pending
    with pytest.raises(BlockingIOError):
        os.eventfd_read(line)
    assert session.set_irqs(IRQ_INTX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 1).ok  # the EOI
    assert os.eventfd_read(line) == 1  # the pending interrupt fires on unmask
    assert session.set_irqs(IRQ_INTX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK, 0, 1, fds=[resample]).ok
    os.eventfd_write(resample, 1)  # what KVM does at the guest's EOI
    session.region_write(0, 0x4000, doorbell)
    assert os.eventfd_read(line) == 1
    assert session.set_irqs(IRQ_INTX, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 0, 1, data=b"\x01").ok
    assert (
        session.set_irqs(IRQ_INTX, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER, 0, 1, data=b"").error
        == errno.EINVAL
    )
    assert session.set_irqs(IRQ_INTX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0).ok  # disable
    assert session.device.attached_eventfds == 0
    os.close(line)
    os.close(resample)


def test_posted_writes_get_no_reply_and_replies_stay_in_order(session: Session) -> None:
    session.region_write(0, 0x200, b"\x11\x22\x33\x44", flags=FLAG_NO_REPLY)
    session.region_write(0, 0x204, b"\x55", flags=FLAG_NO_REPLY)
    ids = [session.send(Command.REGION_READ, struct.pack("=QII", 0x200, 0, 5)) for _ in range(3)]
    replies = [session.receive() for _ in ids]
    assert [r.msg_id for r in replies] == ids
    assert all(r.payload[16:] == b"\x11\x22\x33\x44\x55" for r in replies)


def test_reset_restores_the_virtual_registers(session: Session) -> None:
    assert session.region_write(CONFIG, 0x3C, b"\x42").ok
    assert session.request(Command.DEVICE_RESET).ok
    assert session.region_read(CONFIG, 0x3C, 1).payload[16:] == b"\x0a"
    assert session.backend.resets >= 1


def test_write_multiple_when_negotiated() -> None:
    with Session(limits=Limits(write_multiple=True)) as s:
        reply = s.version()
        assert b'"write_multiple":true' in reply.payload
        entries = [struct.pack("=QII8s", 0x300 + 8 * i, 0, 8, bytes([i]) * 8) for i in range(3)]
        reply = s.request(Command.REGION_WRITE_MULTI, struct.pack("=Q", 3) + b"".join(entries))
        assert reply.ok and reply.payload == struct.pack("=Q", 3)
        assert s.backend.memory(0)[0x300:0x318] == b"\0" * 8 + b"\1" * 8 + b"\2" * 8
        bad = struct.pack("=Q", 1) + struct.pack("=QII8s", 0, 0, 9, b"x" * 8)
        assert s.request(Command.REGION_WRITE_MULTI, bad).error == errno.EINVAL


@pytest.mark.parametrize(
    ("flags", "size"),
    [(TYPE_REPLY, 16), (0, 8)],
    ids=["a reply where a command belongs", "a header claiming less than itself"],
)
def test_an_untrustworthy_stream_is_dropped(flags: int, size: int) -> None:
    s = Session()
    try:
        assert s.version().ok
        s.send(Command.REGION_READ, struct.pack("=QII", 0, CONFIG, 4), flags=flags, size=size)
        with pytest.raises(ConnectionError):
            s.receive()
        s.thread.join(10)
        assert s.why is not None and s.why.startswith("protocol error")
    finally:
        s.close()


def test_a_flood_of_refused_requests_cannot_flood_the_log() -> None:
    with Session() as session, capture_logs() as logs:
        assert session.version().ok
        for _ in range(1000):
            assert session.region_read(9, 0, 4).error == errno.EINVAL  # no region 9
    refusals = [e for e in logs if e["event"] == "request refused"]
    assert 0 < len(refusals) <= 250  # a burst of 200 and 50 a second
    assert refusals[0]["audit"] is True and refusals[0]["command"] == "REGION_READ"
    assert session.service.auditor.events == 1000
