"""Real kernel VFIO: the daemon against vfio-pci inside a TCG guest with an emulated IOMMU.

The guest (Debian 13 kernel, ``intel-iommu,caching-mode=on``) gets QEMU's
four ``edu`` (two for one VM, two sharing a group behind a PCI bridge), a ``virtio-net-pci`` with ATS behind a PCIe root port and an
``igb`` (ARI, SR-IOV) behind another; the host's root is shared read-only
over 9p so the guest runs this checkout with the host's Python. There,
``tests/guest/vfio_guest.py`` binds the devices to vfio-pci, serves them with
the daemon and checks every result it prints here. This machine has no
/dev/vfio and no usable KVM: this is the only real VFIO the tests can reach.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import ROOT, qemu_binary
from tests.guest.test_guest_lspci import guest_files

# Two edu functions for one VM; a 32-bit DMA mask (edu's default is 28 bits) reaches the BARs below 4 GiB.
# Two more behind a conventional PCI bridge, which share an IOMMU group.
EDUS = (
    *["-device", "edu,addr=04.0,dma_mask=0xffffffff", "-device", "edu,addr=07.0,dma_mask=0xffffffff"],
    *["-device", "pci-bridge,id=br0,chassis_nr=3,addr=08.0"],
    *[
        "-device",
        "edu,bus=br0,addr=01.0,dma_mask=0xffffffff",
        "-device",
        "edu,bus=br0,addr=02.0,dma_mask=0xffffffff",
    ],
)
# The testbed's modules (VFIO, 9p, overlay), each after those it needs.
LOAD_MODULES = "for m in $(cat /modules/order); do insmod /modules/$m.ko || echo RESULT-FAIL insmod $m; done"
# The host's root, which boot() shares read-only: mount it at the path that follows.
MOUNT_HOST_ROOT = "mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot"
REPORT = Path(__file__).parents[2] / ".cache" / "real-vfio-report.json"
# The checks' guest: room for a nested QEMU with the big-guest check's 2 GiB of RAM.
GUEST_MEMORY = "4G"


def cached_testbed() -> Path:
    """Where scripts/testbed keeps QEMU and the guest: the guest's daemon runs that same QEMU.

    Asked of the testbed itself (its QEMU wrapper is ``CACHE/qemu/qemu-system-x86_64``)
    rather than worked out again from VFIO_MEDIATOR_CACHE and HOME.
    """
    return Path(qemu_binary()).resolve().parents[1]


def paths_to_keep_under_tmp(paths: list[Path]) -> list[Path]:
    """The outermost of `paths` that lie under /tmp, which the guest replaces with its own tmpfs."""
    kept: list[Path] = []
    for path in sorted({p for p in paths if p.is_relative_to("/tmp") and p != Path("/tmp")}):
        if not any(path.is_relative_to(parent) for parent in kept):
            kept.append(path)
    return kept


def in_guest_script(module: str, modules: tuple[Path, ...] = ()) -> str:
    """The guest's init: the testbed's modules, the host's root, then ``python -m module`` there;
    ``modules`` are further kernel modules of the host's file system, loaded before."""
    home, cache = Path.home().resolve(), cached_testbed()
    run = (
        f"cd {ROOT} && exec /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME={home} "
        f"VFIO_MEDIATOR_CACHE={cache} TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1 "
        f"{sys.executable} -m {module}"
    )
    # The guest's /tmp is its own tmpfs; a checkout, a home or a testbed
    # cache under the host's /tmp is bound back into it, read-only like the
    # rest of the host, so the daemon's code and the cached QEMU stay reachable.
    keep = "".join(
        f"mkdir -p /host{path} && mount -o bind /host-tmp/{path.relative_to('/tmp')} /host{path}; "
        for path in paths_to_keep_under_tmp([ROOT.resolve(), home, cache])
    )
    return (
        f"{LOAD_MODULES}; "
        f"mkdir -p /host && {MOUNT_HOST_ROOT} /host; "
        "mount -t proc proc /host/proc; mount -t sysfs sys /host/sys; mount -t devtmpfs dev /host/dev; "
        "mkdir -p /host-tmp && mount -o bind /host/tmp /host-tmp; mount -t tmpfs tmp /host/tmp; "
        f"{keep}"
        + "".join(f"insmod /host{path} || echo RESULT-FAIL insmod {path}; " for path in modules)
        + f"chroot /host /bin/sh -c '{run}'"
    )


def run_in_guest(
    module: str,
    devices: tuple[str, ...] = EDUS,
    memory: str = "2G",
    timeout: float = 1500,
    modules: tuple[Path, ...] = (),
) -> str:
    """Boot the real-VFIO guest (``memory`` of RAM) with ``devices`` beside the NIC and igb, run
    ``python -m module`` there on this checkout (after loading ``modules``), and return the
    serial console's output."""
    return boot(in_guest_script(module, modules), devices, memory, timeout)


def boot(script: str, devices: tuple[str, ...], memory: str, timeout: float, append: str = "") -> str:
    """Boot the testbed guest with the IOMMU, ``devices``, the NIC and igb, and the host's root shared
    read-only over 9p; its init runs ``script``. The serial console's output."""
    guest = guest_files()
    command = base64.b64encode(script.encode()).decode()
    return subprocess.run(
        [
            qemu_binary(),
            *["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", memory, "-smp", "1"],
            *["-display", "none", "-nodefaults", "-serial", "stdio", "-no-reboot"],
            *["-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.gz")],
            *["-append", f"console=ttyS0 quiet panic=-1 intel_iommu=on {append} tb.cmd={command}"],
            *["-device", "intel-iommu,caching-mode=on", *devices],
            *["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,addr=05.0"],
            *["-device", "virtio-net-pci,bus=rp1,ats=on,disable-legacy=on"],
            *["-device", "pcie-root-port,id=rp2,bus=pcie.0,chassis=2,addr=06.0", "-device", "igb,bus=rp2"],
            *["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on"],
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    ).stdout


def reported(output: str, report: Path) -> dict[str, dict[str, Any]]:
    """The checks a guest's console reported (``RESULT {...}`` lines), also saved in ``report``;
    raises with the console's end unless the guest got to its ``done``."""
    found = {}
    for line in output.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            found[result["check"]] = result
    report.parent.mkdir(exist_ok=True)
    report.write_text(json.dumps(found, indent=1))
    if "done" not in found:
        raise RuntimeError(f"the guest did not finish its checks:\n{output[-6000:]}")
    return found


def assert_passed(results: dict[str, dict[str, Any]], check: str) -> None:
    result = results.get(check)
    assert result is not None, f"the guest never reported {check}"
    assert result["ok"], f"{result.get('error')}\n{result.get('trace', '')}"


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    return reported(run_in_guest("tests.guest.vfio_guest", memory=GUEST_MEMORY), REPORT)


CHECKS = [
    "unbound",
    "vfio-api",
    "policy-on-real-devices",
    "edu-session",
    "handoff",
    "ebusy",
    "eacces",
    "memlock",
    "vm-space",
    "group",
    "wipe-release",
    "big-guest",
    "lingering-fd",
    "enotty",
    "compare-edu",
    "compare-virtio-net",
    "compare-igb",
    "preflight",
]


@pytest.mark.parametrize("check", CHECKS)
def test_real_vfio(results: dict[str, dict[str, Any]], check: str) -> None:
    assert_passed(results, check)
