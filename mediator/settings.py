"""The daemon's configuration file: the devices it serves, who owns them, and how.

A TOML file, checked as a whole before anything starts; every error names
the file and the key::

    state_directory = "/var/lib/vfio-mediator"   # quarantine, hand-off records, sessions, fabric
    client_timeout = 5.0                # seconds the client waits for a reply: QEMU's x-msg-timeout
                                        # (ms) on -device vfio-user-pci; a guest's reset is answered
                                        # a second before it (a fifth before, under 5 s)
    fast_path = true                    # config and plain BAR accesses answered by the C loop;
                                        # false (or serve --no-fast-path): every request in Python

    [access]                            # defaults for every device's socket and clients
    socket_mode = 0o660                 # when the daemon makes the socket (not a .socket unit)
    socket_owner = "vfio-mediator"
    socket_group = "kvm"
    allow_users = ["libvirt-qemu"]      # peers (SO_PEERCRED) allowed by uid ...
    allow_groups = ["kvm"]              # ... or by primary or supplementary gid; none: any

    [log]
    level = "info"
    format = "auto"                     # auto | console | text | json

    [metrics]
    socket = "/run/vfio-mediator/metrics.sock"   # Prometheus text over HTTP
    textfile = "/var/lib/prometheus/node-exporter/vfio_mediator.prom"
    interval = 15

    [[device]]
    name = "gpu0"                       # how logs, peers and the CLI refer to it
    bdf = "0000:3b:00.0"                # a real function bound to vfio-pci ...
    # mdev = "4b20d080-1b54-4048-85b3-a6a62d165c01"   # ... or a mediated device (a vGPU) ...
    # profile = "v100-sxm2"             # ... or a simulated one
    socket = "/run/vfio-mediator/gpu0.sock"
    tenant = "alice"                    # who the device belongs to now
    serial = "0324718003456"            # how peers may name it (optional)
    gpudirect_clique = 3                # GPUDirect P2P clique the guest sees (optional, 0-15)
    reset = "function"                  # this device's hand-off reset, overriding [handoff] reset
    bar_access = "mmap"                 # or "trap"
    quirks = ["/etc/vfio-mediator/quirks/site.toml"]
      [device.links]                    # NVLink index -> peer: device name, BDF or serial
      0 = "gpu1"
      1 = "0000:3c:00.0"
      [device.access]                   # this device's keys over [access]
      allow_users = ["tenant-a-qemu"]

    [handoff]                           # what happens between tenants
    reset = "bus"                       # prefer a secondary bus reset ("bus") or an FLR ("function");
                                        # "none": the device is not reset (a device with no reset
                                        # method is quarantined unless its entry says so)
    rom_sha256 = ["9f86d081..."]        # allow-list for the expansion ROM (optional)
    wipe = ["/usr/local/sbin/gpu-wipe", "{bdf}"]   # device memory sanitisation (optional);
                                        # a tool that needs the device itself (binding it to the
                                        # vendor driver and back to vfio-pci) gets it released:
                                        # wipe = { command = [...], release_device = true }
    wipe_timeout = 900                  # seconds
    keep = 1000                         # hand-off records per device: the newest 1000; or an age,
                                        # keep = "90d" (s, m, h, d, w); or both, a record past
                                        # either goes: keep = { newest = 1000, within = "90d" };
                                        # default: every record stays

    [fabric]                            # NVSwitch partitions (Fabric Manager); optional
    activate = ["fmpm", "-a", "{partition}"]
    deactivate = ["fmpm", "-d", "{partition}"]
    resync = ["fmpm", "--set-activated-list", "{partitions}"]
    timeout = 60                        # seconds, per command
      [[fabric.partition]]
      id = 1
      devices = ["gpu0", "gpu1"]

Links not listed lead to a peer nobody here owns: they are disabled.
Commands are argv lists, never run through a shell; ``{device}``, ``{bdf}``,
``{tenant}``, ``{partition}`` and ``{partitions}`` are replaced in each word.
"""

