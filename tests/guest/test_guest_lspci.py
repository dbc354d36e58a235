"""A Linux guest (TCG, Debian 13 kernel, busybox initramfs) boots with the served device.

Its own kernel enumerates the device and its ``lspci -xxxx`` must show what
the daemon's config view holds at that moment (the policy plus whatever the
guest's kernel was allowed to write), apart from the registers QEMU emulates;
``lspci -vvv`` must list no hidden capability. The bytes the guest could not
write must still be ``inspect``'s.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mediator.pci.hexdump import parse_lspci
from mediator.virt.plan import DevicePlan
from tests.e2e.harness import ROOT, qemu_binary, served
from tests.e2e.test_qemu_config import qemu_emulated

SHELL = "echo ===LSPCI-X; lspci -xxxx -s 01:00.0; echo ===LSPCI-V; lspci -vvv -s 01:00.0; echo ===END"


def guest_files() -> Path:
    result = subprocess.run(
        [str(ROOT / "scripts" / "testbed"), "guest"], capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise RuntimeError(f"building the guest failed:\n{result.stderr}")
    return Path(result.stdout.strip())


def boot(sock: Path, shell: str) -> str:
    guest = guest_files()
    command = base64.b64encode(shell.encode()).decode()
    device = {
        "driver": "vfio-user-pci",
        "bus": "rp0",
        "addr": "00.0",
        "socket": {"type": "unix", "path": str(sock)},
    }
    result = subprocess.run(
        [
            qemu_binary(),
            *["-machine", "q35,memory-backend=mem", "-accel", "tcg", "-m", "512M", "-smp", "1"],
            *["-object", "memory-backend-memfd,id=mem,size=512M,share=on"],
            *["-display", "none", "-nodefaults", "-serial", "stdio", "-no-reboot"],
            *["-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.gz")],
            *["-append", f"console=ttyS0 quiet panic=-1 tb.cmd={command}"],
            *[
                "-device",
                "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=04.0",
                "-device",
                json.dumps(device),
            ],
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if "=== TB-DONE" not in result.stdout:
        raise RuntimeError(f"the guest did not finish:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}")
    return result.stdout


def section(output: str, name: str) -> str:
    return output.split(f"==={name}\n", 1)[1].split("===", 1)[0]


def inspected_config(profile: str) -> bytes:
    """The config space ``inspect`` says the guest gets for ``profile`` before it writes anything."""
    inspected = json.loads(
        subprocess.run(
            [sys.executable, "-m", "mediator", "inspect", "--json", "--profile", profile],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return bytes.fromhex(inspected["virtual"]["config"])


def assert_guest_sees_the_policy(
    output: str, initial: bytes, plan: DevicePlan, daemon_view: bytes | None = None
) -> None:
    """The guest's ``SHELL`` output shows ``plan``'s device: bytes outside QEMU's emulation that the
    guest may not write are ``initial``'s (and all of them ``daemon_view``'s, when given), and no
    hidden capability is listed."""
    writable = b"".join(s.writable for s in plan.segments)
    hidden = [f for f in plan.capabilities if f.hidden and f.placeholder_next is None]
    [function] = parse_lspci(section(output, "LSPCI-X"), "guest lspci")
    seen = function.image(len(initial))
    emulated = qemu_emulated(initial)
    for offset in range(len(initial)):
        outside_qemu = ~emulated.get(offset, 0) & 0xFF
        if daemon_view is not None:
            assert (seen[offset] ^ daemon_view[offset]) & outside_qemu == 0, (
                f"{offset:#x}: guest {seen[offset]:02x}, daemon {daemon_view[offset]:02x}"
            )
        frozen = outside_qemu & ~writable[offset] & 0xFF
        assert (seen[offset] ^ initial[offset]) & frozen == 0, (
            f"{offset:#x} changed in bits the guest may not write"
        )
    listing = section(output, "LSPCI-V")
    assert "Capabilities: [" in listing
    for fate in hidden:
        assert f"Capabilities: [{fate.capability.offset:x}" not in listing, fate.capability.label()


@pytest.mark.parametrize("profile", ["h100-sxm5", "skylake-igd"])
def test_the_guest_kernel_sees_exactly_the_filtered_device(profile: str, tmp_path: Path) -> None:
    initial = inspected_config(profile)
    with served(profile, tmp_path) as dev:
        output = boot(dev.socket, SHELL)
        daemon_view = dev.device.config.read(0, dev.device.config.size)
        assert_guest_sees_the_policy(output, initial, dev.device.plan, daemon_view)
    if profile == "skylake-igd":
        listing = section(output, "LSPCI-V")
        for name in ("Address Translation Service", "Page Request Interface", "Process Address Space ID"):
            assert name not in listing
