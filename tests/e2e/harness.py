"""Real QEMU 11.1 against the daemon, driven through qtest (no guest code).

``served`` runs the daemon's ``DeviceServer`` (with its hand-off lifecycle)
on a real UNIX socket in a background thread of the test process (so tests can read its counters and look at the
simulated hardware); ``Machine`` starts QEMU with the vfio-user device and
speaks the qtest protocol to it: config cycles through 0xCF8/0xCFC, the ECAM
window (after programming q35's PCIEXBAR), MMIO, guest memory, interrupts.
QEMU comes from ``scripts/testbed qemu``, which installs it on first use.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mediator.backends.sim import SimBackend
from mediator.daemon import Daemon
from mediator.metrics.series import DeviceMetrics
from mediator.settings import DeviceSpec, Settings
from mediator.unix_listener import bind_unix
from mediator.vfio_user.fast_loop import PUBLISH_DELAY
from mediator.vfio_user.server import ClientRefusal, DeviceServer
from mediator.vfio_user.wire import Command
from mediator.virt.device import VirtualDevice

ROOT = Path(__file__).parents[2]
ECAM_BASE = 0xB000_0000
MMIO32_BASE = 0xC000_0000
MMIO64_BASE = 0x20_0000_0000
RAM_SIZE = 256 << 20


def qemu_binary() -> str:
    result = subprocess.run(
        [str(ROOT / "scripts" / "testbed"), "qemu"], capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise RuntimeError(f"installing QEMU failed:\n{result.stderr}")
    return result.stdout.strip()


class CountingEvents:
    """The device's metrics, and what a test asks of them: requests of the live session, sessions, refusals."""

    def __init__(self, metrics: DeviceMetrics) -> None:
        self.metrics = metrics
        self.counts: collections.Counter[int] = collections.Counter()
        self.sessions = 0
        self.refused = 0

    def request(self, command: int, seconds: float) -> None:
        self.counts[command] += 1
        self.metrics.request(command, seconds)

    def requests(self, command: int, count: int, buckets: Sequence[int], seconds: float) -> None:
        self.counts[command] += count
        self.metrics.requests(command, count, buckets, seconds)

    @property
    def latency_bounds(self) -> tuple[float, ...]:
        return self.metrics.latency_bounds

    def request_failed(self, command: int, errno_value: int) -> None:
        self.metrics.request_failed(command, errno_value)

    def client_connected(self) -> None:
        self.sessions += 1
        self.counts.clear()
        self.metrics.client_connected()

    def client_gone(self) -> None:
        self.metrics.client_gone()

    def client_refused(self, reason: ClientRefusal) -> None:
        self.refused += 1
        self.metrics.client_refused(reason)


