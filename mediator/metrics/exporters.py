"""Exporters: a textfile for node_exporter, and HTTP on a UNIX socket.

A textfile for node_exporter's textfile collector, replaced atomically
(``write_textfile``, ``write_textfile_periodically``), and ``serve_metrics``,
a minimal HTTP/1.0 responder on a UNIX socket (``curl --unix-socket PATH
http://localhost/metrics``), bounded in clients, request size and time so a
local client cannot hold it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from mediator.unix_listener import accept

log = structlog.get_logger("mediator.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once: a reader sees the old file or the new one, never a part.

    The temporary file is in the same directory (``os.replace`` is atomic only
    within a file system) and does not end in ``.prom``, so node_exporter
    never collects it.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o644)  # node_exporter usually runs as another user
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


async def write_textfile_periodically(
    path: Path,
    render: Callable[[], str],
    interval: float = 15.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write ``render()`` to ``path`` now and every ``interval`` seconds until cancelled.

    A failed write is logged when it starts failing (or fails differently)
    and when it works again, not every interval; the daemon goes on.
    """
    failing: str | None = None
    started = False
    while True:
        try:
            await trio.to_thread.run_sync(write_textfile, path, render())
        except OSError as e:
            why = e.strerror or str(e)
            if why != failing:
                log.warning("cannot write the metrics textfile", path=str(path), why=why)
            failing = why
        except Exception:  # a bug in a metric must not take the daemon down
            log.exception("writing the metrics textfile failed")
        else:
            if failing is not None:
                log.info("metrics textfile written again", path=str(path))
            failing = None
        if not started:
            task_status.started()
            started = True
        await trio.sleep(interval)


@dataclass(frozen=True)
class ExporterLimits:
    max_clients: int = 4  # answered at once; more wait in the listen backlog
    max_request: int = 8192  # bytes of request head
    timeout: float = 2.0  # seconds for a whole exchange, read and write


async def serve_metrics(
    listener: socket.socket,
    render: Callable[[], str],
    limits: ExporterLimits | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer every connection on ``listener`` with ``render()``, until cancelled.

    ``listener`` is a bound, listening UNIX stream socket
    (``mediator.unix_listener.bind_unix``, or one systemd passed); it is
    made non-blocking and stays the caller's to close and unlink. A client
    sends an HTTP request (any path) and gets an HTTP/1.0 response, or shuts
    its side without sending anything and gets the bare text. A client that
    sends nothing and waits, or does not read its answer, is dropped when its
    time is up; one that sends too much gets a 431 at once.
    """
    limits = limits or ExporterLimits()
    listener.setblocking(False)
    slots = trio.Semaphore(limits.max_clients)
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()
            client = await accept(listener, backoff=1.0, failed=_accept_failed)
            nursery.start_soon(_answer, client, render, limits, slots)


def _accept_failed(error: OSError) -> None:
    # Out of fds or memory: the client waits in the backlog meanwhile.
    log.warning("cannot accept a metrics client", why=error.strerror or str(error))


async def _answer(
    client: socket.socket, render: Callable[[], str], limits: ExporterLimits, slots: trio.Semaphore
) -> None:
    try:
        with client, trio.move_on_after(limits.timeout) as scope:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
            head = await _read_head(stream, limits.max_request)
            await stream.send_all(_response(head, render))
        if scope.cancelled_caught:
            log.debug("dropped a metrics client: out of time")
    except (trio.BrokenResourceError, OSError) as e:
        log.debug("metrics client went away", why=str(e))
    finally:
        slots.release()


async def _read_head(stream: trio.SocketStream, limit: int) -> bytes | None:
    """The request up to its blank line or the client's EOF; None when it is longer than ``limit``."""
    head = bytearray()
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        chunk = await stream.receive_some(limit + 1 - len(head))
        if not chunk:
            break
        head += chunk
        if len(head) > limit:
            return None
    return bytes(head)


def _response(head: bytes | None, render: Callable[[], str]) -> bytes:
    """The HTTP answer to a request head; the bare text when there was none."""
    if head is None:
        return _http(431, "Request Header Fields Too Large")
    if head:
        request_line = head.split(b"\n", 1)[0].split()
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/"):
            return _http(400, "Bad Request")
        if request_line[0] != b"GET":
            return _http(405, "Method Not Allowed", headers="Allow: GET\r\n")
    try:
        body = render().encode()
    except Exception:  # a bug in a metric must not take the daemon down
        log.exception("rendering the metrics failed")
        return _http(500, "Internal Server Error")
    return _http(200, "OK", body, f"Content-Type: {CONTENT_TYPE}\r\n") if head else body


def _http(status: int, reason: str, body: bytes = b"", headers: str = "") -> bytes:
    if not body and status != 200:
        body = f"{reason}\n".encode()
    head = f"HTTP/1.0 {status} {reason}\r\n{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode("ascii") + body
