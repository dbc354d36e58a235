"""Faults against the whole daemon: hostile or broken clients, misbehaving hardware, signals.

Each test runs `vfio-mediator serve --config` in a process with two or more
devices, does something a client or a device should not do, and checks
what an operator would notice: every device keeps serving, nothing leaks
(fds, memory, DMA mappings), the errors are replies, and the one device at
fault is blocked and handed off. The simulated hardware misbehaves through
a profile's ``[faults]`` table.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mediator.vfio_user.wire import HEADER, Command
from mediator.virt.reset import DEFAULT_CLIENT_TIMEOUT, reply_deadline
from tests.protocol.client import Client
from tests.support import DaemonProcess, sample, scrape

PROFILES = Path(__file__).parents[2] / "mediator" / "profiles"
CONFIG_REGION = 7
MIRROR = 0x88000  # BAR0 window the daemon serves itself (a trapped access)


def faulty_profile(folder: Path, faults: str) -> Path:
    """The shipped H100 profile with a ``[faults]`` table."""
    text = (PROFILES / "h100-sxm5.toml").read_text().replace('file = "', f'file = "{PROFILES}/')
    path = folder / "faulty.toml"
    path.write_text(f"{text}\n[faults]\n{faults}\n")
    return path


def start(folder: Path, *profiles: str, extra: str = "", top: str = "") -> DaemonProcess:
    """``top``: top-level keys of the config; ``extra``: tables after the devices."""
    lines = ['state_directory = "state"', top, "[metrics]", 'socket = "metrics.sock"']
    for i, profile in enumerate(profiles):
        lines += ["[[device]]", f'name = "gpu{i}"', f'profile = "{profile}"', f'socket = "gpu{i}.sock"']
    (folder / "config.toml").write_text("\n".join(lines) + "\n" + extra)
    return DaemonProcess(
        "--config", str(folder / "config.toml"), "--log-format", "json", devices=len(profiles)
    )


def raw(path: Path) -> socket.socket:
    """A connected socket; like any client, it tries again while the daemon's backlog is full."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            assert time.monotonic() < deadline, "the daemon stopped accepting"
            time.sleep(0.001)
            continue
        return sock


@contextmanager
def client(path: Path) -> Iterator[Client]:
    session = Client(raw(path))
    assert session.version().ok
    try:
        yield session
    finally:
        session.client.close()


def fds(daemon: DaemonProcess) -> int:
    return len(os.listdir(f"/proc/{daemon.process.pid}/fd"))


def rss_kib(daemon: DaemonProcess) -> int:
    for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextmanager
def turn(folder: Path, device: str = "gpu0") -> Iterator[Client]:
    """A served session of ``device`` once every earlier connection has ended and been released.

    Sessions take turns: accept is in order and each session, hand-off
    included, ends before the next is admitted. So once this one's VERSION
    is answered, the daemon has finished with all the ones before it.
    """
    while True:
        session = Client(raw(folder / f"{device}.sock"))
        try:
            if session.version().ok:
                break
        except ConnectionError:  # refused: another one is still waiting its turn
            pass
        session.client.close()
        time.sleep(0.05)
    try:
        yield session
    finally:
        session.client.close()


def test_disconnects_mid_message_leak_nothing_and_the_device_keeps_serving(tmp_path: Path) -> None:
    with start(tmp_path, "h100-sxm5", "h100-sxm5") as daemon:
        with turn(tmp_path):
            baseline = fds(daemon)
        memory = os.memfd_create("guest-ram")
        os.ftruncate(memory, 1 << 20)
        eventfds = [os.eventfd(0) for _ in range(4)]
        cuts = {
            "header": HEADER.pack(9, Command.REGION_READ, 32, 0, 0)[:7],
            "payload": HEADER.pack(9, Command.REGION_READ, 32, 0, 0) + b"\x00" * 5,
            "DMA_MAP": HEADER.pack(9, Command.DMA_MAP, 48, 0, 0) + struct.pack("=IIQ", 32, 3, 0),
            "SET_IRQS": HEADER.pack(9, Command.DEVICE_SET_IRQS, 36, 0, 0) + struct.pack("=II", 20, 0x24),
        }
        for name, data in cuts.items():
            session = Client(raw(tmp_path / "gpu0.sock"))
            assert session.version().ok
            if name == "DMA_MAP":  # a mapping that succeeds first, so there is something to release
                assert session.dma_map(0x100000, 1 << 20, memory).ok
            carried = [memory] if name == "DMA_MAP" else eventfds if name == "SET_IRQS" else []
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(carried)}i", *carried))]
            session.client.sendmsg([data], ancillary if carried else [])
            session.client.close()  # gone in the middle of the message
        with turn(tmp_path) as again:
            assert again.region_read(CONFIG_REGION, 0, 4).payload[16:] == bytes.fromhex("de103023")
            assert again.dma_map(0x100000, 1 << 20, memory).ok  # the old mapping did not stay
        os.close(memory)
        for fd in eventfds:
            os.close(fd)
        with turn(tmp_path):
            assert fds(daemon) == baseline
        metrics = scrape(tmp_path / "metrics.sock")
        assert sample(metrics, "vfio_mediator_dma_mappings", device="gpu0") == 0
        releases = [e["record"]["steps"][0]["detail"] for e in daemon.events("hand-off")]
        assert "1 DMA mappings, 0 eventfds" in releases
        with client(tmp_path / "gpu1.sock") as other:
            assert other.region_read(CONFIG_REGION, 0, 4).ok


