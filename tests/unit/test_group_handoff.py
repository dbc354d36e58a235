"""The functions of one IOMMU group are handed off together: no reset hits a group-mate under its client.

Two simulated functions stand for one group (the simulator has no groups of
its own; the real one is proven in the real-VFIO guest, where a bus reset
covers both). One VM holds both; the first to leave is handed off without a
reset, the last one resets, and then the first gets the reset it waited for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mediator.backends.sim import SimBackend
from mediator.daemon import Daemon
from mediator.settings import load_settings
from mediator.vfio_user.server import Peer

CONFIG = """
state_directory = "state"
[handoff]
reset = "function"
[[device]]
name = "fn0"
profile = "h100-sxm5"
socket = "fn0.sock"
[[device]]
name = "fn1"
profile = "h100-sxm5"
socket = "fn1.sock"
"""


def reset_steps(daemon_dir: Path, device: str) -> list[tuple[str, str]]:
    """(reason, what the reset step did) of each of the device's hand-off records, in order."""
    records = sorted((daemon_dir / "state" / "handoffs" / device).glob("*.json"))
    found = []
    for path in records:
        record = json.loads(path.read_text())
        step = next(s for s in record["steps"] if s["name"] == "reset")
        found.append((record["reason"], step["detail"]))
    return found


def test_the_first_function_of_a_group_to_leave_waits_for_the_last_ones_reset(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(CONFIG)
    daemon = Daemon.open(load_settings(tmp_path / "config.toml"))
    fn0, fn1 = daemon.managed
    hardware = [m.device.backend for m in daemon.managed if isinstance(m.device.backend, SimBackend)]
    assert len(hardware) == 2
    for h in hardware:
        h.iommu_group = 7  # one group, as a GPU and its audio function
    before = [h.resets for h in hardware]
    vm = Peer(os.getpid(), os.getuid(), frozenset({os.getgid()}))
    for managed in (fn0, fn1):
        _device, refusal = managed.admit(vm)
        assert refusal is None
    fn0.client_gone(requests=1)
    assert [h.resets for h in hardware] == before  # nothing reset under fn1's client
    fn1.client_gone(requests=1)
    assert [h.resets for h in hardware] == [n + 1 for n in before]  # one each, fn0's after fn1's
    said = reset_steps(tmp_path, "fn0")[-2:]
    assert (
        said[0][0] == "client gone" and "fn1, of its IOMMU group, is still in its client's VM" in said[0][1]
    )
    assert said[1] == ("its IOMMU group was handed off", "function reset")
    assert reset_steps(tmp_path, "fn1")[-1] == ("client gone", "function reset")
    daemon.close()


def test_a_mate_whose_client_has_gone_but_is_not_home_yet_still_holds_the_groups_reset(
    tmp_path: Path,
) -> None:
    # Two clients of one group going at once: the second's hand-off may not have taken it out of
    # the VM when the first decides; resetting then would reset it inside the VM.
    (tmp_path / "config.toml").write_text(CONFIG)
    daemon = Daemon.open(load_settings(tmp_path / "config.toml"))
    fn0, fn1 = daemon.managed
    hardware = [m.device.backend for m in daemon.managed if isinstance(m.device.backend, SimBackend)]
    for h in hardware:
        h.iommu_group = 7
    before = [h.resets for h in hardware]
    vm = Peer(os.getpid(), os.getuid(), frozenset({os.getgid()}))
    for managed in (fn0, fn1):
        assert managed.admit(vm)[1] is None
    held, fn1._vm = fn1._vm, None  # what fn1's client_gone does first, before its hand-off
    assert fn1.in_vm
    fn0.client_gone(requests=1)
    assert [h.resets for h in hardware] == before  # fn0 waited for fn1, still in the VM
    fn1._vm = held
    fn1.client_gone(requests=1)
    assert [h.resets for h in hardware] == [n + 1 for n in before]
    daemon.close()
