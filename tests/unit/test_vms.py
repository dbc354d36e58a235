"""Client VMs: identity by pid and start time, and the registry of the devices each holds."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from mediator.backends.dma import DmaTable, release
from mediator.vms import VmFigures, VmId, Vms, vm_of


def fake_proc(root: Path, pid: int, command: str, started: int) -> Path:
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    fields = ["S", "1", *(["0"] * 17), str(started), "0"]  # fields 3..23; field 22 is the start time
    (root / str(pid) / "stat").write_text(f"{pid} ({command}) {' '.join(fields)}\n")
    return root


def test_a_vm_is_its_pid_and_start_time_even_with_a_command_full_of_parentheses(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 4242, "qemu (x) ) y", 987654)
    assert vm_of(4242, proc) == VmId(4242, 987654)


def test_a_reused_pid_is_another_vm(tmp_path: Path) -> None:
    before = vm_of(4242, fake_proc(tmp_path, 4242, "qemu", 100))
    after = vm_of(4242, fake_proc(tmp_path, 4242, "qemu", 200))
    assert before != after and str(before) == str(after) == "4242"


def test_this_process_has_a_start_time_and_a_gone_one_has_none(tmp_path: Path) -> None:
    assert vm_of(os.getpid()).started > 0
    assert vm_of(4242, tmp_path) == VmId(4242, 0)


def test_devices_join_and_leave_their_vm_and_an_empty_vm_is_forgotten() -> None:
    vms, a, b = Vms(), VmId(1, 10), VmId(2, 20)
    space, held = vms.join(a, "gpu1")
    assert held == ("gpu1",)
    assert vms.join(a, "gpu0") == (space, ("gpu0", "gpu1"))  # one space for the VM's devices
    other, held = vms.join(b, "gpu2")
    assert held == ("gpu2",) and other is not space  # another VM: its own devices and space
    assert vms.leave(a, "gpu1") == ("gpu0",)
    assert vms.leave(a, "gpu0") == ()
    assert vms.leave(a, "gpu0") == ()  # twice is harmless
    again, held = vms.join(a, "gpu0")
    assert held == ("gpu0",) and again is not space  # an emptied VM was forgotten: it starts again empty
    assert vms.leave(b, "gpu2") == ()


def test_the_last_device_to_leave_tears_the_vms_space_down() -> None:
    vms, vm = Vms(), VmId(1, 10)
    space, _ = vms.join(vm, "gpu0")
    vms.join(vm, "gpu1")
    closed: list[str] = []
    space.close = lambda: closed.append(space.name)  # type: ignore[method-assign]
    vms.leave(vm, "gpu0")
    assert closed == []
    vms.leave(vm, "gpu1")
    assert closed == [space.name]


class Reported:
    def __init__(self) -> None:
        self.vms: dict[str, tuple[int, int, int]] = {}

    def vm_changed(self, vm: str, space: VmFigures) -> None:
        assert space.peer_mappings == space.pending_bytes == 0  # no BARs here, nothing to pin
        self.vms[vm] = (space.devices, space.mappings, space.pinned_bytes)

    def vm_gone(self, vm: str) -> None:
        del self.vms[vm]


def test_a_vms_devices_and_pinned_memory_are_reported_until_it_goes() -> None:
    reported, vm = Reported(), VmId(7, 70)
    vms = Vms(reported)
    space, _ = vms.join(vm, "gpu0")
    vms.join(vm, "gpu1")
    ram = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, 1 << 20)
    try:
        mappings = [DmaTable().prepare(0, 1 << 20, 3, ram, 0) for _ in ("gpu0", "gpu1")]
        for mapping in mappings:
            space.acquire(mapping)
        assert reported.vms == {"7": (2, 1, 1 << 20)}  # two devices, one mapping, pinned once
        space.release(mappings[:1])
        vms.leave(vm, "gpu0")
        assert reported.vms == {"7": (1, 1, 1 << 20)}
        space.release(mappings[1:])
        assert reported.vms == {"7": (1, 0, 0)}
        vms.leave(vm, "gpu1")
        assert reported.vms == {}
    finally:
        release(mappings)
        os.close(ram)


class SlowReport(Reported):
    """A report from the thread named ``late`` stalls until told to go on, as a busy pinner's may."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled, self.go_on = threading.Event(), threading.Event()

    def vm_changed(self, vm: str, space: VmFigures) -> None:
        if threading.current_thread().name == "late":
            self.stalled.set()
            self.go_on.wait(10)
        super().vm_changed(vm, space)


def test_a_report_computed_before_the_vm_goes_does_not_bring_it_back() -> None:
    reported, vm = SlowReport(), VmId(7, 70)
    vms = Vms(reported)
    space, _ = vms.join(vm, "gpu0")
    late = threading.Thread(target=space.refresh, name="late")  # a change: the space reports it
    late.start()
    assert reported.stalled.wait(10)
    leaving = threading.Thread(target=vms.leave, args=(vm, "gpu0"))
    leaving.start()
    leaving.join(0.2)  # the VM goes while the report is still on its way
    reported.go_on.set()
    late.join(10)
    leaving.join(10)
    assert reported.vms == {}  # the VM is gone from the metrics for good
