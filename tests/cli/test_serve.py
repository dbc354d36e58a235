"""`vfio-mediator serve` as a process: it serves, stops on SIGTERM/SIGINT, cleans up its socket."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mediator.vfio_user.wire import HEADER, Command
from tests.support import DaemonProcess


def exchange(client: socket.socket, command: int, payload: bytes) -> bytes:
    client.sendall(HEADER.pack(1, command, 16 + len(payload), 0, 0) + payload)
    header = client.recv(16, socket.MSG_WAITALL)
    size = HEADER.unpack_from(header)[2]
    return client.recv(size - 16, socket.MSG_WAITALL) if size > 16 else b""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_daemon_and_removes_its_socket_even_with_a_client(
    tmp_path: Path, signum: int
) -> None:
    sock = tmp_path / "gpu.sock"
    daemon = DaemonProcess("--socket", str(sock))
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sock))
        client.settimeout(10)
        assert exchange(client, Command.VERSION, struct.pack("=HH", 0, 0) + b"{}\0")[:4] == b"\0\0\0\0"
        reply = exchange(client, Command.REGION_READ, struct.pack("=QII", 0, 7, 4))
        assert reply[16:] == bytes.fromhex("de103023")
        log = daemon.stop(signum)
        assert client.recv(16) == b""  # the daemon closed the session on its way out
    assert daemon.process.returncode == 0, log
    assert not sock.exists()
    assert "client gone" in log and "stopped" in log
    assert "Traceback" not in log


def test_a_live_socket_is_not_taken_over_and_a_stale_one_is(tmp_path: Path) -> None:
    sock = tmp_path / "gpu.sock"
    first = DaemonProcess("--socket", str(sock))
    try:
        second = subprocess.run(
            [sys.executable, "-m", "mediator", "serve", "--socket", str(sock)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert second.returncode == 2
        assert second.stderr.strip().endswith(f"error: {sock} is served by another process")
    finally:
        first.process.kill()  # dies without cleaning up: its socket file stays, stale
        first.process.wait(10)
    assert sock.exists()
    third = DaemonProcess("--socket", str(sock))
    third.stop()
    assert third.process.returncode == 0 and not sock.exists()


def test_a_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("data")
    result = subprocess.run(
        [sys.executable, "-m", "mediator", "serve", "--socket", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {path} exists and is not a socket"
    assert path.read_text() == "data"
