"""Metrics: counters, gauges and histograms with labels, rendered in the Prometheus text format.

A ``Registry`` holds families; ``family.labels(...)`` gives a series once, and
the caller keeps it, so recording is an attribute increment (a counter) or a
``bisect`` on a tuple of bucket bounds and one list-item increment (a
histogram): no lock, and no label string or dict built per call. Each series
has one writer at a time: the per-request and trapped-access series are
written only by the thread serving the device's one client, and the colder
counters that several threads may touch take a lock. The renderer (in the
trio thread) takes none: it reads ints, and copies a histogram's buckets in
one C-level ``list()`` and derives ``_count`` from that copy, so the buckets
stay cumulative and ``+Inf`` equals ``_count``; a scrape may be a few
observations behind, and ``_sum`` one observation apart from the buckets.
Series are listed by family name and label values, and every line's
``name{labels}`` prefix is built when the series is created.

``Metrics`` is what the daemon holds: the process series and one
``DeviceMetrics`` per device. Two exporters: a textfile for node_exporter's
textfile collector, replaced atomically (``write_textfile``,
``write_textfile_periodically``), and ``serve_metrics``, a minimal HTTP/1.0
responder on a UNIX socket (``curl --unix-socket PATH http://localhost/metrics``),
bounded in clients, request size and time so a local client cannot hold it.

Written here rather than taken from prometheus_client: that is a dependency
for about 150 lines, and it takes a mutex on every increment, where the hot
path (every vfio-user request; a config read round trip is ~15 µs) must stay
lock- and allocation-light.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
import tempfile
import threading
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, get_args

import structlog
import trio

from mediator import __version__
from mediator.fabric import FABRIC_ACTIONS, FabricAction
from mediator.unix_listener import accept
from mediator.vfio_user.server import CLIENT_REFUSALS, ClientRefusal
from mediator.vfio_user.wire import Command
from mediator.virt.events import RESET_CAUSES, TRAPPED_ACTIONS, ResetCause, TrappedAction

log = structlog.get_logger("mediator.metrics")

PREFIX = "vfio_mediator_"
# From a config read answered in the daemon (~5-15 µs) to a DMA_MAP pinning
# guest memory or a reset waiting for the device (~0.1-1 s).
LATENCY_BOUNDS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2, 0.1, 1.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DeviceState = Literal["blocked", "quarantined", "serving"]
DEVICE_STATES: tuple[DeviceState, ...] = get_args(DeviceState)

_COMMAND_NAMES = {command.value: command.name for command in Command}
UNKNOWN_COMMAND = "unknown"


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    """A sample value as Prometheus (Go) writes it: ``1`` not ``1.0``, ``+Inf``, ``NaN``."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _is_name(name: str, extra: str = "") -> bool:
    return (
        bool(name)
        and not name[0].isdigit()
        and all(c.isascii() and (c.isalnum() or c == "_" or c in extra) for c in name)
    )


def _prefix(name: str, label_text: str) -> str:
    """The start of a sample line, up to and including the space before the value."""
    return f"{name}{{{label_text}}} " if label_text else f"{name} "


class _Series:
    __slots__ = ()

    def _render(self, out: list[str]) -> None:
        raise NotImplementedError


class Counter(_Series):
    __slots__ = ("_line", "value")

    def __init__(self, line: str) -> None:
        self._line = line
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        """Add ``amount`` (never negative: a counter only goes up)."""
        self.value += amount

    def _render(self, out: list[str]) -> None:
        out.append(self._line + str(self.value))


class Gauge(_Series):
    __slots__ = ("_line", "value")

    def __init__(self, line: str) -> None:
        self._line = line
        self.value: float = 0

    def set(self, value: float) -> None:
        self.value = value

    def _render(self, out: list[str]) -> None:
        out.append(self._line + _format_value(self.value))


