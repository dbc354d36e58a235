"""What the benchmarks share: the C clients they build and the figures they print."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def build(folder: Path, *names: str) -> list[Path]:
    """Compile bench/NAME.c for each name into ``folder``; the binaries, in order."""
    binaries = []
    for name in names:
        binary = folder / name
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(binary), str(HERE / f"{name}.c")], check=True)
        binaries.append(binary)
    return binaries


def number(pattern: str, text: str) -> float:
    """The figure ``pattern``'s group captures in a client's output."""
    found = re.search(pattern, text)
    if not found:
        raise SystemExit(f"unexpected output: {text!r}")
    return float(found.group(1))


def start_daemon(
    folder: Path, profile: str, devices: int, *, fast_path: bool = True
) -> subprocess.Popen[bytes]:
    """One ``vfio-mediator serve --config`` of simulated devices gpu0.. with their sockets in ``folder``.

    Launched with this interpreter directly, so the Popen's pid is the daemon's
    Python process (what ``rss_mib`` reads). ``fast_path=False`` writes
    ``fast_path = false`` into the config: every request answered in Python.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = [] if fast_path else ["fast_path = false"]
    lines.append(f'state_directory = "{folder / "state"}"')
    for i in range(devices):
        lines += [
            "[[device]]",
            f'name = "gpu{i}"',
            f'profile = "{profile}"',
            f'socket = "{folder}/gpu{i}.sock"',
        ]
    (folder / "config.toml").write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "mediator", "serve", "--config", str(folder / "config.toml")]
    daemon = subprocess.Popen([*command, "--log-level", "warning"])
    sockets = [folder / f"gpu{i}.sock" for i in range(devices)]
    return await_sockets(daemon, sockets, 10 + 2 * devices, "the daemon")


def await_sockets(
    server: subprocess.Popen[bytes], sockets: list[Path], seconds: float, who: str
) -> subprocess.Popen[bytes]:
    """``server`` once all of ``sockets`` exist; killed, and the script ends, if it never makes them."""
    deadline = time.monotonic() + seconds
    while not all(sock.exists() for sock in sockets):
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit(f"{who} did not create its sockets")
        time.sleep(0.05)
    return server


def run_together(commands: list[list[str]]) -> tuple[float, list[str]]:
    """Start every command at once; the wall time from the first start to the last end, and each stdout."""
    start = time.monotonic()
    clients = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for command in commands]
    outputs = [client.communicate()[0] for client in clients]
    wall = time.monotonic() - start
    for command, client in zip(commands, clients, strict=True):
        if client.returncode:
            raise SystemExit(f"{command} exited {client.returncode}")
    return wall, outputs


def rss_mib(pid: int) -> float:
    """The resident set of process ``pid`` (VmRSS in /proc/PID/status), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmRSS for process {pid}")


def guest_figures(output: str) -> list[dict[str, Any]]:
    """The ``FIGURE {...}`` lines a guest half printed, which must end with ``{"case": "done"}``."""
    figures = [
        json.loads(line[len("FIGURE ") :]) for line in output.splitlines() if line.startswith("FIGURE ")
    ]
    if not figures or figures[-1].get("case") != "done":
        raise SystemExit(f"the guest did not finish:\n{output[-3000:]}")
    return figures
