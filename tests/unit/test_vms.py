"""Client VMs: identity by pid and start time, and the registry of the devices each holds."""

from __future__ import annotations

import os
from pathlib import Path

from mediator.vms import VmId, Vms, vm_of


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
    assert vms.join(a, "gpu1") == ("gpu1",)
    assert vms.join(a, "gpu0") == ("gpu0", "gpu1")
    assert vms.join(b, "gpu2") == ("gpu2",)  # another VM: its own devices only
    assert vms.leave(a, "gpu1") == ("gpu0",)
    assert vms.leave(a, "gpu0") == ()
    assert vms.leave(a, "gpu0") == ()  # twice is harmless
    assert vms.join(a, "gpu0") == ("gpu0",)  # an emptied VM was forgotten: it starts again empty
    assert vms.leave(b, "gpu2") == ()
