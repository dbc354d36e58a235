"""Serving devices on UNIX sockets, under trio.

Each listening socket accepts one client at a time; a second one is refused
(closed at once) and logged, the first keeps its session. Each session runs
the blocking message pump (``transport``) in a worker thread, between the
device's ``Lifecycle`` hooks: ``admit`` says whether this client may be
served at all (quarantine, fabric partition), ``release`` hands the device
off once the client has gone (``mediator.handoff``), before the next client
is taken. Cancelling ``serve`` (SIGTERM, SIGINT) shuts the client's socket so
its pump ends, waits for that clean-up, and removes the socket file.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import structlog
import trio

from mediator.vfio_user.connection import Connection, Limits
from mediator.vfio_user.service import DeviceService
from mediator.vfio_user.transport import MessageSocket, pump
from mediator.virt.device import VirtualDevice

log = structlog.get_logger("mediator.vfio_user")


class SocketInUseError(Exception):
    """Another process serves on that socket path."""


def bind_unix(path: Path) -> socket.socket:
    """A listening socket at ``path``, replacing a stale socket file, never a live one."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SocketInUseError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left behind by a daemon that died
        else:
            raise SocketInUseError(f"{path} is served by another process")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(path))
        listener.listen(4)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


class Lifecycle(Protocol):
    """What happens to a device around each client; both run in the session's worker thread."""

    def admit(self) -> str | None:
        """Why this client must be refused (every request gets EPERM), or None to serve it."""
        ...

    def release(self) -> None:
        """The client has gone: make the device ready for the next one."""
        ...


class DeviceServer:
    def __init__(
        self, device: VirtualDevice, name: str, lifecycle: Lifecycle, limits: Limits | None = None
    ) -> None:
        self.device = device
        self.name = name
        self.lifecycle = lifecycle
        self.limits = limits or Limits(max_dma_maps=device.dma.max_mappings)
        self.sessions = 0
        self.refused = 0
        self.service: DeviceService | None = None  # the live session's, for counters
        self._busy = False
        self._counter = itertools.count(1)

    async def serve(self, listener: socket.socket) -> None:
        """Accept clients until cancelled."""
        log.info("serving", device=self.name, socket=listener.getsockname())
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(listener)
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    continue
                number = next(self._counter)
                if self._busy:
                    self.refused += 1
                    log.warning(
                        "refused a second client: the device has one", device=self.name, client=number
                    )
                    client.close()
                    continue
                self._busy = True
                nursery.start_soon(self._session, client, number)

    async def _session(self, client: socket.socket, number: int) -> None:
        self.sessions += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_shut_on_cancel, client)
                await trio.to_thread.run_sync(self._run, client, number)
                nursery.cancel_scope.cancel()
        finally:
            client.close()
            self._busy = False

    def _run(self, client: socket.socket, number: int) -> None:
        with structlog.contextvars.bound_contextvars(device=self.name, client=number):
            client.setblocking(True)
            refusal = self.lifecycle.admit()
            if refusal:
                log.warning("client connected; it will be refused", why=refusal)
            else:
                log.info("client connected")
            connection = Connection(self.limits)
            service = self.service = DeviceService(self.device, connection, refusal)
            why = pump(MessageSocket(client, self.limits.max_msg_fds), connection, service)
            log.info("client gone", why=why, requests=service.handled)
            try:
                self.lifecycle.release()
            except Exception:  # the daemon and its other devices keep going
                log.exception("releasing the device after the client failed")
                self.device.block("releasing the device after its last client failed; see the log")


async def _shut_on_cancel(client: socket.socket) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)


async def serve_until_signalled(
    servers: Sequence[tuple[DeviceServer, Path]],
    on_hangup: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve each device on its socket until SIGTERM or SIGINT; the socket files are removed on the way out.

    The signal handlers are in place before the sockets exist, so a client or
    a service manager that sees a socket can always stop the daemon cleanly.
    SIGHUP runs ``on_hangup`` (the fabric resync) and serving goes on.

    Raises:
        SocketInUseError: a socket path is taken; nothing is served then.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        listeners: list[tuple[socket.socket, Path]] = []
        try:
            for _, path in servers:
                listeners.append((bind_unix(path), path))
            async with trio.open_nursery() as nursery:
                for (server, _), (listener, _) in zip(servers, listeners, strict=True):
                    nursery.start_soon(server.serve, listener)
                task_status.started()
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("reloading", signal="SIGHUP")
                        if on_hangup is not None:
                            nursery.start_soon(on_hangup)
                        continue
                    log.info("stopping", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
        finally:
            for listener, path in listeners:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            if len(listeners) == len(servers):
                log.info("stopped", devices=[server.name for server, _ in servers])
