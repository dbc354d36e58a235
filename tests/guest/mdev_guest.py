"""Runs INSIDE the real-VFIO test guest with the kernel's mtty sample loaded: mediated devices.

mtty (samples/vfio-mdev/mtty.c) is a mediated 16550-style serial device with
the kernel's migration uAPI (STOP_COPY, P2P, PRE_COPY): its two I/O BARs are
two ports, each a loopback FIFO (bytes written to the data register are read
back from it) and registers such as the scratch register. Two dual-port
instances are created; the daemon serves them by UUID, a nested QEMU (qtest)
reaches one through its I/O BARs, and the project's migration client moves
one's state to the other through two daemons. One ``RESULT`` line per
check, as ``vfio_guest`` prints them.

    python -m tests.guest.mdev_guest
"""

from __future__ import annotations

import errno
import json
import struct
import subprocess
import time
from pathlib import Path

from mediator.backends.migration import MigState
from mediator.backends.sysfs import DeviceNotReady, find_target, list_mdevs
from mediator.vfio_abi import MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY
from mediator.virt.migration import FRAME, HEADER
from tests.e2e.harness import Machine
from tests.guest.vfio_guest import NO_RESET, PYTHON, checked, connect_to, daemon, inspect, refused, report
from tests.protocol.client import Client

MTTY_TYPE = Path("/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2")  # two ports, BAR0 and BAR1
SOURCE = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
DESTINATION = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002"
ABSENT = "83b8f4f2-509f-382f-3c1e-e6bfe0fa10ff"
MTTY_IDS = 0x32534348  # vendor 0x4348, device 0x3253, as one config read
DATA, IER, LSR, SCR = 0, 1, 5, 7  # 16550 registers, offsets in a port's I/O BAR
LSR_DATA_READY = 0x01
PORT_BASES = (0xC000, 0xC010)  # where the nested guest puts BAR0 and BAR1 in I/O space
IO_ENABLE = b"\x01\x00"  # PCI command: I/O decoding
MTTY_FLAGS = MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY


def create_instances() -> list[str]:
    for uuid in (SOURCE, DESTINATION):
        if not Path(f"/sys/bus/mdev/devices/{uuid}").exists():
            (MTTY_TYPE / "create").write_text(uuid)
    return [m.uuid for m in list_mdevs()]


def register(client: Client, port: int, offset: int) -> int:
    reply = client.region_read(port, offset, 1)
    assert reply.ok, (port, offset, reply.error)
    return reply.payload[16]


def errno_of(reply: object) -> str:
    error = getattr(reply, "error", 0)
    return errno.errorcode.get(error, str(error)) if not getattr(reply, "ok", False) else "ok"


