"""Listening UNIX stream sockets, shared by the device servers and the metrics exporter.

``bind_unix`` makes one at a path, replacing the socket file a dead daemon
left and never a live one; ``give_access`` sets its mode and owner.
``accept`` waits for the next client under trio;
when ``accept()`` fails (out of fds or memory) the connection stays in the
kernel's backlog, so the caller is told and the accept is retried after a
back-off rather than failing the serving task.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import trio

# Room for clients that connect while one is served: they are refused or wait for the hand-off.
LISTEN_BACKLOG = 64


class SocketError(Exception):
    """A socket the daemon must listen on cannot be had as configured; the message names its path."""


class SocketInUseError(SocketError):
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
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


def give_access(path: Path, mode: int, uid: int | None, gid: int | None) -> None:
    """Set the socket file's mode and owner (None: leave that id as it is).

    Raises:
        SocketError: this process may not give it that mode, user or group.
    """
    try:
        os.chmod(path, mode)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    except OSError as e:
        raise SocketError(
            f"cannot set {path}'s owner or mode ({e.strerror}): run the daemon as root, or let a systemd "
            ".socket unit make the socket (SocketUser=, SocketGroup=, SocketMode=)"
        ) from None


async def accept(
    listener: socket.socket, *, backoff: float, failed: Callable[[OSError], None]
) -> socket.socket:
    """The next client of the non-blocking ``listener``; ``failed`` hears of each failed accept()."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        try:
            client, _ = listener.accept()
        except BlockingIOError:  # another task took it, or the client gave up
            continue
        except OSError as e:
            failed(e)
            await trio.sleep(backoff)
            continue
        return client
