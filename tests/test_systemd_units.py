"""The shipped systemd units: valid, and hardened (exposure at most 2.0 by systemd-analyze).

The README documents the score: removing a hardening directive fails here until
the README says what it costs (the systemd guest checks the running unit too).

The units name /usr/bin/vfio-mediator; the checks run on copies that name
this checkout's command, with instance names systemd-analyze 252 can parse.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import readme_section

UNITS = Path(__file__).parents[1] / "systemd"
INSTANCES = {
    "vfio-mediator@.service": "vfio-mediator@dev0.service",
    "vfio-mediator@.socket": "vfio-mediator@dev0.socket",
    "vfio-mediator.service": "vfio-mediator.service",
    "vfio-mediator-device@.socket": "vfio-mediator-device@gpu0.socket",
}


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("units")
    command = str(Path(sys.executable).parent / "vfio-mediator")
    for shipped, instance in INSTANCES.items():
        text = (UNITS / shipped).read_text().replace("/usr/bin/vfio-mediator", command)
        (folder / instance).write_text(text)
    return folder


def exposure_of(analysis: str) -> float:
    """The overall exposure in ``systemd-analyze security UNIT``'s output (an instance may hold colons)."""
    found = re.search(r"Overall exposure level for \S+: ([\d.]+) ", analysis)
    assert found, analysis[-2000:]
    return float(found.group(1))


def documented_exposure() -> float:
    """The score README.md's "Hardening" paragraph gives both services."""
    text = " ".join(readme_section("Running under systemd").split())
    return float(text.split("`systemd-analyze security` rates both services ")[1].split()[0])


def test_every_unit_is_checked() -> None:
    assert sorted(p.name for p in UNITS.glob("*.s*") if p.suffix in (".service", ".socket")) == sorted(
        INSTANCES
    )


def test_the_units_verify(units: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(INSTANCES.values())],
        cwd=units,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@pytest.mark.parametrize("service", ["vfio-mediator@dev0.service", "vfio-mediator.service"])
def test_the_services_are_hardened(units: Path, service: str) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", "--no-pager", service],
        cwd=units,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    exposure = exposure_of(result.stdout)
    assert exposure <= 2.0
    assert exposure == documented_exposure(), f"{service} rates {exposure}: say so in the README"
