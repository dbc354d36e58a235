#!/usr/bin/env python3
"""What a flood of trapped accesses on one device costs another device of the same daemon.

One `vfio-mediator serve --config` process serves two simulated GPUs. Each
round measures the second GPU's config-read latency with vfu-rtt.c (a C
vfio-user client) twice: idle, then while a hostile client floods the first
GPU with reads of its BAR0 config mirror (0x88000, served by the daemon, so
every one is a trapped access), 64 requests in flight at a time. Rounds
alternate idle and flooded so that the machine's noise hits both; the script
prints every round and the medians of the ratio flooded/idle.

    bench/flood_latency.py [--rounds 5] [--requests 20000] [--profile h100-sxm5]

Exit status 0; the judgement is the printed ratio (target: p50 under 2x idle).
This is a benchmark, not a test: the fault suite checks only that both
devices answer correctly during a flood, because a ratio of latencies fails
whenever the machine is busy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as StopEvent
from pathlib import Path

from tools import build, number

from mediator.vfio_user.wire import HEADER, HEADER_SIZE, Command

MIRROR = 0x88000
IN_FLIGHT = 64


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


def p50(client: Path, sock: Path, requests: int) -> float:
    served = subprocess.run(
        [str(client), str(sock), str(requests), "7", "0", "4"], capture_output=True, text=True, check=True
    )
    return number(r"p50_us=([\d.]+)", served.stdout)


def flooded_p50(client: Path, folder: Path, requests: int) -> tuple[float, int]:
    stop, reads = multiprocessing.Event(), multiprocessing.Value("q", 0)
    flooder = multiprocessing.Process(target=flood, args=(str(folder / "gpu0.sock"), stop, reads))
    flooder.start()
    try:
        while reads.value < 10 * IN_FLIGHT:  # the flood is under way before the measurement starts
            if not flooder.is_alive():
                raise SystemExit("the flood ended before it started")
            time.sleep(0.01)
        latency = p50(client, folder / "gpu1.sock", requests)
    finally:
        stop.set()
        flooder.join(30)
    return latency, reads.value


def start_daemon(folder: Path, profile: str) -> subprocess.Popen[bytes]:
    lines = [f'state_directory = "{folder / "state"}"']
    for i in range(2):
        lines += [
            "[[device]]",
            f'name = "gpu{i}"',
            f'profile = "{profile}"',
            f'socket = "{folder}/gpu{i}.sock"',
        ]
    (folder / "config.toml").write_text("\n".join(lines) + "\n")
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mediator",
            "serve",
            "--config",
            str(folder / "config.toml"),
            "--log-level",
            "warning",
        ]
    )
    deadline = time.monotonic() + 20
    while not all((folder / f"gpu{i}.sock").exists() for i in range(2)):
        if time.monotonic() > deadline or daemon.poll() is not None:
            daemon.kill()
            raise SystemExit("the daemon did not create its sockets")
        time.sleep(0.05)
    return daemon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", default="h100-sxm5")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vfio-mediator-bench-") as scratch:
        folder = Path(scratch)
        [client] = build(folder, "vfu-rtt")
        daemon = start_daemon(folder, args.profile)
        ratios = []
        try:
            for round_number in range(1, args.rounds + 1):
                idle = p50(client, folder / "gpu1.sock", args.requests)
                busy, reads = flooded_p50(client, folder, args.requests)
                ratios.append(busy / idle)
                print(
                    f"round {round_number}: idle p50 {idle:6.2f} us   during the flood p50 {busy:6.2f} us"
                    f" ({reads} flood reads)   flooded/idle {ratios[-1]:.2f}"
                )
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)
    print(
        f"median over {args.rounds} rounds of {args.requests} requests (profile {args.profile}, "
        f"{os.cpu_count()} CPUs): flooded/idle p50 {statistics.median(ratios):.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