@dataclass
class Served:
    server: DeviceServer
    events: CountingEvents
    device: VirtualDevice
    backend: SimBackend
    socket: Path
    _token: trio.lowlevel.TrioToken | None = None
    _scope: trio.CancelScope | None = None
    _thread: threading.Thread | None = None
    errors: list[BaseException] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Requests of the live session, by command name, once the C loop has published its own."""
        time.sleep(2 * PUBLISH_DELAY)
        return {Command(c).name: n for c, n in self.events.counts.items()}


@contextlib.contextmanager
def served(profile_name: str, folder: Path, *, quirk_files: tuple[Path, ...] = ()) -> Iterator[Served]:
    """The daemon serving ``profile_name`` on ``folder``/device.sock until the block ends."""
    path = folder / "device.sock"
    spec = DeviceSpec(
        name=profile_name, socket=str(path), profile=profile_name, quirks=[str(q) for q in quirk_files]
    )
    daemon = Daemon.open(Settings(source="test", devices=(spec,), state_directory=None))
    assert not daemon.failed, daemon.failed
    managed = daemon.managed[0]
    device = managed.device
    backend = device.backend
    assert isinstance(backend, SimBackend)
    listener = bind_unix(path)
    events = CountingEvents(managed.metrics)
    state = Served(DeviceServer(profile_name, managed, events), events, device, backend, path)
    started = threading.Event()

    async def main() -> None:
        state._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            state._scope = scope
            started.set()
            await state.server.serve(listener)

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # surfaced by the test, not lost in the thread
            state.errors.append(e)
            started.set()

    state._thread = threading.Thread(target=run, daemon=True)
    state._thread.start()
    started.wait(10)
    try:
        yield state
    finally:
        if state._token is not None and state._scope is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(state._scope.cancel, trio_token=state._token)
        state._thread.join(20)
        listener.close()
        backend.close()
        if state.errors:
            raise state.errors[0]


class Machine:
    """QEMU in qtest mode with the served device plugged in."""

    def __init__(
        self,
        sock: Path | None,
        *,
        behind_root_port: bool,
        extra: tuple[str, ...] = (),
        host: str | None = None,
        more: Sequence[Path] = (),
        ram: str = f"{RAM_SIZE}",
        patience: float = 30,
    ) -> None:
        """QEMU with the vfio-user device on ``sock``, or with plain vfio-pci on ``host`` (a BDF).

        ``patience``: how long QEMU may take to start and to answer one qtest command (it
        answers none until its devices are realized: a socket-activated daemon starts first).

        ``more`` plugs further vfio-user devices into the root bus at 00:06.0, 00:07.0...
        ``ram`` is the guest's RAM, a memfd backend's ``size`` and options (e.g. ``8G,hugetlb=on``).
        """
        self.folder = Path(tempfile.mkdtemp(prefix="vfio-mediator-qtest-"))
        qtest_path = self.folder / "qtest.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(qtest_path))
        listener.listen(1)
        device: dict[str, object] = (
            {"driver": "vfio-pci", "host": host}
            if host
            else {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": str(sock)}}
        )
        if behind_root_port:
            topology = ["-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=04.0"]
            device |= {"bus": "rp0", "addr": "00.0"}
            self.bdf = (1, 0, 0)
        else:
            topology = []
            device |= {"addr": "05.0"}
            self.bdf = (0, 5, 0)
        self.stderr_path = self.folder / "qemu.stderr"
        self.qmp_path = self.folder / "qmp.sock"
        self.process = subprocess.Popen(
            [
                qemu_binary(),
                *["-machine", "q35,memory-backend=mem", "-global", "q35-pcihost.pci-hole64-size=512G"],
                *["-accel", "qtest", "-qtest-log", "/dev/null", "-display", "none", "-nodefaults"],
                *["-object", f"memory-backend-memfd,id=mem,size={ram},share=on"],
                *["-qtest", f"unix:{qtest_path}", "-qmp", f"unix:{self.qmp_path},server=on,wait=off"],
                *topology,
                *["-device", json.dumps(device)],
                *[
                    arg
                    for i, path in enumerate(more)
                    for arg in (
                        "-device",
                        json.dumps(
                            {
                                "driver": "vfio-user-pci",
                                "socket": {"type": "unix", "path": str(path)},
                                "addr": f"{6 + i:02x}.0",
                            }
                        ),
                    )
                ],
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr_path.open("w"),
        )
        listener.settimeout(patience)
        try:
            self.conn, _ = listener.accept()
        except TimeoutError:
            self.process.kill()
            raise RuntimeError(f"QEMU did not start: {self.stderr()}") from None
        finally:
            listener.close()
        self.conn.settimeout(patience)
        # Commands go out with sendall, not through this file: a write through a
        # "rw" text file drops what it has read ahead, which lost an IRQ line that
        # came in the same read as the OK before it.
        self.reader = self.conn.makefile("r")
        self.irqs: list[tuple[str, int]] = []
        if behind_root_port:
            self._program_root_port()
        self._enable_ecam()

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        self.process.kill()
        self.process.wait(10)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # qtest protocol
    def command(self, line: str) -> str:
        try:
            self.conn.sendall(f"{line}\n".encode())
            return self._answer(line)
        except OSError as e:
            self.process.wait(5)
            raise RuntimeError(f"QEMU went away during {line!r} ({e}): {self.stderr()}") from None

    def _answer(self, line: str) -> str:
        while True:
            reply = self.reader.readline()
            if not reply:
                raise RuntimeError(f"QEMU went away during {line!r}: {self.stderr()}")
            words = reply.split()
            if words and words[0] == "IRQ":
                self.irqs.append((words[1], int(words[2])))
                continue
            if words[0] != "OK":
                raise RuntimeError(f"{line!r} -> {reply.strip()}")
            return words[1] if len(words) > 1 else ""

    def value(self, line: str) -> int:
        return int(self.command(line), 16)

    def qmp(self, command: str, **arguments: object) -> object:
        """One QMP command on a fresh monitor connection; its ``return`` value."""
        with socket.socket(socket.AF_UNIX) as monitor:
            monitor.settimeout(30)
            monitor.connect(str(self.qmp_path))
            stream = monitor.makefile("rw", buffering=1)
            json.loads(stream.readline())  # greeting
            for name, args in (("qmp_capabilities", {}), (command, arguments)):
                stream.write(json.dumps({"execute": name, "arguments": args}) + "\n")
                while True:
                    answer = json.loads(stream.readline())
                    if "return" in answer or "error" in answer:
                        break
                if "error" in answer:
                    raise RuntimeError(f"QMP {name}: {answer['error']}")
            return answer["return"]

    # guest memory
    def read_memory(self, address: int, size: int) -> bytes:
        return bytes.fromhex(self.command(f"read {address:#x} {size}")[2:])

    def write_memory(self, address: int, data: bytes) -> None:
        self.command(f"write {address:#x} {len(data)} 0x{data.hex()}")

    # config space
    def _cf8(self, bdf: tuple[int, int, int], offset: int) -> None:
        bus, dev, fn = bdf
        self.command(f"outl 0xcf8 {0x80000000 | bus << 16 | dev << 11 | fn << 8 | (offset & 0xFC):#x}")

    def cfg_read(self, offset: int, size: int, bdf: tuple[int, int, int] | None = None) -> int:
        self._cf8(bdf or self.bdf, offset)
        op = {1: "inb", 2: "inw", 4: "inl"}[size]
        return self.value(f"{op} {0xCFC + (offset & 3):#x}")

    def cfg_write(self, offset: int, size: int, value: int, bdf: tuple[int, int, int] | None = None) -> None:
        self._cf8(bdf or self.bdf, offset)
        op = {1: "outb", 2: "outw", 4: "outl"}[size]
        self.command(f"{op} {0xCFC + (offset & 3):#x} {value:#x}")

    def _enable_ecam(self) -> None:
        host = (0, 0, 0)
        self.cfg_write(0x64, 4, 0, host)
        self.cfg_write(0x60, 4, ECAM_BASE | 1, host)  # PCIEXBAR: 256 buses, enabled

    def ecam_address(self, offset: int) -> int:
        bus, dev, fn = self.bdf
        return ECAM_BASE | bus << 20 | dev << 15 | fn << 12 | offset

    def config_space(self, size: int) -> bytes:
        """The guest's view: 0xCF8/0xCFC below 0x100, ECAM above."""
        low = b"".join(self.cfg_read(o, 4).to_bytes(4, "little") for o in range(0, min(size, 0x100), 4))
        high = b"".join(
            self.value(f"readl {self.ecam_address(o):#x}").to_bytes(4, "little")
            for o in range(0x100, size, 4)
        )
        return low + high

    def _program_root_port(self) -> None:
        port = (0, 4, 0)
        self.cfg_write(0x18, 4, 0x00010100, port)  # primary 0, secondary 1, subordinate 1
        self.cfg_write(0x20, 4, (((MMIO32_BASE + 0x1FF00000) >> 16) << 16) | (MMIO32_BASE >> 16), port)
        self.cfg_write(0x24, 4, 0xFFF00000 | 0x0000, port)  # prefetchable window, 64-bit ...
        self.cfg_write(0x28, 4, MMIO64_BASE >> 32, port)  # ... from MMIO64_BASE
        self.cfg_write(0x2C, 4, (MMIO64_BASE >> 32) + 0x3F, port)  # ... up to MMIO64_BASE + 256 GiB
        self.cfg_write(0x04, 2, 0x0006, port)

    # BARs
    def size_bar(self, index: int) -> int:
        """The guest's BAR sizing: write all-ones, read back, restore."""
        offset = 0x10 + 4 * index
        original = self.cfg_read(offset, 4)
        self.cfg_write(offset, 4, 0xFFFFFFFF)
        low = self.cfg_read(offset, 4)
        self.cfg_write(offset, 4, original)
        if low & 1:
            return (~(low & 0xFFFFFFFC) + 1) & 0xFFFF
        if low & 0x4:
            self.cfg_write(offset + 4, 4, 0xFFFFFFFF)
            high = self.cfg_read(offset + 4, 4)
            self.cfg_write(offset + 4, 4, 0)
            mask = high << 32 | (low & 0xFFFFFFF0)
            return (~mask + 1) & ((1 << 64) - 1)
        return (~(low & 0xFFFFFFF0) + 1) & 0xFFFFFFFF

    def map_bar(self, index: int, address: int, bdf: tuple[int, int, int] | None = None) -> None:
        offset = 0x10 + 4 * index
        self.cfg_write(offset, 4, address & 0xFFFFFFFF, bdf)
        if self.cfg_read(offset, 4, bdf) & 0x4:
            self.cfg_write(offset + 4, 4, address >> 32, bdf)

    def enable(self, command: int = 0x0006, bdf: tuple[int, int, int] | None = None) -> None:
        self.cfg_write(0x04, 2, command, bdf)
