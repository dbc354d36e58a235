"""Serving a device on a UNIX socket, under trio.

Each listening socket serves one client at a time. A client whose
credentials (SO_PEERCRED, SO_PEERGROUPS) the device's ``Lifecycle`` does not
allow is closed at once and logged; so is a second client while the first
keeps its session. A client that comes once the last one has hung up (its
session ending, its device being handed off) waits for its turn. Each
session runs the blocking message pump (``transport``) in a worker thread,
between the lifecycle's hooks: ``admit`` gives the device this client gets
(a reload swaps it between clients, never under one) and whether it may be
served at all (quarantine, fabric partition); ``client_gone`` hands the device
off once the client has gone (``mediator.handoff``), before the next client
is taken. Cancelling ``serve`` shuts the client's socket so its pump ends
and waits for that clean-up.
"""

from __future__ import annotations

import contextlib
import itertools
import select
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol, get_args

import structlog
import trio

from mediator.audit import Auditor, RateLimiter
from mediator.unix_listener import accept
from mediator.vfio_user.connection import Connection, Limits
from mediator.vfio_user.fast_loop import FastLoop, fits
from mediator.vfio_user.model import DeviceModel, RequestEvents
from mediator.vfio_user.service import DeviceService
from mediator.vfio_user.transport import MessageSocket, pump

log = structlog.get_logger("mediator.vfio_user")


class Lifecycle(Protocol):
    """What happens to a device around each client; ``admit`` and ``release`` run in the session's thread."""

    def allows(self, peer: Peer) -> bool:
        """Whether this peer (SO_PEERCRED) may use the device at all."""
        ...

    def admit(self, peer: Peer) -> tuple[DeviceModel, str | None]:
        """The device this client gets, and why it must be refused (every request gets EPERM) or None."""
        ...

    def client_gone(self, requests: int) -> None:
        """The client has gone after ``requests`` requests: make the device ready for the next one.

        Whatever goes wrong here is the lifecycle's to handle (block the device);
        an exception is logged and the next client is taken.
        """
        ...


# Why a client was turned away: the device is refused, it has a client, the peer may not use it.
ClientRefusal = Literal["blocked", "busy", "credentials"]
CLIENT_REFUSALS: tuple[ClientRefusal, ...] = get_args(ClientRefusal)


class ServerEvents(RequestEvents, Protocol):
    """What the server reports of a device's clients and their requests (the daemon's metrics)."""

    def client_connected(self) -> None: ...

    def client_gone(self) -> None: ...

    def client_refused(self, reason: ClientRefusal) -> None: ...


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gids: frozenset[int]  # primary and supplementary


ACCEPT_BACKOFF = 0.1  # seconds before accepting again after accept() failed
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; not in every Python build
CREDENTIALS = struct.Struct("3i")
# CPython refuses a getsockopt buffer over 1024 bytes (EINVAL, "buflen out of range"): 256 groups.
PEER_GROUPS_BUFFER = 1024


def peer_of(client: socket.socket) -> Peer:
    pid, uid, gid = CREDENTIALS.unpack(
        client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CREDENTIALS.size)
    )
    try:
        raw = client.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, PEER_GROUPS_BUFFER)
    except OSError:  # more groups than the buffer holds (ERANGE): only the primary one counts
        raw = b""
    groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return Peer(pid, uid, frozenset((gid, *groups)))


