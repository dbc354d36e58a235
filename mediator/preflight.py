"""Operator preflight: which devices could be served, and what stands in the way of one.

``list_devices`` reads sysfs only: every PCI function bound to a VFIO driver,
every display controller and every function with an IOMMU group, with its
group and the device-specific quirks that match it. ``devices`` adds the
mediated devices (``backends.sysfs``: by UUID, with their parent and type)
and the types their parents offer, with the ``create`` file that makes one. ``doctor``
runs each check the daemon (or its hand-off) would otherwise fail or warn
about later (driver, group viability, VFIO nodes, reset, expansion ROM, ATS
on the host, ACS above the function, RLIMIT_MEMLOCK) and turns each into a
``Finding`` with the fix, then says what a guest will wait for: how long
pinning its RAM takes here, and whether the device's resets fit in the
client's timeout.

A mediated device gets the checks that are its own: that it exists (or how
to create it), its vendor driver, its IOMMU group and the VFIO nodes, and
the same memlock, pinning and timeout checks under its UUID. Its reset is
the vendor driver's, and the expansion ROM, ATS and ACS belong to the parent
device, so one finding sends the operator to the parent's own doctor.

Pinning is estimated from a sample, not a constant: a 64M memfd (and one of
huge pages when the kernel has some free) is mapped and mlocked, which
faults in, zeroes and locks its pages the way VFIO type1's
pin_user_pages does for guest RAM QEMU never touched, and the time is
scaled to the guest's RAM. VFIO also maps every page in the IOMMU, which
the sample leaves out. Under an RLIMIT_MEMLOCK too low for 64M the sample
is what the limit allows, or, below 4M, the mapping is faulted in with
MAP_POPULATE instead, without locking; the finding says which. The reset
check reads how long the device's resets took from its hand-off records
(``mediator.state``) and compares the longest with the deadline the
daemon's ``client_timeout`` gives (``mediator.virt.reset``).

Capabilities come from the function's sysfs ``config`` file
through ``mediator.pci.chain.walk``; without root the kernel shows only its
first 64 bytes, and the checks that need more say so. The ROM is read the
way the kernel wants it: enabled by writing "1" to ``rom``, and with the
function woken from the D3hot vfio-pci leaves an idle one in (its ROM does
not answer there); both are put back. ``root``, ``proc`` and ``dev`` are
parameters so tests can point them at trees of their own.
"""

from __future__ import annotations

import ctypes
import errno
import math
import mmap
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mediator.backends import advice
from mediator.backends.pinning import has_cap_ipc_lock, lockable_bytes
from mediator.backends.sysfs import (
    MdevType,
    MediatedDevice,
    Members,
    driver_of,
    group_blockers,
    iommu_group_of,
    is_mdev_name,
    is_vfio_driver,
    missing_mdev,
    read_mdev,
)
from mediator.handoff import reset_seconds
from mediator.pci import capabilities as caps
from mediator.pci.address import BDF, AddressError, normalize_bdf
from mediator.pci.bars import format_size
from mediator.pci.capabilities import CapKind
from mediator.pci.chain import Chains, walk
from mediator.pci.registers import CONFIG_SPACE_SIZE, EXTENDED_CONFIG_SPACE_SIZE, Identity, u16, u32
from mediator.pci.rom import RomError, check_rom
from mediator.quirks.schema import Match
from mediator.quirks.table import QuirkTable
from mediator.state import StateStore
from mediator.virt.reset import DEFAULT_CLIENT_TIMEOUT, client_timeout_for, reply_deadline

SYSFS = Path("/sys")
PROC = Path("/proc")
DEV = Path("/dev")

