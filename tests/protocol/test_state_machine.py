"""Random command sequences against a live session, checked against a model of what the device holds.

Hypothesis drives a real client on a socketpair to the daemon's own
transport, connection and service (``tests.protocol.client.Session``) with
valid and invalid commands in any order: VERSION twice or never, DMA maps
that overlap or split, interrupt vectors past the end, fds where none belong,
commands that do not exist, a malformed header. After every step the
device's DMA table and attached eventfds must equal the model's; every
request gets the errno the model predicts, or, for a malformed header, the
connection ends; at the end the process holds the fds it held at the start.
"""

from __future__ import annotations

import errno
import gc
import os
import struct

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mediator.vfio_abi import IRQ_MSIX, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE
from mediator.vfio_user.wire import HEADER, Command
from tests.protocol.client import Reply, Session, open_fds, opened_since

CONFIG, BAR0 = 7, 0
IOVA_BASE, PAGE, PAGES = 0x100000, 0x1000, 16
SCRATCH = range(0x100, 0x140, 4)  # plain BAR0 memory in the simulated H100
REFUSED = {
    Command.DEVICE_GET_REGION_IO_FDS: errno.ENOTSUP,
    Command.MIG_DATA_READ: errno.EINVAL,  # sent here without its argsz and size
    Command.MIG_DATA_WRITE: errno.EINVAL,
    Command.DMA_READ: errno.EINVAL,
    Command.DMA_WRITE: errno.EINVAL,
}


def _error(reply: Reply) -> int:
    return 0 if reply.ok else reply.error


