"""Imports follow the data, one way: cli -> daemon -> vfio_user -> virt -> backends -> cshim.

Each module of ``mediator/`` belongs to a layer; a module may import its own
layer and the layers below it, never one above. ``pci``, ``quirks`` and the
leaf utilities sit below all of them (and ``pci`` knows nothing but itself
and the input errors it reports).
The imports are read with ``ast``, without importing anything, so a layer
violation fails here even where it would not cycle at run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "mediator"
ORDER = ("leaf", "cshim", "backends", "virt", "vfio_user", "daemon", "cli")
DAEMON = {
    "daemon",
    "handoff",
    "fabric",
    "settings",
    "state",
    "tenancy",
    "metrics",
    "systemd",
    "commands",
    "preflight",
    "report",
    "vms",
}
# Edges against the order that are allowed, each with its reason. None today.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def layer(module: str) -> str:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top in ("cli", "__main__"):
        return "cli"
    if top in DAEMON:
        return "daemon"
    if top in ("vfio_user", "virt", "backends"):
        return top
    if top in ("_vfio_shim", "_fast_path"):
        return "cshim"
    return "leaf"  # pci, quirks, profiles, errors, tomlinput, audit, log, unix_listener, vfio_abi


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["mediator", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The mediator modules ``path`` imports (``from a import b`` counts b when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("mediator")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mediator"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    return found


def edges() -> list[tuple[str, str]]:
    known = modules()
    return sorted((source, target) for source, path in known.items() for target in imports(path, known))


def test_no_module_imports_a_layer_above_its_own() -> None:
    wrong = [
        f"{source} ({layer(source)}) imports {target} ({layer(target)})"
        for source, target in edges()
        if ORDER.index(layer(target)) > ORDER.index(layer(source)) and (source, target) not in EXCEPTIONS
    ]
    assert not wrong, "\n".join(wrong)


def test_pci_knows_nothing_but_pci() -> None:
    wrong = [
        f"{source} imports {target}"
        for source, target in edges()
        if source.startswith("mediator.pci") and not target.startswith(("mediator.pci", "mediator.errors"))
    ]
    assert not wrong, "\n".join(wrong)


def test_the_walk_sees_the_real_imports() -> None:
    found = edges()
    assert ("mediator.cli", "mediator.daemon") in found
    assert ("mediator.vfio_user.service", "mediator.vfio_user.model") in found
    assert all(
        target in modules() or target in ("mediator._vfio_shim", "mediator._fast_path") for _, target in found
    )


def test_the_virtual_device_loads_neither_the_wire_nor_trio() -> None:
    check = (
        "import sys, mediator.virt.device; "
        "loaded = [m for m in ('trio', 'construct', 'mediator.vfio_user.wire', 'mediator.metrics') "
        "if m in sys.modules]; assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_the_server_knows_a_device_only_through_its_model() -> None:
    # The C fast path's loop is the transport's own (it reads the socket); the device's
    # tables reach it only as the model's opaque ``fast_path()``.
    wrong = [
        f"{source} imports {target}"
        for source, target in edges()
        if layer(source) == "vfio_user"
        and layer(target) in ("virt", "backends", "cshim")
        and target != "mediator._fast_path"
    ]
    assert not wrong, "\n".join(wrong)
