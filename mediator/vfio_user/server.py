"""Serving one device on a UNIX socket, under trio.

The listening socket accepts one client at a time; a second one is refused
(closed at once) and logged, the first keeps its session. Each session runs
the blocking message pump (``transport``) in a worker thread. When the
client goes, whatever it attached is released in that thread before the
next client is taken: DMA mappings unmapped, eventfds detached, the device
reset. Cancelling ``serve`` (SIGTERM, SIGINT) shuts the client's socket so
its pump ends, waits for that clean-up, and removes the socket file.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import stat
from pathlib import Path

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


class DeviceServer:
    def __init__(self, device: VirtualDevice, name: str, limits: Limits | None = None) -> None:
        self.device = device
        self.name = name
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
            log.info("client connected")
            connection = Connection(self.limits)
            service = self.service = DeviceService(self.device, connection)
            why = pump(MessageSocket(client, self.limits.max_msg_fds), connection, service)
            mappings, eventfds = len(self.device.dma), self.device.attached_eventfds
            try:
                self.device.release_client()
            except Exception:
                log.exception("releasing the device after the client failed")
            log.info("client gone", why=why, requests=service.handled, unmapped=mappings, eventfds=eventfds)


async def _shut_on_cancel(client: socket.socket) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)


async def serve_until_signalled(
    server: DeviceServer, path: Path, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve on ``path`` until SIGTERM or SIGINT; the socket file is removed on the way out.

    The signal handlers are in place before the socket exists, so a client or
    a service manager that sees the socket can always stop the daemon cleanly.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        listener = bind_unix(path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve, listener)
                task_status.started()
                async for signum in signals:
                    log.info("stopping", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            log.info("stopped", device=server.name)
