"""Mediated devices and the kernel's migration uAPI: the daemon against the kernel's mtty sample.

Debian builds no kernel samples, so ``scripts/testbed mtty`` builds mtty.ko
for the guest's kernel (cached). The real-VFIO guest boots without the edu
devices, loads it, and ``tests/guest/mdev_guest.py`` creates two instances,
serves them by UUID and migrates one's state to the other through two
daemons; it prints one result per check for the assertions here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import ROOT
from tests.guest.test_real_vfio import assert_passed, reported, run_in_guest

REPORT = Path(__file__).parents[2] / ".cache" / "mdev-report.json"


def mtty_module() -> Path:
    result = subprocess.run(
        [str(ROOT / "scripts" / "testbed"), "mtty"], capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise RuntimeError(f"building mtty.ko failed:\n{result.stderr}")
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    output = run_in_guest("tests.guest.mdev_guest", devices=(), modules=(mtty_module(),), timeout=900)
    return reported(output, REPORT)


@pytest.mark.parametrize("check", ["mdev-discovery", "mdev-nested-qemu", "mdev-migration"])
def test_mdev(results: dict[str, dict[str, Any]], check: str) -> None:
    assert_passed(results, check)
