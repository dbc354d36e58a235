#!/usr/bin/env python3
"""Latency of a 4-byte config REGION_READ against `vfio-mediator serve`, as a ratio to the floor.

The floor is pingpong.c: a C request/reply over an AF_UNIX stream socket with
the same message sizes. The client is vfu-rtt.c, a C vfio-user client. Both,
and the daemon, are pinned to one CPU (taskset -c CPU), the way a vCPU thread
and the daemon share a core. Rounds alternate floor and daemon so that the
machine's noise hits both; the script prints every round and the medians.

    bench/config_read_latency.py [--rounds 5] [--requests 20000] [--profile h100-sxm5] [--cpu 0]

Two daemons run side by side, one with the C fast path (the default) and one
with ``--no-fast-path``, and vfu-echo.c, a C vfio-user server that does
nothing: what any server can reach with this client. Each round measures all
three.

Exit status 0; the judgement is the printed ratios (targets for the fast
path: p50 <= 1.15x floor, p99 <= 2x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tools import await_sockets, build, number

# The servers measured, by name: the daemon's two paths, and vfu-echo.c (a C vfio-user server
# that does nothing), which says what any server measured this way can reach.
PATHS: dict[str, list[str] | None] = {"fast path": [], "pure Python": ["--no-fast-path"], "C echo": None}


def start_server(
    pin: list[str], profile: str, folder: Path, flags: list[str] | None, echo: Path
) -> subprocess.Popen[bytes]:
    """The daemon with ``flags`` (None: vfu-echo) on ``folder``/gpu0.sock."""
    sock = folder / "gpu0.sock"
    folder.mkdir()
    if flags is not None:
        command = [sys.executable, "-m", "mediator", "serve", "--profile", profile, "--socket", str(sock)]
        server = subprocess.Popen([*pin, *command, *flags, "--log-level", "warning"])
    else:
        server = subprocess.Popen([*pin, str(echo), str(folder), "1"])
    return await_sockets(server, [sock], 10, "the daemon" if flags is not None else "vfu-echo")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", default="h100-sxm5")
    parser.add_argument("--cpu", default="0")
    parser.add_argument(
        "--offset", default="0", help="config offset to read (default 0: vendor and device ID)"
    )
    args = parser.parse_args()
    if not shutil.which("taskset") or not shutil.which("gcc"):
        raise SystemExit("needs taskset (util-linux) and gcc")
    pin = ["taskset", "-c", args.cpu]
    floors: list[float] = []
    figures: dict[str, tuple[list[float], list[float]]] = {path: ([], []) for path in PATHS}
    with tempfile.TemporaryDirectory(prefix="vfio-mediator-bench-") as scratch:
        tools = Path(scratch)
        pingpong, client, echo = build(tools, "pingpong", "vfu-rtt", "vfu-echo")
        daemons = {
            path: start_server(pin, args.profile, tools / str(i), flags, echo)
            for i, (path, flags) in enumerate(PATHS.items())
        }
        try:
            for round_number in range(1, args.rounds + 1):
                pingponged = subprocess.run(
                    [*pin, str(pingpong), str(args.requests)], capture_output=True, text=True, check=True
                )
                floors.append(number(r"mean_us=([\d.]+)", pingponged.stdout))
                line = f"round {round_number}: floor {floors[-1]:6.2f} us"
                for i, path in enumerate(PATHS):
                    served = subprocess.run(
                        [
                            *pin,
                            str(client),
                            str(tools / str(i) / "gpu0.sock"),
                            str(args.requests),
                            "7",
                            args.offset,
                            "4",
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    p50s, p99s = figures[path]
                    p50s.append(number(r"p50_us=([\d.]+)", served.stdout))
                    p99s.append(number(r"p99_us=([\d.]+)", served.stdout))
                    line += f"   {path}: p50 {p50s[-1]:6.2f} us p99 {p99s[-1]:6.2f} us"
                print(line)
        finally:
            for daemon in daemons.values():
                daemon.terminate()
                daemon.wait(timeout=10)
    floor = statistics.median(floors)
    print(
        f"median over {args.rounds} rounds of {args.requests} requests "
        f"(profile {args.profile}, CPU {args.cpu}, {os.cpu_count()} CPUs): floor {floor:.2f} us"
    )
    for path, (p50s, p99s) in figures.items():
        p50, p99 = statistics.median(p50s), statistics.median(p99s)
        print(
            f"  {path:12} p50 {p50:6.2f} us  p99 {p99:6.2f} us  "
            f"p50/floor {p50 / floor:.2f}  p99/floor {p99 / floor:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