def test_ten_thousand_connections_leak_no_fds_and_no_memory(tmp_path: Path) -> None:
    with start(tmp_path, "h100-sxm5") as daemon:
        for _ in range(200):  # warm up: thread caches, allocator arenas
            raw(tmp_path / "gpu0.sock").close()
        with turn(tmp_path):
            fds_before, rss_before = fds(daemon), rss_kib(daemon)
        for _ in range(10_000):
            raw(tmp_path / "gpu0.sock").close()
        with turn(tmp_path) as session:
            assert fds(daemon) == fds_before
            growth = rss_kib(daemon) - rss_before
            assert growth < 4096, f"RSS grew {growth} KiB over 10,000 connections"
            assert session.region_read(CONFIG_REGION, 0, 4).ok


def test_a_client_that_never_reads_costs_bounded_memory_and_no_other_device(tmp_path: Path) -> None:
    with start(tmp_path, "h100-sxm5", "h100-sxm5") as daemon:
        rss_before = rss_kib(daemon)
        greedy = raw(tmp_path / "gpu0.sock")
        greedy.sendall(HEADER.pack(1, Command.VERSION, 16 + 7, 0, 0) + struct.pack("=HH", 0, 0) + b"{}\0")
        request = HEADER.pack(2, Command.REGION_READ, 32, 0, 0) + struct.pack("=QII", 0, CONFIG_REGION, 4)
        greedy.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the socket buffers are full both ways
            try:
                sent += greedy.send(request * 256)
            except BlockingIOError:
                time.sleep(0.05)
        assert sent > 100_000  # the daemon read on until its replies had nowhere to go, then stopped
        with client(tmp_path / "gpu1.sock") as other:
            assert other.region_read(CONFIG_REGION, 0, 4).ok
        assert rss_kib(daemon) - rss_before < 16384
        greedy.close()
        with turn(tmp_path) as after:
            assert after.region_read(CONFIG_REGION, 0, 4).ok


VENDOR_DEVICE = bytes.fromhex("de103023")  # config offset 0 of the H100 profile, also through MIRROR


def test_a_flood_of_trapped_accesses_on_one_device_leaves_another_answering_correctly(
    tmp_path: Path,
) -> None:
    """Only what does not depend on timing; the latency cost is bench/flood_latency.py's to measure."""
    with start(tmp_path, "h100-sxm5", "h100-sxm5"), client(tmp_path / "gpu1.sock") as measured:
        stop, started = threading.Event(), threading.Event()
        flooded: list[int] = []
        wrong: list[str] = []
        failed: list[BaseException] = []

        def flood() -> None:
            try:
                with client(tmp_path / "gpu0.sock") as hostile:
                    request = struct.pack("=QII", MIRROR, 0, 4)
                    while not stop.is_set():  # pipelined: 64 trapped reads in flight at a time
                        ids = [hostile.send(Command.REGION_READ, request) for _ in range(64)]
                        for msg_id in ids:
                            reply = hostile.receive()
                            if reply.msg_id != msg_id or not reply.ok or reply.payload[16:] != VENDOR_DEVICE:
                                wrong.append(f"flood {msg_id}: {reply}")
                        flooded.append(len(ids))
                        started.set()
            except BaseException as error:  # reported by the test, not lost in the thread
                failed.append(error)
                started.set()

        flooder = threading.Thread(target=flood)
        flooder.start()
        try:
            assert started.wait(30) and not failed, failed
            answered = 0
            hung = time.monotonic() + 300  # a hang guard only: no speed is asserted
            # Reads on the other device for as long as the flood takes to reach 10,000 reads (and 3,000
            # reads at least), so they overlap it however fast either side runs.
            while answered < 3000 or sum(flooded) < 10_000:
                assert flooder.is_alive() and not failed, failed
                assert time.monotonic() < hung, f"the flood stalled at {sum(flooded)} reads"
                reply = measured.region_read(CONFIG_REGION, 0, 4)
                assert reply.ok and reply.payload[16:] == VENDOR_DEVICE, reply
                answered += 1
        finally:
            stop.set()
            flooder.join(20)
        assert not failed, failed
        assert not flooder.is_alive()
        assert sum(flooded) >= 10_000  # the flood really ran
        assert wrong == []  # and each of its reads was answered, in order and correctly


