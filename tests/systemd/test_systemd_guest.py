"""The shipped units under a real systemd: a TCG guest that boots this machine's root with systemd as PID 1.

The testbed guest's init mounts the host's root (9p, read-only) under a
tmpfs overlay, gives it an empty fstab and machine-id, a tmpfs /tmp and the
checks' service, and switch_roots into Debian's own ``/lib/systemd/systemd``
with the journal, udev and the IOMMU on. ``tests/systemd/systemd_guest.py``
runs there as that service: the README's installation, then one check per
claim the README makes about the units, printed on the serial console for
the tests here. The machines that run the suite do not boot systemd; this is
where the sandbox meets real ``/dev/vfio`` nodes.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import ROOT
from tests.guest.test_real_vfio import (
    EDUS,
    LOAD_MODULES,
    MOUNT_HOST_ROOT,
    assert_passed,
    boot,
    cached_testbed,
    paths_to_keep_under_tmp,
    reported,
)

REPORT = ROOT / ".cache" / "systemd-guest-report.json"
CHECKS = [
    "systemd",
    "install",
    "socket-activation",
    "memlock",
    "journal",
    "hardening",
    "config-service",
    "reload",
    "quarantine-restart-release",
    "access",
    "watchdog",
    "busy-after-restart",
]


def wheels() -> Path:
    """The wheels of the project's build and runtime requirements, for pip in the offline guest (cached)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = sorted({*project["build-system"]["requires"], *project["project"]["dependencies"]})
    folder = cached_testbed() / "wheels" / hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:16]
    if not (folder / ".complete").exists():
        subprocess.run(
            [
                *[sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"],
                *["--only-binary=:all:", "--dest", str(folder), *requirements],
            ],
            check=True,
        )
        (folder / ".complete").touch()
    return folder


def unit_file(name: str, text: str) -> str:
    return f"cat > /newroot/etc/systemd/system/{name} <<'UNIT'\n{text}UNIT\n"


def init_script(wheelhouse: Path) -> str:
    """What the testbed's init runs: the host's root under an overlay, then systemd as PID 1."""
    checks = (
        "[Unit]\nDescription=vfio-mediator's systemd checks\nAfter=basic.target\n"
        "[Service]\nType=oneshot\n"
        f"WorkingDirectory={ROOT}\n"
        f"Environment=TB_WHEELS={wheelhouse} HOME=/root TMPDIR=/tmp PYTHONDONTWRITEBYTECODE=1\n"
        f"ExecStart={sys.executable} -m tests.systemd.systemd_guest\n"
        "StandardOutput=tty\nStandardError=tty\nTTYPath=/dev/ttyS0\n"
    )
    target = (
        "[Unit]\nDescription=vfio-mediator's systemd checks\n"
        "Requires=basic.target\nWants=tb-checks.service\nAfter=basic.target\nAllowIsolate=yes\n"
    )
    # /tmp is a tmpfs (tmpfiles would empty the host's through 9p at boot); a checkout, home or
    # testbed cache under the host's /tmp is bound back, read-only like the rest of the host.
    keep = "".join(
        f"mkdir -p /newroot{path} && mount --bind /lower{path} /newroot{path}\n"
        for path in paths_to_keep_under_tmp(
            [ROOT.resolve(), Path.home().resolve(), cached_testbed(), wheelhouse]
        )
    )
    return (
        f"{LOAD_MODULES}\n"
        "mkdir -p /lower /rw /newroot\n"
        f"{MOUNT_HOST_ROOT} /lower\n"
        "mount -t tmpfs -o mode=0755 rw /rw && mkdir -p /rw/upper /rw/work\n"
        "mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot\n"
        "mount -t tmpfs -o mode=1777 tmp /newroot/tmp\n"
        f"{keep}"
        # No disks here; systemd makes a machine-id at first boot. A container's marker files
        # would make systemd think it runs in one (it then ignores the kernel's command line).
        ": > /newroot/etc/fstab; rm -f /newroot/etc/machine-id; : > /newroot/etc/machine-id\n"
        "rm -f /newroot/.dockerenv /newroot/run/.containerenv\n"
        + unit_file("tb-checks.service", checks)
        + unit_file("tb.target", target)
        + "umount /proc /sys; mount --move /dev /newroot/dev\n"
        "exec switch_root /newroot /lib/systemd/systemd\n"
    )


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    output = boot(
        init_script(wheels()),
        EDUS[:4],  # two edu functions, each in its own IOMMU group
        memory="3G",
        timeout=2400,
        append="systemd.unit=tb.target systemd.show_status=false",
    )
    return reported(output, REPORT)


@pytest.mark.parametrize("check", CHECKS)
def test_systemd_guest(results: dict[str, dict[str, Any]], check: str) -> None:
    assert_passed(results, check)
