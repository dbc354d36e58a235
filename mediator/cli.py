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
import json
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import trio

from mediator import __version__, log
from mediator.backends.base import Backend, BackendError
from mediator.backends.profile import DEFAULT_PROFILE, load_profile, resolve_profile, shipped_profiles
from mediator.backends.sim import SimBackend
from mediator.backends.sysfs import DeviceNotReady
from mediator.backends.vfio import VfioBackend
from mediator.errors import InputError, InputErrors
from mediator.pci.chain import ChainError
from mediator.pci.registers import Identity
from mediator.quirks.table import QuirkTable, load_table_file
from mediator.report import inspection, render_text
from mediator.vfio_user.server import DeviceServer, SocketInUseError, serve_until_signalled
from mediator.virt.device import VirtualDevice
from mediator.virt.plan import PlanError

EXIT_OK = 0
EXIT_DEVICE = 1
EXIT_INPUT = 2


def _print_errors(errors: Sequence[InputError | str]) -> None:
    for error in errors:
        print(f"error: {error}", file=sys.stderr)


def _open_device(args: argparse.Namespace) -> tuple[VirtualDevice, QuirkTable, str, str]:
    """(virtual device, quirk table, name, source) for --device or --profile."""
    table = QuirkTable.load(args.quirks, builtin=not args.no_builtin_quirks)
    backend: Backend
    if args.device:
        backend = VfioBackend(args.device, bar_access=args.bar_access)
        name, source = backend.function.bdf, backend.description
    else:
        path = resolve_profile(args.profile)
        profile = load_profile(path)
        backend = SimBackend(profile)
        name, source = profile.name, str(path)
    try:
        return VirtualDevice.open(backend, table), table, name, source
    except BaseException:
        backend.close()
        raise


def cmd_inspect(args: argparse.Namespace) -> int:
    device, table, name, source = _open_device(args)
    try:
        report = inspection(device, name=name, source=source, quirk_origins=table.origins)
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


def cmd_serve(args: argparse.Namespace) -> int:
    log.configure(args.log_level)
    device, _, name, _ = _open_device(args)
    server = DeviceServer(device, name)
    try:
        trio.run(serve_until_signalled, server, args.socket)
    except SocketInUseError as e:
        _print_errors([str(e)])
        return EXIT_INPUT
    finally:
        device.backend.close()
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
        "--device", metavar="BDF", help="a real PCI function bound to vfio-pci, e.g. 0000:3b:00.0"
    )
    command.add_argument(
        "--bar-access",
        choices=["mmap", "trap"],
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
        description="Serve a simulated device profile over vfio-user until SIGTERM or SIGINT.",
    )
    _device_arguments(serve)
    serve.add_argument(
        "--socket", type=Path, required=True, metavar="PATH", help="the UNIX socket to listen on"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=cmd_serve)

    inspect = commands.add_parser(
        "inspect",
        help="show a device and the guest's view of it, side by side",
        description="Show the physical and the guest-visible config space, capabilities, BARs and "
        "every policy decision for a simulated device profile.",
    )
    _device_arguments(inspect)
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
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result: int = args.run(args)
    except InputErrors as e:
        _print_errors(e.errors)
        return EXIT_INPUT
    except (PlanError, ChainError, DeviceNotReady, BackendError) as e:
        _print_errors([str(e)])
        return EXIT_DEVICE
    except BrokenPipeError:
        return EXIT_OK
    return result