def test_a_reset_slower_than_the_client_waits_is_answered_in_time_and_handed_off(tmp_path: Path) -> None:
    deadline = reply_deadline(DEFAULT_CLIENT_TIMEOUT)
    slow = faulty_profile(tmp_path, f"reset_seconds = {deadline + 0.5}")
    with start(tmp_path, str(slow), "h100-sxm5") as daemon:
        with client(tmp_path / "gpu0.sock") as session, client(tmp_path / "gpu1.sock") as other:
            started = time.monotonic()
            session.send(Command.DEVICE_RESET)
            while time.monotonic() - started < deadline - 0.5:  # the other device is not held up meanwhile
                assert other.region_read(CONFIG_REGION, 0, 4).ok
            reply = session.receive()
            answered = time.monotonic() - started
            assert not reply.ok and reply.error == errno.ETIMEDOUT
            assert answered < DEFAULT_CLIENT_TIMEOUT, (
                f"answered after {answered:.1f} s, past the client's wait"
            )
            blocked = session.region_read(CONFIG_REGION, 0, 4)  # the device is blocked from now on
            assert not blocked.ok and blocked.error == errno.EPERM
            assert session.client.recv(16) == b""  # and the session ends, so it can be handed off
        daemon.wait_for(
            lambda: any(e["record"]["reason"] == "client gone" for e in daemon.events("hand-off")), timeout=60
        )
        gone = next(e for e in daemon.events("hand-off") if e["record"]["reason"] == "client gone")
        assert gone["ok"] is True  # it waited for the straggling reset, then reset again
        with client(tmp_path / "gpu0.sock") as after:
            assert after.region_read(CONFIG_REGION, 0, 4).ok


def test_a_longer_client_timeout_lets_a_slow_reset_finish_before_its_answer(tmp_path: Path) -> None:
    # A 6 s reset: past the default's deadline, within that of client_timeout = 10 (and a QEMU
    # given x-msg-timeout=10000). The hand-offs do not reset, so only the guest's reset is slow.
    slow = faulty_profile(tmp_path, "reset_seconds = 6.0")
    patient, default = tmp_path / "patient", tmp_path / "default"
    patient.mkdir()
    default.mkdir()
    no_handoff_reset = '[handoff]\nreset = "none"\n'
    with (
        start(patient, str(slow), top="client_timeout = 10", extra=no_handoff_reset),
        start(default, str(slow), extra=no_handoff_reset) as impatient,
    ):
        with client(patient / "gpu0.sock") as waits, client(default / "gpu0.sock") as gives_up:
            started = time.monotonic()
            waits.send(Command.DEVICE_RESET)
            gives_up.send(Command.DEVICE_RESET)
            timed_out = gives_up.receive()
            timed_out_after = time.monotonic() - started
            done = waits.receive()
            done_after = time.monotonic() - started
            assert not timed_out.ok and timed_out.error == errno.ETIMEDOUT
            assert timed_out_after < DEFAULT_CLIENT_TIMEOUT, f"answered after {timed_out_after:.1f} s"
            assert done.ok, f"error {done.error} after {done_after:.1f} s"
            assert done_after < 10, f"answered after {done_after:.1f} s, past the configured 10 s"
            assert waits.region_read(CONFIG_REGION, 0, 4).ok  # and the device keeps serving
        # The timed-out reset ran on; a hand-off that does not reset still waits for it.
        impatient.wait_for(lambda: len(impatient.events("hand-off")) >= 2)  # daemon start, client gone
        gone = impatient.events("hand-off")[1]
        assert gone["record"]["reason"] == "client gone" and gone["ok"] is True
        assert "the client's reset that outlived its deadline ran" in gone["record"]["steps"][0]["detail"]


