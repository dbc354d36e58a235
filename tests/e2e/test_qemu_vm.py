"""The devices one QEMU holds are one VM: the daemon knows which, and says so (docs/vm-space.md).

One `serve --config` serves three simulated GPUs; one QEMU takes two of them,
a second QEMU the third. The daemon's log and metrics must group the first
two under the first QEMU's pid and the third under the other's, pin the
first QEMU's RAM once for its two devices, and forget a VM once its QEMU
has gone.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.harness import RAM_SIZE, Machine
from tests.e2e.test_qemu_gpu_policy import serve, write_config
from tests.support import sample, scrape


def client_pids(metrics: Path) -> dict[str, float]:
    text = scrape(metrics)
    return {gpu: sample(text, "vfio_mediator_client_pid", device=gpu) for gpu in ("gpu0", "gpu1", "gpu2")}


def test_the_devices_of_one_qemu_are_one_vm_and_another_qemu_is_another(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        [{"name": f"gpu{i}", "profile": "h100-sxm5"} for i in range(3)],
        extra='[metrics]\nsocket = "metrics.sock"\n',
    )
    metrics = tmp_path / "metrics.sock"
    with serve(config, devices=3) as daemon:
        with (
            Machine(tmp_path / "gpu0.sock", behind_root_port=False, more=[tmp_path / "gpu1.sock"]) as first,
            Machine(tmp_path / "gpu2.sock", behind_root_port=False) as second,
        ):
            joined = daemon.wait_for_event("device joins its client's VM", device="gpu1")
            assert joined["vm"] == str(first.process.pid) and joined["devices"] == ["gpu0", "gpu1"]
            alone = daemon.wait_for_event("device joins its client's VM", device="gpu2")
            assert alone["vm"] == str(second.process.pid) and alone["devices"] == ["gpu2"]
            assert client_pids(metrics) == {
                "gpu0": first.process.pid,
                "gpu1": first.process.pid,
                "gpu2": second.process.pid,
            }
            vm = str(first.process.pid)
            deadline = time.monotonic() + 30  # a hang guard: QEMU sends the maps without waiting
            while True:
                text = scrape(metrics)
                each = [
                    sample(text, "vfio_mediator_dma_pinned_bytes", device=gpu) for gpu in ("gpu0", "gpu1")
                ]
                if each[0] == each[1] >= RAM_SIZE // 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert each[0] == each[1] >= RAM_SIZE // 2, daemon.log[
                -6000:
            ]  # both connections mapped the guest's RAM...
            assert sample(text, "vfio_mediator_vm_pinned_bytes", vm=vm) == each[0]  # ...and it is held once
            assert sample(text, "vfio_mediator_vm_devices", vm=vm) == 2
        deadline = time.monotonic() + 30  # a hang guard: the sessions end as the QEMUs go
        while client_pids(metrics) != {"gpu0": 0, "gpu1": 0, "gpu2": 0}:
            assert time.monotonic() < deadline, client_pids(metrics)
            time.sleep(0.1)
        assert "vfio_mediator_vm_" not in scrape(metrics)  # both VMs forgotten
