"""Metrics: the exposition text, thread safety of recording, and both exporters under hostile clients."""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from mediator.metrics.exporters import (
    ExporterLimits,
    serve_metrics,
    write_textfile,
    write_textfile_periodically,
)
from mediator.metrics.registry import LATENCY_BOUNDS, Registry
from mediator.metrics.series import DeviceMetrics, Metrics
from mediator.vfio_user.wire import Command
from mediator.vms import VmFigures

# A tiny parser for the text format 0.0.4, strict enough to catch a malformed exposition.
SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
UNESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
Labels = tuple[tuple[str, str], ...]


class Family:
    def __init__(self, name: str) -> None:
        self.name = name
        self.help: str | None = None
        self.type: str | None = None
        self.samples: dict[tuple[str, Labels], float] = {}


def parse_labels(text: str) -> Labels:
    labels: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        match = LABEL.match(text, position)
        assert match, f"bad labels at {text[position:]!r}"
        value = re.sub(r"\\(.)", lambda m: UNESCAPES[m.group(1)], match.group(2))
        labels.append((match.group(1), value))
        position = match.end()
        if position < len(text):
            assert text[position] == ",", text
            position += 1
    return tuple(labels)


def parse(text: str) -> dict[str, Family]:
    assert text.endswith("\n")
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help = line[7:].partition(" ")
            assert name not in families, f"{name} twice"
            current = families[name] = Family(name)
            current.help = re.sub(r"\\(.)", lambda m: UNESCAPES[m.group(1)], help)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is not None and current.name == name and current.type is None
            assert kind in ("counter", "gauge", "histogram")
            current.type = kind
        else:
            match = SAMPLE.fullmatch(line)
            assert match, f"bad sample line {line!r}"
            name, labels, value = match.group(1), parse_labels(match.group(2) or ""), match.group(3)
            assert current is not None and current.type is not None
            suffixes = ("_bucket", "_sum", "_count") if current.type == "histogram" else ("",)
            assert any(name == current.name + suffix for suffix in suffixes), f"{name} under {current.name}"
            assert (name, labels) not in current.samples, f"{line} twice"
            current.samples[name, labels] = float(value)
    return families


def lookup(families: dict[str, Family], name: str, **labels: str) -> float | None:
    family = families.get(name) or families.get(re.sub(r"_(bucket|sum|count)$", "", name))
    matches = (
        [v for (n, ls), v in family.samples.items() if n == name and dict(ls) == labels] if family else []
    )
    assert len(matches) <= 1
    return matches[0] if matches else None


def value(families: dict[str, Family], name: str, **labels: str) -> float:
    found = lookup(families, name, **labels)
    assert found is not None, (name, labels)
    return found


def check_histograms(families: dict[str, Family]) -> None:
    """Buckets cumulative and in order, +Inf present and equal to _count, for every series."""
    for family in families.values():
        if family.type != "histogram":
            continue
        by_series: dict[Labels, list[tuple[float, float]]] = {}
        for (name, labels), count in family.samples.items():
            if name.endswith("_bucket"):
                rest = tuple(label for label in labels if label[0] != "le")
                le = dict(labels)["le"]
                by_series.setdefault(rest, []).append((math.inf if le == "+Inf" else float(le), count))
        for labels, buckets in by_series.items():
            bounds = [b for b, _ in buckets]
            counts = [c for _, c in buckets]
            assert bounds == sorted(bounds) and bounds[-1] == math.inf
            assert counts == sorted(counts), f"{family.name}{labels} not cumulative: {counts}"
            assert family.samples[family.name + "_count", labels] == counts[-1]