DISPLAY_CLASS = 0x03
EXP_DEVCAP = 0x04
EXP_DEVCAP_FLR = 1 << 28
EXP_TYPE_DOWNSTREAM_PORT = 0x6
ATS_CONTROL = 0x06
ATS_ENABLE = 1 << 15
ACS_CAPABILITY = 0x04
ACS_CONTROL = 0x06
# Source Validation, Request and Completion Redirect, Upstream Forwarding: what the kernel's
# pci_acs_enabled asks of every port above a function before it isolates the function's group.
ACS_ISOLATION = {0x01: "SV", 0x04: "RR", 0x08: "CR", 0x10: "UF"}

Severity = Literal["ok", "warning", "error"]


@dataclass(frozen=True)
class Finding:
    severity: Severity
    check: str
    found: str
    fix: str = ""


@dataclass(frozen=True)
class DeviceSummary:
    bdf: str
    identity: Identity
    driver: str | None
    iommu_group: int | None
    group_members: Members  # the function itself included
    group_blockers: Members  # members that keep the group from being viable
    quirks: tuple[str, ...]  # built-in quirks that match this device in particular

    @property
    def group_viable(self) -> bool:
        return self.iommu_group is not None and not self.group_blockers

    def to_json(self) -> dict[str, Any]:
        return {
            "bdf": self.bdf,
            "vendor": f"{self.identity.vendor:04x}",
            "device": f"{self.identity.device:04x}",
            "class": f"{self.identity.class_code:06x}",
            "driver": self.driver,
            "iommu_group": self.iommu_group,
            "group_members": [{"bdf": bdf, "driver": driver} for bdf, driver in self.group_members],
            "group_viable": self.group_viable,
            "group_blockers": [{"bdf": bdf, "driver": driver} for bdf, driver in self.group_blockers],
            "quirks": list(self.quirks),
        }


def mdev_json(mdev: MediatedDevice) -> dict[str, Any]:
    """A mediated device, as ``devices --json`` lists it next to the functions."""
    return {
        "mdev": mdev.uuid,
        "parent": mdev.parent,
        "type": mdev.mdev_type,
        "type_name": mdev.type_name,
        "device_api": mdev.device_api,
        "driver": mdev.driver,
        "iommu_group": mdev.iommu_group,
        "vfio_cdev": mdev.vfio_cdev,
    }


def mdev_type_json(kind: MdevType) -> dict[str, Any]:
    """A type a parent offers, as ``devices --json`` lists it next to the devices."""
    return {
        "mdev_type": kind.name,
        "parent": kind.parent,
        "type_name": kind.description,
        "device_api": kind.device_api,
        "available_instances": kind.available,
        "create": str(kind.path / "create"),
    }


# sysfs reading


def _chains(config: bytes) -> tuple[bytes, Chains] | None:
    """The capability chains, or None when the kernel showed only the header (not root)."""
    for size in (EXTENDED_CONFIG_SPACE_SIZE, CONFIG_SPACE_SIZE):
        if len(config) >= size:
            image = config[:size]
            return image, walk(image)
    return None


def _quirk_names(table: QuirkTable, identity: Identity) -> tuple[str, ...]:
    # Quirks that match every function (baseline/, security/) would fill every line and tell
    # nothing about this device; `inspect` shows all of them at work.
    return tuple(q.name for q in table.for_device(identity) if q.match != Match())


def list_devices(root: Path = SYSFS) -> list[DeviceSummary]:
    """Every function that is a candidate for VFIO: bound to a VFIO driver, a display controller
    (class 0x03), or in an IOMMU group."""
    devices = root / "bus/pci/devices"
    if not devices.is_dir():
        return []
    table = QuirkTable.load()
    found = []
    for device in sorted(devices.iterdir()):
        identity = Identity.of((device / "config").read_bytes())
        driver = driver_of(device)
        group, members = iommu_group_of(device)
        if not (is_vfio_driver(driver) or identity.class_code >> 16 == DISPLAY_CLASS or group is not None):
            continue
        found.append(
            DeviceSummary(
                device.name,
                identity,
                driver,
                group,
                members,
                group_blockers(members),
                _quirk_names(table, identity),
            )
        )
    return found


