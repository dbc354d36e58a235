"""The server side of one vfio-user connection, sans I/O (h11's shape).

Bytes and file descriptors go in with ``receive``; ``next_request`` hands
out whole requests, one at a time, and will not hand out the next before the
current one is answered with ``reply`` or ``error`` (or needs no answer):
replies leave strictly in request order, as clients rely on. Nothing here
touches a socket.

Theory of operation:

- Framing. A message is a 16-byte header and ``size - 16`` payload bytes.
  A header that cannot be right (size < 16, a reply or an unknown type where
  a command belongs) means the stream can no longer be trusted: that is a
  ``ProtocolError`` and the caller drops the connection. A message larger
  than the limit is discarded as it streams in, never buffered, and gets an
  E2BIG error reply; the connection goes on.
- File descriptors. Linux delivers the fds of a ``sendmsg`` with the read
  that ends inside (or at the end of) that message, and never glues data
  from a later message after it. So the fds of a read belong to the message
  holding that read's last byte; ``receive`` records them against that
  stream position. A read whose ancillary data was truncated marks its
  message, which is then refused (EINVAL) with the fds that did arrive
  closed. Fds of a message nobody takes are closed when it is answered.
- Negotiation. VERSION comes first; anything before it is refused (EINVAL),
  and so is a second VERSION. We speak 0.0 (the only version QEMU 11.1
  accepts); another major is refused (ENOTSUP). Our capabilities JSON is
  compact and shrunk further to fit the client's buffer, which is the size
  of its own request.
- Rules. Every rule of the protocol that is not a command's meaning is
  checked here, and a request that breaks one carries its ``violation``
  (the errno and why) for the service to refuse: the state (``State``:
  awaiting VERSION, ready, closing), the fds each command may carry and
  the capability it needs (``RULES``), the size limit, truncated fds.
  Once the connection is closing (``close_after``) it hands out nothing more.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from mediator.errors import Refused
from mediator.vfio_user.wire import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_MASK,
    HEADER,
    HEADER_SIZE,
    TYPE_COMMAND,
    TYPE_REPLY,
    VERSION,
    Command,
    header,
)

_pack_header = HEADER.pack
SUPPORTED_MAJOR = 0
SUPPORTED_MINOR = 0
# Bytes a message may have beyond its data: header, REGION_WRITE fields, slack
# for VERSION JSON and WRITE_MULTI batches.
MESSAGE_OVERHEAD = 64 * 1024


class ProtocolError(Exception):
    """The byte stream can no longer be trusted; the connection must end."""


class CommandError(Refused):
    """A command to refuse with ``errno``; the connection goes on."""


class State(Enum):
    AWAITING_VERSION = "awaiting VERSION"
    READY = "ready"
    CLOSING = "closing"


@dataclass(frozen=True)
class CommandRule:
    """What a command may carry and needs, beyond its payload."""

    fds: int | None = 0  # how many fds it may carry; None: up to max_msg_fds
    needs: str | None = None  # the capability both sides must have negotiated


# Commands absent here carry no fd and need nothing.
RULES: dict[int, CommandRule] = {
    Command.DMA_MAP: CommandRule(fds=1),
    Command.DEVICE_SET_IRQS: CommandRule(fds=None),
    Command.REGION_WRITE_MULTI: CommandRule(needs="write_multiple"),
}
_PLAIN = CommandRule()
# The commands a ready connection must look at even without fds: a second VERSION, and the gated ones.
_CHECKED_WHEN_READY = frozenset(
    [Command.VERSION, *(command for command, rule in RULES.items() if rule.needs)]
)


@dataclass(frozen=True)
class Limits:
    """What the server advertises and enforces."""

    max_msg_fds: int = 16
    max_data_xfer_size: int = 1 << 20
    max_dma_maps: int = 65535
    pgsizes: int = 4096
    write_multiple: bool = False

    @property
    def max_message_size(self) -> int:
        return HEADER_SIZE + self.max_data_xfer_size + MESSAGE_OVERHEAD


_NO_FDS: list[int] = []  # shared by fd-less requests, never mutated: take_fds swaps in a new list


class Request:
    """One command from the client, with the fds that came with it (closed when answered)."""

    __slots__ = ("command", "fds", "fds_truncated", "flags", "msg_id", "payload", "too_big", "violation")

    def __init__(
        self,
        msg_id: int,
        command: int,
        flags: int,
        payload: bytes,
        *,
        fds: list[int] | None = None,
        fds_truncated: bool = False,
        too_big: bool = False,
    ) -> None:
        self.msg_id = msg_id
        self.command = command
        self.flags = flags
        self.payload = payload
        self.fds: list[int] = fds if fds else _NO_FDS
        self.fds_truncated = fds_truncated
        self.too_big = too_big  # the body was over the size limit and has been discarded
        # (errno, why) when the request breaks a rule of the protocol: refuse it, whatever its command
        self.violation: tuple[int, str] | None = None

    @property
    def wants_reply(self) -> bool:
        return not self.flags & FLAG_NO_REPLY

    def take_fds(self) -> list[int]:
        """The request's fds, now the caller's to close."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        if self.fds:
            for fd in self.take_fds():
                os.close(fd)