def test_a_small_registry_renders_exactly() -> None:
    registry = Registry()
    requests = registry.counter("demo_requests_total", "Requests.\nBy kind \\ path.", ("kind",))
    requests.labels("read").inc(3)
    requests.labels('a\\b"c\nd').inc()
    registry.gauge("demo_temperature", "Temperature.").labels().set(21.5)
    latency = registry.histogram("demo_seconds", "Latency.", ("op",), bounds=(0.001, 0.1, 1))
    for seconds in (0.0005, 0.001, 0.05, 3):
        latency.labels("x").observe(seconds)
    registry.counter("demo_unused_total", "Never given a series.", ("kind",))

    assert registry.render() == (
        "# HELP demo_requests_total Requests.\\nBy kind \\\\ path.\n"
        "# TYPE demo_requests_total counter\n"
        'demo_requests_total{kind="a\\\\b\\"c\\nd"} 1\n'
        'demo_requests_total{kind="read"} 3\n'
        "# HELP demo_seconds Latency.\n"
        "# TYPE demo_seconds histogram\n"
        'demo_seconds_bucket{op="x",le="0.001"} 2\n'
        'demo_seconds_bucket{op="x",le="0.1"} 3\n'
        'demo_seconds_bucket{op="x",le="1"} 3\n'
        'demo_seconds_bucket{op="x",le="+Inf"} 4\n'
        'demo_seconds_sum{op="x"} 3.0515\n'
        'demo_seconds_count{op="x"} 4\n'
        "# HELP demo_temperature Temperature.\n"
        "# TYPE demo_temperature gauge\n"
        "demo_temperature 21.5\n"
    )


def test_label_values_are_escaped_and_parse_back() -> None:
    metrics = Metrics()
    awkward = 'gpu "0" \\ on\nline two'
    metrics.device(awkward).reset("guest")
    families = parse(metrics.render())
    assert value(families, "vfio_mediator_resets_total", device=awkward, cause="guest") == 1
    assert 'device="gpu \\"0\\" \\\\ on\\nline two"' in metrics.render()


def test_every_daemon_series_is_exported_and_parses() -> None:  # noqa: PLR0915  every series, once
    metrics = Metrics(version="9.9.9")
    gpu = metrics.device("gpu0")
    assert metrics.device("gpu0") is gpu
    metrics.device("gpu1")
    gpu.request(Command.REGION_READ, 12e-6)
    gpu.request(Command.REGION_READ, 3.0)
    gpu.request(Command.DMA_MAP, 0.2)
    gpu.request_failed(Command.DMA_MAP, 12)
    gpu.trapped_access("config-mirror")
    gpu.trapped_access("padding")
    gpu.dma_changed(mappings=3, pinned_bytes=8 << 30)
    gpu.reset("client")
    gpu.handoff(ok=False)
    gpu.client_connected()
    gpu.client_refused("busy")
    gpu.dma_pin_failed()
    gpu.set_state("quarantined")
    metrics.fabric_command("activate", ok=True)
    metrics.vm_changed(
        "4242", VmFigures(devices=2, mappings=3, pinned_bytes=1 << 30, pending_bytes=5, peer_mappings=4)
    )
    metrics.vm_changed(
        "4343", VmFigures(devices=1, mappings=0, pinned_bytes=0, pending_bytes=0, peer_mappings=0)
    )
    metrics.vm_gone("4343")

    families = parse(metrics.render())
    check_histograms(families)
    p = "vfio_mediator_"
    assert value(families, p + "build_info", version="9.9.9") == 1
    assert value(families, p + "devices") == 2
    assert value(families, p + "requests_total", device="gpu0", command="REGION_READ") == 2
    assert value(families, p + "request_errors_total", device="gpu0", command="DMA_MAP", errno="ENOMEM") == 1
    assert value(families, p + "request_duration_seconds_count", device="gpu0", command="REGION_READ") == 2
    assert (
        value(families, p + "request_duration_seconds_sum", device="gpu0", command="REGION_READ") == 3.000012
    )
    assert (
        value(
            families,
            p + "request_duration_seconds_bucket",
            device="gpu0",
            command="REGION_READ",
            le="2.5e-05",
        )
        == 1
    )
    assert value(families, p + "trapped_accesses_total", device="gpu0", action="config-mirror") == 1
    assert value(families, p + "trapped_accesses_total", device="gpu0", action="raz-wi") == 0
    assert value(families, p + "dma_mappings", device="gpu0") == 3
    assert value(families, p + "dma_pinned_bytes", device="gpu0") == 8 << 30
    assert value(families, p + "resets_total", device="gpu0", cause="client") == 1
    assert value(families, p + "dma_pin_failures_total", device="gpu0") == 1
    assert value(families, p + "handoffs_total", device="gpu0", result="failed") == 1
    assert value(families, p + "clients_connected", device="gpu0") == 1
    assert value(families, p + "clients_refused_total", device="gpu0", reason="busy") == 1
    assert value(families, p + "device_blocked", device="gpu0") == 1
    assert value(families, p + "device_state", device="gpu0", state="quarantined") == 1
    assert value(families, p + "device_state", device="gpu0", state="serving") == 0
    assert value(families, p + "device_blocked", device="gpu1") == 0
    assert value(families, p + "fabric_commands_total", action="activate", result="ok") == 1
    assert value(families, p + "vm_devices", vm="4242") == 2
    assert value(families, p + "vm_dma_mappings", vm="4242") == 3
    assert value(families, p + "vm_pinned_bytes", vm="4242") == 1 << 30
    assert value(families, p + "vm_pin_pending_bytes", vm="4242") == 5
    assert value(families, p + "vm_peer_mappings", vm="4242") == 4
    assert lookup(families, p + "vm_devices", vm="4343") is None  # a VM that has gone is forgotten
    assert {f.type for f in families.values()} == {"counter", "gauge", "histogram"}
    for family in families.values():
        assert family.help and family.name.startswith(p)
        assert (family.type == "counter") == family.name.endswith("_total")


