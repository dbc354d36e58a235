"""NVLink isolation, guest resets through the daemon, fail-closed, GPUDirect cliques, audit windows.

The simulated V100 keeps its link-disable bits (BAR0 0xa00148, bits 21:16)
sticky until a reset, as the real part does, so these tests prove what the
guest could and could not undo.
"""

from __future__ import annotations

import dataclasses
import errno

import pytest
from structlog.testing import capture_logs

from mediator.audit import RateLimiter
from mediator.backends.profile import Behaviour
from mediator.pci.registers import u16
from mediator.virt.errors import DeviceError
from mediator.virt.plan import DeviceContext
from tests.protocol.client import Session
from tests.support import device, profile

LINK_DISABLE = 0xA00148
PCIE = 0x78  # the V100 profile's PCI Express capability
ALL_LINKS = 0x3F0000


def link_disable(sim) -> int:  # type: ignore[no-untyped-def]
    return int.from_bytes(sim.read_region(0, LINK_DISABLE, 4), "little")


def test_every_link_is_disabled_when_the_config_names_no_peer() -> None:
    _, sim = device("v100-sxm2")
    assert link_disable(sim) == ALL_LINKS
    assert int.from_bytes(sim.read_region(0, 0x12004C, 4), "little") == 4
    assert int.from_bytes(sim.read_region(0, 0x122204, 4), "little") == 2
    assert int.from_bytes(sim.read_region(0, 0x200, 4), "little") & 0x02000000


def test_links_to_the_same_tenant_stay_usable() -> None:
    _, sim = device("v100-sxm2", context=DeviceContext(tenant="a", allowed_links=frozenset({0, 3})))
    assert link_disable(sim) == ALL_LINKS & ~((1 | 1 << 3) << 16)


def test_the_guest_cannot_re_enable_a_link_by_writing_or_resetting() -> None:
    dev, sim = device("v100-sxm2", context=DeviceContext(tenant="a", allowed_links=frozenset({0})))
    foreign = ALL_LINKS & ~(1 << 16)
    dev.write_region(0, LINK_DISABLE, bytes(4))  # the audit window passes it through
    assert link_disable(sim) == foreign
    control = u16(dev.config.read(PCIE + 8, 2), 0)
    dev.write_region(7, PCIE + 8, (control | 0x8000).to_bytes(2, "little"))  # Initiate FLR
    assert sim.resets == 1
    assert link_disable(sim) == foreign
    assert not u16(dev.config.read(PCIE + 8, 2), 0) & 0x8000
    dev.reset()  # as VFIO_USER_DEVICE_RESET does
    assert sim.resets == 2
    assert link_disable(sim) == foreign


def test_a_write_through_the_bar0_config_mirror_cannot_reset_behind_the_daemon() -> None:
    dev, sim = device("v100-sxm2")
    control = u16(dev.config.read(PCIE + 8, 2), 0)
    dev.write_region(0, 0x88000 + PCIE + 8, (control | 0x8000).to_bytes(2, "little"))
    assert sim.resets == 1
    assert link_disable(sim) == ALL_LINKS


def isolation_that_does_not_hold():  # type: ignore[no-untyped-def]
    base = profile("v100-sxm2")
    behaviours = [b for b in base.behaviours if b.kind != "sticky-bits"]
    return dataclasses.replace(base, behaviours=(*behaviours, Behaviour("read-only", 0, LINK_DISABLE, 4)))


def test_a_device_whose_isolation_does_not_hold_is_refused_with_the_reason() -> None:
    with Session(isolation_that_does_not_hold()) as session:
        blocked = session.device.refusal
        assert blocked is not None
        assert "0xa00148 reads 0x0" in blocked and "nvidia/nvlink-isolation" in blocked
        reply = session.version()
        assert not reply.ok and reply.error == errno.EPERM
        session.thread.join(10)
        assert session.why is not None and "nvidia/nvlink-isolation" in session.why
        assert session.client.recv(1) == b""  # the daemon ended the session


def test_a_reset_that_loses_isolation_blocks_the_device() -> None:
    dev, sim = device("v100-sxm2")
    assert dev.refusal is None
    sim.profile = isolation_that_does_not_hold()  # the register drops to 0 and stops taking writes
    sim.memory(0)[LINK_DISABLE : LINK_DISABLE + 4] = bytes(4)
    with pytest.raises(DeviceError) as failure:
        dev.reset()
    assert failure.value.errno == errno.EIO
    assert dev.refusal is not None


def test_gpudirect_clique_comes_from_the_config_and_is_read_only() -> None:
    dev, _ = device("h100-sxm5", context=DeviceContext(gpudirect_clique=5))
    capability = dev.config.read(0xC8, 8)
    assert capability == bytes([0x09, 0x00, 0x08]) + b"P2P" + bytes([5 << 3, 0])
    dev.config.write(0xCE, b"\x00\x00")
    assert dev.config.read(0xC8, 8) == capability
    plain, _ = device("h100-sxm5")
    assert plain.config.read(0xC8, 8) != capability


def test_audit_windows_log_every_access_up_to_the_rate_limit() -> None:
    now = [0.0]
    dev, sim = device("v100-sxm2")
    dev.auditor.limiter = RateLimiter(rate=1, burst=3, clock=lambda: now[0])
    with capture_logs() as logs:
        dev.write_region(0, 0x122204, (7).to_bytes(4, "little"))
        for _ in range(5):
            dev.read_region(0, 0x122204, 4)
        now[0] += 10
        dev.read_region(0, 0x122204, 4)
    accesses = [e for e in logs if e["event"] == "guest access"]
    assert accesses[0] | {"log_level": None} == {
        "event": "guest access",
        "bar": 0,
        "offset": "0x122204",
        "size": 4,
        "direction": "write",
        "value": "0x00000007",
        "action": "audit",
        "audit": True,
        "log_level": None,
    }
    assert len(accesses) == 4  # a burst of three, then one after the bucket refilled
    assert accesses[-1]["suppressed"] == 3
    assert int.from_bytes(sim.read_region(0, 0x122204, 4), "little") == 7  # audited, not blocked
    assert dev.auditor.events == 7


def test_a_blocked_device_refuses_the_next_command_too() -> None:
    with Session("h100-sxm5") as session:
        assert session.version().ok
        assert session.region_read(7, 0, 4).ok
        session.device.block("quarantined by a test")
        reply = session.region_read(7, 0, 4)
        assert not reply.ok and reply.error == errno.EPERM
        session.thread.join(10)
        assert session.why is not None and "quarantined by a test" in session.why