# doctor's checks


def _not_vfio(bdf: str, device: Path, driver: str | None, root: Path) -> Finding:
    return Finding(
        "error",
        "driver",
        f"{'bound to ' + driver if driver else 'no driver'}, not vfio-pci: the daemon refuses the function",
        advice.rebind_to_vfio(bdf, device, driver, root),
    )


def _group_finding(
    bdf: str, group: int | None, members: tuple[tuple[str, str | None], ...], root: Path
) -> Finding:
    if group is None:
        return Finding(
            "error",
            "iommu",
            "no IOMMU group: the IOMMU is off",
            advice.ENABLE_IOMMU,
        )
    listed = ", ".join(f"{member} ({driver or 'no driver'})" for member, driver in members)
    # The function's own driver is a finding of its own.
    blockers = [(member, driver) for member, driver in group_blockers(members) if member != bdf]
    if blockers:
        named = ", ".join(f"{member} (bound to {driver})" for member, driver in blockers)
        return Finding(
            "error",
            "iommu",
            f"group {group} is not viable: {named} shares it",
            advice.SHARE_THE_GROUP
            + ": "
            + "; ".join(
                f"echo {member} > {root}/bus/pci/devices/{member}/driver/unbind" for member, _ in blockers
            ),
        )
    return Finding("ok", "iommu", f"group {group} is viable: {listed}")


def _uses_iommufd(device: Path, dev: Path) -> bool:
    """What the backend will pick (``backends.vfio``): the cdev with iommufd when both exist."""
    cdevs = sorted(p.name for p in (device / "vfio-dev").glob("vfio*"))
    return bool(cdevs) and (dev / "iommu").exists() and (dev / "vfio/devices" / cdevs[0]).exists()


def _peer_dma(device: Path, dev: Path) -> Finding:
    if _uses_iommufd(device, dev):
        return Finding(
            "warning",
            "p2p",
            "iommufd cannot map another device's BAR without dma-buf support, which the daemon lacks: "
            "peer-to-peer DMA between a VM's devices faults and GPUDirect cliques are withheld",
            "where P2P matters, serve the devices through the group API (a kernel without the VFIO cdev)",
        )
    return Finding("ok", "p2p", "type1 maps a peer's BAR for peer-to-peer DMA between a VM's devices")


def _vfio_api(device: Path, group: int | None, dev: Path) -> Finding:
    cdevs = sorted(p.name for p in (device / "vfio-dev").glob("vfio*"))
    iommufd = dev / "iommu"
    if _uses_iommufd(device, dev):
        return Finding(
            "ok", "vfio-api", f"{dev / 'vfio/devices' / cdevs[0]} and {iommufd}: the daemon uses iommufd"
        )
    container = dev / "vfio/vfio"
    if container.exists():
        node = dev / "vfio" / str(group)
        nodes = f"{container} and {node}" if node.exists() else f"{container}"
        why = "no VFIO cdev for the device" if not cdevs else f"no {iommufd}"
        return Finding("ok", "vfio-api", f"{nodes}: the daemon uses the group API ({why})")
    return Finding(
        "error",
        "vfio-api",
        f"no VFIO device nodes: neither {container} nor a cdev under {dev / 'vfio/devices'} with {iommufd}",
        "modprobe vfio-pci (for the iommufd path also modprobe iommufd)",
    )


def _flr_capable(chains: tuple[bytes, Chains] | None) -> bool:
    if chains is None:
        return False
    image, found = chains
    exp = found.find(CapKind.STD, caps.EXP)
    return exp is not None and bool(u32(image, exp.offset + EXP_DEVCAP) & EXP_DEVCAP_FLR)


