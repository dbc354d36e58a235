"""The daemon run the way systemd runs it: socket activation, notifications, watchdog, reload, journald.

The test plays the service manager: it makes the listening sockets and
passes them as LISTEN_FDS/LISTEN_FDNAMES, listens on a NOTIFY_SOCKET, sets
WATCHDOG_USEC, sends SIGHUP and SIGTERM, and checks what comes back.
"""

from __future__ import annotations

import json
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
from tests.support import DaemonProcess

CONFIG = """
state_directory = "state"
[[device]]
name = "gpu0"
profile = "h100-sxm5"
socket = "gpu0.sock"
tenant = "alice"
gpudirect_clique = {clique}
[[device]]
name = "gpu1"
profile = "gp108m-mx150"
socket = "gpu1.sock"
tenant = "alice"
gpudirect_clique = {clique}  # a clique needs a peer it can reach
"""


class Manager:
    """The service manager's side: a notify socket and the messages that arrived on it."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[dict[str, str]] = []

    def env(self, watchdog_usec: int = 0) -> dict[str, str]:
        extra = {"WATCHDOG_USEC": str(watchdog_usec)} if watchdog_usec else {}
        return {**os.environ, "NOTIFY_SOCKET": str(self.path), **extra}

    def wait_for(self, key: str, value: str = "1", timeout: float = 30) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if message.get(key) == value:
                    self.messages.remove(message)
                    return message
            left = deadline - time.monotonic()
            assert left > 0, f"no {key}={value} from the daemon; got {self.messages}"
            self.sock.settimeout(left)
            data = self.sock.recv(4096).decode()
            self.messages.append(dict(line.split("=", 1) for line in data.splitlines()))


def listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(4)
    return sock


def connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(10)
    client.connect(str(path))
    return client


def request(client: socket.socket, command: int, payload: bytes) -> tuple[int, bytes]:
    """(error, payload) of the reply."""
    client.sendall(HEADER.pack(1, command, 16 + len(payload), 0, 0) + payload)
    header = client.recv(16, socket.MSG_WAITALL)
    if not header:
        raise ConnectionError("closed")
    size, error = HEADER.unpack_from(header)[2], HEADER.unpack_from(header)[4]
    return error, client.recv(size - 16, socket.MSG_WAITALL) if size > 16 else b""


def version(client: socket.socket) -> int:
    return request(client, Command.VERSION, struct.pack("=HH", 0, 0) + b"{}\0")[0]


def config_byte(client: socket.socket, offset: int) -> int:
    error, payload = request(client, Command.REGION_READ, struct.pack("=QII", offset, 7, 1))
    assert error == 0
    return payload[16]


def test_socket_activation_readiness_watchdog_reload_and_stop(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(clique=3))
    manager = Manager(tmp_path)
    sockets = [("gpu0", listening(tmp_path / "gpu0.sock")), ("gpu1", listening(tmp_path / "gpu1.sock"))]
    daemon = DaemonProcess(
        "--config", str(config), env=manager.env(watchdog_usec=200_000), sockets=sockets, devices=2
    )
    with daemon:
        ready = manager.wait_for("READY")
        assert ready["STATUS"] == "serving 2 devices"
        for _ in range(3):
            manager.wait_for("WATCHDOG")  # every 0.1 s while the event loop runs

        live = connect(tmp_path / "gpu0.sock")
        assert version(live) == 0
        assert config_byte(live, 0xCE) == 3 << 3  # the clique the config gave

        config.write_text(CONFIG.format(clique=9))
        daemon.process.send_signal(signal.SIGHUP)
        manager.wait_for("RELOADING")
        manager.wait_for("READY")
        assert config_byte(live, 0xCE) == 3 << 3  # a live session keeps its view
        live.close()
        daemon.wait_for(
            lambda: any(e["record"]["reason"] == "config reloaded" for e in daemon.events("hand-off"))
        )
        with connect(tmp_path / "gpu0.sock") as fresh:
            assert version(fresh) == 0
            assert config_byte(fresh, 0xCE) == 9 << 3  # the next client gets the new one
        with connect(tmp_path / "gpu1.sock") as other:
            assert version(other) == 0

        daemon.process.send_signal(signal.SIGTERM)
        manager.wait_for("STOPPING")
        assert daemon.process.wait(20) == 0
    assert (tmp_path / "gpu0.sock").exists()  # systemd's socket: the daemon leaves it alone
    assert "Traceback" not in daemon.log


def test_a_device_that_cannot_be_opened_closes_the_clients_of_its_socket_unit(tmp_path: Path) -> None:
    """Its socket is systemd's and stays: without the daemon accepting, a client would wait for a
    reply until its own timeout (QEMU: x-msg-timeout, 5 s), as nothing else would ever answer."""
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(clique=3).replace('"gp108m-mx150"', '"no-such-profile"'))
    manager = Manager(tmp_path)
    sockets = [("gpu0", listening(tmp_path / "gpu0.sock")), ("gpu1", listening(tmp_path / "gpu1.sock"))]
    daemon = DaemonProcess(
        "--config", str(config), "--log-format", "json", env=manager.env(), sockets=sockets
    )
    with daemon:
        assert manager.wait_for("READY")["STATUS"] == "serving 1 device; 1 not opened: gpu1"
        with connect(tmp_path / "gpu1.sock") as client:
            client.sendall(HEADER.pack(1, Command.VERSION, 20, 0, 0) + struct.pack("=HH", 0, 0))
            try:  # closed at once, well within the client's 10 s timeout (reset: our bytes were unread)
                closed = client.recv(16) == b""
            except ConnectionResetError:
                closed = True
            assert closed
        refused = daemon.wait_for_event("refused a client: the device could not be opened", device="gpu1")
        assert refused["audit"] and "no-such-profile" in refused["why"]
        with connect(tmp_path / "gpu0.sock") as served:
            assert version(served) == 0
    assert "Traceback" not in daemon.log


def test_a_device_the_host_holds_back_waits_on_its_socket(tmp_path: Path) -> None:
    """A function not there yet (or busy, or unbound) is the host's state, which changes: the
    daemon serves the rest, makes the device's socket, closes its clients at once and tries again.
    The systemd guest proves it serves the device once it can be opened."""
    config = tmp_path / "config.toml"
    absent = "0000:7f:1f.7"
    config.write_text(CONFIG.format(clique=3).replace('profile = "gp108m-mx150"', f'bdf = "{absent}"'))
    manager = Manager(tmp_path)
    daemon = DaemonProcess("--config", str(config), "--log-format", "json", env=manager.env())
    with daemon:
        assert manager.wait_for("READY")["STATUS"] == "serving 1 device; 1 not opened: gpu1"
        waiting = daemon.wait_for_event("device not served yet", device="gpu1")
        assert f"no PCI device {absent}" in waiting["why"] and waiting["retry_every_s"] > 0
        with connect(tmp_path / "gpu1.sock") as client:
            try:
                closed = client.recv(16) == b""
            except ConnectionResetError:
                closed = True
            assert closed
        refused = daemon.wait_for_event("refused a client: the device could not be opened", device="gpu1")
        assert refused["audit"] and absent in refused["why"]
        with connect(tmp_path / "gpu0.sock") as served:
            assert version(served) == 0
    assert not (tmp_path / "gpu1.sock").exists()  # the daemon's socket: removed on the way out
    assert "Traceback" not in daemon.log


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("0000:7f:1f.7", "no PCI device 0000:7f:1f.7"),
        # This host has no mdev bus: the error names the UUID and what would give it one.
        ("83B8F4F2-509F-382F-3C1E-E6BFE0FA1001", "no mediated device 83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"),
    ],
)
def test_a_command_line_device_that_cannot_be_opened_is_an_error_at_once(
    tmp_path: Path, device: str, message: str
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mediator",
            "serve",
            "--device",
            device,
            "--socket",
            str(tmp_path / "dev.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and message in result.stderr, result.stderr


def test_a_bad_config_on_reload_changes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(clique=3))
    manager = Manager(tmp_path)
    with DaemonProcess("--config", str(config), env=manager.env(), devices=2) as daemon:
        manager.wait_for("READY")
        config.write_text(CONFIG.format(clique=99))
        daemon.process.send_signal(signal.SIGHUP)
        manager.wait_for("READY")
        refused = daemon.wait_for_event("reload refused: the config has errors, the running one stays")
        assert any("gpudirect_clique" in error for error in refused["errors"])
        with connect(tmp_path / "gpu0.sock") as client:
            assert version(client) == 0 and config_byte(client, 0xCE) == 3 << 3


def test_one_device_from_a_socket_unit(tmp_path: Path) -> None:
    manager = Manager(tmp_path)
    sock = listening(tmp_path / "dev.sock")
    daemon = DaemonProcess(
        "--profile", "v100-sxm2", env=manager.env(), sockets=[("vfio-mediator@dev0.socket", sock)]
    )
    with daemon:
        manager.wait_for("READY")
        with connect(tmp_path / "dev.sock") as client:
            assert version(client) == 0


def test_clients_are_checked_by_their_credentials(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    nobody = 65534
    config.write_text(
        CONFIG.format(clique=3)
        + f"[access]\nallow_users = [{nobody}]\n"
        + "[[device]]\nname = 'mine'\nprofile = 'h100-sxm5'\nsocket = 'mine.sock'\n"
        + f"[device.access]\nallow_users = [{os.getuid()}]\nsocket_mode = 0o600\n"
    )
    with DaemonProcess("--config", str(config), "--log-format", "json", devices=3) as daemon:
        with connect(tmp_path / "gpu0.sock") as refused:
            assert refused.recv(16) == b""  # closed at once: this test is not user 65534
        event = daemon.wait_for_event("refused a client: its user and groups may not use this device")
        assert (event["device"], event["uid"], event["audit"]) == ("gpu0", os.getuid(), True)
        with connect(tmp_path / "mine.sock") as allowed:
            assert version(allowed) == 0
        assert (tmp_path / "mine.sock").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "gpu1.sock").stat().st_mode & 0o777 == 0o660


def test_journald_gets_json_with_a_level_prefix(tmp_path: Path) -> None:
    with DaemonProcess("--socket", str(tmp_path / "gpu.sock"), journal=True) as daemon:
        first = daemon.lines[0]
        assert first.startswith("<6>{"), first
        assert json.loads(first[3:])["level"] == "info"


def test_a_daemon_that_died_with_a_client_is_recovered(tmp_path: Path) -> None:
    fm_calls = tmp_path / "fm.jsonl"
    standin = Path(__file__).parents[1] / "commands" / "standin.py"

    def fm(action: str, placeholder: str) -> str:
        return json.dumps([sys.executable, str(standin), str(fm_calls), action, placeholder])

    config = tmp_path / "config.toml"
    config.write_text(
        CONFIG.format(clique=3)
        + f"[fabric]\nactivate = {fm('activate', '{partition}')}\ndeactivate = {fm('deactivate', '{partition}')}\n"
        + "[[fabric.partition]]\nid = 4\ndevices = ['gpu0']\n"
    )
    first = DaemonProcess("--config", str(config), "--log-format", "json", devices=2)
    client = connect(tmp_path / "gpu0.sock")
    assert version(client) == 0
    first.wait_for(fm_calls.exists)
    first.process.kill()  # dies with the client attached and partition 4 active
    first.stop()
    client.close()
    state = tmp_path / "state"
    assert json.loads((state / "fabric.json").read_text()) == {"active": [4]}
    assert (state / "sessions" / "gpu0.json").exists()

    with DaemonProcess("--config", str(config), "--log-format", "json", devices=2) as second:
        recovered = [e["record"] for e in second.events("hand-off") if e["device"] == "gpu0"]
        assert recovered[0]["reason"].startswith("recovery: the daemon stopped with a client attached")
        assert recovered[0]["tenant"] == "alice"
        calls = [json.loads(line) for line in fm_calls.read_text().splitlines()]
        assert [(c["action"], c["args"]) for c in calls] == [("activate", ["4"]), ("deactivate", ["4"])]
        assert json.loads((state / "fabric.json").read_text()) == {"active": []}
        assert not (state / "sessions" / "gpu0.json").exists()
        with connect(tmp_path / "gpu0.sock") as again:
            assert version(again) == 0