class Histogram(_Series):
    __slots__ = ("_bounds", "_bucket_lines", "_count_line", "_counts", "_sum_line", "sum")

    def __init__(
        self, bounds: tuple[float, ...], bucket_lines: tuple[str, ...], sum_line: str, count_line: str
    ) -> None:
        self._bounds = bounds
        # Per bucket, not cumulative: one increment per observation. The last
        # one is the overflow (+Inf) bucket.
        self._counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self._bucket_lines = bucket_lines
        self._sum_line = sum_line
        self._count_line = count_line

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le is "<=").
        self._counts[bisect_left(self._bounds, value)] += 1
        self.sum += value

    def _render(self, out: list[str]) -> None:
        cumulative = list(accumulate(list(self._counts)))
        out.extend(line + str(count) for line, count in zip(self._bucket_lines, cumulative, strict=True))
        out.append(self._sum_line + _format_value(self.sum))
        out.append(self._count_line + str(cumulative[-1]))


SeriesT = TypeVar("SeriesT", bound=_Series)


class Family(Generic[SeriesT]):
    """A metric name, its help and label names, and its series by label values."""

    def __init__(
        self,
        kind: str,
        name: str,
        help: str,
        label_names: Sequence[str],
        *,
        make: Callable[[str], SeriesT],
        bounds: tuple[float, ...] = (),
    ) -> None:
        if not _is_name(name, ":"):
            raise ValueError(f"bad metric name {name!r}")
        for label in label_names:
            if not _is_name(label) or label.startswith("__") or (kind == "histogram" and label == "le"):
                raise ValueError(f"{name}: bad label name {label!r}")
        self.kind = kind
        self.name = name
        self.help = help
        self.label_names = tuple(label_names)
        self.bounds = bounds
        self._make = make
        self._lock = threading.Lock()
        self._by_values: dict[tuple[str, ...], SeriesT] = {}
        # Sorted by label values and replaced whole on every insert, so the
        # renderer reads one consistent tuple while a writer adds a series.
        self._series: tuple[tuple[tuple[str, ...], SeriesT], ...] = ()

    def labels(self, *values: str) -> SeriesT:
        """The series for these label values (in ``label_names`` order), created on first use."""
        series = self._by_values.get(values)
        if series is not None:
            return series
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {values}")
        with self._lock:
            series = self._by_values.get(values)
            if series is None:
                label_text = ",".join(
                    f'{name}="{_escape_label_value(value)}"'
                    for name, value in zip(self.label_names, values, strict=True)
                )
                series = self._make(label_text)
                self._series = tuple(sorted((*self._series, (values, series)), key=lambda item: item[0]))
                self._by_values[values] = series
        return series

    def _signature(self) -> tuple[object, ...]:
        return (self.kind, self.help, self.label_names, self.bounds)

    def _render(self, out: list[str]) -> None:
        series = self._series
        if not series:
            return
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for _, one in series:
            one._render(out)


class Registry:
    def __init__(self) -> None:
        self._families: dict[str, Family[Any]] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Family[Counter]:
        """The counter family ``name``; the one already registered when its definition is the same."""
        return self._register(
            Family("counter", name, help, labels, make=lambda text: Counter(_prefix(name, text)))
        )

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Family[Gauge]:
        return self._register(
            Family("gauge", name, help, labels, make=lambda text: Gauge(_prefix(name, text)))
        )

    def histogram(
        self, name: str, help: str, labels: Sequence[str] = (), bounds: Sequence[float] = LATENCY_BOUNDS
    ) -> Family[Histogram]:
        edges = tuple(float(bound) for bound in bounds)
        if not edges or list(edges) != sorted(set(edges)) or math.isinf(edges[-1]):
            raise ValueError(f"{name}: bucket bounds must be finite, distinct and increasing")
        les = [_format_value(bound) for bound in edges] + ["+Inf"]

        def make(text: str) -> Histogram:
            joined = text + "," if text else ""
            return Histogram(
                edges,
                tuple(f'{name}_bucket{{{joined}le="{le}"}} ' for le in les),
                _prefix(name + "_sum", text),
                _prefix(name + "_count", text),
            )

        return self._register(Family("histogram", name, help, labels, make=make, bounds=edges))

    def _register(self, family: Family[SeriesT]) -> Family[SeriesT]:
        with self._lock:
            known = self._families.get(family.name)
            if known is None:
                self._families[family.name] = family
                return family
        if known._signature() != family._signature():
            raise ValueError(f"metric {family.name} is already registered with another definition")
        return known

    def render(self) -> str:
        """Every family with at least one series, in the text exposition format 0.0.4."""
        out: list[str] = []
        for _, family in sorted(self._families.copy().items()):
            family._render(out)
        out.append("")
        return "\n".join(out) if len(out) > 1 else ""