def _reset(device: Path, chains: tuple[bytes, Chains] | None) -> Finding:
    # The kernel shows ``reset`` (and, since 5.15, ``reset_method``) only for a function it can
    # reset, so without either there is none, whatever the config space claims.
    listed = device / "reset_method"
    if listed.exists() and listed.read_text().split():
        methods = ", ".join(listed.read_text().split())
        return Finding("ok", "reset", f"{methods} (from the kernel's reset_method)")
    if not listed.exists() and (device / "reset").exists():
        if _flr_capable(chains):
            return Finding(
                "ok", "reset", "flr (from PCIe Device Capabilities; this kernel has no reset_method)"
            )
        return Finding("ok", "reset", "the kernel can reset it (this kernel does not say how)")
    return Finding(
        "error",
        "reset",
        "no reset method (no FLR, PM or bus reset): the device cannot be cleaned between tenants, "
        "so the daemon quarantines it at start",
        'accept that in its config entry with reset = "none" (or serve --reset none), '
        "or use a slot where a bus reset can reach it",
    )


@contextmanager
def _awake(device: Path) -> Iterator[None]:
    """Keep the function in D0: vfio-pci puts an idle one in D3hot, where its ROM does not answer."""
    status = device / "power/runtime_status"
    if not status.exists() or status.read_text().strip() != "suspended":
        yield
        return
    control = device / "power/control"
    previous = control.read_text().strip()
    control.write_text("on")
    try:
        yield
    finally:
        control.write_text(previous)


def _read_rom(device: Path) -> bytes:
    rom = device / "rom"
    with _awake(device):
        try:
            return rom.read_bytes()
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        # The kernel refuses to read a ROM (EINVAL) until "1" is written to the file.
        rom.write_text("1")
        try:
            return rom.read_bytes()
        finally:
            rom.write_text("0")


def _rom(device: Path, identity: Identity) -> Finding:
    if not (device / "rom").exists():
        return Finding("ok", "rom", "no ROM")
    try:
        data = _read_rom(device)
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        denied = e.errno in (errno.EACCES, errno.EPERM)
        return Finding(
            "warning",
            "rom",
            f"the expansion ROM cannot be read: {e.strerror} ({name})",
            "run doctor as root"
            if denied
            else "none needed unless the guest needs the ROM: the kernel finds no valid image in it (dmesg "
            "says why), so VFIO offers none and the hand-off skips it",
        )
    try:
        checked = check_rom(data, identity, frozenset())  # what the hand-off's rom step checks
    except RomError as e:
        return Finding(
            "error",
            "rom",
            f"the expansion ROM is not valid: {e}; the hand-off would quarantine the device",
            "restore the vendor's firmware image (a previous user may have overwritten it)",
        )
    return Finding(
        "ok",
        "rom",
        f"{len(checked.images)} image(s), {checked.length} bytes, SHA-256 {checked.sha256} "
        f"(for [handoff] rom_sha256)",
    )


def _ats(chains: tuple[bytes, Chains] | None) -> Finding:
    if chains is None:
        return Finding(
            "warning", "ats", "cannot tell: only the config header is readable", "run doctor as root"
        )
    image, found = chains
    ats = found.find(CapKind.EXT, caps.ATS)
    if ats is None:
        return Finding("ok", "ats", "no ATS capability")
    control = u16(image, ats.offset + ATS_CONTROL)
    if not control & ATS_ENABLE:
        return Finding(
            "ok", "ats", f"ATS capability @{ats.offset:#x} disabled on the host; the guest never sees it"
        )
    return Finding(
        "warning",
        "ats",
        f"ATS is enabled on the host (control {control:#06x} @{ats.offset + ATS_CONTROL:#x}): the daemon "
        "hides ATS from the guest, but the function can still send translated requests past the IOMMU",
        "disable ATS on the host (kernel parameter pci=noats), or do not pass this device",
    )


