"""The README's libvirt domain, under Debian 12's libvirt (9.0), gives a guest the served device.

The ``<domain>`` block is read from README.md ("Attaching QEMU"), so the README
cannot drift from what is tested, and completed only with what any domain
needs besides it: a name, memory, a CPU, the testbed's kernel and initrd with
the commands the guest runs, the testbed's QEMU 11.1 as emulator, a serial
console into a file, TCG instead of KVM, and no USB controller and memory
balloon (libvirt would give one of them the root port's only slot; the
README says so, and the test checks that libvirt left the port free). The
daemon serves the simulated H100 on a socket with the README's permissions
(group ``kvm``, mode 0660, only clients in ``kvm``); libvirt's QEMU runs as
Debian's ``libvirt-qemu``. The guest's own ``lspci`` must show the policy's
device, as in the guest test, and ``virsh destroy`` must end the session and
hand the device off. The libvirtd is the test's own (``private_libvirt``).
"""

from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import re
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.e2e.harness import qemu_binary
from tests.e2e.test_qemu_gpu_policy import handoff
from tests.guest.test_guest_lspci import SHELL, assert_guest_sees_the_policy, guest_files, inspected_config
from tests.libvirt.private_libvirt import PrivateLibvirt, missing_tools
from tests.support import DaemonProcess, device, readme_section

QEMU_NAMESPACE = "http://libvirt.org/schemas/domain/qemu/1.0"
PROFILE = "h100-sxm5"
DOMAIN = "vfio-mediator-readme"
GUEST_TIMEOUT = 300  # seconds for the TCG guest to boot and print its lspci
STAY_UP = "; sleep 3600"  # the guest waits for virsh destroy, as a running VM would


def readme_domain() -> str:
    """The ``<domain>`` XML block of README.md's "Attaching QEMU"."""
    attaching = readme_section("Attaching QEMU")
    [domain] = [b for b in re.findall(r"```xml\n(.*?)```", attaching, re.DOTALL) if b.startswith("<domain")]
    return domain


def element(tag: str, text: str | None = None, **attributes: str) -> ET.Element:
    made = ET.Element(tag, attributes)
    made.text = text
    return made


def complete(snippet: str, *, socket: Path, emulator: Path, folder: Path, shell: str) -> tuple[str, int]:
    """The README's domain with what it leaves out filled in, and the bus of its root port."""
    ET.register_namespace("qemu", QEMU_NAMESPACE)
    domain = ET.fromstring(snippet)
    assert domain.get("type") == "kvm"
    domain.set("type", "qemu")  # TCG: the test machine need not have KVM
    command = base64.b64encode(shell.encode()).decode()
    system = element("os")
    system.append(element("type", "hvm", arch="x86_64", machine="q35"))
    system.append(element("kernel", str(folder / "vmlinuz")))
    system.append(element("initrd", str(folder / "initrd.gz")))
    system.append(element("cmdline", f"console=ttyS0 quiet panic=-1 tb.cmd={command}"))
    head = [
        element("name", DOMAIN),
        element("memory", "512", unit="MiB"),
        element("vcpu", "1"),
        system,
        element("on_poweroff", "destroy"),
    ]
    for position, part in enumerate(head):
        domain.insert(position, part)
    devices = domain.find("devices")
    assert devices is not None
    devices.insert(0, element("emulator", str(emulator)))
    devices.append(element("controller", type="usb", model="none"))
    devices.append(element("memballoon", model="none"))
    serial = element("serial", type="file")
    serial.append(element("source", path=str(folder / "console.log")))
    devices.append(serial)

    [port] = [c for c in devices.iter("controller") if c.get("model") == "pcie-root-port"]
    alias = port.find("alias")
    assert alias is not None
    [argument] = [
        a
        for a in domain.iter(f"{{{QEMU_NAMESPACE}}}arg")
        if a.get("value", "").startswith("{") and '"vfio-user-pci"' in a.get("value", "")
    ]
    vfio_user = json.loads(argument.get("value", ""))
    assert vfio_user["bus"] == alias.get("name"), "the device is not on the snippet's root port"
    vfio_user["socket"]["path"] = str(socket)
    argument.set("value", json.dumps(vfio_user, separators=(",", ":")))
    return ET.tostring(domain, encoding="unicode"), int(port.get("index", "-1"))