@dataclass(frozen=True)
class _DeviceFamilies:
    requests: Family[Counter]
    errors: Family[Counter]
    durations: Family[Histogram]
    trapped: Family[Counter]
    dma_mappings: Family[Gauge]
    dma_pinned: Family[Gauge]
    resets: Family[Counter]
    handoffs: Family[Counter]
    connected: Family[Gauge]
    refused: Family[Counter]
    blocked: Family[Gauge]
    state: Family[Gauge]

    @classmethod
    def of(cls, registry: Registry) -> _DeviceFamilies:
        d = ("device",)
        return cls(
            requests=registry.counter(
                PREFIX + "requests_total", "vfio-user requests handled, by command.", (*d, "command")
            ),
            errors=registry.counter(
                PREFIX + "request_errors_total",
                "vfio-user requests answered with an error, by command and errno.",
                (*d, "command", "errno"),
            ),
            durations=registry.histogram(
                PREFIX + "request_duration_seconds",
                "Time to handle a vfio-user request, by command.",
                (*d, "command"),
            ),
            trapped=registry.counter(
                PREFIX + "trapped_accesses_total",
                "Guest BAR accesses answered by the daemon (trap windows and padding), by action.",
                (*d, "action"),
            ),
            dma_mappings=registry.gauge(PREFIX + "dma_mappings", "DMA mappings the client holds.", d),
            dma_pinned=registry.gauge(
                PREFIX + "dma_pinned_bytes", "Bytes of client memory mapped for device DMA.", d
            ),
            resets=registry.counter(PREFIX + "resets_total", "Device resets, by cause.", (*d, "cause")),
            handoffs=registry.counter(
                PREFIX + "handoffs_total",
                "Tenant hand-offs (reset, checks, wipe), by result.",
                (*d, "result"),
            ),
            connected=registry.gauge(PREFIX + "clients_connected", "1 while a client is connected.", d),
            refused=registry.counter(
                PREFIX + "clients_refused_total", "Clients refused, by reason.", (*d, "reason")
            ),
            blocked=registry.gauge(
                PREFIX + "device_blocked", "1 while the device is not served (blocked or quarantined).", d
            ),
            state=registry.gauge(
                PREFIX + "device_state", "1 for the device's current state, 0 for the others.", (*d, "state")
            ),
        )


