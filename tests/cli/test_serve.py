"""`vfio-mediator serve` as a process: it serves, stops on SIGTERM/SIGINT, cleans up its socket."""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mediator.vfio_user.wire import HEADER, Command
from tests.faults.test_faults import faulty_profile
from tests.protocol.client import Client
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


def test_client_timeout_without_a_config_is_the_reset_deadline_of_the_one_device(tmp_path: Path) -> None:
    # A client told to wait 2 s (x-msg-timeout=2000) gets its 3 s reset answered before then.
    slow = faulty_profile(tmp_path, "reset_seconds = 3.0")
    sock = tmp_path / "gpu.sock"
    with DaemonProcess(
        "--socket", str(sock), "--profile", str(slow), "--reset", "none", "--client-timeout", "2"
    ):
        connection = socket.socket(socket.AF_UNIX)
        connection.connect(str(sock))
        session = Client(connection)
        assert session.version().ok
        started = time.monotonic()
        reply = session.request(Command.DEVICE_RESET)
        answered = time.monotonic() - started
        session.client.close()
    assert not reply.ok and reply.error == errno.ETIMEDOUT
    assert answered < 2, f"answered after {answered:.1f} s, past the client's 2 s"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--client-timeout", "0"), "'0' is not a client timeout: give seconds above 0"),
        (("--client-timeout", "soon"), "'soon' is not a client timeout"),
        (("--config", "config.toml", "--client-timeout", "10"), "--client-timeout goes in the config file"),
    ],
)
def test_a_bad_client_timeout_flag_is_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    (tmp_path / "config.toml").write_text(
        '[[device]]\nname = "a"\nprofile = "h100-sxm5"\nsocket = "a.sock"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "mediator", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]


def config_read(sock: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sock))
        client.settimeout(10)
        exchange(client, Command.VERSION, struct.pack("=HH", 0, 0) + b"{}\0")
        return exchange(client, Command.REGION_READ, struct.pack("=QII", 0, 7, 4))[16:]


FAST = "config and plain BAR accesses are answered by the C fast path"
PYTHON = "every request is answered in Python"


@pytest.mark.parametrize(
    ("flags", "says"),
    [((), FAST), (("--no-fast-path",), PYTHON)],
    ids=["fast path", "no fast path"],
)
def test_the_daemon_says_at_start_which_path_answers_and_serves_either_way(
    tmp_path: Path, flags: tuple[str, ...], says: str
) -> None:
    sock = tmp_path / "gpu.sock"
    daemon = DaemonProcess("--socket", str(sock), *flags)
    try:
        assert config_read(sock) == bytes.fromhex("de103023")
    finally:
        log = daemon.stop(signal.SIGTERM)
    assert says in log and (FAST if says == PYTHON else PYTHON) not in log


def test_without_the_built_extension_the_daemon_says_why_and_serves_in_python(tmp_path: Path) -> None:
    blocker = tmp_path / "site"
    blocker.mkdir()
    # As if the optional extension had not built: importing it fails.
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['mediator._fast_path'] = None\n")
    sock = tmp_path / "gpu.sock"
    daemon = DaemonProcess("--socket", str(sock), env={**os.environ, "PYTHONPATH": str(blocker)})
    try:
        assert config_read(sock) == bytes.fromhex("de103023")
    finally:
        log = daemon.stop(signal.SIGTERM)
    assert PYTHON in log and "the C fast path is not built" in log and FAST not in log