def test_unknown_command_numbers_share_one_series() -> None:
    metrics = Metrics()
    gpu = metrics.device("gpu0")
    for command in (14, 999, 65535):
        gpu.request(command, 1e-5)
        gpu.request_failed(command, 38)
    families = parse(metrics.render())
    assert value(families, "vfio_mediator_requests_total", device="gpu0", command="unknown") == 3
    assert (
        value(
            families, "vfio_mediator_request_errors_total", device="gpu0", command="unknown", errno="ENOSYS"
        )
        == 3
    )
    assert len(families["vfio_mediator_requests_total"].samples) == 1


def test_a_family_registered_twice_is_shared_unless_it_differs() -> None:
    registry = Registry()
    first = registry.counter("x_total", "X.", ("a",))
    assert registry.counter("x_total", "X.", ("a",)) is first
    with pytest.raises(ValueError, match="another definition"):
        registry.counter("x_total", "X.", ("b",))
    with pytest.raises(ValueError, match="another definition"):
        registry.gauge("x_total", "X.", ("a",))
    with pytest.raises(ValueError, match="labels"):
        first.labels("one", "two")
    with pytest.raises(ValueError, match="label name"):
        registry.histogram("y_seconds", "Y.", ("le",))
    with pytest.raises(ValueError, match="bounds"):
        registry.histogram("y_seconds", "Y.", bounds=(1, 0.5))


@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), max_size=60))
def test_histogram_buckets_count_every_value_at_or_below_their_bound(values: list[float]) -> None:
    registry = Registry()
    histogram = registry.histogram("h_seconds", "H.").labels()
    for seconds in [*values, *LATENCY_BOUNDS]:  # the bounds themselves belong to their own bucket
        histogram.observe(seconds)
    families = parse(registry.render())
    check_histograms(families)
    observed = [*values, *LATENCY_BOUNDS]
    for bound in LATENCY_BOUNDS:
        le = format(bound, "g") if bound < 1 else "1"
        assert value(families, "h_seconds_bucket", le=le) == sum(v <= bound for v in observed)
    assert value(families, "h_seconds_count") == len(observed)
    assert value(families, "h_seconds_sum") == pytest.approx(sum(observed))