class Door:
    """A device socket's refusals and accept errors, logged through rate limits: a local flood must
    not fill a journal."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._refusals_logged = RateLimiter()
        # The connection stays queued and is retried every ACCEPT_BACKOFF: a line a minute says it all.
        self._accept_errors_logged = RateLimiter(rate=1 / 60, burst=3)

    def refuse(self, connection: socket.socket, event: str, **fields: object) -> None:
        """Close a refused connection; ``event`` says why."""
        connection.close()
        dropped = self._refusals_logged.allow()
        if dropped is not None:
            log.warning(event, device=self.name, **fields, **({"suppressed": dropped} if dropped else {}))

    def accept_failed(self, error: OSError) -> None:
        """Out of fds, or the like: this device waits, the others go on."""
        dropped = self._accept_errors_logged.allow()
        if dropped is not None:
            log.error("cannot accept a client", device=self.name, why=str(error), suppressed=dropped)


class DeviceServer:
    def __init__(
        self,
        name: str,
        lifecycle: Lifecycle,
        events: ServerEvents,
        limits: Limits | None = None,
        *,
        fast_path: bool = True,
    ) -> None:
        """``fast_path``: let the C loop answer what the device's tables determine (``fast_loop``)."""
        self.name = name
        self.fast_path = fast_path
        self.lifecycle = lifecycle
        self.events = events
        self.limits = limits or Limits()
        self._refused_requests = Auditor()  # across sessions: a reconnecting client gets no new budget
        # One client at a time; the next one may wait while the last one's
        # device is handed off, a third is refused.
        self._turn = trio.Lock()
        self._live = False
        self._live_socket: socket.socket | None = None
        self._waiting = False
        self._counter = itertools.count(1)
        self._door = Door(name)

    async def serve(self, listener: socket.socket) -> None:
        """Accept clients until cancelled."""
        log.info("serving", device=self.name, socket=listener.getsockname())
        async with trio.open_nursery() as nursery:
            while True:
                client = await accept(listener, backoff=ACCEPT_BACKOFF, failed=self._door.accept_failed)
                number = next(self._counter)
                try:
                    peer = peer_of(client)
                except OSError as e:
                    log.warning(
                        "a client went before its credentials could be read", device=self.name, why=str(e)
                    )
                    client.close()
                    continue
                if not self.lifecycle.allows(peer):
                    self.events.client_refused("credentials")
                    self._door.refuse(
                        client,
                        "refused a client: its user and groups may not use this device",
                        client=number,
                        pid=peer.pid,
                        uid=peer.uid,
                        gids=sorted(peer.gids),
                        audit=True,
                    )
                    continue
                if self._waiting or (self._live and not self._live_client_hung_up()):
                    self.events.client_refused("busy")
                    self._door.refuse(client, "refused a second client: the device has one", client=number)
                    continue
                self._waiting = self._turn.locked()
                nursery.start_soon(self._session, client, number, peer)

    def _live_client_hung_up(self) -> bool:
        """Whether the served client has already closed its end (its session is about to end)."""
        live = self._live_socket
        if live is None:
            return True
        poller = select.poll()
        try:
            poller.register(live, select.POLLRDHUP)
        except (OSError, ValueError):  # closed under us: it is gone
            return True
        return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))

    async def _session(self, client: socket.socket, number: int, peer: Peer) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_shut_on_cancel, client)
                async with self._turn:
                    self._waiting, self._live, self._live_socket = False, True, client
                    await trio.to_thread.run_sync(self._run, client, number, peer)
                nursery.cancel_scope.cancel()
        except Exception:  # a bug in one session must not stop this device's or another's serving
            log.exception("the session failed", device=self.name, client=number)
        finally:
            if self._live_socket is client:
                self._live, self._live_socket = False, None
            client.close()

    def _run(self, client: socket.socket, number: int, peer: Peer) -> None:
        with structlog.contextvars.bound_contextvars(device=self.name, client=number):
            client.setblocking(True)
            device, refusal = self.lifecycle.admit(peer)
            if refusal:
                self.events.client_refused("blocked")
                log.warning("client connected; it will be refused", pid=peer.pid, uid=peer.uid, why=refusal)
            else:
                log.info("client connected", pid=peer.pid, uid=peer.uid)
            self.events.client_connected()
            connection = Connection(replace(self.limits, max_dma_maps=device.max_dma_mappings))
            service = DeviceService(
                device, connection, refusal, events=self.events, auditor=self._refused_requests
            )
            fast = self._fast_loop(client, device, connection.limits)
            why = pump(MessageSocket(client, self.limits.max_msg_fds), connection, service, fast)
            client.close()  # now, not after the hand-off: a slow one must not hold the fd
            self._live = False  # the next client may now connect and wait for the hand-off
            self.events.client_gone()
            log.info("client gone", why=why, requests=service.handled)
            try:
                self.lifecycle.client_gone(service.handled)
            except Exception:  # the daemon and its other devices keep going
                log.exception("making the device ready after its client failed")

    def _fast_loop(self, client: socket.socket, device: DeviceModel, limits: Limits) -> FastLoop | None:
        if not self.fast_path or not fits(limits):
            return None
        tables = device.fast_path()
        return None if tables is None else FastLoop(client, tables, limits, self.events.latency_bounds)


class UnservedDevice:
    """A device of the config that could not be opened, on its socket (systemd's or the config's).

    Not accepting would leave each client waiting for a reply (QEMU: its x-msg-timeout, then it
    fails), since systemd starts nothing for a socket whose service runs. Each is closed at once.
    With ``opened`` (the daemon trying again to open it: it returns the device's server once it
    is), the socket is that server's from then on.
    """

    def __init__(
        self, name: str, why: str, opened: Callable[[UnservedDevice], Awaitable[DeviceServer]] | None = None
    ) -> None:
        self.name = name
        self.why = why  # kept current by ``opened`` as its attempts fail
        self._opened = opened
        self._door = Door(name)

    async def serve(self, listener: socket.socket) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refuse_clients, listener)
            if self._opened is None:
                return
            server = await self._opened(self)
            nursery.cancel_scope.cancel()
        await server.serve(listener)

    async def _refuse_clients(self, listener: socket.socket) -> None:
        while True:
            client = await accept(listener, backoff=ACCEPT_BACKOFF, failed=self._door.accept_failed)
            self._door.refuse(
                client, "refused a client: the device could not be opened", why=self.why, audit=True
            )


async def _shut_on_cancel(client: socket.socket) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)
