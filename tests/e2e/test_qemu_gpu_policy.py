"""The GPU policy end to end: `vfio-mediator serve --config` in a process, a real QEMU 11.1 as client.

Each test writes a daemon config (tenancy, hand-off, fabric), starts the
daemon with JSON logs, drives the guest side through qtest, and checks what
the guest saw and what the daemon logged, including every negative case:
the guest tries and fails, a protection does not hold, a command fails.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import MMIO32_BASE, Machine
from tests.support import DaemonProcess, StandIn

PROFILES = Path(__file__).parents[2] / "mediator" / "profiles"
LINK_DISABLE = 0xA00148
PCIE_DEVICE_CONTROL = 0x78 + 8  # in the V100 profile
GPU0, GPU1 = (0, 5, 0), (0, 6, 0)
BAR0_GPU0, BAR0_GPU1 = MMIO32_BASE, MMIO32_BASE + (16 << 20)
QEMU_REFUSED = "version reply: Operation not permitted"  # QEMU 11.1's words for EPERM at VERSION


def write_config(folder: Path, devices: list[dict[str, object]], extra: str = "") -> Path:
    lines = ['state_directory = "state"']
    for device in devices:
        lines.append("[[device]]")
        links = device.get("links", {})
        for key, value in device.items():
            if key != "links":
                lines.append(f"{key} = {json.dumps(value)}")
        if device.get("socket") is None:
            lines.append(f'socket = "{device["name"]}.sock"')
        if links:
            lines.append("  [device.links]")
            lines += [f"  {link} = {json.dumps(peer)}" for link, peer in links.items()]  # type: ignore[attr-defined]
    path = folder / "config.toml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def serve(config: Path, devices: int) -> DaemonProcess:
    return DaemonProcess("--config", str(config), "--log-format", "json", devices=devices)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def link_disable(machine: Machine, bar0: int) -> int:
    return machine.value(f"readl {bar0 + LINK_DISABLE:#x}")


def test_nvlink_isolation_by_ownership_survives_guest_writes_and_resets(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        [
            {
                "name": "gpu0",
                "profile": "v100-sxm2",
                "tenant": "alice",
                "links": {0: "gpu1", 1: "gpu2", 2: "99:00.0"},
            },
            {"name": "gpu1", "profile": "v100-sxm2", "tenant": "alice", "links": {0: "gpu0"}},
            {"name": "gpu2", "profile": "v100-sxm2", "tenant": "bob", "links": {1: "gpu0"}},
        ],
    )
    foreign = 0x3E0000  # links 1-5 disabled, link 0 (the other alice GPU) usable
    with (
        serve(config, devices=3) as daemon,
        Machine(tmp_path / "gpu0.sock", behind_root_port=False, more=[tmp_path / "gpu1.sock"]) as machine,
    ):
        for bdf, bar0 in ((GPU0, BAR0_GPU0), (GPU1, BAR0_GPU1)):
            machine.map_bar(0, bar0, bdf)
            machine.enable(0x0006, bdf)
        assert link_disable(machine, BAR0_GPU0) == foreign
        assert link_disable(machine, BAR0_GPU1) == foreign

        machine.command(f"writel {BAR0_GPU0 + LINK_DISABLE:#x} 0x0")  # try to re-enable every link
        assert link_disable(machine, BAR0_GPU0) == foreign
        write = daemon.wait_for_event("guest access", device="gpu0", direction="write")
        assert (write["offset"], write["value"], write["client"], write["audit"]) == (
            "0xa00148",
            "0x00000000",
            1,
            True,
        )

        machine.cfg_write(0x3C, 1, 0x42, GPU0)
        control = machine.cfg_read(PCIE_DEVICE_CONTROL, 2, GPU0)
        machine.cfg_write(PCIE_DEVICE_CONTROL, 2, control | 0x8000, GPU0)  # the guest's FLR
        flr = daemon.wait_for_event(
            "guest reset", device="gpu0", cause="the guest's function-level reset (config write)"
        )
        assert flr["audit"] and flr["post_reset_writes"] == 4
        assert machine.cfg_read(0x3C, 1, GPU0) != 0x42  # the device really was reset
        machine.map_bar(0, BAR0_GPU0, GPU0)
        machine.enable(0x0006, GPU0)
        assert link_disable(machine, BAR0_GPU0) == foreign

        refusals = len(daemon.events("request refused"))

        def client_resets() -> list[str]:
            return [
                e["device"] for e in daemon.events("guest reset") if e["cause"] == "the client's DEVICE_RESET"
            ]

        before = client_resets()  # QEMU resets its devices when the machine starts, too
        machine.qmp("system_reset")  # and through DEVICE_RESET again now
        daemon.wait_for(lambda: sorted(client_resets()) == sorted([*before, "gpu0", "gpu1"]))
        for bdf, bar0 in ((GPU0, BAR0_GPU0), (GPU1, BAR0_GPU1)):
            machine.map_bar(0, bar0, bdf)
            machine.enable(0x0006, bdf)
            assert link_disable(machine, bar0) == foreign
        assert len(daemon.events("request refused")) == refusals


def broken_isolation_profile(folder: Path) -> Path:
    """A V100 whose link-disable register does not take writes: isolation cannot be established."""
    text = (PROFILES / "v100-sxm2.toml").read_text()
    text = text.replace('file = "', f'file = "{PROFILES}/')
    text = text.replace('kind = "sticky-bits"', 'kind = "read-only"').replace("mask = 0x3f0000", "size = 4")
    path = folder / "v100-stuck.toml"
    path.write_text(text)
    return path


def test_a_device_whose_isolation_cannot_be_established_is_refused_and_the_others_served(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path,
        [
            {"name": "stuck", "profile": str(broken_isolation_profile(tmp_path)), "tenant": "alice"},
            {"name": "gpu1", "profile": "v100-sxm2", "tenant": "alice"},
        ],
    )
    with serve(config, devices=2) as daemon:
        start = daemon.wait_for_event("hand-off", device="stuck")
        assert start["ok"] is False and start["record"]["reason"] == "daemon start"
        with pytest.raises(RuntimeError) as qemu_failed:
            Machine(tmp_path / "stuck.sock", behind_root_port=False).close()
        refused = daemon.wait_for_event("request refused", device="stuck", command="VERSION")
        assert refused["errno"] == "EPERM"
        assert "isolation: a required protection did not hold: BAR0+0xa00148 reads 0x0" in refused["why"]
        assert QEMU_REFUSED in str(qemu_failed.value)
        with Machine(tmp_path / "gpu1.sock", behind_root_port=False) as machine:
            assert machine.cfg_read(0, 4) == 0x1DB110DE  # the other device is served


def test_the_gpudirect_clique_is_the_operators_and_read_only(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        [
            {"name": "gpu0", "profile": "h100-sxm5", "tenant": "alice", "gpudirect_clique": 7},
            {"name": "gpu1", "profile": "h100-sxm5", "tenant": "alice"},
            {"name": "gpu2", "profile": "h100-sxm5", "tenant": "alice", "gpudirect_clique": 7},
        ],
    )
    with (
        serve(config, devices=3),
        Machine(tmp_path / "gpu0.sock", behind_root_port=False, more=[tmp_path / "gpu1.sock"]) as machine,
    ):
        # gpu2 shares the clique (a GPU alone in its clique gets none: there is nobody to reach)
        capability = [machine.cfg_read(0xC8 + i, 1, GPU0) for i in range(8)]
        assert capability[0] == 0x09 and capability[2:] == [0x08, *b"P2P", 7 << 3, 0]
        chain, pointer = [], machine.cfg_read(0x34, 1, GPU0)
        while pointer:
            chain.append(pointer)
            pointer = machine.cfg_read(pointer + 1, 1, GPU0)
        assert 0xC8 in chain  # linked into the guest's capability list
        machine.cfg_write(0xCE, 2, 0x0000, GPU0)  # the guest tries to leave the clique
        assert machine.cfg_read(0xCE, 1, GPU0) == 7 << 3
        assert [machine.cfg_read(0xC8 + i, 1, GPU1) for i in range(8)] != capability  # no clique configured


def test_audit_windows_log_guest_accesses_rate_limited(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "gpu0", "profile": "v100-sxm2", "tenant": "alice"}])
    with (
        serve(config, devices=1) as daemon,
        Machine(tmp_path / "gpu0.sock", behind_root_port=False) as machine,
    ):
        machine.map_bar(0, BAR0_GPU0)
        machine.enable()
        machine.command(f"writel {BAR0_GPU0 + 0x122204:#x} 0x7")
        assert machine.value(f"readl {BAR0_GPU0 + 0x122204:#x}") == 0x7  # watched, not blocked
        for _ in range(400):
            machine.value(f"readl {BAR0_GPU0 + 0x122204:#x}")
        time.sleep(0.2)  # the bucket refills a little
        machine.value(f"readl {BAR0_GPU0 + 0x122204:#x}")
        daemon.wait_for(lambda: any("suppressed" in e for e in daemon.events("guest access")))
        accesses = daemon.events("guest access")
        first = accesses[0]
        assert {
            k: first[k] for k in ("device", "client", "bar", "offset", "size", "direction", "value", "action")
        } == {
            "device": "gpu0",
            "client": 1,
            "bar": 0,
            "offset": "0x122204",
            "size": 4,
            "direction": "write",
            "value": "0x00000007",
            "action": "audit",
        }
        assert len(accesses) < 300  # a burst of 200, then 50 a second
        assert len(accesses) + sum(e.get("suppressed", 0) for e in accesses) == 403  # each one accounted for


def test_hand_off_between_tenants_and_quarantine_until_released(tmp_path: Path) -> None:
    wipe = StandIn(tmp_path)
    config = write_config(
        tmp_path,
        [{"name": "gpu0", "profile": "h100-sxm5", "tenant": "alice"}],
        extra=f"[handoff]\nwipe = {json.dumps(wipe.command('wipe', '{device}', '{tenant}'))}\n",
    )
    with serve(config, devices=1) as daemon:
        with Machine(tmp_path / "gpu0.sock", behind_root_port=False) as machine:
            assert machine.cfg_read(0, 4) == 0x233010DE
        gone = handoff(daemon, "client gone")
        steps = {s["name"]: s["result"] for s in gone["record"]["steps"]}
        assert steps == {
            "release": "ok",
            "reset": "ok",
            "config": "ok",
            "isolation": "skipped",
            "rom": "ok",
            "wipe": "ok",
        }
        assert wipe.calls()[-1] == ("wipe", ["gpu0", "alice"])

        wipe.fail("wipe", "HBM scrub failed")
        with Machine(tmp_path / "gpu0.sock", behind_root_port=False) as machine:
            assert machine.cfg_read(0, 4) == 0x233010DE
        failed = daemon.wait_for_event("hand-off", device="gpu0", ok=False)
        assert "HBM scrub failed" in json.dumps(failed["record"])
        assert (tmp_path / "state" / "quarantine" / "gpu0.json").exists()

        with pytest.raises(RuntimeError, match=QEMU_REFUSED):
            Machine(tmp_path / "gpu0.sock", behind_root_port=False).close()
        refused = daemon.wait_for_event("request refused", device="gpu0", command="VERSION")
        assert "quarantined since" in refused["why"] and "wipe: " in refused["why"]

        wipe.succeed("wipe")
        released = subprocess.run(
            [sys.executable, "-m", "mediator", "release", "--device", "gpu0", "--config", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert released.returncode == 0, released.stderr
        with Machine(tmp_path / "gpu0.sock", behind_root_port=False) as machine:
            assert machine.cfg_read(0, 4) == 0x233010DE  # handed off again, then served
        retry = handoff(daemon, "before serving a blocked device")
        assert retry["ok"] and retry["record"]["tenant"] == "alice"


def handoff(daemon: DaemonProcess, reason: str) -> dict[str, Any]:
    """The first hand-off event for ``reason``, once the daemon has logged it."""

    def found() -> list[dict[str, Any]]:
        return [e for e in daemon.events("hand-off") if e["record"]["reason"] == reason]

    daemon.wait_for(lambda: bool(found()))
    return found()[0]


def test_fabric_partitions_follow_tenancy_and_fail_closed(tmp_path: Path) -> None:
    fm = StandIn(tmp_path)
    fabric = "\n".join(
        [
            "[fabric]",
            f"activate = {json.dumps(fm.command('activate', '{partition}'))}",
            f"deactivate = {json.dumps(fm.command('deactivate', '{partition}'))}",
            f"resync = {json.dumps(fm.command('resync', '{partitions}'))}",
            "[[fabric.partition]]",
            'id = 1\ndevices = ["gpu0", "gpu1"]',
            "[[fabric.partition]]",
            'id = 2\ndevices = ["gpu2"]',
            "[[fabric.partition]]",
            'id = 3\ndevices = ["gpu0", "gpu1", "gpu2"]',
        ]
    )
    config = write_config(
        tmp_path,
        [
            {"name": "gpu0", "profile": "h100-sxm5", "tenant": "alice"},
            {"name": "gpu1", "profile": "h100-sxm5", "tenant": "alice"},
            {"name": "gpu2", "profile": "h100-sxm5", "tenant": "bob"},
        ],
        extra=fabric + "\n",
    )
    with serve(config, devices=3) as daemon:
        with Machine(
            tmp_path / "gpu0.sock", behind_root_port=False, more=[tmp_path / "gpu1.sock"]
        ) as machine:
            assert machine.cfg_read(0, 4, GPU1) == 0x233010DE
            assert fm.calls() == [("activate", ["1"])]  # once, for both of alice's GPUs
            daemon.process.send_signal(signal.SIGHUP)  # as after a Fabric Manager restart
            wait_until(lambda: ("resync", ["1"]) in fm.calls(), "no resync after SIGHUP")
        wait_until(lambda: ("deactivate", ["1"]) in fm.calls(), "the partition was not released")
        assert [c for c in fm.calls() if c[0] != "resync"] == [("activate", ["1"]), ("deactivate", ["1"])]
        daemon.wait_for(
            lambda: sum(e["record"]["reason"] == "client gone" for e in daemon.events("hand-off")) == 2
        )
        releases = [e for e in daemon.events("hand-off") if e["record"]["reason"] == "client gone"]
        details = [s["detail"] for e in releases for s in e["record"]["steps"] if s["name"] == "fabric"]
        assert sorted(details) == ["partition 1 deactivated", "partition 1 stays active for its other GPUs"]

        fm.fail("activate", "partition 2 is not supported on this system")
        with pytest.raises(RuntimeError, match=QEMU_REFUSED):
            Machine(tmp_path / "gpu2.sock", behind_root_port=False).close()
        refused = daemon.wait_for_event("request refused", device="gpu2", command="VERSION")
        assert "partition 2 is not supported on this system" in refused["why"]
        call = daemon.wait_for_event("operator command", purpose="fabric activate", ok=False)
        assert call["partition"] == 2 and call["audit"] is True and "seconds" in call