def devices_on_bus(defined: str, bus: int) -> list[str]:
    """The devices of a defined domain (``virsh dumpxml``) whose PCI address is on ``bus``."""
    found = []
    for owner in ET.fromstring(defined).iter():
        for address in owner.findall("address"):
            if address.get("type") == "pci" and int(address.get("bus", "0"), 0) == bus:
                found.append(owner.tag)
    return found


def wait_for_console(console: Path, marker: str, libvirt: PrivateLibvirt) -> str:
    deadline = time.monotonic() + GUEST_TIMEOUT
    while True:
        text = console.read_text(errors="replace") if console.exists() else ""
        if marker in text:
            return text
        state = libvirt.run("domstate", DOMAIN).stdout.strip()
        if state != "running" or time.monotonic() > deadline:
            raise AssertionError(
                f"the guest did not print {marker!r} (domain {state}):\n{text[-3000:]}\n{libvirt.diagnostics()}"
            )
        time.sleep(1)


def test_the_readme_domain_gives_the_guest_the_served_device_and_destroy_hands_it_off(
    tmp_path: Path,
) -> None:
    missing = missing_tools()
    if missing:
        pytest.fail(
            f"libvirt is missing ({', '.join(missing)} not found): scripts/bootstrap installs "
            "libvirt-daemon-system and libvirt-clients"
        )
    if os.geteuid() != 0:
        pytest.fail("the test's own libvirtd needs root (a mount namespace; QEMU as libvirt-qemu)")
    qemu_user = pwd.getpwnam("libvirt-qemu")
    kvm = grp.getgrnam("kvm")
    initial = inspected_config(PROFILE)
    plan = device(PROFILE)[0].plan
    guest = guest_files()

    with PrivateLibvirt(Path(qemu_binary())) as libvirt:
        folder = libvirt.folder
        # Copies: libvirt gives the kernel and initrd to libvirt-qemu while the domain runs.
        for name in ("vmlinuz", "initrd.gz"):
            shutil.copy(guest / name, folder / name)
        socket = folder / "gpu0.sock"
        config = tmp_path / "config.toml"
        config.write_text(
            f"state_directory = {json.dumps(str(tmp_path / 'state'))}\n"
            '[access]\nsocket_mode = 0o660\nsocket_group = "kvm"\nallow_groups = ["kvm"]\n'
            f'[[device]]\nname = "gpu0"\nprofile = "{PROFILE}"\nsocket = {json.dumps(str(socket))}\n'
        )
        with DaemonProcess("--config", str(config), "--log-format", "json") as daemon:
            assert socket.stat().st_gid == kvm.gr_gid and socket.stat().st_mode & 0o777 == 0o660
            xml, port_bus = complete(
                readme_domain(),
                socket=socket,
                emulator=libvirt.emulator,
                folder=folder,
                shell=SHELL + STAY_UP,
            )
            libvirt.define(xml, DOMAIN)
            taken = devices_on_bus(libvirt.run("dumpxml", DOMAIN).stdout, port_bus)
            assert taken == [], f"libvirt put {taken} on the vfio-user device's root port"

            libvirt.run("start", DOMAIN)
            output = wait_for_console(folder / "console.log", "===END", libvirt)
            connected = daemon.wait_for_event("client connected", device="gpu0")
            assert connected["uid"] == qemu_user.pw_uid  # QEMU as libvirt-qemu, let in by its group kvm
            assert_guest_sees_the_policy(output, initial, plan)

            libvirt.run("destroy", DOMAIN)
            gone = daemon.wait_for_event("client gone", device="gpu0", timeout=60)
            assert gone["client"] == connected["client"]
            released = handoff(daemon, "client gone")
            assert released["ok"] is True and released["device"] == "gpu0"
            assert daemon.process.poll() is None  # and it serves on for the next VM