class ClientSession(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        gc.collect()  # what earlier tests left for the collector must not close during this one
        self.fds_before = open_fds()
        self.session = Session()
        self.negotiated = self.hung_up = False
        self.mapped: list[tuple[int, int]] = []  # (first page, end page)
        self.vectors: set[int] = set()
        self.scratch: dict[int, int] = {}
        self.msix_count = self.session.device.irq_info(IRQ_MSIX).count

    def _expect(self, reply: Reply, error: int) -> bool:
        """Check ``reply`` against the model: ``error`` unless the version is not yet negotiated."""
        expected = error if self.negotiated else errno.EINVAL
        assert _error(reply) == expected, (errno.errorcode.get(reply.error), errno.errorcode.get(expected))
        return expected == 0

    @initialize(negotiate=st.booleans())
    def start(self, negotiate: bool) -> None:
        if negotiate:
            self.version()

    @precondition(lambda self: not self.hung_up)
    @rule()
    def version(self) -> None:
        assert _error(self.session.version()) == (errno.EINVAL if self.negotiated else 0)
        self.negotiated = True

    @precondition(lambda self: not self.hung_up)
    @rule(first=st.integers(0, PAGES - 1), pages=st.integers(1, 4), backed=st.booleans())
    def dma_map(self, first: int, pages: int, backed: bool) -> None:
        end = first + pages
        memory = None
        if backed:
            memory = os.memfd_create("state-machine-ram")
            os.ftruncate(memory, pages * PAGE)
        try:
            reply = self.session.dma_map(IOVA_BASE + first * PAGE, pages * PAGE, memory)
        finally:
            if memory is not None:
                os.close(memory)  # the daemon keeps its own mapping, not the fd
        overlaps = any(start < end and first < stop for start, stop in self.mapped)
        if self._expect(reply, errno.EEXIST if overlaps else 0):
            self.mapped.append((first, end))

    @precondition(lambda self: not self.hung_up)
    @rule(first=st.integers(0, PAGES - 1), pages=st.integers(1, 8))
    def dma_unmap(self, first: int, pages: int) -> None:
        end = first + pages
        reply = self.session.dma_unmap(IOVA_BASE + first * PAGE, pages * PAGE)
        inside = [(start, stop) for start, stop in self.mapped if first <= start and stop <= end]
        split = any(
            start < end and first < stop for start, stop in self.mapped if (start, stop) not in inside
        )
        if self._expect(reply, errno.EINVAL if split else errno.ENOENT if not inside else 0):
            self.mapped = [m for m in self.mapped if m not in inside]

    @precondition(lambda self: not self.hung_up)
    @rule()
    def dma_unmap_all(self) -> None:
        if self._expect(self.session.dma_unmap(0, 0, flags=2), 0):
            self.mapped.clear()

    @precondition(lambda self: not self.hung_up)
    @rule(start=st.integers(0, 40), count=st.integers(1, 4), attach=st.booleans())
    def msix_vectors(self, start: int, count: int, attach: bool) -> None:
        """Attach eventfds to vectors, or detach them (no fds: how clients send fd -1)."""
        fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(count)] if attach else []
        flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
        reply = self.session.set_irqs(IRQ_MSIX, flags, start, count, fds=fds)
        for fd in fds:
            os.close(fd)
        vectors = set(range(start, start + count))
        if self._expect(reply, errno.EINVAL if start + count > self.msix_count else 0):
            self.vectors = self.vectors | vectors if attach else self.vectors - vectors

    @precondition(lambda self: not self.hung_up)
    @rule()
    def msix_disable(self) -> None:
        reply = self.session.set_irqs(IRQ_MSIX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0)
        if self._expect(reply, 0):
            self.vectors.clear()

    @precondition(lambda self: not self.hung_up)
    @rule(offset=st.integers(0, 0x1010), count=st.sampled_from([1, 2, 4, 8, 64]))
    def config_read(self, offset: int, count: int) -> None:
        reply = self.session.region_read(CONFIG, offset, count)
        if self._expect(reply, 0 if offset + count <= 0x1000 else errno.EINVAL):
            assert len(reply.payload) == 16 + count
            if offset == 0 and count >= 4:
                assert reply.payload[16:20] == bytes.fromhex("de103023")  # 10de:2330, the H100 SXM5

    @precondition(lambda self: not self.hung_up)
    @rule(offset=st.sampled_from(SCRATCH), value=st.integers(0, 0xFFFFFFFF))
    def scratch_write(self, offset: int, value: int) -> None:
        if self._expect(self.session.region_write(BAR0, offset, struct.pack("=I", value)), 0):
            self.scratch[offset] = value

    @precondition(lambda self: not self.hung_up)
    @rule(offset=st.sampled_from(SCRATCH))
    def scratch_read(self, offset: int) -> None:
        reply = self.session.region_read(BAR0, offset, 4)
        if self._expect(reply, 0) and offset in self.scratch:
            assert struct.unpack_from("=I", reply.payload, 16)[0] == self.scratch[offset]

    @precondition(lambda self: not self.hung_up)
    @rule(command=st.sampled_from(sorted(REFUSED)) | st.integers(Command.DEVICE_FEATURE + 1, 0xFFFF))
    def command_not_served(self, command: int) -> None:
        self._expect(self.session.request(command), REFUSED.get(command, errno.ENOSYS))

    @precondition(lambda self: not self.hung_up)
    @rule()
    def fds_where_none_belong(self) -> None:
        fd = os.eventfd(0)
        reply = self.session.request(Command.REGION_READ, struct.pack("=QII", 0, CONFIG, 4), [fd])
        os.close(fd)
        self._expect(reply, errno.EINVAL)

    @precondition(lambda self: not self.hung_up)
    @rule(size=st.integers(0, 15))
    def header_too_short(self, size: int) -> None:
        """A message smaller than its own header cannot be framed: the connection ends."""
        self.session.client.sendall(HEADER.pack(1, Command.REGION_READ, size, 0, 0))
        assert self.session.client.recv(1) == b""
        self.session.thread.join(10)
        assert not self.session.thread.is_alive()
        self.hung_up = True

    @precondition(lambda self: self.hung_up)
    @rule()
    def reconnect(self) -> None:
        self.session.close()
        self.session = Session()
        self.negotiated = self.hung_up = False
        self.scratch.clear()

    @invariant()
    def device_holds_what_the_model_holds(self) -> None:
        if self.hung_up:  # what the client left goes when the daemon releases the device
            self.session.device.detach_client()
            self.mapped.clear()
            self.vectors.clear()
        assert sorted((m.iova, m.size) for m in self.session.device.dma.table.mappings()) == sorted(
            (IOVA_BASE + start * PAGE, (stop - start) * PAGE) for start, stop in self.mapped
        )
        assert self.session.device.attached_eventfds == len(self.vectors)

    def teardown(self) -> None:
        self.session.close()
        assert opened_since(self.fds_before) == []


ClientSession.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_client_sessions = ClientSession.TestCase