def _port_acs(port: Path) -> str | None:
    """What keeps ``port`` from isolating the functions below it; None when nothing does
    or it is not a root or downstream port."""
    chains = _chains((port / "config").read_bytes())
    if chains is None:
        return f"{port.name}: only the config header is readable (run doctor as root)"
    image, found = chains
    exp = found.find(CapKind.STD, caps.EXP)
    if exp is None:
        return None
    port_type = (u16(image, exp.offset + caps.EXP_FLAGS) >> caps.EXP_FLAGS_TYPE_SHIFT) & 0xF
    if port_type not in (caps.EXP_TYPE_ROOT_PORT, EXP_TYPE_DOWNSTREAM_PORT):
        return None
    kind = "root port" if port_type == caps.EXP_TYPE_ROOT_PORT else "downstream port"
    acs = found.find(CapKind.EXT, caps.ACS)
    if acs is None:
        return f"{port.name} ({kind}) has no ACS capability"
    # As in the kernel's pci_acs_flags_enabled: a control the port does not implement is
    # hard-wired enabled, so only the implemented ones must be on.
    implemented = u16(image, acs.offset + ACS_CAPABILITY)
    control = u16(image, acs.offset + ACS_CONTROL)
    off = [name for bit, name in ACS_ISOLATION.items() if bit & implemented and not bit & control]
    return f"{port.name} ({kind}) has ACS {' '.join(off)} off" if off else None


def _acs(device: Path) -> Finding:
    ports = [parent for parent in device.resolve().parents if BDF.match(parent.name)]
    if not ports:
        return Finding("ok", "acs", "no bridge above the function (it is on a root bus)")
    gaps = [gap for gap in (_port_acs(port) for port in ports) if gap]
    path = " -> ".join(port.name for port in reversed(ports))
    if not gaps:
        return Finding("ok", "acs", f"peer-to-peer isolated on the way up ({path})")
    return Finding(
        "warning",
        "acs",
        f"peer-to-peer can bypass the IOMMU: {'; '.join(gaps)}",
        "enable ACS on those ports (a firmware setting), use a slot whose ports have it, or give every "
        "device below them to the same guest",
    )


def _memlock(guest_ram: int | None, proc: Path) -> Finding:
    # Doctor sees its own limit; the daemon's comes from its unit (LimitMEMLOCK=), so say whose.
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else format_size(soft)
    if has_cap_ipc_lock(proc):
        return Finding("ok", "memlock", "this process has CAP_IPC_LOCK: pinning guest RAM is not limited")
    if guest_ram is None:
        return Finding(
            "ok", "memlock", f"RLIMIT_MEMLOCK {limit} for this process (--guest-ram SIZE compares it)"
        )
    if soft == resource.RLIM_INFINITY or soft >= guest_ram:
        return Finding(
            "ok", "memlock", f"RLIMIT_MEMLOCK {limit} for this process covers {format_size(guest_ram)}"
        )
    return Finding(
        "warning",
        "memlock",
        f"RLIMIT_MEMLOCK {limit} for this process, below the guest's {format_size(guest_ram)}, and no "
        "CAP_IPC_LOCK: mapping guest RAM for DMA would fail with ENOMEM",
        advice.memlock(guest_ram),
    )


# pinning: a sample of this host

SAMPLE_SIZE = 64 << 20
# A smaller mlock sample is over too fast to time well: below it, fault the pages in without locking.
MIN_MLOCK_SAMPLE = 4 << 20
BASE_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class PinSample:
    """``size`` bytes of ``page``-sized pages mapped and pinned (or only faulted in) in ``seconds``."""

    page: int
    size: int
    seconds: float
    how: str  # how the pages were pinned, and why not with mlock when they were not

    def estimate(self, size: int) -> float:
        return self.seconds * size / self.size


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


class MlockFailed(OSError):
    """mlock(2) refused: the sample falls back to faulting the pages in."""


def _mlock(mapping: mmap.mmap, size: int) -> None:
    anchor = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(anchor)
    del anchor  # the mapping cannot be closed while a ctypes object exports its buffer
    if _libc.mlock(address, size) != 0:
        number = ctypes.get_errno()
        raise MlockFailed(number, os.strerror(number))


