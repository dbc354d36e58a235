"""The ``vfio-mediator`` command.

Exit codes (also in the README):
  0  done
  1  the device cannot be served: not ready for VFIO, a VFIO error, or a policy
     that cannot be carried out on it
  2  bad input: usage, a malformed or invalid profile, quirk table or dump, a
     socket path that is taken

Every error about input is one line naming the file and the key or line;
no traceback reaches the user for anything they can fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import msgspec
import trio

from mediator import __version__, log, preflight
from mediator.audit import audit_log
from mediator.backends.base import BAR_ACCESS_MODES, BackendError
from mediator.backends.profile import DEFAULT_PROFILE, load_profile, resolve_profile, shipped_profiles
from mediator.backends.sim import SimBackend
from mediator.backends.sysfs import (
    DeviceNotReady,
    MdevType,
    MediatedDevice,
    is_mdev_name,
    list_mdevs,
    mdev_types,
)
from mediator.daemon import Daemon, forbid_core_dumps, open_device
from mediator.errors import InputError, InputErrors
from mediator.handoff import HandOff, HandOffReason, Owner
from mediator.pci.address import AddressError, normalize_bdf
from mediator.pci.chain import ChainError
from mediator.pci.registers import Identity
from mediator.quirks.table import QuirkTable, load_table_file
from mediator.report import inspection, render_text
from mediator.settings import DeviceSpec, Settings, load_settings
from mediator.state import StateError, StateStore
from mediator.unix_listener import SocketError
from mediator.virt.device import VirtualDevice
from mediator.virt.plan import PlanError
from mediator.virt.reset import DEFAULT_CLIENT_TIMEOUT, MAX_CLIENT_TIMEOUT, RESET_MODES

EXIT_OK = 0
EXIT_DEVICE = 1
EXIT_INPUT = 2


def _print_errors(errors: Sequence[InputError | str]) -> None:
    for error in errors:
        print(f"error: {error}", file=sys.stderr)


def cmd_inspect(args: argparse.Namespace) -> int:
    settings, spec = _configured_device(args)
    device, table = open_device(settings, spec)
    try:
        source = str(resolve_profile(spec.profile)) if spec.profile else device.backend.description
        report = inspection(device, name=spec.name, source=source, quirk_origins=table.origins)
    finally:
        device.backend.close()
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(report, device.plan))
    return EXIT_OK


def _check_file(path: Path) -> str:
    """A one-line summary of a valid file; raises InputErrors otherwise."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        document = None  # the specific loader below reports it with its position
    if document is not None and "config" in document:
        profile = load_profile(path)
        try:
            VirtualDevice.open(SimBackend(profile), QuirkTable.load()).backend.close()
        except PlanError as e:
            raise InputErrors([InputError(str(path), "", f"with the built-in quirks: {e}")]) from None
        return f"profile {profile.name}: {Identity.of(profile.image)}"
    if document is not None and "quirk" not in document:
        raise InputErrors(
            [InputError(str(path), "", "neither a quirk table ([[quirk]]) nor a device profile ([config])")]
        )
    quirks = load_table_file(path)
    return f"quirk table: {len(quirks)} quirks"


