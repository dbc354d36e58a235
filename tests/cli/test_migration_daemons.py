"""Migration between two daemons, driven by a migration client over their sockets.

A source daemon and a destination daemon each serve a simulated H100 under
the same policy. The client stops the source, streams its state to the
destination and resumes it there, as a VMM's migration would; the device
state the guest left is there on the destination. When the source's client
goes, its hand-off brings the device back to RUNNING for the next tenant.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any

from mediator.backends.migration import MigState
from tests.protocol.client import Client
from tests.support import DaemonProcess

CONFIG = """
state_directory = "state"
[handoff]
reset = "function"
[[device]]
name = "gpu"
profile = "h100-sxm5"
socket = "gpu.sock"
"""
BAR0, BAR2, CONFIG_REGION = 0, 2, 7


def daemon(folder: Path) -> DaemonProcess:
    folder.mkdir()
    (folder / "config.toml").write_text(CONFIG)
    return DaemonProcess("--config", str(folder / "config.toml"), "--log-format", "json")


def client(sock: Path) -> Client:
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(30)
    raw.connect(str(sock))
    peer = Client(raw)
    assert peer.version().ok
    return peer


def client_gone(daemon: DaemonProcess) -> dict[str, Any]:
    """The hand-off after a client left."""

    def found() -> list[dict[str, Any]]:
        return [e for e in daemon.events("hand-off") if e["record"]["reason"] == "client gone"]

    daemon.wait_for(lambda: bool(found()))
    return found()[-1]


def test_a_device_migrates_from_one_daemon_to_another(tmp_path: Path) -> None:
    with daemon(tmp_path / "source") as source_daemon, daemon(tmp_path / "destination") as destination_daemon:
        source, destination = client(tmp_path / "source/gpu.sock"), client(tmp_path / "destination/gpu.sock")
        source.region_write(BAR0, 0x100, b"guest state")
        source.region_write(BAR2, 3 << 30, b"in device memory")
        source.region_write(CONFIG_REGION, 0x3C, b"\x0a")
        assert source.set_migration_state(MigState.STOP_COPY).ok
        stream = source.save(chunk=1 << 16)
        assert destination.set_migration_state(MigState.RESUMING).ok
        destination.resume(stream)
        assert destination.set_migration_state(MigState.RUNNING).ok
        assert destination.region_read(BAR0, 0x100, 11).payload[16:] == b"guest state"
        assert destination.region_read(BAR2, 3 << 30, 16).payload[16:] == b"in device memory"
        assert destination.region_read(CONFIG_REGION, 0x3C, 1).payload[16:] == b"\x0a"

        source.client.close()  # the source's VM is gone: its device is handed off, running again
        handed_off = client_gone(source_daemon)
        assert handed_off["ok"], handed_off
        states = [e["state"] for e in source_daemon.events("migration state")]
        assert states[-2:] == ["STOP_COPY", "RUNNING"], states
        nxt = client(tmp_path / "source/gpu.sock")
        assert nxt.migration_state() == MigState.RUNNING
        assert nxt.region_read(BAR0, 0x100, 4).ok
        nxt.client.close()
        destination.client.close()
        assert client_gone(destination_daemon)["ok"]
    assert "Traceback" not in source_daemon.log + destination_daemon.log


def test_the_streams_bytes_are_refused_by_a_daemon_with_another_policy(tmp_path: Path) -> None:
    with daemon(tmp_path / "source") as _:
        other_folder = tmp_path / "other"
        other_folder.mkdir()
        (other_folder / "config.toml").write_text(CONFIG.replace("h100-sxm5", "v100-sxm2"))
        with DaemonProcess("--config", str(other_folder / "config.toml")):
            source, other = client(tmp_path / "source/gpu.sock"), client(other_folder / "gpu.sock")
            assert source.set_migration_state(MigState.STOP_COPY).ok
            stream = source.save()
            assert other.set_migration_state(MigState.RESUMING).ok
            assert other.mig_data_write(stream[:4096]).error == errno.EINVAL
            assert other.migration_state() == MigState.RESUMING  # nothing of it reached the device
            source.client.close()
            other.client.close()