def test_a_failing_reset_is_an_error_reply_and_quarantines_the_device(tmp_path: Path) -> None:
    broken = faulty_profile(tmp_path, "reset_fails = true")
    with start(tmp_path, str(broken), "h100-sxm5", extra='[handoff]\nreset = "bus"\n') as daemon:
        start_handoff = daemon.wait_for_event("hand-off", device="gpu0")
        assert start_handoff["ok"] is False and "injected" in str(start_handoff["record"])
        refused = Client(raw(tmp_path / "gpu0.sock")).version()
        assert not refused.ok and refused.error == errno.EPERM
        with client(tmp_path / "gpu1.sock") as other:
            assert other.region_read(CONFIG_REGION, 0, 4).ok
        assert (tmp_path / "state" / "quarantine" / "gpu0.json").exists()


def test_backend_errors_become_error_replies(tmp_path: Path) -> None:
    failing = faulty_profile(tmp_path, "config_read_eio = [0x2c]")
    with start(tmp_path, str(failing)), client(tmp_path / "gpu0.sock") as session:
        eio = session.region_read(CONFIG_REGION, 0x2C, 4)  # the subsystem IDs come from the device
        assert not eio.ok and eio.error == errno.EIO
        assert session.region_read(CONFIG_REGION, 0, 4).ok  # the rest of config space still reads, and
        assert session.region_read(CONFIG_REGION, 0x2C, 2).error == errno.EIO  # the session goes on


def test_a_pin_that_fails_after_the_reply_blocks_the_device_with_its_reason(tmp_path: Path) -> None:
    failing = faulty_profile(tmp_path, "dma_map_fails = true")
    memory = os.memfd_create("guest-ram")
    os.ftruncate(memory, 1 << 20)
    with start(tmp_path, str(failing), "h100-sxm5") as daemon, client(tmp_path / "gpu0.sock") as session:
        assert session.dma_map(0x100000, 1 << 20, memory).ok  # answered before the pin ran
        blocked = daemon.wait_for_event("device blocked", device="gpu0")
        assert "guest memory 0x100000+0x100000 could not be pinned for DMA" in blocked["why"]
        metrics = scrape(tmp_path / "metrics.sock")
        assert sample(metrics, "vfio_mediator_dma_pin_failures_total", device="gpu0") == 1
        assert sample(metrics, "vfio_mediator_device_state", device="gpu0", state="blocked") == 1
        refused = session.region_read(CONFIG_REGION, 0, 4)  # fail closed: no device that cannot DMA
        assert not refused.ok and refused.error == errno.EPERM

        def gone() -> list[dict[str, Any]]:
            return [e for e in daemon.events("hand-off") if e["record"]["reason"] == "client gone"]

        daemon.wait_for(lambda: bool(gone()))  # the session ended; the mapping went with it
        assert gone()[0]["ok"] and gone()[0]["record"]["steps"][0]["detail"] == "1 DMA mappings, 0 eventfds"
        with client(tmp_path / "gpu1.sock") as other:
            assert other.region_read(CONFIG_REGION, 0, 4).ok
    os.close(memory)


def test_out_of_fds_a_device_waits_to_accept_and_the_others_keep_serving(tmp_path: Path) -> None:
    with start(tmp_path, "h100-sxm5", "h100-sxm5") as daemon, client(tmp_path / "gpu1.sock") as other:
        assert other.region_read(0, 0x100, 4).ok  # the simulator's BAR memory exists now
        pid = daemon.process.pid
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (fds(daemon), limits[1]))  # no fd to spare
        waiting = Client(raw(tmp_path / "gpu0.sock"))  # queued: accept() fails with EMFILE
        waiting.send(Command.VERSION, struct.pack("=HH", 0, 0) + b"{}\0")
        failed = daemon.wait_for_event("cannot accept a client", device="gpu0")
        assert "Too many open files" in failed["why"]
        for _ in range(50):  # the served device is not held up
            assert other.region_read(CONFIG_REGION, 0, 4).ok
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        assert waiting.receive().ok  # the queued client is served once fds are back
        assert waiting.region_read(CONFIG_REGION, 0, 4).ok
        waiting.client.close()
        assert daemon.process.poll() is None
        assert len(daemon.events("cannot accept a client")) <= 3  # retried every 0.1 s, logged rarely