def test_recording_from_several_threads_adds_up_while_rendering() -> None:
    metrics = Metrics()
    devices = [metrics.device(f"gpu{i}") for i in range(4)]
    increments = 100_000
    start = threading.Barrier(len(devices) + 1)

    def serve(device: DeviceMetrics) -> None:
        start.wait()
        for i in range(increments):
            device.request(Command.REGION_READ, (i % 13) * 1e-5)
            device.trapped_access("audit")

    threads = [threading.Thread(target=serve, args=(device,)) for device in devices]
    for thread in threads:
        thread.start()
    start.wait()
    renders = 0
    previous: dict[str, float] = {}
    while any(thread.is_alive() for thread in threads):
        families = parse(metrics.render())
        check_histograms(families)
        for i in range(4):
            name = f"gpu{i}"
            now = lookup(families, "vfio_mediator_requests_total", device=name, command="REGION_READ") or 0
            assert now >= previous.get(name, 0)
            previous[name] = now
        renders += 1
    for thread in threads:
        thread.join()

    assert renders > 1, renders
    families = parse(metrics.render())
    check_histograms(families)
    for i in range(4):
        labels = {"device": f"gpu{i}"}
        assert value(families, "vfio_mediator_requests_total", command="REGION_READ", **labels) == increments
        assert (
            value(families, "vfio_mediator_request_duration_seconds_count", command="REGION_READ", **labels)
            == increments
        )
        assert value(families, "vfio_mediator_trapped_accesses_total", action="audit", **labels) == increments


def test_the_process_counters_add_up_from_several_threads() -> None:
    metrics = Metrics()
    gpu = metrics.device("gpu0")
    rounds = 20_000

    def record() -> None:
        for _ in range(rounds):
            gpu.reset("handoff")
            metrics.fabric_command("resync", ok=True)

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    families = parse(metrics.render())
    assert value(families, "vfio_mediator_resets_total", device="gpu0", cause="handoff") == 4 * rounds
    assert value(families, "vfio_mediator_fabric_commands_total", action="resync", result="ok") == 4 * rounds


# The textfile exporter


def test_the_textfile_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "vfio-mediator.prom"
    versions = ["a" * 300_000 + "\n", "b" * 200_000 + "\n"]
    write_textfile(path, versions[0])
    seen: set[str] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(200):
        write_textfile(path, versions[i % 2])
    stop.set()
    reader.join()
    assert seen <= set(versions) and len(seen) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == [path.name]


def test_a_failed_textfile_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "vfio-mediator.prom"
    write_textfile(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_textfile(path, "new \udc80\n")  # fails half-way through the write
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.trio
async def test_the_periodic_writer_refreshes_the_file_and_survives_failures(tmp_path: Path) -> None:
    metrics = Metrics()
    gpu = metrics.device("gpu0")
    path = tmp_path / "metrics" / "vfio-mediator.prom"
    async with trio.open_nursery() as nursery:
        await nursery.start(write_textfile_periodically, path, metrics.render, 0.02)
        assert not path.exists()  # no directory yet: logged, and the task goes on
        path.parent.mkdir()
        with trio.fail_after(5):
            while not path.exists():
                await trio.sleep(0.01)
        gpu.reset("guest")
        with trio.fail_after(5):
            while 'cause="guest"} 1' not in path.read_text():
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert path.read_text() == metrics.render()


# The UNIX socket exporter


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Short, under /tmp: a UNIX socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="vm-metrics-") as directory:
        yield Path(directory) / "metrics.sock"


def listen(path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    return listener


async def exchange(path: Path, request: bytes, shut: bool = False) -> bytes:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(request)
        if shut:
            await stream.send_eof()
        answer = bytearray()
        while chunk := await stream.receive_some():
            answer += chunk
    return bytes(answer)


def split_http(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("ascii").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(headers["content-length"]) == len(body)
    return status, headers, body


@pytest.fixture
def metrics() -> Metrics:
    metrics = Metrics()
    metrics.device("gpu0").request(Command.VERSION, 2e-5)
    return metrics


@pytest.mark.trio
async def test_an_http_get_gets_the_exposition(socket_path: Path, metrics: Metrics) -> None:
    with listen(socket_path) as listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_metrics, listener, metrics.render)
            answer = await exchange(
                socket_path, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
            )
            nursery.cancel_scope.cancel()
    status, headers, body = split_http(answer)
    assert status == "HTTP/1.0 200 OK"
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert body.decode() == metrics.render()
    parse(body.decode())


@pytest.mark.trio
async def test_other_requests_get_an_error_or_the_bare_text(socket_path: Path, metrics: Metrics) -> None:
    with listen(socket_path) as listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_metrics, listener, metrics.render)
            post = await exchange(socket_path, b"POST /metrics HTTP/1.0\r\n\r\n")
            garbage = await exchange(socket_path, b"hello\n\n")
            nothing = await exchange(socket_path, b"", shut=True)
            nursery.cancel_scope.cancel()
    assert split_http(post)[0] == "HTTP/1.0 405 Method Not Allowed"
    assert split_http(garbage)[0] == "HTTP/1.0 400 Bad Request"
    assert nothing.decode() == metrics.render()