def _meminfo(proc: Path) -> dict[str, int]:
    """``/proc/meminfo``'s numbers (kB, or counts for HugePages_*); empty when unreadable."""
    try:
        text = (proc / "meminfo").read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if value.split() and value.split()[0].isdigit():
            found[key] = int(value.split()[0])
    return found


def _time_pinning(page: int, size: int, *, lock: bool) -> float:
    """Seconds to map a fresh memfd of ``size`` bytes in ``page``-sized pages and mlock it, or
    (``lock`` false) fault it in with MAP_POPULATE.

    Raises:
        OSError: the memfd, its mapping or the mlock failed.
    """
    fd = os.memfd_create(
        "vfio-mediator-doctor", os.MFD_CLOEXEC | (os.MFD_HUGETLB if page != BASE_PAGE else 0)
    )
    try:
        os.ftruncate(fd, size)
        clock = time.perf_counter()
        if not lock:
            with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE):
                return time.perf_counter() - clock
        with mmap.mmap(fd, size) as mapping:
            _mlock(mapping, size)
            return time.perf_counter() - clock
    finally:
        os.close(fd)


def _sample(page: int, lockable: int | None, largest: int = SAMPLE_SIZE) -> PinSample:
    """Pinning up to ``largest`` bytes of ``page``-sized pages, timed, with as much mlock as the limit allows.

    Raises:
        OSError: the memfd or its mapping cannot be made (no huge pages after all).
    """
    size = largest // page * page
    if lockable is not None and lockable < size:
        fits = lockable // page * page
        if fits < MIN_MLOCK_SAMPLE:
            limited = f"MAP_POPULATE, as RLIMIT_MEMLOCK leaves {format_size(lockable)} to mlock"
            return PinSample(page, size, _time_pinning(page, size, lock=False), limited)
        size = fits
    try:
        return PinSample(page, size, _time_pinning(page, size, lock=True), "mlock")
    except MlockFailed as e:
        failed = f"MAP_POPULATE, as mlock failed ({e.strerror})"
        return PinSample(page, size, _time_pinning(page, size, lock=False), failed)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"


def _huge_pages(proc: Path, lockable: int | None) -> tuple[PinSample | None, str]:
    """A sample of the default huge page size, or None and why there is none."""
    meminfo = _meminfo(proc)
    page, free = meminfo.get("Hugepagesize", 0) << 10, meminfo.get("HugePages_Free", 0)
    if not page:
        return None, "this kernel has no huge pages"
    if not free:
        return None, f"no free {format_size(page)} huge pages to sample"
    if page > SAMPLE_SIZE:
        return None, f"{format_size(page)} huge pages are larger than a sample"
    try:
        return _sample(page, lockable, min(SAMPLE_SIZE, free * page)), ""
    except OSError as e:
        return None, f"{format_size(page)} huge pages could not be sampled ({e.strerror})"


