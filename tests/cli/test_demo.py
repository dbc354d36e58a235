"""The README's first command: `./scripts/demo` serves the default profile to a real QEMU guest."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_demo_boots_a_guest_that_sees_the_simulated_gpu() -> None:
    result = subprocess.run(
        [ROOT / "scripts" / "demo"], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vfio-mediator is serving the simulated h100-sxm5 on ")
    assert "01:00.0 3D controller: NVIDIA Corporation GH100 [H100 SXM5 80GB] (rev a1)" in lines
    assert "lspci -xxxx (the guest view of the config space):" in lines
    assert lines[-1] == "what the daemon hid and why: .venv/bin/vfio-mediator inspect "
