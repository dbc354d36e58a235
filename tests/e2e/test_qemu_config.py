"""What a real QEMU 11.1 guest reads from the served config space.

The guest's 4 KiB (0xCF8/0xCFC below 0x100, ECAM above) must equal
``inspect --json``'s ``virtual.config`` byte for byte, except where QEMU
emulates registers itself (listed in ``qemu_emulated``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mediator.pci import capabilities as caps
from mediator.pci.capabilities import CapKind
from mediator.pci.chain import walk
from tests.e2e.harness import Machine, served
from tests.support import PROFILES


def inspect_virtual_config(profile: str) -> bytes:
    result = subprocess.run(
        [sys.executable, "-m", "mediator", "inspect", "--json", "--profile", profile],
        capture_output=True,
        text=True,
        check=True,
    )
    return bytes.fromhex(json.loads(result.stdout)["virtual"]["config"])


def qemu_emulated(view: bytes) -> dict[int, int]:
    """Bits QEMU's vfio-pci layer emulates (offset -> mask): the guest sees QEMU's value there.

    - Status.CapList and the header type's multifunction bit;
    - BAR0-5 (0x10-0x27), the ROM BAR and the capability pointer (0x30-0x34);
    - every standard capability's next pointer;
    - the whole MSI and MSI-X capabilities (QEMU runs both);
    - the first extended header (0x100-0x103) and every later one's next pointer;
    - for a Root Complex integrated Endpoint, which QEMU turns into an endpoint
      when it sits behind a root port: the PCIe capability's device/port type
      and its link capability, control and status registers (x1, 2.5 GT/s).
    """
    emulated = {0x06: 0x10, 0x0E: 0x80}
    emulated |= {o: 0xFF for o in range(0x10, 0x28)}
    emulated |= {o: 0xFF for o in range(0x30, 0x35)}
    chains = walk(view)
    for cap in chains.std:
        emulated[cap.offset + 1] = 0xFF
        if cap.id in (caps.MSI, caps.MSIX):
            emulated |= {o: 0xFF for o in range(cap.offset, cap.end)}
        if cap.id == caps.EXP and (view[cap.offset + 2] >> 4) == caps.EXP_TYPE_RC_END:
            emulated[cap.offset + 2] = 0xF0
            emulated |= {cap.offset + o: 0xFF for o in (*range(0x0C, 0x14), *range(0x2C, 0x34))}
    if len(view) > 0x100:
        emulated |= {o: 0xFF for o in range(0x100, 0x104)}
        for cap in chains.ext:
            emulated[cap.offset + 2] = emulated.get(cap.offset + 2, 0) | 0xF0
            emulated[cap.offset + 3] = 0xFF
    return emulated


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_guest_reads_exactly_the_virtual_config(profile: str, tmp_path: Path) -> None:
    expected = inspect_virtual_config(profile)
    with served(profile, tmp_path) as dev, Machine(dev.socket, behind_root_port=True) as machine:
        seen = machine.config_space(len(expected))
        assert machine.process.poll() is None, machine.stderr()
    emulated = qemu_emulated(expected)
    differences = [
        f"{o:#05x}: guest {seen[o]:02x} expected {expected[o]:02x}"
        for o in range(len(expected))
        if (seen[o] ^ expected[o]) & ~emulated.get(o, 0) & 0xFF
    ]
    assert not differences, "\n".join(differences)
    guest_caps = {(c.kind, c.id) for c in walk(seen).all() if c.id}
    hidden = {
        (f.capability.kind, f.capability.id)
        for f in dev.device.plan.capabilities
        if f.hidden and f.capability.id
    }
    assert not guest_caps & hidden, f"the guest walks to hidden capabilities {guest_caps & hidden}"
    if profile == "h100-sxm5":
        assert (CapKind.STD, caps.VENDOR) not in guest_caps
