"""One session's C fast path: the loop of cshim/fast_path.c on the client's socket, without the GIL.

``transport.pump`` calls ``FastLoop.serve`` whenever the connection sits
between messages with nothing buffered. The C loop then owns the socket: it
reads, answers the config and plain BAR accesses the device's tables
(``mediator.virt.fast_tables``) determine, sends their replies batched, and
comes back with one of:

- a hand-over: the input from the first request it did not answer (and the
  fds of the read that brought them), which the pump gives the
  ``Connection`` as if it had read it, so Python serves it in order;
- a yield: it has been serving for a while, or the socket's receive timeout
  found it idle, with counters to publish: the pump publishes them (request
  counts and latency buckets to the service, padding accesses to the
  device) and calls again, so metrics trail the traffic by ``PUBLISH_DELAY``;
- the client closed its end, or the socket failed.

Buffers are allocated without being cleared, so a session's RSS grows only
with the requests it really gets.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from mediator.vfio_user.connection import Limits
from mediator.vfio_user.model import FastPathTables
from mediator.vfio_user.wire import Command

try:
    from mediator._fast_path import ffi, lib
except ImportError:  # not built: no device offers tables then (mediator.virt.fast_tables says why)
    lib = None

INPUT_SIZE = 1 << 17  # as Python's reads: a larger message goes to Python, which assembles it
OUTPUT_SIZE = 1 << 18  # replies batched before a send; a read's data must fit with its header
# What the loop answered is in the metrics this long after, at most: an idle loop wakes
# every RECEIVE_TIMEOUT and comes back to publish when it has counted something, a busy one
# comes back between two reads once it has served for PUBLISH_DELAY. Each costs the GIL once.
PUBLISH_DELAY = 0.1
RECEIVE_TIMEOUT = struct.pack("ll", 0, 50_000)
YIELD_AFTER_NS = round(PUBLISH_DELAY * 1e9)
COMMANDS = (int(Command.REGION_READ), int(Command.REGION_WRITE))  # the loop's counters, in its order


@dataclass(frozen=True)
class Served:
    """How a run of the C loop ended: a hand-over (``data``, ``fds``), a yield, or the session's end."""

    data: bytes = b""  # the input from the first request not answered
    fds: tuple[int, ...] = ()
    fds_truncated: bool = False
    ended: str | None = None  # why the session ended


def fits(limits: Limits) -> bool:
    """Whether the C loop can serve a session with these limits (its fd room is fixed)."""
    return lib is not None and limits.max_msg_fds <= lib.FP_MAX_FDS


class FastLoop:
    def __init__(
        self, sock: socket.socket, tables: FastPathTables, limits: Limits, bounds: tuple[float, ...]
    ) -> None:
        """``bounds``: the latency buckets' upper bounds in seconds (``RequestEvents.latency_bounds``)."""
        assert fits(limits)
        self.tables = tables
        raw = ffi.new_allocator(should_clear_after_alloc=False)
        self._input, self._output = raw("uint8_t[]", INPUT_SIZE), raw("uint8_t[]", OUTPUT_SIZE)
        self._session = session = ffi.new("struct fp_session *")
        session.socket = sock.fileno()
        session.max_fds = limits.max_msg_fds
        session.max_count = min(limits.max_data_xfer_size, OUTPUT_SIZE - 32)
        session.input, session.input_size = self._input, INPUT_SIZE
        session.output, session.output_size = self._output, OUTPUT_SIZE
        session.yield_after_ns = YIELD_AFTER_NS
        if len(bounds) > lib.FP_MAX_BOUNDS:
            raise ValueError(f"{len(bounds)} latency buckets, over {lib.FP_MAX_BOUNDS}")
        session.n_bounds = len(bounds)
        for i, bound in enumerate(bounds):
            session.bounds_ns[i] = round(bound * 1e9)
        self._buckets = len(bounds) + 1
        # The pump's own reads then see EAGAIN now and then, and read again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, RECEIVE_TIMEOUT)

    def serve(self) -> Served:
        """Run the C loop until it hands over, yields, or the session ends (the GIL is released)."""
        session = self._session
        result = lib.fp_serve(self.tables.device, session)
        if result == lib.FP_CLOSED:
            return Served(ended="client closed the connection")
        if result == lib.FP_SOCKET_ERROR:
            return Served(ended=f"socket error: {os.strerror(session.error)}")
        if result == lib.FP_YIELD:
            return Served()
        data = bytes(ffi.buffer(session.input + session.input_start, session.input_end - session.input_start))
        fds = tuple(session.fds[0 : session.n_fds])
        truncated = bool(session.fds_truncated)
        session.input_start = session.input_end = session.n_fds = session.fds_truncated = 0
        return Served(data, fds, truncated)

    def take_counts(self) -> list[tuple[int, int, list[int], float]]:
        """(command, requests, latency buckets, seconds) the loop answered since the last call."""
        session, counts = self._session, []
        for which, command in enumerate(COMMANDS):
            answered = int(session.answered[which])
            if not answered:
                continue
            buckets = list(session.buckets[which][0 : self._buckets])
            counts.append((command, answered, buckets, session.nanoseconds[which] / 1e9))
            session.answered[which] = session.nanoseconds[which] = 0
            for i in range(self._buckets):
                session.buckets[which][i] = 0
        self.tables.publish()
        return counts

    def close(self) -> None:
        self.tables.close()