@pytest.mark.trio
async def test_curl_gets_the_exposition(socket_path: Path, metrics: Metrics) -> None:
    with listen(socket_path) as listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_metrics, listener, metrics.render)
            result = await trio.run_process(
                ["curl", "-sS", "--fail", "--unix-socket", str(socket_path), "http://localhost/metrics"],
                capture_stdout=True,
            )
            nursery.cancel_scope.cancel()
    assert result.stdout.decode() == metrics.render()


@pytest.mark.trio
async def test_a_silent_client_is_dropped_after_the_timeout_and_blocks_nobody(
    socket_path: Path, metrics: Metrics
) -> None:
    limits = ExporterLimits(max_clients=2, timeout=1.0)
    with listen(socket_path) as listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_metrics, listener, metrics.render, limits)
            silent = await trio.open_unix_socket(str(socket_path))
            began = time.monotonic()
            answer = await exchange(socket_path, b"GET / HTTP/1.0\r\n\r\n")
            assert time.monotonic() - began < limits.timeout
            assert split_http(answer)[0] == "HTTP/1.0 200 OK"
            with trio.fail_after(5):
                assert await silent.receive_some() == b""  # closed, without an answer
            assert time.monotonic() - began >= limits.timeout * 0.9
            await silent.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_clients_beyond_the_limit_wait_for_a_free_slot(socket_path: Path, metrics: Metrics) -> None:
    limits = ExporterLimits(max_clients=1, timeout=0.5)
    with listen(socket_path) as listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_metrics, listener, metrics.render, limits)
            silent = await trio.open_unix_socket(str(socket_path))
            await trio.sleep(0.05)  # let it take the only slot
            began = time.monotonic()
            answer = await exchange(socket_path, b"GET / HTTP/1.0\r\n\r\n")
            assert time.monotonic() - began >= limits.timeout * 0.8
            assert split_http(answer)[0] == "HTTP/1.0 200 OK"
            await silent.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_huge_request_is_cut_off(socket_path: Path, metrics: Metrics) -> None:
    limits = ExporterLimits(max_request=4096, timeout=10)
    with listen(socket_path) as listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_metrics, listener, metrics.render, limits)
            stream = await trio.open_unix_socket(str(socket_path))
            answer = bytearray()

            async def flood() -> None:
                with contextlib.suppress(trio.BrokenResourceError):  # the server closed on us, as it should
                    await stream.send_all(b"GET /" + b"a" * (16 << 20))

            with trio.fail_after(2):  # well before the timeout: cut for size, not time
                async with trio.open_nursery() as client:
                    client.start_soon(flood)
                    try:
                        while chunk := await stream.receive_some():
                            answer += chunk
                    except trio.BrokenResourceError:
                        pass  # reset before the answer could be read: cut off all the same
            await stream.aclose()
            assert answer.startswith(b"HTTP/1.0 431 ")
            assert split_http(await exchange(socket_path, b"GET / HTTP/1.0\r\n\r\n"))[0] == "HTTP/1.0 200 OK"
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_a_failing_render_answers_500_and_the_exporter_goes_on(socket_path: Path) -> None:
    calls = 0

    def render() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")
        return "ok 1\n"

    with listen(socket_path) as listener:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_metrics, listener, render)
            first = await exchange(socket_path, b"GET / HTTP/1.0\r\n\r\n")
            second = await exchange(socket_path, b"GET / HTTP/1.0\r\n\r\n")
            nursery.cancel_scope.cancel()
    assert split_http(first)[0] == "HTTP/1.0 500 Internal Server Error"
    assert split_http(second)[2] == b"ok 1\n"
