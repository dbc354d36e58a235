"""Building simulated devices the way the daemon does, for tests."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mediator.backends.base import IrqCounts
from mediator.backends.profile import Behaviour, Profile, load_profile, shipped_profiles
from mediator.backends.sim import SimBackend
from mediator.backends.space import IommuSpace
from mediator.pci.registers import COMMAND, COMMAND_MASTER
from mediator.quirks.table import QuirkTable
from mediator.vfio_abi import CONFIG_REGION
from mediator.virt.device import VirtualDevice
from mediator.virt.errors import DeviceError
from mediator.virt.plan import DeviceContext

PROFILES = shipped_profiles()
README = Path(__file__).parents[1] / "README.md"
BUILTIN = QuirkTable.load()


def readme_section(title: str) -> str:
    """README.md's ``## title`` section, without its heading: tests hold the README to what it says."""
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def profile(name: str) -> Profile:
    return load_profile(PROFILES[name])


def image_profile(
    image: bytes,
    bar_sizes: Sequence[int] = (0,) * 6,
    rom_size: int = 0,
    behaviours: Sequence[Behaviour] = (),
) -> Profile:
    """A profile around a raw config image, as if loaded from a file."""
    return Profile(
        name="test",
        description="",
        address=None,
        source="test",
        image=bytes(image),
        bar_sizes=tuple(bar_sizes),
        rom_size=rom_size,
        irqs=IrqCounts(0, 0, 0),
        behaviours=tuple(behaviours),
    )


def device(
    source: str | Profile,
    *,
    quirk_files: Sequence[Path] = (),
    builtin: bool = True,
    context: DeviceContext | None = None,
) -> tuple[VirtualDevice, SimBackend]:
    """The virtual device the daemon would serve for a profile, and its simulated hardware."""
    prof = profile(source) if isinstance(source, str) else source
    table = QuirkTable.load(quirk_files, builtin=builtin) if quirk_files or not builtin else BUILTIN
    backend = SimBackend(prof)
    dev = VirtualDevice.open(backend, table, context)
    with contextlib.suppress(DeviceError):  # blocked, as the daemon would leave it
        dev.apply_post_reset_writes()
    return dev, backend


def h100_in(space: IommuSpace) -> VirtualDevice:
    """A simulated H100 in ``space`` (a client's VM) whose guest driver has turned bus mastering on."""
    dev, _ = device("h100-sxm5")
    dev.move_to(space)
    dev.write_region(CONFIG_REGION, COMMAND, COMMAND_MASTER.to_bytes(2, "little"))
    return dev


def write_table(folder: Path, text: str, name: str = "operator.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


class DaemonProcess:
    """`vfio-mediator serve ARGS` in a process, handed over once ``devices`` devices are being served.

    Its log is read all along by a thread (so the pipe never fills) and kept
    as lines; with ``--log-format json`` they can be read as events.
    """

    def __init__(
        self,
        *args: str,
        devices: int = 1,
        timeout: float = 60,
        env: dict[str, str] | None = None,
        sockets: Sequence[tuple[str, socket.socket]] = (),
        journal: bool = False,
    ) -> None:
        """``sockets``: (name, listening socket) passed the way systemd's socket activation does;
        ``journal``: stderr is announced as the journal's stream (JOURNAL_STREAM), as under systemd.
        """
        command = [sys.executable, "-m", "mediator", "serve", *args]
        if sockets:
            fds = ",".join(str(s.fileno()) for _, s in sockets)
            names = ":".join(name for name, _ in sockets)
            command = [
                sys.executable,
                str(Path(__file__).parent / "commands" / "activate.py"),
                fds,
                names,
                *command,
            ]
        read_end, write_end = os.pipe()
        if journal:
            status = os.fstat(write_end)
            env = {**(env or os.environ), "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            env=env,
            pass_fds=[s.fileno() for _, s in sockets],
        )
        os.close(write_end)
        self._stream = os.fdopen(read_end, encoding="utf-8", errors="replace")
        self.lines: list[str] = []
        self.counts: collections.Counter[str] = collections.Counter()  # JSON events by name, as they come
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.wait_for(lambda: sum(1 for line in self.lines if _is_serving(line)) >= devices, timeout)
        except TimeoutError:
            self.process.kill()
            self._reader.join(10)
            raise RuntimeError("serve did not start:\n" + self.log) from None

    def _read(self) -> None:
        for line in self._stream:
            event = _event_name(line)
            with self._changed:
                self.lines.append(line)
                if event:
                    self.counts[event] += 1
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log's events (``name``: only those)."""
        parsed = [
            json.loads(line[line.index("{") :])
            for line in list(self.lines)
            if line.lstrip("<0123456789>").startswith("{")
        ]
        return [e for e in parsed if name is None or e.get("event") == name]

    def wait_for(self, ready: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise TimeoutError("the daemon's log never showed it:\n" + self.log)
                self._changed.wait(min(left, 0.5))

    def wait_for_event(self, name: str, timeout: float = 30, **fields: object) -> dict[str, Any]:
        """The first JSON event ``name`` whose fields include ``fields``."""

        def matching() -> list[dict[str, Any]]:
            return [e for e in self.events(name) if all(e.get(k) == v for k, v in fields.items())]

        self.wait_for(lambda: bool(matching()), timeout)
        return matching()[0]

    def stop(self, signum: int = signal.SIGTERM) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        self.process.wait(20)
        self._reader.join(10)
        return self.log

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()  # SIGTERM: the daemon cleans up as under systemd
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.stop()


def _event_name(line: str) -> str | None:
    start = line.find("{")
    if start < 0:
        return None
    try:
        event = json.loads(line[start:]).get("event")
    except (json.JSONDecodeError, AttributeError):
        return None
    return event if isinstance(event, str) else None


def _is_serving(line: str) -> bool:
    return "event='serving'" in line or '"event": "serving"' in line


class StandIn:
    """An operator command that records its calls and fails when told (``tests/commands/standin.py``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.calls_file = folder / "calls.jsonl"

    def command(self, action: str, *args: str) -> list[str]:
        return [
            sys.executable,
            str(Path(__file__).parent / "commands" / "standin.py"),
            str(self.calls_file),
            action,
            *args,
        ]

    def calls(self) -> list[tuple[str, list[str]]]:
        if not self.calls_file.exists():
            return []
        lines = self.calls_file.read_text(encoding="utf-8").splitlines()
        return [(call["action"], call["args"]) for call in map(json.loads, lines)]

    def fail(self, action: str, message: str = "told to fail") -> None:
        (self.folder / f"fail-{action}").write_text(message, encoding="utf-8")

    def succeed(self, action: str) -> None:
        (self.folder / f"fail-{action}").unlink(missing_ok=True)


def scrape(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(path))
        client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := client.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


def sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{wanted}}} in the metrics")