def _pinning(guest_ram: int | None, proc: Path) -> Finding:
    lockable = lockable_bytes(proc)
    try:
        samples = [_sample(BASE_PAGE, lockable)]
    except OSError as e:
        return Finding(
            "warning",
            "pinning",
            f"cannot sample how long pinning takes: a {format_size(SAMPLE_SIZE)} memfd cannot be mapped "
            f"({e.strerror})",
            "none needed to serve the device; the estimate needs memfd_create and mmap",
        )
    huge, no_huge = _huge_pages(proc, lockable)
    if huge is not None:
        samples.append(huge)
    measured = "; ".join(
        f"{format_size(s.page)} pages: {format_size(s.size)} in {s.seconds * 1000:.1f} ms by {s.how}"
        for s in samples
    )
    method = (
        f"From a sample ({measured}{'; ' + no_huge if no_huge else ''}): mlock faults in, zeroes and locks "
        "pages as VFIO's pin does, and VFIO maps each one in the IOMMU on top"
    )
    if guest_ram is None:
        rates = " and ".join(
            f"{_duration(s.estimate(1 << 30))} per 1G in {format_size(s.page)} pages" for s in samples
        )
        return Finding(
            "ok",
            "pinning",
            f"pinning guest RAM takes about {rates} (--guest-ram SIZE estimates a guest's). {method}",
        )
    estimates = [_duration(s.estimate(guest_ram)) for s in samples]
    each = " and ".join(
        f"{e} in {format_size(s.page)} pages" for e, s in zip(estimates, samples, strict=True)
    )
    in_huge_pages = f" ({estimates[1]} in huge pages)" if huge is not None else ""
    return Finding(
        "ok",
        "pinning",
        f"pinning {format_size(guest_ram)} of guest RAM takes about {each}, so the device can DMA about "
        f"{estimates[0]} after QEMU maps the guest's RAM{in_huge_pages}: the daemon answers DMA_MAP at once "
        f"and holds the device's Bus Master Enable off until the RAM is pinned. {method}",
    )


# A reset takes longer some times than others and the records are a sample: advise a deadline a
# quarter above the longest recorded.
RESET_HEADROOM = 1.25


def _timeouts(client_timeout: float) -> str:
    """The daemon's setting and QEMU's, which must say the same."""
    milliseconds = f"{client_timeout * 1000:.0f}"
    return f"client_timeout = {client_timeout:g} and x-msg-timeout={milliseconds} on -device vfio-user-pci"


def _reset_time(name: str, client_timeout: float, state: StateStore | None) -> Finding:
    deadline = reply_deadline(client_timeout)
    answered = f"a guest's reset is answered within {deadline:g} s ({_timeouts(client_timeout)})"
    if state is None or state.directory is None:
        return Finding(
            "ok",
            "timeout",
            f"{answered}; --config FILE (or --state-directory DIR) compares the resets hand-offs recorded",
        )
    durations = [d for d in map(reset_seconds, state.records(name)) if d is not None]
    if not durations:
        return Finding("ok", "timeout", f"{answered}; no reset of {name} is recorded in {state.directory}")
    longest = max(durations)
    took = f"resets of {name} took up to {longest:.1f} s in {len(durations)} recorded hand-offs"
    if longest <= deadline:
        return Finding("ok", "timeout", f"{took}: {answered}")
    advised = math.ceil(client_timeout_for(longest * RESET_HEADROOM))
    return Finding(
        "warning",
        "timeout",
        f"{took}, longer than the {deadline:g} s a guest's reset is answered within "
        f"(client_timeout = {client_timeout:g}): such a reset fails with ETIMEDOUT and ends the session",
        f"set {_timeouts(advised)} (without a config: serve --client-timeout {advised})",
    )


def _mdev_found(mdev: MediatedDevice) -> Finding:
    kind = f"type {mdev.mdev_type}{f' ({mdev.type_name})' if mdev.type_name else ''} on {mdev.parent}"
    if mdev.device_api == "vfio-pci":
        return Finding("ok", "mdev", f"{mdev.uuid}: {kind}")
    return Finding(
        "error",
        "mdev",
        f"{mdev.uuid}: {kind} is a {mdev.device_api or 'unknown'} mediated device; the daemon serves "
        "PCI ones (device_api vfio-pci)",
        "create one of a vfio-pci type instead (vfio-mediator devices lists the types offered)",
    )


def _mdev_driver(mdev: MediatedDevice, root: Path) -> Finding:
    if mdev.driver is None:
        return Finding(
            "error",
            "driver",
            "bound to no driver: nothing registers the mediated device with VFIO",
            advice.bind_mdev(mdev.uuid, root),
        )
    return Finding("ok", "driver", f"bound to {mdev.driver}, the vendor driver of {mdev.parent}'s mdevs")


