"""The migration stream the daemon serves: what a client copies from source to destination.

The state machine is the kernel's (``mediator.backends.migration``). The
stream a client reads in PRE_COPY and STOP_COPY and writes in RESUMING is
the daemon's, framed: a header (format, and a fingerprint of the policy,
so a destination serving the device under another policy refuses it), the
device's own bytes in frames as the backend gives them, then at the end of
STOP_COPY the virtual config registers the guest wrote (the policy's
shadow: the device's data does not hold what the daemon emulates) and an
end frame. ``Outbound`` and ``Inbound`` are sans-IO: bytes in, bytes out.
"""

from __future__ import annotations

import errno
import hashlib
import struct
from collections.abc import Callable
from typing import Protocol

from mediator.backends.migration import SAVING, MigrationError, MigState, state_named

# Frames: kind u8, length u32, then the bytes.
FRAME = struct.Struct("<BI")
HEADER, DEVICE, CONFIG, END = 1, 2, 3, 4
FORMAT = b"vfio-mediator migration 1\0"


def fingerprint(virtual: bytes, writable: bytes, initial_shadow: bytes) -> bytes:
    """What a destination's policy must share with the source's: the config rules and their seed."""
    return hashlib.sha256(virtual + writable + initial_shadow).digest()


def _frame(kind: int, data: bytes) -> bytes:
    return FRAME.pack(kind, len(data)) + data


class Outbound:
    """The source's stream: header, then device bytes as the client reads, then config and end."""

    def __init__(self, policy: bytes) -> None:
        self._pending = bytearray(_frame(HEADER, FORMAT + policy))
        self._ended = False  # the end frame is in ``_pending``

    @property
    def finished(self) -> bool:
        """The whole stream was read."""
        return self._ended and not self._pending

    def read(
        self, size: int, device: Callable[[int], bytes], shadow: Callable[[], bytes], last: bool
    ) -> bytes:
        """Up to ``size`` bytes of the stream; ``device(n)`` gives the device's next bytes (b"" when it
        has none now), ``last``: the device is in STOP_COPY, so its b"" ends the stream."""
        while len(self._pending) < size and not self._ended:
            chunk = device(max(size - len(self._pending) - FRAME.size, 1))
            if chunk:
                self._pending += _frame(DEVICE, chunk)
            elif last:
                self._pending += _frame(CONFIG, shadow()) + _frame(END, b"")
                self._ended = True
            else:
                break  # PRE_COPY: nothing more for now
        out = bytes(self._pending[:size])
        del self._pending[:size]
        return out


class Inbound:
    """The destination's stream: checked frame by frame, device bytes passed on as they complete."""

    def __init__(self, policy: bytes) -> None:
        self._policy = policy
        self._buffer = bytearray()
        self._kinds_seen: list[int] = []
        self.shadow: bytes | None = None

    @property
    def complete(self) -> bool:
        return bool(self._kinds_seen) and self._kinds_seen[-1] == END

    def write(self, data: bytes, device: Callable[[bytes], None]) -> None:
        """Take the client's next bytes; ``device(b)`` gets each device frame's bytes.

        Raises:
            MigrationError: EINVAL, the bytes are not a stream of this device under this policy.
        """
        if self.complete and data:
            raise MigrationError(errno.EINVAL, "bytes after the end of the migration stream")
        self._buffer += data
        while len(self._buffer) >= FRAME.size:
            kind, length = FRAME.unpack_from(self._buffer)
            if len(self._buffer) < FRAME.size + length:
                return
            body = bytes(self._buffer[FRAME.size : FRAME.size + length])
            del self._buffer[: FRAME.size + length]
            self._take(kind, body, device)

    def _take(self, kind: int, body: bytes, device: Callable[[bytes], None]) -> None:
        first = not self._kinds_seen
        if first != (kind == HEADER) or self.complete:
            raise MigrationError(errno.EINVAL, "the migration stream's frames are out of order")
        if kind == HEADER:
            if body != FORMAT + self._policy:
                raise MigrationError(
                    errno.EINVAL,
                    "the migration stream is not from this device under this policy "
                    "(another format, device or quirk table)",
                )
        elif kind == DEVICE and self.shadow is None:
            device(body)
        elif kind == CONFIG and self.shadow is None:
            self.shadow = body
        elif kind != END or self.shadow is None:
            raise MigrationError(errno.EINVAL, f"a migration stream frame of kind {kind} out of place")
        self._kinds_seen.append(kind)