def test_a_state_directory_that_cannot_be_written_refuses_the_client_and_loses_nothing(
    tmp_path: Path,
) -> None:
    with start(tmp_path, "h100-sxm5", "h100-sxm5") as daemon:
        record = tmp_path / "state" / "sessions" / "gpu0.json"
        record.mkdir()  # the session record cannot be written (as a full disk or a read-only mount)
        refused = Client(raw(tmp_path / "gpu0.sock")).version()
        assert not refused.ok and refused.error == errno.EPERM
        why = daemon.wait_for_event("client refused", device="gpu0")["why"]
        assert "cannot be recorded in the state directory" in why
        with client(tmp_path / "gpu1.sock") as other:
            assert other.region_read(CONFIG_REGION, 0, 4).ok
        record.rmdir()
        with client(tmp_path / "gpu0.sock") as after:  # nothing was lost: served once it can be recorded
            assert after.region_read(CONFIG_REGION, 0, 4).ok
            assert record.exists()


def _stops_cleanly(daemon: DaemonProcess, folder: Path, devices: int) -> str:
    log = daemon.stop(signal.SIGTERM)
    assert daemon.process.returncode == 0, log[-2000:]
    for i in range(devices):
        assert not (folder / f"gpu{i}.sock").exists()
    assert not (folder / "metrics.sock").exists()
    assert "Traceback" not in log
    return log


def test_sigterm_while_idle_serving_or_handing_off_leaves_no_socket_and_no_mapping(tmp_path: Path) -> None:
    memory = os.memfd_create("guest-ram")
    os.ftruncate(memory, 1 << 20)
    idle = tmp_path / "idle"
    idle.mkdir()
    _stops_cleanly(start(idle, "h100-sxm5", "h100-sxm5"), idle, 2)

    serving = tmp_path / "serving"
    serving.mkdir()
    daemon = start(serving, "h100-sxm5", "h100-sxm5")
    session = Client(raw(serving / "gpu0.sock"))
    assert session.version().ok and session.dma_map(0x100000, 1 << 20, memory).ok
    log = _stops_cleanly(daemon, serving, 2)
    assert '"detail": "1 DMA mappings, 0 eventfds"' in log  # released on the way out
    assert session.client.recv(16) == b""
    session.client.close()

    handing_off = tmp_path / "handing-off"
    handing_off.mkdir()
    slow = faulty_profile(handing_off, "reset_seconds = 2.0")
    daemon = start(handing_off, str(slow), "h100-sxm5")
    session = Client(raw(handing_off / "gpu0.sock"))
    assert session.version().ok
    session.client.close()  # the hand-off starts: a 2 s reset
    daemon.wait_for(lambda: len(daemon.events("client gone")) >= 1)
    _stops_cleanly(daemon, handing_off, 2)
    os.close(memory)