def _mdev_group(mdev: MediatedDevice, root: Path) -> Finding:
    # An mdev's group is VFIO's own, made when the vendor driver registers it, with or without an
    # IOMMU: ENABLE_IOMMU, _group_finding's fix for a function, would not help.
    if mdev.iommu_group is None:
        return Finding(
            "error",
            "iommu",
            f"no IOMMU group: its driver ({mdev.driver or 'none'}) did not register it with VFIO",
            advice.bind_mdev(mdev.uuid, root),
        )
    return _group_finding(mdev.uuid, mdev.iommu_group, mdev.group_members, root)


def _mdev_parent(mdev: MediatedDevice, root: Path) -> Finding:
    owned = "reset, expansion ROM, ATS and ACS are the parent's"
    if (root / "bus/pci/devices" / mdev.parent).exists():
        return Finding(
            "ok",
            "parent",
            f"{owned}: vfio-mediator doctor --device {mdev.parent} checks them (there the driver check "
            "expects vfio-pci, but a parent keeps its vendor driver)",
        )
    return Finding(
        "ok",
        "parent",
        f"{owned}, and {mdev.parent} is a virtual device: the vendor driver emulates the reset, and there "
        "is no ROM, ATS or ACS",
    )


def _mdev_checks(device: Path, root: Path, dev: Path) -> list[Finding]:
    """The checks of the mediated device at ``device`` that are its own, not its parent's."""
    mdev = read_mdev(device)
    return [
        _mdev_found(mdev),
        _mdev_driver(mdev, root),
        _mdev_group(mdev, root),
        _vfio_api(device, mdev.iommu_group, dev),
        _mdev_parent(mdev, root),
    ]


def _function_checks(address: str, device: Path, root: Path, dev: Path) -> list[Finding]:
    """The checks of the PCI function at ``device``."""
    config = (device / "config").read_bytes()
    identity = Identity.of(config)
    chains = _chains(config)
    driver = driver_of(device)
    group, members = iommu_group_of(device)
    return [
        Finding("ok", "function", f"{address} {identity}"),
        Finding("ok", "driver", f"bound to {driver}")
        if is_vfio_driver(driver)
        else _not_vfio(address, device, driver, root),
        _group_finding(address, group, members, root),
        _vfio_api(device, group, dev),
        _peer_dma(device, dev),
        _reset(device, chains),
        _rom(device, identity),
        _ats(chains),
        _acs(device),
    ]


def doctor(
    target: str,
    root: Path = SYSFS,
    guest_ram: int | None = None,
    *,
    proc: Path = PROC,
    dev: Path = DEV,
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
    state: StateStore | None = None,
    name: str | None = None,
) -> list[Finding]:
    """Every check for serving ``target`` (a function's address or a mediated device's UUID), with
    guest RAM of ``guest_ram`` bytes.

    ``client_timeout`` is the daemon's; ``state`` holds the hand-off records of the device, under
    ``name`` (its name in the config; default: its address or UUID, as ``serve --device`` names it).
    """
    if is_mdev_name(target):
        canonical = target.strip().lower()
        missing = missing_mdev(canonical, root)
        if missing is not None:
            why, fix = missing
            return [Finding("error", "mdev", f"no mediated device {canonical}: {why}", fix)]
        own = _mdev_checks(root / "bus/mdev/devices" / canonical, root, dev)
    else:
        try:
            canonical = normalize_bdf(target)
        except AddressError as e:
            return [Finding("error", "function", str(e), "give the address as lspci -D shows it")]
        device = root / "bus/pci/devices" / canonical
        if not device.exists():
            return [
                Finding(
                    "error",
                    "function",
                    f"no PCI device {canonical} (nothing at {device})",
                    "check the address with lspci -D or vfio-mediator devices",
                )
            ]
        own = _function_checks(canonical, device, root, dev)
    return [
        *own,
        _memlock(guest_ram, proc),
        _pinning(guest_ram, proc),
        _reset_time(name or canonical, client_timeout, state),
    ]
