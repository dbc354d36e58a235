#!/usr/bin/env python3
"""What a flood of trapped accesses on one device costs the other devices of the same daemon.

One `vfio-mediator serve --config` process serves 16 simulated GPUs
(``--devices``). The first, gpu0, is flooded by a hostile client that
pipelines reads of its BAR0 config mirror (0x88000, served by the daemon in
Python and audited, so every one is a trapped access), 64 requests in
flight at a time; the other 15 are idle but probed: each round runs 15
concurrent vfu-rtt.c clients (a C vfio-user client), one per device, each
reading config space, twice: with no flood (idle), then during the flood.
Each phase's figure is the median of the probes' p50s; the flood's rate
while they ran prints beside it (what the flood got). Two daemons run side
by side, one with the C fast path (the default) and one with
``fast_path = false`` (every request in Python), and each round measures
both; rounds alternate idle and flooded so that the machine's noise hits
both, and the script prints every round and the medians of the ratio
flooded/idle.

    bench/flood_latency.py [--rounds 5] [--requests 20000] [--devices 16] [--profile h100-sxm5]

Exit status 0; the judgement is the printed ratio (target for the fast
path: flooded/idle p50 <= 1.5). This is a benchmark, not a test: the fault
suite checks only that both devices answer correctly during a flood,
because a ratio of latencies fails whenever the machine is busy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import struct
import tempfile
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as StopEvent
from pathlib import Path

from tools import build, number, run_together, start_daemon

from mediator.vfio_user.wire import HEADER, HEADER_SIZE, Command

MIRROR = 0x88000
IN_FLIGHT = 64
PATHS = {"fast path": True, "pure Python": False}  # fast_path in the config


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise SystemExit("the daemon closed the flood's connection")
        data += chunk
    return data


def flood(path: str, stop: StopEvent, reads: Synchronized[int]) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    capabilities = json.dumps({"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576}})
    version = struct.pack("=HH", 0, 0) + capabilities.encode() + b"\0"
    sock.sendall(HEADER.pack(0, Command.VERSION, HEADER_SIZE + len(version), 0, 0) + version)
    _, _, size, _, _ = HEADER.unpack_from(receive_exactly(sock, HEADER_SIZE))
    receive_exactly(sock, size - HEADER_SIZE)
    read = struct.pack("=QII", MIRROR, 0, 4)
    burst = b"".join(
        HEADER.pack(msg_id, Command.REGION_READ, HEADER_SIZE + len(read), 0, 0) + read
        for msg_id in range(1, IN_FLIGHT + 1)
    )
    reply_size = HEADER_SIZE + len(read) + 4
    while not stop.is_set():
        sock.sendall(burst)
        receive_exactly(sock, reply_size * IN_FLIGHT)
        with reads.get_lock():
            reads.value += IN_FLIGHT
    sock.close()


def probes(client: Path, folder: Path, devices: int, requests: int) -> tuple[float, float]:
    """The median of the p50s of concurrent config-read probes of gpu1 and on, and their wall time."""
    wall, outputs = run_together(
        [[str(client), str(folder / f"gpu{d}.sock"), str(requests), "7", "0", "4"] for d in range(1, devices)]
    )
    return statistics.median(number(r"p50_us=([\d.]+)", output) for output in outputs), wall


def flooded_probes(client: Path, folder: Path, devices: int, requests: int) -> tuple[float, float]:
    """The probes' median p50 during the flood, and the flood's reads/s while they ran."""
    stop, reads = multiprocessing.Event(), multiprocessing.Value("q", 0)
    flooder = multiprocessing.Process(target=flood, args=(str(folder / "gpu0.sock"), stop, reads))
    flooder.start()
    try:
        while reads.value < 10 * IN_FLIGHT:  # the flood is under way before the measurement starts
            if not flooder.is_alive():
                raise SystemExit("the flood ended before it started")
            time.sleep(0.01)
        before = reads.value
        latency, wall = probes(client, folder, devices, requests)
        rate = (reads.value - before) / wall
    finally:
        stop.set()
        flooder.join(30)
    return latency, rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000, help="per probe")
    parser.add_argument("--devices", type=int, default=16, help="gpu0 is flooded, the others probed")
    parser.add_argument("--profile", default="h100-sxm5")
    args = parser.parse_args()
    if args.devices < 2:
        raise SystemExit("--devices: at least 2, one flooded and one probed")
    figures: dict[str, tuple[list[float], list[float], list[float]]] = {path: ([], [], []) for path in PATHS}
    with tempfile.TemporaryDirectory(prefix="vfio-mediator-bench-") as scratch:
        scratch_folder = Path(scratch)
        [client] = build(scratch_folder, "vfu-rtt")
        folders = {path: scratch_folder / f"daemon{i}" for i, path in enumerate(PATHS)}
        daemons = {
            path: start_daemon(folders[path], args.profile, args.devices, fast_path=fast)
            for path, fast in PATHS.items()
        }
        try:
            for round_number in range(1, args.rounds + 1):
                for path in PATHS:
                    idle, _ = probes(client, folders[path], args.devices, args.requests)
                    busy, rate = flooded_probes(client, folders[path], args.devices, args.requests)
                    figures[path][0].append(idle)
                    figures[path][1].append(busy)
                    figures[path][2].append(rate)
                    print(
                        f"round {round_number}: {path:12} idle p50 {idle:8.2f} us   during the flood p50 "
                        f"{busy:8.2f} us (flood {rate:6.0f} reads/s)   flooded/idle {busy / idle:5.2f}"
                    )
        finally:
            for daemon in daemons.values():
                daemon.terminate()
                daemon.wait(timeout=10)
    print(
        f"median over {args.rounds} rounds, {args.devices - 1} probes of {args.requests} requests each "
        f"(profile {args.profile}, {os.cpu_count()} CPUs), of the probes' median p50:"
    )
    for path, (idles, busies, rates) in figures.items():
        ratio = statistics.median(b / i for i, b in zip(idles, busies, strict=True))
        print(
            f"  {path:12} idle p50 {statistics.median(idles):8.2f} us   during the flood p50 "
            f"{statistics.median(busies):8.2f} us (flood {statistics.median(rates):6.0f} reads/s)"
            f"   flooded/idle {ratio:5.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
