"""The devices one QEMU holds are one VM: the daemon knows which, and says so (docs/vm-space.md).

One `serve --config` serves three simulated GPUs; one QEMU takes two of them,
a second QEMU the third. The daemon's log and metrics must group the first
two under the first QEMU's pid and the third under the other's, and forget
a VM once its QEMU has gone.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.e2e.harness import Machine
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
        deadline = time.monotonic() + 30  # a hang guard: the sessions end as the QEMUs go
        while client_pids(metrics) != {"gpu0": 0, "gpu1": 0, "gpu2": 0}:
            assert time.monotonic() < deadline, client_pids(metrics)
            time.sleep(0.1)