def test_the_event_loop_keeps_feeding_the_watchdog_through_a_flood_and_a_stuck_reset(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(5)
    slow = faulty_profile(tmp_path, "reset_seconds = 4.5")
    lines = ['[[device]]\nname = "gpu0"\nprofile = "h100-sxm5"\nsocket = "gpu0.sock"']
    lines.append(f'[[device]]\nname = "gpu1"\nprofile = "{slow}"\nsocket = "gpu1.sock"')
    (tmp_path / "config.toml").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
    with DaemonProcess("--config", str(tmp_path / "config.toml"), "--log-format", "json", env=env, devices=2):
        stop = threading.Event()

        def flood() -> None:
            with client(tmp_path / "gpu0.sock") as hostile:
                request = struct.pack("=QII", MIRROR, 0, 4)
                while not stop.is_set():
                    ids = [hostile.send(Command.REGION_READ, request) for _ in range(64)]
                    for _ in ids:
                        hostile.receive()

        with client(tmp_path / "gpu1.sock") as stuck:
            stuck.send(Command.DEVICE_RESET)  # holds its session thread in a slow reset
            flooder = threading.Thread(target=flood)
            flooder.start()
            pings = []
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                if b"WATCHDOG=1" in notify.recv(4096):
                    pings.append(time.monotonic())
            stop.set()
            flooder.join(20)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 10 and max(gaps) < 0.5, f"watchdog gaps {gaps}"


ENGINE = 0x5000  # the H100 profile's dma-engine registers in BAR0 (+0 source, +8 destination, +0x10 count)


def run_engine(session: Client, source: int, destination: int, count: int, command: int) -> bool:
    """The simulated GPU's DMA engine, started through BAR0; whether it completed without a fault.

    As a guest's driver would, it turns bus mastering on first.
    """
    assert session.region_write(CONFIG_REGION, 0x04, b"\x04\x00").ok
    for n, value in enumerate((source, destination, count, command)):
        assert session.region_write(0, ENGINE + 8 * n, value.to_bytes(8, "little")).ok
    status = int.from_bytes(session.region_read(0, ENGINE + 0x18, 8).payload[16:], "little")
    return not status & 0x100


def test_a_vm_losing_one_device_mid_dma_keeps_its_memory_for_the_others(tmp_path: Path) -> None:
    # One client process holding two devices is one VM: its RAM is pinned once, for both.
    with start(tmp_path, "h100-sxm5", "h100-sxm5") as daemon:
        ram = os.memfd_create("guest-ram")
        os.ftruncate(ram, 1 << 20)
        os.pwrite(ram, b"guest data", 0x100)
        with client(tmp_path / "gpu0.sock") as a:
            b = Client(raw(tmp_path / "gpu1.sock"))
            assert b.version().ok
            assert a.dma_map(0x100000, 1 << 20, ram).ok and b.dma_map(0x100000, 1 << 20, ram).ok
            assert run_engine(b, 0x100100, 0x1000, 10, 0x1)  # RAM -> gpu1's BAR, under way
            b.client.close()  # gpu1's connection dies; gpu0 goes on DMAing
            vm = str(os.getpid())
            daemon.wait_for(
                lambda: sample(scrape(tmp_path / "metrics.sock"), "vfio_mediator_vm_devices", vm=vm) == 1, 30
            )  # gpu1 has left the VM (its hand-off line comes before the VM's metrics say so)
            assert run_engine(a, 0x100100, 0x2000, 10, 0x1)
            assert a.region_read(0, 0x2000, 10).payload[16:] == b"guest data"
            metrics = scrape(tmp_path / "metrics.sock")
            assert sample(metrics, "vfio_mediator_vm_pinned_bytes", vm=vm) == 1 << 20
        daemon.wait_for(lambda: daemon.counts["hand-off"] > 2, 30)
        gone = [e for e in daemon.events("hand-off") if e["record"]["reason"] == "client gone"]
        assert gone[0]["device"] == "gpu1" and gone[0]["ok"], gone
        assert gone[0]["record"]["steps"][0]["detail"] == "1 DMA mappings, 0 eventfds"
        os.close(ram)


def test_a_dma_map_aimed_at_another_vms_bar_never_reaches_it(tmp_path: Path) -> None:
    bar = 0xE0000000
    with start(tmp_path, "h100-sxm5", "h100-sxm5") as daemon:
        ready, done = threading.Event(), threading.Event()

        def other_vm() -> None:  # another client process: it holds gpu1 and puts its BAR0 at `bar`
            script = (
                "import socket, struct, sys\n"
                "from tests.protocol.client import Client\n"
                "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); c = Client(s)\n"
                "assert c.version().ok\n"
                "assert c.region_write(0, 0x100, b'secret of VM 2').ok\n"
                f"assert c.region_write(7, 0x10, struct.pack('<Q', {bar})).ok\n"
                "assert c.region_write(7, 0x04, b'\\x06\\x00').ok\n"
                "print('ready', flush=True); sys.stdin.readline()\n"
            )
            with subprocess.Popen(
                [sys.executable, "-c", script, str(tmp_path / "gpu1.sock")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).parents[2],
            ) as vm2:
                assert vm2.stdout is not None and vm2.stdin is not None
                assert vm2.stdout.readline() == "ready\n"
                ready.set()
                done.wait(60)
                vm2.stdin.write("\n")

        holder = threading.Thread(target=other_vm)
        holder.start()
        try:
            assert ready.wait(60)
            with client(tmp_path / "gpu0.sock") as attacker:
                assert attacker.dma_map(bar, 16 << 20).ok  # accepted, as any fd-less map is
                assert not run_engine(attacker, bar + 0x100, 0x1000, 14, 0x1)  # the IOMMU faults
                assert attacker.region_read(0, 0x1000, 14).payload[16:] != b"secret of VM 2"
        finally:
            done.set()
            holder.join(60)
        unbacked = daemon.events("fd-less DMA range left unbacked")
        assert any(e["iova"] == hex(bar) and "no device of this VM" in e["why"] for e in unbacked), unbacked
        assert not daemon.events("peer BAR mapped")
