"""What the daemon records: the process series, one ``DeviceMetrics`` per device, the client VMs.

``DeviceMetrics`` is the device's ``DeviceEvents`` (mediator.virt.events) and the
server's ``ServerEvents`` (mediator.vfio_user.server): the device and the server
report, and never know what is behind.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from mediator import __version__
from mediator.fabric import FABRIC_ACTIONS, FabricAction
from mediator.metrics.registry import Counter, Family, Gauge, Histogram, Registry
from mediator.vfio_user.server import CLIENT_REFUSALS, ClientRefusal
from mediator.vfio_user.wire import Command
from mediator.virt.events import RESET_CAUSES, TRAPPED_ACTIONS, ResetCause, TrappedAction
from mediator.vms import VmFigures

PREFIX = "vfio_mediator_"
DeviceState = Literal["blocked", "quarantined", "serving"]
DEVICE_STATES: tuple[DeviceState, ...] = get_args(DeviceState)

_COMMAND_NAMES = {command.value: command.name for command in Command}
UNKNOWN_COMMAND = "unknown"


@dataclass(frozen=True)
class _DeviceFamilies:
    requests: Family[Counter]
    errors: Family[Counter]
    durations: Family[Histogram]
    trapped: Family[Counter]
    dma_mappings: Family[Gauge]
    dma_pinned: Family[Gauge]
    resets: Family[Counter]
    pin_failures: Family[Counter]
    handoffs: Family[Counter]
    connected: Family[Gauge]
    client_pid: Family[Gauge]
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
            pin_failures=registry.counter(
                PREFIX + "dma_pin_failures_total",
                "Guest memory of the device's VM that could not be pinned; each blocks the device.",
                d,
            ),
            handoffs=registry.counter(
                PREFIX + "handoffs_total",
                "Tenant hand-offs (reset, checks, wipe), by result.",
                (*d, "result"),
            ),
            connected=registry.gauge(PREFIX + "clients_connected", "1 while a client is connected.", d),
            client_pid=registry.gauge(
                PREFIX + "client_pid",
                "The pid of the client (VM) holding the device, 0 without one; one pid, one VM.",
                d,
            ),
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
        self._pin_failures = families.pin_failures.labels(device)
        self._handoffs = {
            ok: families.handoffs.labels(device, "ok" if ok else "failed") for ok in (True, False)
        }
        self._connected = families.connected.labels(device)
        self._client_pid = families.client_pid.labels(device)
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

    def requests(self, command: int, count: int, buckets: Sequence[int], seconds: float) -> None:
        """``count`` requests handled elsewhere (the C fast path), by ``latency_bounds`` bucket."""
        series = self._requests.get(command) or self._request_series(command)
        series[0].value += count
        series[1].add(buckets, seconds)

    @property
    def latency_bounds(self) -> tuple[float, ...]:
        return self._families.durations.bounds

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

    def trapped_access(self, action: TrappedAction, count: int = 1) -> None:
        """``count`` guest BAR accesses (or pieces of one) answered by a trap window or the padding."""
        self._trapped[action].value += count

    def dma_changed(self, mappings: int, pinned_bytes: int) -> None:
        """The client's DMA mappings now, after a map or unmap."""
        self._dma_mappings.set(mappings)
        self._dma_pinned.set(pinned_bytes)

    def reset(self, cause: ResetCause) -> None:
        with self._lock:
            self._resets[cause].inc()

    def dma_pin_failed(self) -> None:
        with self._lock:
            self._pin_failures.inc()
        self.set_state("blocked")

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

    def set_client(self, pid: int) -> None:
        """The client VM that holds the device now (0: none)."""
        self._client_pid.set(pid)

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
        vm = ("vm",)
        self._vm_series = (
            registry.gauge(PREFIX + "vm_devices", "Devices the client VM (by pid) holds.", vm),
            registry.gauge(
                PREFIX + "vm_dma_mappings", "DMA mappings in the VM's IOMMU space, each counted once.", vm
            ),
            registry.gauge(
                PREFIX + "vm_pinned_bytes",
                "Client memory mapped in the VM's IOMMU space, once however many of its devices map it.",
                vm,
            ),
            registry.gauge(
                PREFIX + "vm_pin_pending_bytes",
                "Client memory mapped in the VM's IOMMU space and still being pinned; bus mastering "
                "waits for it.",
                vm,
            ),
            registry.gauge(
                PREFIX + "vm_peer_mappings",
                "IOMMU mappings of the VM's devices' BARs for peer-to-peer DMA.",
                vm,
            ),
        )

    def vm_changed(self, vm: str, space: VmFigures) -> None:
        """A client VM's devices or IOMMU space changed (``mediator.vms.VmEvents``)."""
        values = (space.devices, space.mappings, space.pinned_bytes, space.pending_bytes, space.peer_mappings)
        for family, value in zip(self._vm_series, values, strict=True):
            family.labels(vm).set(value)

    def vm_gone(self, vm: str) -> None:
        for family in self._vm_series:
            family.remove(vm)

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
