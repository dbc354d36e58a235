"""A real QEMU 11.1 using the served device: BARs, MMIO, traps, interrupts, DMA, reset, clients.

The device sits on the q35 root bus at 00:05.0; the test programs its BARs
and drives it through qtest, then checks what the simulated hardware saw and
which vfio-user messages the daemon received.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.e2e.harness import MMIO64_BASE, Machine, served

BAR0 = MMIO64_BASE
BAR2 = MMIO64_BASE + (128 << 30)
DOORBELL = 0x4000
DMA_ENGINE = 0x5000
MSIX_TABLE = 0xB90000
GUEST_BUFFER = 0x200000


def region_messages(dev: object) -> int:
    counts = dev.counts()  # type: ignore[attr-defined]
    return counts.get("REGION_READ", 0) + counts.get("REGION_WRITE", 0)


def bring_up(machine: Machine, bars: dict[int, int]) -> None:
    for index, address in bars.items():
        machine.map_bar(index, address)
    machine.enable(0x0006)  # memory decoding and bus mastering


def test_guest_bar_sizing_gives_the_virtual_power_of_two_sizes(tmp_path: Path) -> None:
    with served("gh200", tmp_path) as dev, Machine(dev.socket, behind_root_port=False) as machine:
        sizes = {bar.index: machine.size_bar(bar.index) for bar in dev.device.plan.bars}
    assert sizes == {0: 16 << 20, 2: 1 << 30, 4: 128 << 30}


def test_mmio_in_mapped_areas_reaches_the_device_without_messages(tmp_path: Path) -> None:
    with served("h100-sxm5", tmp_path) as dev, Machine(dev.socket, behind_root_port=False) as machine:
        bring_up(machine, {0: BAR0})
        before = region_messages(dev)
        machine.command(f"writel {BAR0 + 0x100:#x} 0x12345678")
        machine.command(f"writeq {BAR0 + 0x6000:#x} 0x1122334455667788")
        assert machine.value(f"readl {BAR0 + 0x100:#x}") == 0x12345678
        assert region_messages(dev) == before  # QEMU mapped the memfd: no message at all
        memory = dev.backend.memory(0)
        assert memory[0x100:0x104] == (0x12345678).to_bytes(4, "little")
        assert memory[0x6000:0x6008] == (0x1122334455667788).to_bytes(8, "little")


def test_the_config_mirror_in_bar0_serves_the_filtered_view(tmp_path: Path) -> None:
    with served("h100-sxm5", tmp_path) as dev, Machine(dev.socket, behind_root_port=False) as machine:
        bring_up(machine, {0: BAR0})
        before = region_messages(dev)
        assert machine.value(f"readl {BAR0 + 0x88000:#x}") == 0x233010DE
        assert machine.value(f"readl {BAR0 + 0x88000 + 0x9C:#x}") == 0  # the hidden vendor capability
        assert machine.value(f"readl {BAR0 + 0x1800 + 0x9C:#x}") == 0
        physical = bytes(dev.backend.config)
        machine.command(f"writel {BAR0 + 0x88000 + 0x9C:#x} 0xffffffff")
        machine.command(f"writel {BAR0 + 0x88000 + 0x10:#x} 0x12345678")
        assert bytes(dev.backend.config) == physical  # nothing reached the device's config space
        assert region_messages(dev) == before + 5  # every trapped access is a message


def test_padding_past_the_real_size_reads_ff_and_drops_writes(tmp_path: Path) -> None:
    real = 0x17E0000000
    base = MMIO64_BASE + (128 << 30)
    with served("gh200", tmp_path) as dev, Machine(dev.socket, behind_root_port=False) as machine:
        bring_up(machine, {0: BAR0, 4: base})
        machine.command(f"writeb {base + real - 1:#x} 0x5a")
        before = region_messages(dev)
        assert machine.value(f"readb {base + real - 1:#x}") == 0x5A  # last real byte, mapped
        assert region_messages(dev) == before
        assert machine.value(f"readb {base + real:#x}") == 0xFF  # first padding byte
        machine.command(f"writel {base + real:#x} 0")
        assert machine.value(f"readl {base + real:#x}") == 0xFFFFFFFF
        assert machine.value(f"readq {base + (128 << 30) - 8:#x}") == 0xFFFFFFFFFFFFFFFF
        assert region_messages(dev) == before + 4
        assert dev.backend.memory(4)[real - 1] == 0x5A


def test_an_msix_interrupt_from_the_device_lands_in_guest_memory(tmp_path: Path) -> None:
    with served("h100-sxm5", tmp_path) as dev, Machine(dev.socket, behind_root_port=False) as machine:
        bring_up(machine, {0: BAR0})
        entry = BAR0 + MSIX_TABLE
        machine.command(f"writel {entry:#x} {GUEST_BUFFER:#x}")
        machine.command(f"writel {entry + 4:#x} 0")
        machine.command(f"writel {entry + 8:#x} 0x4d534958")
        machine.command(f"writel {entry + 12:#x} 0")  # unmasked
        machine.cfg_write(0xB2, 2, 0x8000)  # MSI-X enable
        assert dev.device.attached_eventfds >= 1
        machine.command(f"writel {BAR0 + DOORBELL:#x} 0")  # the device raises vector 0
        deadline = time.monotonic() + 30  # a hang guard, not a latency bound
        while machine.read_memory(GUEST_BUFFER, 4) != (0x4D534958).to_bytes(4, "little"):
            assert time.monotonic() < deadline, "the MSI-X message never reached guest memory"
            machine.command("clock_step 1000")
        assert dev.backend.interrupts_raised == 1


def test_an_intx_interrupt_from_the_device_reaches_the_interrupt_controller(tmp_path: Path) -> None:
    with served("h100-sxm5", tmp_path) as dev, Machine(dev.socket, behind_root_port=False) as machine:
        bring_up(machine, {0: BAR0})
        machine.command("irq_intercept_in ioapic")
        machine.command(f"writel {BAR0 + DOORBELL:#x} 0")
        # ICH9 routes PCI INTx to GSIs 16-23; GSI 0 is the PIT ticking meanwhile.
        deadline = time.monotonic() + 30  # a hang guard: the line comes with the write's answer
        while not any(kind == "raise" and 16 <= line <= 23 for kind, line in machine.irqs):
            assert time.monotonic() < deadline, f"no INTx; saw {machine.irqs}"
            machine.command("clock_step 1000")
        assert dev.backend.interrupts_raised == 1


def test_device_dma_moves_bytes_between_the_bar_and_guest_ram(tmp_path: Path) -> None:
    pattern = bytes(range(0x40, 0x60))
    with served("h100-sxm5", tmp_path) as dev, Machine(dev.socket, behind_root_port=False) as machine:
        bring_up(machine, {0: BAR0})
        machine.write_memory(BAR0 + 0x8000, pattern)  # into BAR memory, through the mmap
        engine = BAR0 + DMA_ENGINE
        machine.command(f"writeq {engine:#x} 0x8000")  # source: BAR offset
        machine.command(f"writeq {engine + 8:#x} {GUEST_BUFFER:#x}")  # destination: guest RAM
        machine.command(f"writeq {engine + 0x10:#x} {len(pattern)}")
        machine.command(f"writeq {engine + 0x18:#x} 0x3")  # start, to the guest
        assert machine.read_memory(GUEST_BUFFER, len(pattern)) == pattern
        assert machine.value(f"readq {engine + 0x18:#x}") == 0x2  # done, no fault

        machine.write_memory(GUEST_BUFFER + 0x1000, pattern[::-1])
        machine.command(f"writeq {engine:#x} {GUEST_BUFFER + 0x1000:#x}")
        machine.command(f"writeq {engine + 8:#x} 0x9000")
        machine.command(f"writeq {engine + 0x18:#x} 0x1")  # start, from the guest
        assert dev.backend.memory(0)[0x9000 : 0x9000 + len(pattern)] == pattern[::-1]
        assert any(m.backed for m in dev.device.dma.table.mappings())


def test_machine_reset_resets_the_device_and_its_virtual_registers(tmp_path: Path) -> None:
    with served("h100-sxm5", tmp_path) as dev, Machine(dev.socket, behind_root_port=False) as machine:
        resets = dev.backend.resets
        assert resets >= 1  # QEMU resets the device when the machine starts
        machine.cfg_write(0x3C, 1, 0x42)
        assert machine.cfg_read(0x3C, 1) == 0x42
        machine.qmp("system_reset")
        deadline = time.monotonic() + 30  # a hang guard, not a latency bound
        while dev.backend.resets == resets:
            assert time.monotonic() < deadline, "no DEVICE_RESET after system_reset"
            time.sleep(0.05)
        assert machine.cfg_read(0x3C, 1) == 0x0A  # the profile's value again
        assert dev.counts()["DEVICE_RESET"] >= 2


def test_one_client_at_a_time_and_a_clean_device_for_the_next(tmp_path: Path) -> None:
    with served("h100-sxm5", tmp_path) as dev:
        with Machine(dev.socket, behind_root_port=False) as machine:
            bring_up(machine, {0: BAR0})
            machine.cfg_write(0xB2, 2, 0x8000)
            assert len(dev.device.dma) > 0 and dev.device.attached_eventfds > 0
            intruder = socket.socket(socket.AF_UNIX)
            intruder.connect(str(dev.socket))
            intruder.settimeout(5)
            assert intruder.recv(16) == b""  # refused: the device has its client
            intruder.close()
            assert dev.events.refused == 1
            resets = dev.backend.resets
        deadline = time.monotonic() + 10
        while dev.events.sessions == 1 and (len(dev.device.dma) or dev.backend.resets == resets):
            assert time.monotonic() < deadline, "the daemon did not clean up after the client"
            time.sleep(0.05)
        assert len(dev.device.dma) == 0 and dev.device.attached_eventfds == 0
        assert dev.backend.resets > resets
        with Machine(dev.socket, behind_root_port=False) as second:  # the daemon keeps serving
            assert second.cfg_read(0, 4) == 0x233010DE
        assert dev.events.sessions == 2
