"""What fuzzing the protocol core found (fuzz/protocol.py), each kept as a test once fixed."""

from __future__ import annotations

import errno
import os
import struct
import time

from mediator.vfio_abi import (
    IRQ_INTX,
    IRQ_MSIX,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
)
from mediator.vfio_user.connection import Connection
from mediator.vfio_user.service import DeviceService
from mediator.vfio_user.transport import BATCH_SIZE
from mediator.vfio_user.wire import FLAG_NO_REPLY, HEADER, Command
from tests.protocol.client import Session, open_fds, opened_since
from tests.support import device

CONFIG = 7
DOORBELL = 0x4000  # the H100 profile's interrupt doorbell in BAR0


def test_capabilities_nested_deeper_than_the_json_parser_goes_are_einval() -> None:
    with Session() as s:
        too_deep = struct.pack("=HH", 0, 0) + b"[" * 100_000 + b"\0"
        assert s.request(Command.VERSION, too_deep).error == errno.EINVAL  # was EIO, from a RecursionError
        assert s.version().ok


def test_a_posted_region_info_hands_out_no_fd() -> None:
    virtual, backend = device("h100-sxm5")
    connection = Connection()
    service = DeviceService(virtual, connection)
    version = struct.pack("=HH", 0, 0) + b"{}\0"
    region_info = struct.pack("=IIIIQQ", 0x100, 0, 0, 0, 0, 0)  # BAR0, room for its sparse-mmap areas
    connection.receive(
        HEADER.pack(1, Command.VERSION, 16 + len(version), 0, 0)
        + version
        + HEADER.pack(2, Command.DEVICE_GET_REGION_INFO, 16 + len(region_info), FLAG_NO_REPLY, 0)
        + region_info
    )
    for _ in range(2):
        request = connection.next_request()
        assert request is not None
        reply, fds = service.handle(request)
    assert (reply, fds) == (b"", [])  # the fd had no bytes to travel with
    backend.close()


def test_interrupt_fds_that_are_not_eventfds_are_refused_and_closed() -> None:
    with Session() as s:
        assert s.version().ok
        s.backend.memory(0)  # the simulator's BAR memfd, made on first use, is not a leak
        before = open_fds()
        read_end, write_end = os.pipe()
        null = os.open(os.devnull, os.O_RDWR)
        trigger = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
        for fd in (read_end, write_end, null):
            assert s.set_irqs(IRQ_MSIX, trigger, 0, 1, fds=[fd]).error == errno.EINVAL
        assert s.device.attached_eventfds == 0
        for fd in (read_end, write_end, null):
            os.close(fd)
        assert opened_since(before) == []


def test_a_blocking_resample_eventfd_cannot_stall_the_session() -> None:
    with Session() as s:
        s.client.settimeout(5)
        assert s.version().ok
        line, resample = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0)  # the client chose blocking
        assert s.set_irqs(IRQ_INTX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1, fds=[line]).ok
        assert s.set_irqs(IRQ_INTX, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK, 0, 1, fds=[resample]).ok
        doorbell = struct.pack("=I", 0)
        assert s.region_write(0, DOORBELL, doorbell).ok  # INTx fires and automasks
        assert s.region_write(0, DOORBELL, doorbell).ok  # masked: the simulator reads the resample fd
        os.close(line)
        os.close(resample)


def test_replies_to_a_burst_of_large_reads_are_not_all_held_at_once() -> None:
    with Session() as s:
        assert s.version().ok
        count, size = 64, 1 << 20
        request = struct.pack("=QII", 0, 2, size)  # BAR2, which is 128 GiB
        s.client.sendall(
            b"".join(HEADER.pack(100 + i, Command.REGION_READ, 32, 0, 0) + request for i in range(count))
        )
        handled = -1
        while handled != s.service.handled:  # the pump stops once the socket's buffer is full
            handled = s.service.handled
            time.sleep(0.2)
        assert handled - 1 < count  # was all of them, their 64 MiB of replies held for one write
        assert handled - 1 <= 2 * BATCH_SIZE // size
        for i in range(count):
            reply = s.receive()
            assert (reply.msg_id, reply.ok, len(reply.payload)) == (100 + i, True, 16 + size)
