#!/usr/bin/env python3
"""16 devices in one `vfio-mediator serve` under 16 concurrent clients, against 16 socket floors.

One `serve --config` daemon serves 16 simulated GPUs with the C fast path,
another the same 16 with ``fast_path = false`` (every request in Python);
both start once and serve every round. A round runs, in an order that
rotates from round to round so that the machine's noise hits all three:

- the floor: 16 concurrent pingpong.c pairs (a C request/reply over an
  AF_UNIX stream socket, the sizes of a 4-byte REGION_READ);
- 16 concurrent vfu-rtt.c clients (a C vfio-user client), one per device of
  the fast-path daemon, each N 4-byte config reads;
- the same against the pure-Python daemon;
- the same against vfu-echo.c, a C vfio-user server that does nothing (one
  thread per socket): what any server can reach with this client, whose
  three syscalls per request to pingpong's two cost on their own.

Nothing is pinned. Aggregate requests/s is the sum of every client's N over
the wall time from starting the first client until the last one ends (the
same for the floor); fairness is the slowest client's p50 over the fastest
one's (pingpong.c prints only its mean round trip, so the floor's spread is
of means). The script prints every round, then the medians of the per-round
figures and ratios.

It also prints each daemon's RSS (VmRSS of its Python process) with its
devices idle before any client connects, the largest sampled while 16
clients are connected, and idle again after the last round.

    bench/scale.py [--rounds 3] [--requests 20000] [--devices 16] [--profile h100-sxm5]

Exit status 0; the judgement is the printed figures (targets for the fast
path: aggregate >= 0.8x the floor's, slowest/fastest p50 <= 2, RSS under
load <= 40 MiB + 2 MiB per device).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory

from tools import build, number, rss_mib, run_together, start_daemon

DAEMONS = {"fast path": True, "pure Python": False}
FLOOR = "pingpong"
ECHO = "C echo"  # vfu-rtt against vfu-echo.c, a server that does nothing: what the client leaves


@dataclass
class Figures:
    """One side's per-round figures."""

    aggregate: list[float] = field(default_factory=list)  # requests/s
    fastest: list[float] = field(default_factory=list)  # µs, the fastest client's p50 (the floor: mean)
    slowest: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)  # MiB, the largest sample during the round (daemons)


class Sampler:
    """The largest RSS of a process, sampled every few milliseconds while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.largest = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.largest = max(self.largest, rss_mib(self.pid))
            if self._stop.wait(0.02):
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.largest = max(self.largest, rss_mib(self.pid))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20000, help="per client")
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--profile", default="h100-sxm5")
    args = parser.parse_args()
    n, devices = args.requests, args.devices
    sides = [FLOOR, ECHO, *DAEMONS]
    figures = {side: Figures() for side in sides}
    with TemporaryDirectory(prefix="vfio-mediator-bench-") as scratch:
        folder = Path(scratch)
        pingpong, client, echo = build(folder, "pingpong", "vfu-rtt", "vfu-echo")
        (folder / "echo").mkdir()
        echoes = subprocess.Popen([str(echo), str(folder / "echo"), str(devices)])
        daemons = {
            path: start_daemon(folder / f"daemon{i}", args.profile, devices, fast_path=fast)
            for i, (path, fast) in enumerate(DAEMONS.items())
        }
        try:
            time.sleep(1)  # past the start's last allocations
            idle = {path: rss_mib(daemon.pid) for path, daemon in daemons.items()}
            folders = {ECHO: folder / "echo"} | {
                path: folder / f"daemon{i}" for i, path in enumerate(DAEMONS)
            }
            commands = {FLOOR: [[str(pingpong), str(n)]] * devices} | {
                side: [
                    [str(client), str(where / f"gpu{d}.sock"), str(n), "7", "0", "4"] for d in range(devices)
                ]
                for side, where in folders.items()
            }
            for round_number in range(1, args.rounds + 1):
                shift = (round_number - 1) % len(sides)
                for side in sides[shift:] + sides[:shift]:
                    if side in (FLOOR, ECHO):
                        wall, outputs = run_together(commands[side])
                    else:
                        with Sampler(daemons[side].pid) as sampler:
                            wall, outputs = run_together(commands[side])
                        figures[side].rss.append(sampler.largest)
                    # pingpong.c prints no percentiles: its spread is of means
                    pattern = r"mean_us=([\d.]+)" if side == FLOOR else r"p50_us=([\d.]+)"
                    each = [number(pattern, output) for output in outputs]
                    figures[side].aggregate.append(n * devices / wall)
                    figures[side].fastest.append(min(each))
                    figures[side].slowest.append(max(each))
                for side in sides:
                    print(f"round {round_number}: {describe(side, figures, -1)}")
            after = {path: rss_mib(daemon.pid) for path, daemon in daemons.items()}
        finally:
            for process in [echoes, *daemons.values()]:
                process.terminate()
                process.wait(timeout=10)
    summarize(args, figures, idle, after)
    return 0


def summarize(
    args: argparse.Namespace, figures: dict[str, Figures], idle: dict[str, float], after: dict[str, float]
) -> None:
    devices = args.devices
    print(
        f"median over {args.rounds} rounds, {devices} clients of {args.requests} requests each "
        f"(profile {args.profile}, {os.cpu_count()} CPUs):"
    )
    for side in figures:
        print(f"  {describe(side, figures, None)}")
    target = 40 + 2 * devices
    for path in DAEMONS:
        print(
            f"  {path:12} RSS: idle {idle[path]:5.1f} MiB, with {devices} clients (max) "
            f"{max(figures[path].rss):5.1f} MiB, idle after {after[path]:5.1f} MiB"
            f"   (target 40 MiB + 2 MiB per device = {target} MiB)"
        )


def describe(side: str, figures: dict[str, Figures], at: int | None) -> str:
    """A side's figures of round ``at``, or (None) their medians over the rounds; ratios per round."""

    def pick(values: list[float]) -> float:
        return statistics.median(values) if at is None else values[at]

    mine, floor = figures[side], figures[FLOOR]
    spread = pick([s / f for s, f in zip(mine.slowest, mine.fastest, strict=True)])
    text = f"{side:12} {pick(mine.aggregate):8.0f} req/s"
    if side == FLOOR:
        text += " " * 16 + "mean"
    else:
        ratio = pick([d / f for d, f in zip(mine.aggregate, floor.aggregate, strict=True)])
        text += f" ({ratio:4.2f}x floor)  p50 "
    return (
        text + f" fastest {pick(mine.fastest):8.2f} us  slowest {pick(mine.slowest):8.2f} us"
        f"  slowest/fastest {spread:5.2f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
