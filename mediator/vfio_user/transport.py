"""Moving vfio-user messages over a client's UNIX socket, with their fds.

The socket is blocking and one thread owns it: ``pump`` reads whatever the
client sent with ``recvmsg`` (fds as SCM_RIGHTS, ``MSG_CTRUNC`` reported so
the connection can refuse a message whose fds were cut), hands every whole
request to the service in order, and sends the replies, batched into one
write (of at most about ``BATCH_SIZE`` bytes) when several are ready and none
carries an fd. A reply with an fd goes alone in its own ``sendmsg``.

With the C fast path (``fast_loop``), the pump lends the socket to the C
loop whenever the connection is between messages: the loop answers what the
device's tables determine, without the GIL, and hands back the first request
it does not answer with everything read after it, which the pump serves as
if it had read it; replies keep their order.

Why a blocking socket in a thread and not trio's: on this machine kind a
4-byte REGION_READ round trip costs the C socket floor x1.3-1.5 with a
blocking loop and x2.3 when every read waits in trio's scheduler
(``wait_readable``), and the guest's config and trapped-BAR accesses wait on
every one of them. trio still runs everything else: it accepts clients,
starts and stops each pump in a worker thread, and shuts a client's socket
to stop its pump (see ``server``).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Callable, Sequence

import structlog

from mediator.vfio_user.connection import Connection, ProtocolError
from mediator.vfio_user.fast_loop import FastLoop
from mediator.vfio_user.service import DeviceService

log = structlog.get_logger("mediator.vfio_user")

RECEIVE_SIZE = 1 << 17
# Replies wait to be batched up to this many bytes: one read can hold thousands of
# 1 MiB REGION_READs, whose replies must not all be held at once.
BATCH_SIZE = 1 << 20
FD_SIZE = array.array("i").itemsize


class MessageSocket:
    def __init__(self, sock: socket.socket, max_fds: int) -> None:
        self.sock = sock
        self._ancillary_size = socket.CMSG_SPACE(max_fds * FD_SIZE)
        # Reads land in one preallocated buffer: asking recvmsg for a large size
        # instead makes CPython allocate (and shrink) that much on every read,
        # which costs more than the whole round trip's Python work.
        self._view = memoryview(bytearray(RECEIVE_SIZE))

    def receive(self, connection: Connection) -> bool:
        """One read into ``connection``; False when the client has closed its end."""
        try:
            size, ancillary, flags, _ = self.sock.recvmsg_into(
                [self._view], self._ancillary_size, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:  # the receive timeout the fast path sets: nothing yet
            return True
        if size and not ancillary:
            connection.receive(self._view[:size].tobytes())
            return True
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % FD_SIZE]))
        if not size:
            for fd in fds:
                os.close(fd)
            return False
        connection.receive(self._view[:size].tobytes(), fds, fds_truncated=bool(flags & socket.MSG_CTRUNC))
        return True

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            sent = self.sock.send(data)  # one syscall for the usual small reply; sendall loops
        if sent < len(data):
            self.sock.sendall(data[sent:])


class _Batch:
    """Replies waiting to leave in one write, sent once they reach ``BATCH_SIZE``."""

    __slots__ = ("_parts", "_send", "_size")

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, reply: bytes) -> None:
        self._parts.append(reply)
        self._size += len(reply)
        if self._size >= BATCH_SIZE:
            self.flush()

    def flush(self) -> None:
        parts = self._parts
        if parts:
            self._send(parts[0] if len(parts) == 1 else b"".join(parts))
            parts.clear()
            self._size = 0


def pump(
    messages: MessageSocket, connection: Connection, service: DeviceService, fast: FastLoop | None = None
) -> str:
    """Serve requests until the client goes; returns why the session ended.

    With ``fast``, the C loop reads and answers whenever the connection is between messages.
    """
    batch = _Batch(messages.send)
    next_request, handle, send = connection.next_request, service.handle, messages.send
    try:
        while True:
            request = next_request()
            if request is None:
                batch.flush()
                if fast is not None and connection.between_messages and service.serves:
                    ended = _serve_fast(fast, connection, service)
                    if ended is not None:
                        return ended
                elif not messages.receive(connection):
                    return "client closed the connection"
                continue
            reply, fds = handle(request)
            if connection.closing_reason is not None:
                batch.add(reply)
                batch.flush()
                return connection.closing_reason
            if fds:
                batch.flush()
                send(reply, fds)
            elif reply:
                batch.add(reply)
    except ProtocolError as e:
        log.warning("dropping client: the stream cannot be trusted", why=str(e))
        with contextlib.suppress(OSError):  # what came before the bad header is answered
            batch.flush()
        return f"protocol error: {e}"
    except OSError as e:
        return f"socket error: {e.strerror or e}"
    finally:
        connection.close()
        if fast is not None:
            _publish(fast, service)
            fast.close()


def _serve_fast(fast: FastLoop, connection: Connection, service: DeviceService) -> str | None:
    """One run of the C loop; why the session ended, or None when it goes on."""
    served = fast.serve()
    _publish(fast, service)
    if served.data or served.fds:
        connection.receive(served.data, served.fds, fds_truncated=served.fds_truncated)
    return served.ended


def _publish(fast: FastLoop, service: DeviceService) -> None:
    for command, count, buckets, seconds in fast.take_counts():
        service.answered_elsewhere(command, count, buckets, seconds)
