"""The daemon config as an operator uses it: `serve --config`, `inspect --config`, `scrub`, `release`."""

from __future__ import annotations

import errno
import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

from mediator.vfio_user.wire import HEADER, Command
from tests.cli.test_cli import run
from tests.support import DaemonProcess, sample, scrape

BLANK_ROM_PROFILE = """
description = "an H100 whose expansion ROM reads blank"
[config]
file = "{dump}"
[[bars]]
index = 0
size = 0x1000000
[rom]
size = 0x10000
contents = "blank"
"""


def config(folder: Path, devices: str, extra: str = "") -> Path:
    path = folder / "config.toml"
    path.write_text(f'state_directory = "state"\n{devices}\n{extra}')
    return path


def device_entry(name: str, profile: str, **fields: str) -> str:
    lines = [f'[[device]]\nname = "{name}"\nprofile = "{profile}"\nsocket = "{name}.sock"']
    lines += [f'{key} = "{value}"' for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def version(sock: Path) -> tuple[int, int]:
    """(flags, error) of the reply to VERSION."""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(sock))
        payload = struct.pack("=HH", 0, 0) + b"{}\0"
        client.sendall(HEADER.pack(1, Command.VERSION, 16 + len(payload), 0, 0) + payload)
        header = client.recv(16, socket.MSG_WAITALL)
        _, _, _, flags, error = HEADER.unpack_from(header)
        return flags, error


def test_serve_config_serves_every_device_and_reports_the_ones_it_cannot(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        device_entry("gpu0", "v100-sxm2", tenant="alice")
        + device_entry("gpu1", "h100-sxm5")
        + device_entry("lost", "no-such-profile"),
    )
    with DaemonProcess("--config", str(path), "--log-format", "json", devices=2) as daemon:
        assert version(tmp_path / "gpu0.sock") == (0x1, 0)  # a reply, no error
        assert version(tmp_path / "gpu1.sock") == (0x1, 0)
        lost = daemon.wait_for_event("device not served", device="lost")
        assert "no-such-profile" in lost["why"]
        starts = [
            e["record"]["device"]
            for e in daemon.events("hand-off")
            if e["record"]["reason"] == "daemon start"
        ]
        assert sorted(starts) == ["gpu0", "gpu1"]
        log = daemon.stop()
    assert daemon.process.returncode == 0, log
    assert not (tmp_path / "gpu0.sock").exists() and not (tmp_path / "gpu1.sock").exists()
    kept = sorted((tmp_path / "state" / "handoffs" / "gpu0").glob("*.json"))
    assert [json.loads(k.read_text())["reason"] for k in kept] == ["daemon start", "client gone"]


def test_serve_refuses_mixing_a_config_with_a_socket(tmp_path: Path) -> None:
    path = config(tmp_path, device_entry("gpu0", "h100-sxm5"))
    result = run("serve", "--config", path, "--socket", tmp_path / "x.sock")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: the command line: --socket goes in the config file"


def test_scrub_prints_each_step_and_succeeds_on_a_clean_device() -> None:
    result = run("scrub", "--profile", "v100-sxm2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [
        ["release", "ok"],
        ["reset", "ok"],
        ["config", "ok"],
        ["isolation", "ok"],
        ["rom", "ok"],
        ["wipe", "skipped"],
    ]
    assert "bus reset" in lines[1]
    assert lines[-1] == "v100-sxm2: ready for the next tenant"


def test_a_failed_scrub_quarantines_until_released(tmp_path: Path) -> None:
    dump = Path(__file__).parents[2] / "mediator" / "profiles" / "nvidia-10de_2330-h100-sxm5-like.lspci"
    profile = tmp_path / "blank-rom.toml"
    profile.write_text(BLANK_ROM_PROFILE.format(dump=dump))
    path = config(tmp_path, device_entry("gpu9", "blank-rom.toml", tenant="bob"))
    result = run("scrub", "--profile", profile, "--config", path, "--json")
    assert result.returncode == 1
    record = json.loads(result.stdout)
    assert record["ok"] is False and record["device"] == "gpu9" and record["tenant"] == "bob"
    assert {s["name"]: s["result"] for s in record["steps"]}["rom"] == "failed"
    assert (tmp_path / "state" / "quarantine" / "gpu9.json").exists()

    with DaemonProcess("--config", str(path), "--log-format", "json") as daemon:
        assert version(tmp_path / "gpu9.sock") == (0x1 | 0x20, errno.EPERM)  # refused at VERSION
        refused = daemon.wait_for_event("request refused", command="VERSION")
        assert (
            "quarantined since" in refused["why"] and "vfio-mediator release --device gpu9" in refused["why"]
        )

    released = run("release", "--device", "gpu9", "--config", path)
    assert released.returncode == 0, released.stderr
    assert released.stdout.startswith("gpu9 released from quarantine")
    assert not (tmp_path / "state" / "quarantine" / "gpu9.json").exists()
    assert run("release", "--device", "gpu9", "--config", path).stdout == "gpu9 is not in quarantine\n"
    unknown = run("release", "--device", "gpu7", "--config", path)
    assert unknown.returncode == 2 and "no device 'gpu7' (devices: gpu9)" in unknown.stderr