def cmd_check(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            summary = _check_file(path)
        except InputErrors as e:
            _print_errors(e.errors)
            failed = True
            continue
        print(f"ok: {path}: {summary}")
    return EXIT_INPUT if failed else EXIT_OK


def _command_line_settings(args: argparse.Namespace) -> Settings:
    """The one device the command line names, as a config would.

    Its state directory is ``--state-directory``, else systemd's
    ``STATE_DIRECTORY`` (``StateDirectory=`` in the unit), else none.
    """
    mdev = None
    if args.device and is_mdev_name(args.device):
        name = mdev = args.device.strip().lower()
        profile = None
    elif args.device:
        try:
            name, profile = normalize_bdf(args.device), None
        except AddressError as e:
            raise InputErrors(
                [InputError("the command line", "--device", f"{e}, or a mediated device's UUID")]
            ) from None
    else:
        profile = str(resolve_profile(args.profile))
        name = load_profile(Path(profile)).name
    spec = DeviceSpec(
        name=name,
        socket=str(args.socket) if getattr(args, "socket", None) else "",
        bdf=name if args.device and mdev is None else None,
        mdev=mdev,
        profile=profile,
        bar_access=args.bar_access,
        quirks=[str(q) for q in args.quirks],
        builtin_quirks=not args.no_builtin_quirks,
        reset=getattr(args, "reset", None),
    )
    state = getattr(args, "state_directory", None) or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Settings(
        source="the command line",
        devices=(spec,),
        state_directory=Path(state) if state else None,
        client_timeout=getattr(args, "client_timeout", None) or DEFAULT_CLIENT_TIMEOUT,
        fast_path=not getattr(args, "no_fast_path", False),
    )


def _in_the_config(**flags: object) -> None:
    """Refuse the flags given (a flag's value, by its name) that a config file says instead."""
    given = [f"--{name.replace('_', '-')}" for name, value in flags.items() if value]
    if given:
        raise InputErrors([InputError("the command line", "", f"{given[0]} goes in the config file")])


def cmd_serve(args: argparse.Namespace) -> int:
    if args.config is not None:
        _in_the_config(
            socket=args.socket,
            device=args.device,
            reset=args.reset,
            state_directory=args.state_directory,
            client_timeout=args.client_timeout,
        )
        settings = load_settings(args.config)
        if args.no_fast_path:  # for debugging, over the config's
            settings = dataclasses.replace(settings, fast_path=False)
    elif args.socket is None and "LISTEN_FDS" not in os.environ:
        raise InputErrors(
            [
                InputError(
                    "the command line", "", "give --socket PATH or --config FILE (or run from a .socket unit)"
                )
            ]
        )
    else:
        settings = _command_line_settings(args)
    log.configure(args.log_level or settings.log.level, args.log_format or settings.log.format)
    forbid_core_dumps()
    # A service (a config, or systemd's socket) waits for a device the host holds back; a
    # command line says at once why its device cannot be served.
    service = args.config is not None or "LISTEN_FDS" in os.environ
    try:
        daemon = Daemon.open(settings, args.config, reopen=service)
    except StateError as e:
        _print_errors([str(e)])
        return EXIT_INPUT
    try:
        if not daemon.managed and not daemon.reopening:
            _print_errors(
                [why if why.startswith(name) else f"{name}: {why}" for name, why in daemon.failed.items()]
            )
            return EXIT_DEVICE
        trio.run(daemon.serve)
    except SocketError as e:
        _print_errors([str(e)])
        return EXIT_INPUT
    finally:
        daemon.close()
    return EXIT_OK


def _configured_device(args: argparse.Namespace) -> tuple[Settings, DeviceSpec]:
    """The config (or the command line) and the device the arguments name in it."""
    if args.config is None:
        settings = _command_line_settings(args)
        return settings, settings.devices[0]
    settings = load_settings(args.config)
    wanted = args.device or args.profile
    spec = settings.find(wanted)
    if spec is None and args.profile:
        spec = next((d for d in settings.devices if d.profile == str(resolve_profile(args.profile))), None)
    if spec is None:
        raise _no_such_device(settings, wanted)
    return settings, msgspec.structs.replace(spec, reset=getattr(args, "reset", None) or spec.reset)


def _no_such_device(settings: Settings, wanted: str) -> InputErrors:
    names = ", ".join(d.name for d in settings.devices)
    return InputErrors([InputError(settings.source, "device", f"no device {wanted!r} (devices: {names})")])


def cmd_scrub(args: argparse.Namespace) -> int:
    settings, spec = _configured_device(args)
    state = StateStore(settings.state_directory)
    try:
        state.prepare()
    except StateError as e:
        _print_errors([str(e)])
        return EXIT_INPUT
    device, _ = open_device(settings, spec)
    try:
        record = HandOff(settings.handoff, state).run(
            device, Owner(spec.name, spec.bdf, spec.tenant, spec.mdev), HandOffReason.ON_DEMAND
        )
    finally:
        device.backend.close()
    if args.json:
        json.dump(record.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for step in record.steps:
            print(f"{step.name:<10} {step.result:<8} {step.seconds:7.3f} s  {step.detail}")
        where = f" in {settings.state_directory}" if settings.state_directory else ""
        verdict = "ready for the next tenant" if record.ok else f"quarantined{where}: {record.failure}"
        print(f"{spec.name}: {verdict}")
    return EXIT_OK if record.ok else EXIT_DEVICE


def cmd_release(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    spec = settings.find(args.device)
    if spec is None:
        raise _no_such_device(settings, args.device)
    state = StateStore(settings.state_directory)
    record = state.quarantined(spec.name)
    if not state.release(spec.name):
        print(f"{spec.name} is not in quarantine")
        return EXIT_OK
    audit_log.warning("released from quarantine", device=spec.name, was=record)
    print(f"{spec.name} released from quarantine: the daemon hands it off again before its next client")
    return EXIT_OK


def cmd_profiles(_args: argparse.Namespace) -> int:
    for name, path in shipped_profiles().items():
        try:
            description = load_profile(path).description
        except InputErrors as e:
            description = f"(invalid: {e.errors[0]})"
        marker = " (default)" if name == DEFAULT_PROFILE else ""
        print(f"{name:<24} {description}{marker}")
    return EXIT_OK


def _device_arguments(command: argparse.ArgumentParser) -> None:
    source = command.add_mutually_exclusive_group()
    source.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        metavar="NAME|FILE",
        help=f"a simulated device: a shipped profile (see `vfio-mediator profiles`) or a profile file; "
        f"default {DEFAULT_PROFILE}",
    )
    source.add_argument(
        "--device",
        metavar="BDF|UUID",
        help="a real PCI function bound to vfio-pci, e.g. 0000:3b:00.0, or a mediated device by its UUID",
    )
    command.add_argument(
        "--bar-access",
        choices=BAR_ACCESS_MODES,
        default="mmap",
        help="mmap: the client maps BAR pages outside trap windows through the VFIO device fd "
        "(native speed); trap: no fd leaves the daemon and every BAR access is a message",
    )
    command.add_argument(
        "--quirks",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="an operator quirk table, applied after the built-ins (repeatable)",
    )
    command.add_argument("--no-builtin-quirks", action="store_true", help="apply only the --quirks tables")


def _reset_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--reset",
        choices=RESET_MODES,
        help="how the hand-off resets the device: a secondary bus reset where possible (default), "
        "a function reset, or none (for a device with no reset method, which is otherwise quarantined)",
    )


def parse_client_timeout(text: str) -> float:
    """Seconds, above 0 and no more than a client can be told to wait."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_CLIENT_TIMEOUT:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a client timeout: give seconds above 0 (QEMU's x-msg-timeout / 1000), e.g. 10"
        )
    return seconds


def _client_timeout_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--client-timeout",
        type=parse_client_timeout,
        metavar="SECONDS",
        help="without --config: how long the client waits for a reply, QEMU's x-msg-timeout in "
        f"seconds (default {DEFAULT_CLIENT_TIMEOUT:g}); a guest's reset is answered before it",
    )


# preflight: devices and doctor

SIZE = re.compile(r"^(\d+)([KMGT]?)(?:i?B)?$", re.IGNORECASE)
SIZE_SHIFTS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str) -> int:
    """``64G`` -> 64 GiB; units are powers of 1024."""
    match = SIZE.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes or a number with K, M, G or T (powers of 1024), e.g. 64G"
        )
    return int(match.group(1)) << SIZE_SHIFTS[match.group(2).upper()]


def _group_text(summary: preflight.DeviceSummary) -> str:
    if summary.iommu_group is None:
        return "no IOMMU group"
    return f"group {summary.iommu_group} {'viable' if summary.group_viable else 'NOT viable'}"


def _function_lines(summaries: Sequence[preflight.DeviceSummary]) -> list[str]:
    if not summaries:
        return []
    lines = [f"{'BDF':<12}  {'ID':<9}  {'CLASS':<6}  {'DRIVER':<16}  {'IOMMU':<20}  QUIRKS"]
    for s in summaries:
        ids = f"{s.identity.vendor:04x}:{s.identity.device:04x}"
        lines.append(
            f"{s.bdf:<12}  {ids:<9}  {s.identity.class_code:06x}  {s.driver or '-':<16}  "
            f"{_group_text(s):<20}  {', '.join(s.quirks) or '-'}"
        )
        others = [f"{bdf} ({driver or 'no driver'})" for bdf, driver in s.group_members if bdf != s.bdf]
        if others:
            lines.append(
                f"{'':<14}group {s.iommu_group} also holds {', '.join(others)}: "
                "they go to one VM together (one IOMMU space)"
            )
    return lines


def _mdev_lines(mdevs: Sequence[MediatedDevice]) -> list[str]:
    if not mdevs:
        return []
    lines = [f"{'MDEV':<36}  {'PARENT':<12}  {'TYPE':<16}  {'DRIVER':<16}  IOMMU"]
    for m in mdevs:
        group = "no IOMMU group" if m.iommu_group is None else f"group {m.iommu_group}"
        lines.append(f"{m.uuid:<36}  {m.parent:<12}  {m.mdev_type:<16}  {m.driver or '-':<16}  {group}")
    return lines


def _mdev_type_lines(offered: Sequence[MdevType]) -> list[str]:
    if not offered:
        return []
    lines = [f"{'MDEV TYPE':<16}  {'PARENT':<12}  {'API':<9}  {'AVAILABLE':<9}  NAME"]
    for t in offered:
        lines.append(
            f"{t.name:<16}  {t.parent:<12}  {t.device_api:<9}  {t.available:<9}  {t.description or '-'}"
        )
        if t.device_api != "vfio-pci":
            lines.append(f"{'':<18}not servable: the daemon serves vfio-pci mediated devices only")
        elif t.available:
            lines.append(f"{'':<18}create one: echo $(uuidgen) > {t.path}/create")
        else:
            lines.append(f"{'':<18}none left to create: {t.parent} has no room for another")
    return lines


def run_devices(args: argparse.Namespace) -> int:
    summaries = preflight.list_devices(args.sysfs)
    mdevs, offered = list_mdevs(args.sysfs), mdev_types(args.sysfs)
    if args.json:
        # Still one list, as scripts written before mdevs read it: an entry's key says its kind.
        listing = [
            *(s.to_json() for s in summaries),
            *map(preflight.mdev_json, mdevs),
            *map(preflight.mdev_type_json, offered),
        ]
        json.dump(listing, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    sections = [_function_lines(summaries), _mdev_lines(mdevs), _mdev_type_lines(offered)]
    if not any(sections):
        print(
            "no candidate for VFIO: nothing is bound to vfio-pci, no display controller, no IOMMU group, "
            "no mediated device"
        )
        return 0
    print("\n\n".join("\n".join(lines) for lines in sections if lines))
    return 0


def _doctor_settings(args: argparse.Namespace) -> tuple[float, StateStore | None, str | None]:
    """The client timeout, the state directory and the function's name there that doctor reads."""
    if args.config is None:
        state = StateStore(args.state_directory) if args.state_directory else None
        return args.client_timeout or DEFAULT_CLIENT_TIMEOUT, state, None
    _in_the_config(state_directory=args.state_directory, client_timeout=args.client_timeout)
    settings = load_settings(args.config)
    spec = settings.find(args.device)
    return settings.client_timeout, StateStore(settings.state_directory), spec.name if spec else None


def run_doctor(args: argparse.Namespace) -> int:
    client_timeout, state, name = _doctor_settings(args)
    findings = preflight.doctor(
        args.device,
        args.sysfs,
        args.guest_ram,
        proc=args.proc,
        dev=args.dev,
        client_timeout=client_timeout,
        state=state,
        name=name,
    )
    errors = sum(f.severity == "error" for f in findings)
    if args.json:
        document = {"device": args.device, "errors": errors, "findings": [asdict(f) for f in findings]}
        json.dump(document, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for f in findings:
            print(f"{f.severity:<7}  {f.check:<8}  {f.found}")
            if f.fix:
                print(f"{'':<9}fix: {f.fix}")
    return 1 if errors else 0


def _tree_arguments(command: argparse.ArgumentParser, *trees: str) -> None:
    # Not for operators: tests point these at fake trees, so they stay out of --help.
    defaults = {"sysfs": preflight.SYSFS, "proc": preflight.PROC, "dev": preflight.DEV}
    for tree in trees:
        command.add_argument(f"--{tree}", type=Path, default=defaults[tree], help=argparse.SUPPRESS)


def _preflight_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``devices`` and ``doctor``."""
    devices = commands.add_parser(
        "devices",
        help="list the PCI functions and mediated devices that could be served, and the mdev types offered",
        description="List every PCI function bound to a VFIO driver, every display controller and "
        "every function in an IOMMU group, with its group (viable or not) and the device-specific "
        "built-in quirks that match it; then every mediated device (UUID, parent, type, driver, IOMMU "
        "group), and the mediated device types their parents offer, with how to create one. "
        "Reads sysfs only; exit 0.",
    )
    devices.add_argument(
        "--json",
        action="store_true",
        help='print one JSON list: functions (with key "bdf"), mediated devices ("mdev"), the types of '
        'mediated device offered ("mdev_type")',
    )
    _tree_arguments(devices, "sysfs")
    devices.set_defaults(run=run_devices)

    doctor_command = commands.add_parser(
        "doctor",
        help="check a function or mediated device before serving it, and say how to fix what is wrong",
        description="Check everything that would stop the daemon serving a function or weaken its "
        "isolation: driver, IOMMU group, VFIO nodes, reset method, expansion ROM, ATS on the host, "
        "ACS above it, RLIMIT_MEMLOCK; then how long pinning the guest's RAM takes on this host (from "
        "a short mlock sample) and whether the function's recorded resets fit in the client's timeout. "
        "A mediated device (by UUID) gets its own checks (that it exists, its vendor driver, group and "
        "VFIO nodes) and the same memlock, pinning and timeout ones; its parent's reset, ROM, ATS and "
        "ACS are checked on the parent. One line per check (ok, warning, error) with the fix under "
        "it. Exit 1 when a check is an error; warnings do not fail. Reading the ROM needs root and "
        "briefly enables it: run doctor while the device is not in use.",
    )
    doctor_command.add_argument(
        "--device",
        required=True,
        metavar="BDF|UUID",
        help="the function, e.g. 0000:3b:00.0, or the mediated device's UUID",
    )
    doctor_command.add_argument(
        "--guest-ram",
        type=parse_size,
        metavar="SIZE",
        help="the guest's RAM (e.g. 64G), to check RLIMIT_MEMLOCK against and estimate pinning it",
    )
    doctor_command.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the daemon config: its client_timeout, and the state directory whose hand-off records say "
        "how long the function's resets took",
    )
    doctor_command.add_argument(
        "--state-directory",
        type=Path,
        metavar="DIR",
        help="without --config: the state directory of `serve --device` (its records name the device "
        "by its address or UUID)",
    )
    _client_timeout_argument(doctor_command)
    doctor_command.add_argument("--json", action="store_true", help="print one JSON object")
    _tree_arguments(doctor_command, "sysfs", "proc", "dev")
    doctor_command.set_defaults(run=run_doctor)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="vfio-mediator",
        description="Serve a PCI device to a vfio-user VMM through a policed, quirk-table-driven view.",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve a device to a vfio-user client (QEMU) on a UNIX socket",
        description="Serve a real PCI function (--device) or a simulated profile (--profile) over vfio-user, "
        "or every device of a daemon config (--config), until SIGTERM or SIGINT.",
    )
    _device_arguments(serve)
    _reset_argument(serve)
    _client_timeout_argument(serve)
    serve.add_argument("--socket", type=Path, metavar="PATH", help="the UNIX socket to listen on")
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="serve every device of a daemon config (tenancy, hand-off, fabric) instead of one device",
    )
    serve.add_argument(
        "--state-directory",
        type=Path,
        metavar="DIR",
        help="without --config: where quarantine and hand-off records live (default: $STATE_DIRECTORY)",
    )
    serve.add_argument(
        "--no-fast-path",
        action="store_true",
        help="answer every request in Python, not config and plain BAR accesses in the C loop "
        "(for debugging; the config's fast_path = false says the same)",
    )
    serve.add_argument("--log-level", choices=log.LEVELS, help="default: the config's, else info")
    serve.add_argument(
        "--log-format",
        choices=log.FORMATS,
        help="auto (the default): console on a terminal, JSON lines elsewhere (with journald's level "
        "prefix under systemd); text: key=value lines",
    )
    serve.set_defaults(run=cmd_serve)

    scrub = commands.add_parser(
        "scrub",
        help="hand a device off now: reset, verify, check the ROM, wipe; quarantine it on failure",
        description="Run the tenant hand-off on a device that is not being served and print each step; "
        "exit 1 when a step fails (the device is then quarantined).",
    )
    _device_arguments(scrub)
    scrub.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the daemon config: hand-off policy, tenancy, state directory",
    )
    _reset_argument(scrub)
    scrub.add_argument("--json", action="store_true", help="print the hand-off record as JSON")
    scrub.set_defaults(run=cmd_scrub)

    release = commands.add_parser(
        "release",
        help="take a device out of quarantine once the cause is fixed",
        description="Remove a device's quarantine; the daemon hands it off again before serving it.",
    )
    release.add_argument("--device", required=True, metavar="NAME|BDF", help="the device, by name or address")
    release.add_argument("--config", type=Path, required=True, metavar="FILE", help="the daemon config")
    release.set_defaults(run=cmd_release)

    inspect = commands.add_parser(
        "inspect",
        help="show a device and the guest's view of it, side by side",
        description="Show the physical and the guest-visible config space, capabilities, BARs and "
        "every policy decision for a real function or a simulated device profile.",
    )
    _device_arguments(inspect)
    inspect.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="a daemon config: inspect its device (--device NAME|BDF) with its tenancy, links and clique",
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(run=cmd_inspect)

    check = commands.add_parser(
        "check",
        help="validate quirk tables and device profiles",
        description="Validate quirk tables and device profiles; exit 2 listing every error.",
    )
    check.add_argument("files", nargs="+", type=Path, metavar="FILE")
    check.set_defaults(run=cmd_check)

    profiles = commands.add_parser("profiles", help="list the device profiles that ship with the daemon")
    profiles.set_defaults(run=cmd_profiles)

    _preflight_commands(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log.configure("info", "text")  # stderr; serve sets its own level and format before it logs
    try:
        result: int = args.run(args)
    except InputErrors as e:
        _print_errors(e.errors)
        return EXIT_INPUT
    except (PlanError, ChainError, DeviceNotReady, BackendError, StateError) as e:
        _print_errors([str(e)])
        return EXIT_DEVICE
    except BrokenPipeError:
        return EXIT_OK
    return result