from __future__ import annotations

import grp
import pwd
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from mediator.backends.base import BarAccess
from mediator.backends.sysfs import is_mdev_name
from mediator.errors import InputError, InputErrors
from mediator.log import LogFormat, LogLevel
from mediator.pci.address import AddressError, normalize_bdf
from mediator.state import KEEP_EVERY_RECORD, Retention
from mediator.tomlinput import convert, read_toml
from mediator.virt.reset import DEFAULT_CLIENT_TIMEOUT, MAX_CLIENT_TIMEOUT, ResetMode

Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
Principal = str | Annotated[int, Meta(ge=0)]  # a user or group name, or its number
Command = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)]

DEFAULT_STATE_DIRECTORY = Path("/var/lib/vfio-mediator")
ClientTimeout = Annotated[float, Meta(gt=0, le=MAX_CLIENT_TIMEOUT)]  # seconds


class AccessSpec(Struct, forbid_unknown_fields=True, frozen=True):
    """Who may connect; unset keys of a device's ``access`` take the top-level ``[access]`` value."""

    socket_mode: Annotated[int, Meta(ge=0, le=0o777)] | msgspec.UnsetType = msgspec.UNSET
    socket_owner: Principal | msgspec.UnsetType = msgspec.UNSET
    socket_group: Principal | msgspec.UnsetType = msgspec.UNSET
    allow_users: list[Principal] | msgspec.UnsetType = msgspec.UNSET
    allow_groups: list[Principal] | msgspec.UnsetType = msgspec.UNSET


@dataclass(frozen=True)
class Access:
    """A device socket's permissions and the peers (SO_PEERCRED) allowed to use it.

    Empty ``allowed_uids`` and ``allowed_gids``: whoever the socket's file
    permissions let in. Otherwise a peer must have an allowed uid, or an
    allowed gid as its primary or a supplementary group.
    """

    mode: int = 0o660
    uid: int | None = None  # None: the daemon's own
    gid: int | None = None
    allowed_uids: frozenset[int] = frozenset()
    allowed_gids: frozenset[int] = frozenset()

    def admits(self, uid: int, gids: frozenset[int]) -> bool:
        if not self.allowed_uids and not self.allowed_gids:
            return True
        return uid in self.allowed_uids or bool(gids & self.allowed_gids)


class LogSpec(Struct, forbid_unknown_fields=True, frozen=True):
    level: LogLevel = "info"
    # auto: JSON lines with a syslog level prefix for journald when stderr is
    # not a terminal, a readable console format when it is.
    format: LogFormat = "auto"


class MetricsSpec(Struct, forbid_unknown_fields=True, frozen=True):
    socket: str | None = None  # Prometheus text over HTTP on this UNIX socket
    textfile: str | None = None  # or written here for node_exporter's textfile collector
    interval: Annotated[float, Meta(gt=0)] = 15.0  # seconds between textfile writes


class DeviceSpec(Struct, forbid_unknown_fields=True, frozen=True):
    name: Name
    socket: str
    bdf: str | None = None
    mdev: str | None = None  # a mediated device's UUID
    profile: str | None = None
    tenant: str | None = None
    serial: str | None = None
    gpudirect_clique: Annotated[int, Meta(ge=0, le=15)] | None = None
    bar_access: BarAccess = "mmap"
    quirks: list[str] = msgspec.field(default_factory=list)
    builtin_quirks: bool = True
    reset: ResetMode | None = None  # None: the [handoff] policy's
    links: dict[str, str] = msgspec.field(default_factory=dict)
    access: AccessSpec = msgspec.field(default_factory=AccessSpec)


RecordCount = Annotated[int, Meta(ge=1)]
AGE = re.compile(r"^([1-9][0-9]{0,5})([smhdw])$")  # at most 999999 weeks: a timedelta holds it
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> timedelta:
    """``"30d"`` -> 30 days; raises ValueError saying what an age looks like."""
    match = AGE.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not an age: give a whole number from 1 to 999999 and a unit, "
            's, m, h, d or w (e.g. "90d")'
        )
    return timedelta(seconds=int(match.group(1)) * AGE_UNITS[match.group(2)])