def test_inspect_shows_what_the_tenancy_decides(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        device_entry("gpu0", "v100-sxm2", tenant="alice")
        + '  [device.links]\n  0 = "gpu1"\n  1 = "gpu2"\n'
        + device_entry("gpu1", "v100-sxm2", tenant="alice")
        + device_entry("gpu2", "h100-sxm5", tenant="bob").replace(
            'profile = "h100-sxm5"', 'profile = "h100-sxm5"\ngpudirect_clique = 9'
        )
        + device_entry("gpu3", "h100-sxm5", tenant="bob").replace(
            'profile = "h100-sxm5"', 'profile = "h100-sxm5"\ngpudirect_clique = 9'
        ),
    )
    gpu0 = json.loads(run("inspect", "--config", path, "--device", "gpu0", "--json").stdout)
    assert {
        "bar": 0,
        "offset": 0xA00148,
        "size": 4,
        "op": "set",
        "value": 0x3E0000,
        "quirk": "nvidia/nvlink-isolation",
    }.items() <= next(w for w in gpu0["post_reset"] if w["offset"] == 0xA00148).items()
    gpu2 = run("inspect", "--config", path, "--device", "gpu2")
    assert gpu2.returncode == 0, gpu2.stderr
    assert "synthesize" in gpu2.stdout and "clique 9; P2P reaches gpu3" in gpu2.stdout


def test_metrics_count_requests_errors_handoffs_and_state(tmp_path: Path) -> None:
    dump = Path(__file__).parents[2] / "mediator" / "profiles" / "nvidia-10de_2330-h100-sxm5-like.lspci"
    (tmp_path / "blank-rom.toml").write_text(BLANK_ROM_PROFILE.format(dump=dump))
    path = config(
        tmp_path,
        device_entry("gpu0", "h100-sxm5") + device_entry("bad", "blank-rom.toml"),
        extra=f'[metrics]\nsocket = "metrics.sock"\ntextfile = "{tmp_path / "vfio.prom"}"\ninterval = 0.2\n',
    )
    with DaemonProcess("--config", str(path), "--log-format", "json", devices=2) as daemon:
        assert version(tmp_path / "gpu0.sock") == (0x1, 0)
        daemon.wait_for(lambda: len(daemon.events("hand-off")) == 3)  # two at start, one after the client
        text = scrape(tmp_path / "metrics.sock")
        assert sample(text, "vfio_mediator_requests_total", device="gpu0", command="VERSION") == 1
        assert (
            sample(text, "vfio_mediator_request_duration_seconds_count", device="gpu0", command="VERSION")
            == 1
        )
        assert sample(text, "vfio_mediator_handoffs_total", device="gpu0", result="ok") == 2
        assert sample(text, "vfio_mediator_handoffs_total", device="bad", result="failed") == 1
        assert sample(text, "vfio_mediator_device_state", device="bad", state="quarantined") == 1
        assert sample(text, "vfio_mediator_device_state", device="gpu0", state="serving") == 1
        assert sample(text, "vfio_mediator_resets_total", device="gpu0", cause="handoff") == 2
        assert sample(text, "vfio_mediator_devices") == 2
        assert version(tmp_path / "bad.sock") == (0x1 | 0x20, errno.EPERM)
        daemon.wait_for(lambda: "vfio_mediator_request_errors_total" in scrape(tmp_path / "metrics.sock"))
        text = scrape(tmp_path / "metrics.sock")
        assert (
            sample(text, "vfio_mediator_request_errors_total", device="bad", command="VERSION", errno="EPERM")
            == 1
        )
        assert sample(text, "vfio_mediator_clients_refused_total", device="bad", reason="blocked") == 1
        daemon.wait_for((tmp_path / "vfio.prom").exists)
        assert "vfio_mediator_build_info" in (tmp_path / "vfio.prom").read_text()
    assert not (tmp_path / "metrics.sock").exists()


def test_a_config_may_ask_for_text_logs(tmp_path: Path) -> None:
    path = config(tmp_path, device_entry("gpu0", "h100-sxm5"), '[log]\nformat = "text"\n')
    with DaemonProcess("--config", str(path)) as daemon:
        log = daemon.stop()
    assert "event='serving'" in log and "device='gpu0'" in log, log


def test_a_socket_owner_the_daemon_may_not_set_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # Without CAP_CHOWN not even root may give the socket to another user.
    path = config(tmp_path, device_entry("gpu0", "h100-sxm5"), "[access]\nsocket_owner = 65534\n")
    result = subprocess.run(
        ["setpriv", "--bounding-set", "-chown", sys.executable, "-m", "mediator", "serve", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot set {tmp_path / 'gpu0.sock'}'s owner or mode" in errors[0], (
        result.stderr
    )
    assert "Traceback" not in result.stderr
