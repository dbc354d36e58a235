"""The guest half of ``bench/vm_dma_map.py``: runs INSIDE the real-VFIO TCG guest.

One ``serve --config`` serves four edu functions bound to vfio-pci; this
process is the client, so its connections are one VM. For 1, 2 and 4
devices it maps the same memfd through each device, at the same IOVA (the
VM's space pins it once and the other devices join) and at an IOVA per
device (pinned again by each, which is what a container per device cost),
and prints one ``FIGURE {...}`` line per case with the seconds from the
first DMA_MAP until the VM's memory is pinned (the daemon pins in the
background; its metrics say when nothing is pending). The floor is an
fd-less DMA_MAP round trip (nothing to pin), measured in the same run.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from tests.guest.vfio_guest import bind_to_vfio, connect, edu_config, find_all
from tests.support import DaemonProcess, sample, scrape

SIZE = 64 << 20
IOVA = 0x10000000


def figure(**fields: object) -> None:
    print("FIGURE " + json.dumps(fields), flush=True)


def main() -> None:
    edus = find_all("edu")[:4]
    for bdf in edus:
        bind_to_vfio(bdf)
    config, sockets = edu_config("bench", edus)
    metrics = config.parent / "metrics.sock"
    config.write_text(config.read_text() + f'[metrics]\nsocket = "{metrics}"\n')
    vm = str(os.getpid())
    memory = os.memfd_create("guest-ram")
    os.ftruncate(memory, SIZE)
    os.pwrite(
        memory, bytes(SIZE), 0
    )  # the pages exist before the first case: every case pins, none faults in
    with DaemonProcess(
        "--config", str(config), "--log-format", "json", devices=len(edus), timeout=300
    ) as served:
        handoffs = served.counts["hand-off"]
        probe = connect(sockets[0])
        trips = []
        for n in range(20):
            started = time.perf_counter()
            assert probe.dma_map(0xF0000000 + n * 0x1000, 0x1000).ok
            trips.append(time.perf_counter() - started)
        probe.client.close()
        figure(case="floor", seconds=statistics.median(trips))
        handoffs += 1
        for devices in (1, 2, 4):
            for shared in (True, False):
                served.wait_for(lambda: served.counts["hand-off"] >= handoffs, 120)  # noqa: B023
                clients = [connect(sock) for sock in sockets[:devices]]
                started = time.perf_counter()
                for n, client in enumerate(clients):
                    assert client.dma_map(IOVA if shared else IOVA + n * SIZE, SIZE, memory).ok
                while sample(scrape(metrics), "vfio_mediator_vm_pin_pending_bytes", vm=vm):
                    time.sleep(0.001)
                figure(devices=devices, shared=shared, seconds=time.perf_counter() - started)
                for client in clients:
                    client.client.close()
                handoffs += devices
    os.close(memory)
    figure(case="done")


if __name__ == "__main__":
    main()