class MigratingBackend(Protocol):
    """The part of a backend migration talks to (the kernel's uAPI, or the simulator's)."""

    migration_state: MigState

    def migration_flags(self) -> int: ...

    def set_migration_state(self, target: MigState) -> None: ...

    def read_migration_data(self, size: int) -> bytes: ...

    def write_migration_data(self, data: bytes) -> None: ...


class Migration:
    """One device's migration: its state as the backend has it, and the stream of the current copy.

    ``shadow`` is the policy's config shadow, sent at the end of STOP_COPY and, on the
    destination, put back when RESUMING ends; ``changed`` hears of every state reached.
    """

    def __init__(
        self, backend: MigratingBackend, shadow: bytearray, policy: bytes, changed: Callable[[], None]
    ) -> None:
        self._backend = backend
        self._shadow = shadow
        self._policy = policy
        self._changed = changed
        self._outbound: Outbound | None = None
        self._inbound: Inbound | None = None

    @property
    def flags(self) -> int:
        """VFIO_MIGRATION_* the device offers; 0: no migration."""
        return self._backend.migration_flags()

    @property
    def state(self) -> MigState:
        return self._backend.migration_state

    def set_state(self, value: int) -> None:
        """Go to state ``value`` by the kernel's arcs.

        Raises:
            MigrationError: no such state, an arc the device refuses (the kernel's errno), or
                RESUMING left before the whole stream came.
        """
        if not self.flags:
            raise MigrationError(errno.ENOTSUP, "the device does not migrate")
        target = state_named(value)
        before = self.state
        resumed = self._resumed_shadow() if before == MigState.RESUMING != target else None
        self._backend.set_migration_state(target)
        if target in SAVING and before not in SAVING:
            self._outbound = Outbound(self._policy)
        elif target not in SAVING:
            self._outbound = None
        if target == MigState.RESUMING != before:
            self._inbound = Inbound(self._policy)
        elif resumed is not None:
            self._shadow[:] = resumed
            self._inbound = None
        self._changed()

    def _resumed_shadow(self) -> bytes:
        """The config shadow a complete inbound stream brought, checked before RESUMING is left."""
        if self._inbound is None or not self._inbound.complete or self._inbound.shadow is None:
            raise MigrationError(errno.EINVAL, "RESUMING ends before the migration stream did")
        shadow = self._inbound.shadow
        if len(shadow) != len(self._shadow):
            raise MigrationError(
                errno.EINVAL, f"the stream's config space has {len(shadow)} bytes, not {len(self._shadow)}"
            )
        return shadow

    def read(self, size: int) -> bytes:
        if self._outbound is None or self.state not in SAVING:
            raise MigrationError(errno.EINVAL, f"no migration data to read in {self.state.name}")
        last = self.state == MigState.STOP_COPY
        return self._outbound.read(size, self._backend.read_migration_data, lambda: bytes(self._shadow), last)

    def write(self, data: bytes) -> None:
        if self._inbound is None or self.state != MigState.RESUMING:
            raise MigrationError(errno.EINVAL, f"no migration data to write in {self.state.name}")
        self._inbound.write(data, self._backend.write_migration_data)

    def back_to_running(self) -> None:
        """Between clients: the next one finds the device running, whatever the last one left."""
        self._outbound = self._inbound = None
        if self.flags and self.state != MigState.RUNNING:
            self._backend.set_migration_state(MigState.RUNNING)
            self._changed()
