"""Guest RAM pinned in the background, through a real QEMU 11.1 (docs/faults.md).

QEMU sends the guest's RAM as DMA_MAPs at realize and waits for each reply
no longer than x-msg-timeout (5 s). The simulator's ``dma_map_seconds_per_gib``
fault makes the pin of 256 MiB of guest RAM take 6 s: QEMU must not notice,
the guest must see the Bus Master Enable it wrote, and the device must not
DMA until the pin is done. ``dma_map_fails`` makes the pin fail after the
reply: the device is blocked with the reason, and another device is served.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.harness import MMIO64_BASE, RAM_SIZE, Machine
from tests.e2e.test_qemu_gpu_policy import serve, write_config
from tests.faults.test_faults import faulty_profile
from tests.support import sample, scrape

BAR0 = MMIO64_BASE
PEER = (0, 6, 0)  # where Machine plugs the second device
ENGINE = BAR0 + 0x5000  # the H100 profile's DMA engine
GUEST_BUFFER = RAM_SIZE - 0x10000  # near the top of the guest's RAM: the last memory pinned
FAULT = 0x100
# 256 MiB of guest RAM at this rate pins in 6 s, longer than QEMU's x-msg-timeout.
SECONDS_PER_GIB = 24.0


def bring_up(machine: Machine) -> None:
    machine.map_bar(0, BAR0)
    machine.enable(0x0006)  # memory decoding and bus mastering, as the guest's driver does


def dma_to_guest(machine: Machine, pattern: bytes) -> int:
    """Copy ``pattern`` from BAR0+0x8000 to the guest buffer with the device's engine; its status."""
    machine.write_memory(BAR0 + 0x8000, pattern)
    machine.command(f"writeq {ENGINE:#x} 0x8000")
    machine.command(f"writeq {ENGINE + 8:#x} {GUEST_BUFFER:#x}")
    machine.command(f"writeq {ENGINE + 0x10:#x} {len(pattern)}")
    machine.command(f"writeq {ENGINE + 0x18:#x} 0x3")  # start, to the guest
    return machine.value(f"readq {ENGINE + 0x18:#x}")


def pending(metrics: Path, machine: Machine) -> float:
    return sample(scrape(metrics), "vfio_mediator_vm_pin_pending_bytes", vm=str(machine.process.pid))


def test_a_slow_pin_delays_nothing_qemu_waits_for_and_bus_mastering_waits_for_it(tmp_path: Path) -> None:
    slow = faulty_profile(tmp_path, f"dma_map_seconds_per_gib = {SECONDS_PER_GIB}")
    config = write_config(
        tmp_path,
        [{"name": "gpu0", "profile": str(slow)}, {"name": "gpu1", "profile": "h100-sxm5"}],
        extra='[metrics]\nsocket = "metrics.sock"\n',
    )
    metrics = tmp_path / "metrics.sock"
    with (
        serve(config, devices=2) as daemon,
        Machine(tmp_path / "gpu0.sock", behind_root_port=False, more=[tmp_path / "gpu1.sock"]) as machine,
    ):
        bring_up(machine)
        machine.map_bar(0, BAR0 + (256 << 20), PEER)
        machine.enable(0x0006, bdf=PEER)  # one VM: its other device waits for the same pins
        # QEMU has realized and reset the device and the guest has set it up, all answered,
        # while the guest's RAM is still being pinned:
        assert pending(metrics, machine) > 0
        assert machine.cfg_read(0x04, 2) & 0x0004  # the guest sees the Bus Master Enable it wrote
        assert dma_to_guest(machine, b"too early") & FAULT  # the hardware does not have it yet
        deadline = time.monotonic() + 120  # a hang guard, not a latency bound
        while pending(metrics, machine):
            assert time.monotonic() < deadline, daemon.log[-3000:]
            time.sleep(0.2)
        pattern = bytes(range(0x40, 0x60))
        assert not dma_to_guest(machine, pattern) & FAULT
        assert machine.read_memory(GUEST_BUFFER, len(pattern)) == pattern
        assert machine.process.poll() is None and "timed out" not in machine.stderr(), machine.stderr()
    held = daemon.events("bus master held until guest memory is pinned")
    assert {e["device"] for e in held} == {"gpu0", "gpu1"}, held
    on = [e for e in daemon.events("bus master on") if e["waited_for_pinning"]]
    assert sorted(e["device"] for e in on) == ["gpu0", "gpu1"], on  # each line names its own device


def test_a_pin_that_fails_blocks_the_device_and_another_device_keeps_serving(tmp_path: Path) -> None:
    failing = faulty_profile(tmp_path, "dma_map_fails = true")
    config = write_config(
        tmp_path,
        [{"name": "gpu0", "profile": str(failing)}, {"name": "gpu1", "profile": "h100-sxm5"}],
        extra='[metrics]\nsocket = "metrics.sock"\n',
    )
    metrics = tmp_path / "metrics.sock"
    with serve(config, devices=2) as daemon:
        try:
            with Machine(tmp_path / "gpu0.sock", behind_root_port=False) as machine:
                daemon.wait_for_event("device blocked", device="gpu0")
                assert machine.cfg_read(0x00, 4) != 0x233010DE  # refused: the guest does not get the device
        except RuntimeError as e:
            # Refused while it realizes the device, QEMU 11.1 aborts: `error_setv: Assertion
            # `*errp == NULL' failed` (its error path sets an error twice); the daemon goes on.
            assert "QEMU" in str(e)
        assert daemon.process.poll() is None
        blocked = daemon.wait_for_event("device blocked", device="gpu0")
        assert "could not be pinned for DMA" in blocked["why"] and "injected" in blocked["why"]
        assert sample(scrape(metrics), "vfio_mediator_dma_pin_failures_total", device="gpu0") >= 1
        with Machine(tmp_path / "gpu1.sock", behind_root_port=False) as other:
            bring_up(other)
            assert other.cfg_read(0x00, 4) == 0x233010DE
            deadline = time.monotonic() + 60  # a hang guard: the RAM is pinned at once here
            while pending(metrics, other):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert not dma_to_guest(other, b"still served") & FAULT
            assert other.read_memory(GUEST_BUFFER, 12) == b"still served"