class DeviceMetrics:
    """What the daemon records about one device.

    ``request``, ``request_failed`` and ``trapped_access`` are on the hot path,
    without locks: call them only from the thread serving the device's client.
    The other methods may be called from any thread.
    """

    def __init__(self, registry: Registry, device: str) -> None:
        self.device = device
        self._families = families = _DeviceFamilies.of(registry)
        self._lock = threading.Lock()
        self._requests: dict[int, tuple[Counter, Histogram]] = {}
        self._errors: dict[tuple[int, int], Counter] = {}
        self._trapped = {action: families.trapped.labels(device, action) for action in TRAPPED_ACTIONS}
        self._dma_mappings = families.dma_mappings.labels(device)
        self._dma_pinned = families.dma_pinned.labels(device)
        self._resets = {cause: families.resets.labels(device, cause) for cause in RESET_CAUSES}
        self._handoffs = {
            ok: families.handoffs.labels(device, "ok" if ok else "failed") for ok in (True, False)
        }
        self._connected = families.connected.labels(device)
        self._refused = {reason: families.refused.labels(device, reason) for reason in CLIENT_REFUSALS}
        self._blocked = families.blocked.labels(device)
        self._states = {state: families.state.labels(device, state) for state in DEVICE_STATES}
        self.set_state("serving")

    def request(self, command: int, seconds: float) -> None:
        """One request handled, taking ``seconds``."""
        series = self._requests.get(command) or self._request_series(command)
        # ``value += 1`` rather than ``inc()`` here and below: half the cost, on every request.
        series[0].value += 1
        series[1].observe(seconds)

    def _request_series(self, command: int) -> tuple[Counter, Histogram]:
        name = _COMMAND_NAMES.get(command, UNKNOWN_COMMAND)
        series = (
            self._families.requests.labels(self.device, name),
            self._families.durations.labels(self.device, name),
        )
        if name != UNKNOWN_COMMAND:  # the client picks unknown numbers: they share one series, uncached
            self._requests[command] = series
        return series

    def request_failed(self, command: int, errno_value: int) -> None:
        """One request answered with ``errno_value``."""
        counter = self._errors.get((command, errno_value))
        if counter is None:
            name = _COMMAND_NAMES.get(command, UNKNOWN_COMMAND)
            counter = self._families.errors.labels(
                self.device, name, errno.errorcode.get(errno_value, str(errno_value))
            )
            if name != UNKNOWN_COMMAND:
                self._errors[(command, errno_value)] = counter
        counter.value += 1

    def trapped_access(self, action: TrappedAction) -> None:
        """One guest BAR access (or piece of one) answered by a trap window or the padding."""
        self._trapped[action].value += 1

    def dma_changed(self, mappings: int, pinned_bytes: int) -> None:
        """The client's DMA mappings now, after a map or unmap."""
        self._dma_mappings.set(mappings)
        self._dma_pinned.set(pinned_bytes)

    def reset(self, cause: ResetCause) -> None:
        with self._lock:
            self._resets[cause].inc()

    def handoff(self, ok: bool) -> None:
        with self._lock:
            self._handoffs[ok].inc()

    def client_connected(self) -> None:
        self._connected.set(1)

    def client_gone(self) -> None:
        self._connected.set(0)

    def client_refused(self, reason: ClientRefusal) -> None:
        with self._lock:
            self._refused[reason].inc()

    def set_state(self, state: DeviceState) -> None:
        """Whether the device is served; ``device_blocked`` follows (1 unless serving)."""
        with self._lock:
            for name, gauge in self._states.items():
                gauge.set(1 if name == state else 0)
            self._blocked.set(0 if state == "serving" else 1)


class Metrics:
    """The daemon's registry: build info, the device count, fabric commands, and each device's metrics."""

    def __init__(self, version: str = __version__) -> None:
        self.registry = registry = Registry()
        registry.gauge(PREFIX + "build_info", "The daemon's version; always 1.", ("version",)).labels(
            version
        ).set(1)
        self._device_count = registry.gauge(PREFIX + "devices", "Devices the daemon serves.").labels()
        fabric = registry.counter(
            PREFIX + "fabric_commands_total",
            "Fabric Manager partition commands run, by action and result.",
            ("action", "result"),
        )
        self._fabric = {
            (action, ok): fabric.labels(action, "ok" if ok else "failed")
            for action in FABRIC_ACTIONS
            for ok in (True, False)
        }
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceMetrics] = {}

    def device(self, name: str) -> DeviceMetrics:
        """The metrics of a device the daemon serves, created on first call; counts it in ``devices``."""
        with self._lock:
            metrics = self._devices.get(name)
            if metrics is None:
                metrics = self._devices[name] = DeviceMetrics(self.registry, name)
                self._device_count.set(len(self._devices))
        return metrics

    def fabric_command(self, action: FabricAction, ok: bool) -> None:
        with self._lock:
            self._fabric[action, ok].inc()

    def render(self) -> str:
        return self.registry.render()


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once: a reader sees the old file or the new one, never a part.

    The temporary file is in the same directory (``os.replace`` is atomic only
    within a file system) and does not end in ``.prom``, so node_exporter
    never collects it.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o644)  # node_exporter usually runs as another user
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