def main() -> None:  # noqa: PLR0915  one nested function per check, in the order they run
    @checked("mdev-discovery")
    def _() -> dict[str, object]:
        listed = create_instances()
        mdevs = {m.uuid: m for m in list_mdevs()}
        source = find_target(SOURCE)
        try:
            find_target(ABSENT)
            absent = "found"
        except DeviceNotReady as e:
            absent = str(e)
        code, last_line = refused(ABSENT)
        assert {SOURCE, DESTINATION} <= set(listed), listed
        assert source.iommu_group is not None and source.iommu_group != mdevs[DESTINATION].iommu_group
        assert mdevs[SOURCE].parent == "mtty" and mdevs[SOURCE].mdev_type == "mtty-2", mdevs[SOURCE]
        assert mdevs[SOURCE].driver == "mtty" and mdevs[SOURCE].device_api == "vfio-pci", mdevs[SOURCE]
        assert f"echo {ABSENT} > " in absent and "mtty-2" in absent, absent
        assert code != 0 and ABSENT in last_line, (code, last_line)
        listing = json.loads(
            subprocess.run([*PYTHON, "devices", "--json"], capture_output=True, text=True, check=True).stdout
        )
        rows = {row.get("mdev"): row for row in listing if row.get("mdev")}
        assert rows.get(SOURCE, {}).get("parent") == "mtty", listing
        return {"mdevs": {u: m.describe() for u, m in mdevs.items()}, "absent": absent, "refused": last_line}

    @checked("mdev-nested-qemu")
    def _() -> dict[str, object]:
        inspected = inspect(SOURCE)
        view = bytes.fromhex(inspected["virtual"]["config"])
        # Which VFIO API opened the mdev: iommufd when the kernel gives it a device cdev, else its group.
        cdev = find_target(SOURCE).vfio_cdev and Path("/dev/iommu").exists()
        api = "iommufd" if cdev else "group"
        with (
            daemon(SOURCE, name="mtty", reset=NO_RESET) as (sock, _log),
            Machine(sock, behind_root_port=False) as vm,
        ):
            seen = vm.config_space(0x100)
            sizes = [vm.size_bar(0), vm.size_bar(1)]
            for index, base in enumerate(PORT_BASES):
                vm.map_bar(index, base | 1)
            vm.enable(0x0001)
            vm.command(f"outb {PORT_BASES[0] + SCR:#x} 0x5a")
            vm.command(f"outb {PORT_BASES[1] + SCR:#x} 0xa5")
            for byte in b"hi":
                vm.command(f"outb {PORT_BASES[0] + DATA:#x} {byte:#x}")
            scratch = [vm.value(f"inb {base + SCR:#x}") for base in PORT_BASES]
            ready = vm.value(f"inb {PORT_BASES[0] + LSR:#x}") & LSR_DATA_READY
            echoed = bytes(vm.value(f"inb {PORT_BASES[0] + DATA:#x}") for _ in range(2))
        identity = int.from_bytes(seen[0:4], "little")
        # QEMU emulates the command register and the BARs; the rest is the policy's view as it is.
        same = {
            name: seen[start:end] == view[start:end]
            for name, (start, end) in {
                "ids": (0x00, 0x04),
                "class": (0x08, 0x0C),
                "subsystem": (0x2C, 0x30),
                "vendor-data": (0x40, 0x100),
            }.items()
        }
        assert identity == MTTY_IDS and all(same.values()), (hex(identity), same)
        assert inspected["source"].endswith(f"({api})"), (api, inspected["source"])
        assert sizes == [8, 8] and scratch == [0x5A, 0xA5], (sizes, scratch)
        assert ready and echoed == b"hi", (ready, echoed)
        return {
            "source": inspected["source"],
            "ids": hex(identity),
            "same_as_policy": same,
            "bar_sizes": sizes,
            "echoed": echoed.decode(),
        }

    @checked("mdev-migration")
    def _() -> dict[str, object]:
        with (
            daemon(SOURCE, name="source", reset=NO_RESET) as (source_sock, source_log),
            daemon(DESTINATION, name="destination", reset=NO_RESET) as (destination_sock, _),
        ):
            with connect_to(source_sock) as source, connect_to(destination_sock) as destination:
                flags = struct.unpack_from("=Q", source.migration_flags().payload, 8)[0]
                assert source.region_write(7, 0x04, IO_ENABLE).ok
                for byte in b"moved":
                    source.region_write(0, DATA, bytes([byte]))
                source.region_write(0, SCR, b"\x5a")
                source.region_write(1, SCR, b"\xa5")
                source.region_write(1, IER, b"\x05")

                assert source.set_migration_state(MigState.PRE_COPY).ok
                early = source.mig_data_read(4096).payload[8:]
                running_read = source.region_read(0, SCR, 1).ok  # PRE_COPY: the device still runs
                assert source.set_migration_state(MigState.STOP_COPY).ok
                stopped_bar = errno_of(source.region_read(0, SCR, 1))
                stopped_config = source.region_read(7, 0, 4)
                back_to_pre_copy = errno_of(source.set_migration_state(MigState.PRE_COPY))
                stream = early + source.save()

                assert destination.set_migration_state(MigState.RESUMING).ok
                destination.resume(stream)
                assert destination.set_migration_state(MigState.RUNNING).ok
                destination.region_write(7, 0x04, IO_ENABLE)
                scratch = [register(destination, 0, SCR), register(destination, 1, SCR)]
                interrupts = register(destination, 1, IER)
                fifo = bytes(register(destination, 0, DATA) for _ in range(5))
                destination_state = destination.migration_state()

                # The source, saved, resumes a state whose device bytes are corrupt: mtty's refusal.
                kind, length = FRAME.unpack_from(stream)
                corrupt = bytearray(stream)
                corrupt[FRAME.size + length + FRAME.size] ^= 0xFF  # mtty's magic, in the first device frame
                assert source.set_migration_state(MigState.RESUMING).ok
                bad_magic = errno_of(source.mig_data_write(bytes(corrupt)))
            # mtty has no reset method: a device left halfway through a resume cannot be brought back
            # to RUNNING, so the daemon keeps it from the next tenant.
            deadline = time.monotonic() + 30
            while not any("quarantine" in line for line in source_log) and time.monotonic() < deadline:
                time.sleep(0.2)
            quarantined = [line for line in source_log if "quarantine" in line]
        assert flags == MTTY_FLAGS and kind == HEADER, (flags, kind)
        assert running_read and stopped_bar == "EBUSY" and stopped_config.ok, (running_read, stopped_bar)
        assert int.from_bytes(stopped_config.payload[16:20], "little") == MTTY_IDS
        assert back_to_pre_copy == "EINVAL" and bad_magic == "EFAULT", (back_to_pre_copy, bad_magic)
        assert scratch == [0x5A, 0xA5] and interrupts == 0x05 and fifo == b"moved", (
            scratch,
            interrupts,
            fifo,
        )
        assert destination_state == MigState.RUNNING, destination_state
        assert quarantined, source_log[-5:]
        return {
            "flags": flags,
            "pre_copy_bytes": len(early),
            "stream_bytes": len(stream),
            "stop_copy": {"bar": stopped_bar, "config": "ok"},
            "refused": {"STOP_COPY->PRE_COPY": back_to_pre_copy, "corrupt device state": bad_magic},
            "destination": {"scratch": scratch, "ier": interrupts, "fifo": fifo.decode()},
            "left_halfway": quarantined[0][-300:],
        }


if __name__ == "__main__":
    main()
    report("done", ok=True)