@dataclass
class _Oversized:
    msg_id: int
    command: int
    flags: int
    remaining: int


class Connection:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._max_message_size = self.limits.max_message_size  # read for every message
        self.state = State.AWAITING_VERSION
        self.closing_reason: str | None = None
        self.write_multiple = False
        self.client_capabilities: dict[str, object] = {}
        # Unread bytes are _buffer[_read:]; a read usually brings exactly one whole
        # message, which is then parsed where it lies, without copying.
        self._buffer = b""
        self._read = 0
        self._buffer_pos = 0  # stream position of _buffer[0]
        self._fds: list[
            tuple[int, list[int], bool]
        ] = []  # (stream position of a read's last byte, fds, truncated)
        self._skipping: _Oversized | None = None
        self._current: Request | None = None

    # input
    def receive(
        self, data: bytes | memoryview, fds: Sequence[int] = (), *, fds_truncated: bool = False
    ) -> None:
        """Bytes (and the fds that came with them) read from the socket."""
        if not data:
            if fds:
                self._close(list(fds))
            return
        if fds or fds_truncated:
            last_byte = self._buffer_pos + len(self._buffer) + len(data) - 1
            self._fds.append((last_byte, list(fds), fds_truncated))
        if self._read == len(self._buffer):
            self._buffer_pos += self._read
            self._buffer = bytes(data)
        else:
            self._buffer_pos += self._read
            self._buffer = self._buffer[self._read :] + data
        self._read = 0

    def next_request(self) -> Request | None:
        """The next whole request, or None until more bytes arrive.

        Raises:
            ProtocolError: the stream cannot be trusted any more.
            RuntimeError: the previous request has not been answered.
        """
        if self._current is not None:
            raise RuntimeError(f"request {self._current.msg_id} has not been answered")
        if not self._ready and self.state is State.CLOSING:
            return None
        if self._skipping is not None:
            return self._skip()
        at = self._read
        if len(self._buffer) - at < HEADER_SIZE:
            return None
        msg_id, command, size, flags, _ = HEADER.unpack_from(self._buffer, at)
        if size < HEADER_SIZE:
            raise ProtocolError(f"message {msg_id} claims {size} bytes, less than its header")
        if flags & FLAG_TYPE_MASK != TYPE_COMMAND:
            kind = "a reply" if flags & FLAG_TYPE_MASK == TYPE_REPLY else f"type {flags & FLAG_TYPE_MASK}"
            raise ProtocolError(f"message {msg_id} is {kind}; the server only takes commands")
        if size > self._max_message_size:
            self._skipping = _Oversized(msg_id, command, flags, size)
            return self._skip()
        if len(self._buffer) - at < size:
            return None
        payload = self._buffer[at + HEADER_SIZE : at + size]
        if self._fds:
            fds, truncated = self._claim_fds(size)
            request = Request(msg_id, command, flags, payload, fds=fds, fds_truncated=truncated)
        else:
            request = Request(msg_id, command, flags, payload)
        if not self._ready or request.fds or request.fds_truncated or command in _CHECKED_WHEN_READY:
            request.violation = self._violation(request)
        self._read = at + size
        self._current = request
        return request

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        self._state = state
        self._ready = state is State.READY  # one check per message on the hot path instead of two

    @property
    def between_messages(self) -> bool:
        """Ready, and nothing held: every byte received was handed out and answered, no fd waits.

        The next byte read then starts a message: someone else (the C fast path) may read and
        answer for a while, and hand back what it did not answer with ``receive``.
        """
        return (
            self._ready
            and self._read == len(self._buffer)
            and self._current is None
            and self._skipping is None
            and not self._fds
        )

    @property
    def negotiated(self) -> bool:
        return self.state is not State.AWAITING_VERSION

    def _violation(self, request: Request) -> tuple[int, str] | None:
        """The rule ``request`` breaks, or None."""
        limits, command = self.limits, request.command
        if request.fds_truncated:
            return errno.EINVAL, f"more than {limits.max_msg_fds} fds"
        if self.state is State.AWAITING_VERSION and command != Command.VERSION:
            return errno.EINVAL, "VERSION must come first"
        if self.state is State.READY and command == Command.VERSION:
            return errno.EINVAL, "the version was already negotiated"
        rule = RULES.get(command, _PLAIN)
        allowed = limits.max_msg_fds if rule.fds is None else rule.fds
        if len(request.fds) > allowed:
            return errno.EINVAL, f"{len(request.fds)} fds where at most {allowed} belong"
        if rule.needs == "write_multiple" and not self.write_multiple:
            return errno.ENOTSUP, "write_multiple was not negotiated"
        return None

    def _claim_fds(self, size: int) -> tuple[list[int], bool]:
        """The fds of the ``size`` bytes starting at the read position."""
        end = self._buffer_pos + self._read + size
        fds: list[int] = []
        truncated = False
        while self._fds and self._fds[0][0] < end:
            _, more, cut = self._fds.pop(0)
            fds += more
            truncated |= cut
        return fds, truncated

    def _skip(self) -> Request | None:
        skipping = self._skipping
        assert skipping is not None
        drop = min(skipping.remaining, len(self._buffer) - self._read)
        fds, _ = self._claim_fds(drop)
        self._close(fds)
        self._read += drop
        skipping.remaining -= drop
        if skipping.remaining:
            return None
        self._skipping = None
        request = Request(skipping.msg_id, skipping.command, skipping.flags, b"", too_big=True)
        request.violation = errno.E2BIG, f"message over the {self.limits.max_message_size}-byte limit"
        self._current = request
        return request

    # output
    def reply(self, request: Request, payload: bytes = b"") -> bytes:
        """The reply to ``request`` (empty when it asked for none); closes fds it left."""
        if request is not self._current or request.fds:
            self._answered(request)
        self._current = None
        if request.flags & FLAG_NO_REPLY:
            return b""
        return (
            _pack_header(request.msg_id, request.command, HEADER_SIZE + len(payload), TYPE_REPLY, 0) + payload
        )

    def error(self, request: Request, errno_value: int) -> bytes:
        self._answered(request)
        if not request.wants_reply:
            return b""
        return header(request.msg_id, request.command, HEADER_SIZE, TYPE_REPLY | FLAG_ERROR, errno_value)

    def _answered(self, request: Request) -> None:
        if request is not self._current:
            raise RuntimeError(f"request {request.msg_id} is not the one being answered")
        if request.fds:
            request.close_fds()
        self._current = None

    # negotiation
    def negotiate(self, request: Request) -> bytes:
        """The VERSION reply payload.

        Raises:
            CommandError: malformed proposal (EINVAL), another major (ENOTSUP).
        """
        if len(request.payload) < VERSION.size:
            raise CommandError(
                errno.EINVAL, f"VERSION payload of {len(request.payload)} bytes, need {VERSION.size}"
            )
        major, _ = VERSION.unpack_from(request.payload)  # any minor of ours is answered with ours
        if major != SUPPORTED_MAJOR:
            raise CommandError(
                errno.ENOTSUP, f"client speaks vfio-user {major}.x, we speak {SUPPORTED_MAJOR}.x"
            )
        self.client_capabilities = self._client_capabilities(request.payload[4:])
        self.state = State.READY
        self.write_multiple = bool(self._capability_sets()[0].get("write_multiple"))
        version = VERSION.pack(SUPPORTED_MAJOR, SUPPORTED_MINOR)
        room = HEADER_SIZE + 4 + len(request.payload[4:])  # the client's buffer is its request's size
        for capabilities in self._capability_sets():
            text = json.dumps({"capabilities": capabilities}, separators=(",", ":")).encode() + b"\0"
            if HEADER_SIZE + len(version) + len(text) <= room:
                return version + text
        return version

    @staticmethod
    def _client_capabilities(blob: bytes) -> dict[str, object]:
        text = blob.split(b"\0", 1)[0]
        if not text:
            return {}
        try:
            parsed = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nesting too deep
            raise CommandError(errno.EINVAL, "VERSION capabilities are not JSON") from None
        capabilities = parsed.get("capabilities", {}) if isinstance(parsed, dict) else None
        if not isinstance(capabilities, dict):
            raise CommandError(errno.EINVAL, "VERSION capabilities must be a JSON object")
        return capabilities

    def _capability_sets(self) -> list[dict[str, object]]:
        """Our capabilities, most complete first, to fit the client's buffer."""
        limits = self.limits
        essential: dict[str, object] = {
            "max_msg_fds": limits.max_msg_fds,
            "max_data_xfer_size": limits.max_data_xfer_size,
        }
        full = dict(essential, max_dma_maps=limits.max_dma_maps, pgsizes=limits.pgsizes)
        if limits.write_multiple and self.client_capabilities.get("write_multiple") is True:
            full["write_multiple"] = True
        return [full, essential]

    # teardown
    def close_after(self, reason: str) -> None:
        """End the session once the current request is answered: nothing more is handed out."""
        self.state = State.CLOSING
        self.closing_reason = reason

    def close(self) -> None:
        """Close every fd still held: buffered, or attached to an unanswered request."""
        for _, fds, _ in self._fds:
            self._close(fds)
        self._fds.clear()
        if self._current is not None:
            self._current.close_fds()

    @staticmethod
    def _close(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