async def write_textfile_periodically(
    path: Path,
    render: Callable[[], str],
    interval: float = 15.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write ``render()`` to ``path`` now and every ``interval`` seconds until cancelled.

    A failed write is logged when it starts failing (or fails differently)
    and when it works again, not every interval; the daemon goes on.
    """
    failing: str | None = None
    started = False
    while True:
        try:
            await trio.to_thread.run_sync(write_textfile, path, render())
        except OSError as e:
            why = e.strerror or str(e)
            if why != failing:
                log.warning("cannot write the metrics textfile", path=str(path), why=why)
            failing = why
        except Exception:  # a bug in a metric must not take the daemon down
            log.exception("writing the metrics textfile failed")
        else:
            if failing is not None:
                log.info("metrics textfile written again", path=str(path))
            failing = None
        if not started:
            task_status.started()
            started = True
        await trio.sleep(interval)


@dataclass(frozen=True)
class ExporterLimits:
    max_clients: int = 4  # answered at once; more wait in the listen backlog
    max_request: int = 8192  # bytes of request head
    timeout: float = 2.0  # seconds for a whole exchange, read and write


async def serve_metrics(
    listener: socket.socket,
    render: Callable[[], str],
    limits: ExporterLimits | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer every connection on ``listener`` with ``render()``, until cancelled.

    ``listener`` is a bound, listening UNIX stream socket
    (``mediator.unix_listener.bind_unix``, or one systemd passed); it is
    made non-blocking and stays the caller's to close and unlink. A client
    sends an HTTP request (any path) and gets an HTTP/1.0 response, or shuts
    its side without sending anything and gets the bare text. A client that
    sends nothing and waits, or does not read its answer, is dropped when its
    time is up; one that sends too much gets a 431 at once.
    """
    limits = limits or ExporterLimits()
    listener.setblocking(False)
    slots = trio.Semaphore(limits.max_clients)
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()
            client = await accept(listener, backoff=1.0, failed=_accept_failed)
            nursery.start_soon(_answer, client, render, limits, slots)


def _accept_failed(error: OSError) -> None:
    # Out of fds or memory: the client waits in the backlog meanwhile.
    log.warning("cannot accept a metrics client", why=error.strerror or str(error))


async def _answer(
    client: socket.socket, render: Callable[[], str], limits: ExporterLimits, slots: trio.Semaphore
) -> None:
    try:
        with client, trio.move_on_after(limits.timeout) as scope:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
            head = await _read_head(stream, limits.max_request)
            await stream.send_all(_response(head, render))
        if scope.cancelled_caught:
            log.debug("dropped a metrics client: out of time")
    except (trio.BrokenResourceError, OSError) as e:
        log.debug("metrics client went away", why=str(e))
    finally:
        slots.release()


async def _read_head(stream: trio.SocketStream, limit: int) -> bytes | None:
    """The request up to its blank line or the client's EOF; None when it is longer than ``limit``."""
    head = bytearray()
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        chunk = await stream.receive_some(limit + 1 - len(head))
        if not chunk:
            break
        head += chunk
        if len(head) > limit:
            return None
    return bytes(head)


def _response(head: bytes | None, render: Callable[[], str]) -> bytes:
    """The HTTP answer to a request head; the bare text when there was none."""
    if head is None:
        return _http(431, "Request Header Fields Too Large")
    if head:
        request_line = head.split(b"\n", 1)[0].split()
        if len(request_line) != 3 or not request_line[2].startswith(b"HTTP/"):
            return _http(400, "Bad Request")
        if request_line[0] != b"GET":
            return _http(405, "Method Not Allowed", headers="Allow: GET\r\n")
    try:
        body = render().encode()
    except Exception:  # a bug in a metric must not take the daemon down
        log.exception("rendering the metrics failed")
        return _http(500, "Internal Server Error")
    return _http(200, "OK", body, f"Content-Type: {CONTENT_TYPE}\r\n") if head else body


def _http(status: int, reason: str, body: bytes = b"", headers: str = "") -> bytes:
    if not body and status != 200:
        body = f"{reason}\n".encode()
    head = f"HTTP/1.0 {status} {reason}\r\n{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode("ascii") + body