class KeepSpec(Struct, forbid_unknown_fields=True, frozen=True):
    newest: RecordCount | None = None
    within: str | None = None  # an age, parse_age's


class WipeSpec(Struct, forbid_unknown_fields=True, frozen=True):
    command: Command
    # The daemon closes the device for the command and opens it again after, once it is bound
    # to vfio-pci once more, checking it is the same device.
    release_device: bool = False


class HandoffSpec(Struct, forbid_unknown_fields=True, frozen=True):
    reset: ResetMode = "bus"
    rom_sha256: list[Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")]] = msgspec.field(default_factory=list)
    wipe: Command | WipeSpec | None = None
    wipe_timeout: Annotated[float, Meta(gt=0)] = 900.0
    keep: RecordCount | str | KeepSpec | None = None  # a count, an age or both; None: every record

    @property
    def wiping(self) -> WipeSpec | None:
        """``wipe`` in its full form, a bare command being one that keeps the device."""
        return WipeSpec(self.wipe) if isinstance(self.wipe, list) else self.wipe

    @property
    def retention(self) -> Retention:
        """``keep`` as the state directory applies it (its ages were checked at load)."""
        keep = self.keep
        if keep is None:
            return KEEP_EVERY_RECORD
        if isinstance(keep, int):
            return Retention(newest=keep)
        if isinstance(keep, str):
            return Retention(within=parse_age(keep))
        return Retention(keep.newest, parse_age(keep.within) if keep.within is not None else None)


class PartitionSpec(Struct, forbid_unknown_fields=True, frozen=True):
    id: Annotated[int, Meta(ge=0)]
    devices: Annotated[list[Name], Meta(min_length=1)]


class FabricSpec(Struct, forbid_unknown_fields=True, frozen=True):
    activate: Command
    deactivate: Command
    resync: Command | None = None
    timeout: Annotated[float, Meta(gt=0)] = 60.0
    partition: list[PartitionSpec] = msgspec.field(default_factory=list)


class SettingsSpec(Struct, forbid_unknown_fields=True, frozen=True):
    device: Annotated[list[DeviceSpec], Meta(min_length=1)]
    state_directory: str = str(DEFAULT_STATE_DIRECTORY)
    client_timeout: ClientTimeout = DEFAULT_CLIENT_TIMEOUT
    fast_path: bool = True
    handoff: HandoffSpec = msgspec.field(default_factory=HandoffSpec)
    fabric: FabricSpec | None = None
    access: AccessSpec = msgspec.field(default_factory=AccessSpec)
    log: LogSpec = msgspec.field(default_factory=LogSpec)
    metrics: MetricsSpec = msgspec.field(default_factory=MetricsSpec)


@dataclass(frozen=True)
class Settings:
    """The checked configuration; paths in it are absolute or relative to the file's folder."""

    source: str
    devices: tuple[DeviceSpec, ...]
    state_directory: Path | None  # None: quarantine lives in memory only, records go to the log
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT  # how long every device's client waits for a reply
    fast_path: bool = True  # the C loop answers what the devices' tables determine
    handoff: HandoffSpec = field(default_factory=HandoffSpec)
    fabric: FabricSpec | None = None
    access: dict[str, Access] = field(default_factory=dict)  # by device name; absent: Access()
    log: LogSpec = field(default_factory=LogSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)

    def access_for(self, name: str) -> Access:
        return self.access.get(name, Access())

    def device(self, name: str) -> DeviceSpec:
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(name)

    def find(self, text: str) -> DeviceSpec | None:
        """The device named ``text``, or at that BDF, or with that serial number or mdev UUID."""
        for device in self.devices:
            if (
                text in (device.name, device.serial)
                or (device.bdf is not None and _same_bdf(device.bdf, text))
                or (device.mdev is not None and device.mdev == text.strip().lower())
            ):
                return device
        return None


def _same_bdf(bdf: str, text: str) -> bool:
    try:
        return normalize_bdf(text) == bdf
    except AddressError:
        return False


COMMAND_FIELDS = {
    "handoff.wipe": {"device", "bdf", "mdev", "tenant"},
    "fabric.activate": {"partition"},
    "fabric.deactivate": {"partition"},
    "fabric.resync": {"partitions"},
}


def expand(command: Sequence[str], **values: str) -> list[str]:
    """``command`` with ``{name}`` replaced in every word (the names were checked at load)."""
    return [word.format_map(values) for word in command]


def _placeholders(command: Sequence[str]) -> set[str]:
    return {name for word in command for _, name, _, _ in string.Formatter().parse(word) if name is not None}


Problem = tuple[str, str]  # (key path, message)


def _check(spec: SettingsSpec, source: str) -> list[InputError]:
    problems = [*_check_devices(spec.device), *_check_commands(spec), *_check_keep(spec.handoff.keep)]
    if spec.fabric is not None:
        problems += _check_partitions(spec.fabric, {device.name for device in spec.device})
    return [InputError(source, where, message) for where, message in problems]


def _check_devices(devices: Sequence[DeviceSpec]) -> Iterable[Problem]:
    names: dict[str, int] = {}
    sockets: dict[str, int] = {}
    for i, device in enumerate(devices):
        where = f"device[{i}] ({device.name})"
        if device.name in names:
            yield f"{where}.name", f"repeats device[{names[device.name]}]"
        names.setdefault(device.name, i)
        if device.socket in sockets:
            yield f"{where}.socket", f"repeats device[{sockets[device.socket]}]'s socket"
        sockets.setdefault(device.socket, i)
        if [device.bdf, device.mdev, device.profile].count(None) != 2:
            yield where, "give exactly one of bdf (a PCI function), mdev (a mediated device) or profile"
        if device.bdf is not None:
            try:
                normalize_bdf(device.bdf)
            except AddressError as e:
                yield f"{where}.bdf", str(e)
        if device.mdev is not None and not is_mdev_name(device.mdev):
            yield f"{where}.mdev", f"{device.mdev!r} is not an mdev UUID (as uuidgen prints)"
        for link in device.links:
            if not link.isdigit() or int(link) > 63:
                yield f"{where}.links.{link}", "link indexes are numbers 0-63"


def _check_commands(spec: SettingsSpec) -> Iterable[Problem]:
    wiping = spec.handoff.wiping
    commands = {"handoff.wipe": wiping.command if wiping else None}
    if spec.fabric is not None:
        commands |= {
            "fabric.activate": spec.fabric.activate,
            "fabric.deactivate": spec.fabric.deactivate,
            "fabric.resync": spec.fabric.resync,
        }
    for key, command in commands.items():
        try:
            unknown = _placeholders(command or []) - COMMAND_FIELDS[key]
        except ValueError as e:
            yield key, f"a malformed placeholder: {e}"
            continue
        if unknown:
            yield (
                key,
                f"unknown placeholder {{{sorted(unknown)[0]}}}; it may use "
                + ", ".join(f"{{{name}}}" for name in sorted(COMMAND_FIELDS[key])),
            )


def _check_keep(keep: int | str | KeepSpec | None) -> Iterable[Problem]:
    ages: dict[str, str] = {}
    if isinstance(keep, str):
        ages["handoff.keep"] = keep
    elif isinstance(keep, KeepSpec):
        if keep.newest is None and keep.within is None:
            yield "handoff.keep", "give newest (a count of records), within (an age) or both"
        if keep.within is not None:
            ages["handoff.keep.within"] = keep.within
    for where, age in ages.items():
        try:
            parse_age(age)
        except ValueError as e:
            yield where, str(e)


def _check_partitions(fabric: FabricSpec, names: set[str]) -> Iterable[Problem]:
    ids: dict[int, int] = {}
    for i, partition in enumerate(fabric.partition):
        for member in partition.devices:
            if member not in names:
                yield f"fabric.partition[{i}].devices", f"no device named {member!r}"
        if partition.id in ids:
            yield f"fabric.partition[{i}].id", f"repeats fabric.partition[{ids[partition.id]}]"
        ids.setdefault(partition.id, i)


def load_settings(path: Path) -> Settings:
    """The checked configuration. Raises InputErrors with every problem found."""
    source = str(path)
    try:
        spec = convert(read_toml(path, source), SettingsSpec, source, "")
    except InputError as e:
        raise InputErrors([e]) from None
    errors = _check(spec, source)
    access: dict[str, Access] = {}
    for i, device in enumerate(spec.device):
        try:
            access[device.name] = _access(
                spec.access, device.access, source, f"device[{i}] ({device.name}).access"
            )
        except InputErrors as e:
            errors.extend(e.errors)
    if errors:
        raise InputErrors(errors)
    base = path.absolute().parent
    return Settings(
        source=source,
        devices=tuple(_resolved(device, base) for device in spec.device),
        state_directory=base / spec.state_directory,
        client_timeout=spec.client_timeout,
        fast_path=spec.fast_path,
        handoff=spec.handoff,
        fabric=spec.fabric,
        access=access,
        log=spec.log,
        metrics=msgspec.structs.replace(
            spec.metrics,
            socket=str(base / spec.metrics.socket) if spec.metrics.socket else None,
            textfile=str(base / spec.metrics.textfile) if spec.metrics.textfile else None,
        ),
    )


def _access(defaults: AccessSpec, own: AccessSpec, source: str, where: str) -> Access:
    """A device's access: its own keys over the top-level ones, names resolved to ids."""
    errors: list[InputError] = []

    def pick(key: str) -> Any:
        value = getattr(own, key)
        return getattr(defaults, key) if value is msgspec.UNSET else value

    def resolve(key: str, value: str | int, lookup: Callable[[str], int], kind: str) -> int | None:
        if isinstance(value, int):
            return value
        try:
            return lookup(value)
        except KeyError:
            origin = where if getattr(own, key) is not msgspec.UNSET else "access"
            errors.append(InputError(source, f"{origin}.{key}", f"no {kind} named {value!r} on this host"))
            return None

    def user(name: str) -> int:
        return pwd.getpwnam(name).pw_uid

    def group(name: str) -> int:
        return grp.getgrnam(name).gr_gid

    mode, owner, socket_group = pick("socket_mode"), pick("socket_owner"), pick("socket_group")
    users, groups = pick("allow_users"), pick("allow_groups")
    result = Access(
        mode=0o660 if mode is msgspec.UNSET else mode,
        uid=None if owner is msgspec.UNSET else resolve("socket_owner", owner, user, "user"),
        gid=None if socket_group is msgspec.UNSET else resolve("socket_group", socket_group, group, "group"),
        allowed_uids=frozenset(
            u
            for u in (
                [] if users is msgspec.UNSET else [resolve("allow_users", v, user, "user") for v in users]
            )
            if u is not None
        ),
        allowed_gids=frozenset(
            g
            for g in (
                []
                if groups is msgspec.UNSET
                else [resolve("allow_groups", v, group, "group") for v in groups]
            )
            if g is not None
        ),
    )
    if errors:
        raise InputErrors(errors)
    return result


def _resolved(device: DeviceSpec, base: Path) -> DeviceSpec:
    """Paths made relative to the config file's folder; the BDF in its long form."""
    profile = device.profile
    if profile is not None and ("/" in profile or profile.endswith(".toml")):
        profile = str(base / profile)
    return msgspec.structs.replace(
        device,
        socket=str(base / device.socket),
        bdf=normalize_bdf(device.bdf) if device.bdf is not None else None,
        mdev=device.mdev.strip().lower() if device.mdev is not None else None,
        profile=profile,
        quirks=[str(base / quirk) for quirk in device.quirks],
    )
