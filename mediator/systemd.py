"""What systemd hands a service and expects back: sockets, readiness, a watchdog.

Socket activation (sd_listen_fds): ``LISTEN_PID`` names this process,
``LISTEN_FDS`` counts the sockets from fd 3 on and ``LISTEN_FDNAMES`` names
them (``FileDescriptorName=``); the variables are removed once read, so no
child inherits them. Notification (sd_notify): datagrams of ``KEY=value``
lines to ``NOTIFY_SOCKET`` (a path, or ``@`` for the abstract namespace):
``READY=1`` once every socket serves, ``STATUS=`` for ``systemctl status``,
``RELOADING=1`` then ``READY=1`` around a reload, ``STOPPING=1`` on the way
out, and ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while the event loop
runs. Outside systemd every call is a no-op.

Written here rather than taken from python-systemd: that binding needs
libsystemd and a compiler at install time for what is two environment
variables and one datagram.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping, MutableMapping

import structlog
import trio

log = structlog.get_logger("mediator.systemd")

FIRST_LISTEN_FD = 3


def listen_fds(environ: MutableMapping[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """The sockets systemd passed, by name (unnamed ones under ``"unknown"``); consumes the variables."""
    env = os.environ if environ is None else environ
    pid, count, names = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", ""), env.pop("LISTEN_FDNAMES", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return {}
    labels = names.split(":") if names else []
    passed: dict[str, list[socket.socket]] = {}
    for i in range(int(count)):
        fd = FIRST_LISTEN_FD + i
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        passed.setdefault(labels[i] if i < len(labels) else "unknown", []).append(sock)
    return passed


class Notifier:
    """sd_notify for this process; silent when systemd did not ask for notifications."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_pid = env.get("WATCHDOG_PID", "")
        usec = env.get("WATCHDOG_USEC", "")
        ours = not watchdog_pid or (watchdog_pid.isdigit() and int(watchdog_pid) == os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) and ours else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, **fields: str | int) -> None:
        if not self._address:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as e:  # the service manager went away: nothing to tell it
            log.warning("cannot notify systemd", why=str(e))

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status)

    def status(self, status: str) -> None:
        self.send(status=status)

    def reloading(self) -> None:
        self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.send(stopping=1, status="stopping")

    async def keep_watchdog_fed(self) -> None:
        """Ping the watchdog from the event loop: a stuck loop stops the pings and systemd restarts us."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send(watchdog=1)
            await trio.sleep(self.watchdog_interval)
