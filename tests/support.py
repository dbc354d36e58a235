"""Building simulated devices the way the daemon does, for tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mediator.backends.base import IrqCounts
from mediator.backends.profile import Behaviour, Profile, load_profile, shipped_profiles
from mediator.backends.sim import SimBackend
from mediator.quirks.table import QuirkTable
from mediator.virt.device import VirtualDevice
from mediator.virt.plan import DeviceContext

PROFILES = shipped_profiles()
BUILTIN = QuirkTable.load()


def profile(name: str) -> Profile:
    return load_profile(PROFILES[name])


def image_profile(
    image: bytes,
    bar_sizes: Sequence[int] = (0,) * 6,
    rom_size: int = 0,
    behaviours: Sequence[Behaviour] = (),
) -> Profile:
    """A profile around a raw config image, as if loaded from a file."""
    return Profile(
        name="test",
        description="",
        address=None,
        source="test",
        image=bytes(image),
        bar_sizes=tuple(bar_sizes),
        rom_size=rom_size,
        irqs=IrqCounts(0, 0, 0),
        behaviours=tuple(behaviours),
    )


def device(
    source: str | Profile,
    *,
    quirk_files: Sequence[Path] = (),
    builtin: bool = True,
    context: DeviceContext | None = None,
) -> tuple[VirtualDevice, SimBackend]:
    """The virtual device the daemon would serve for a profile, and its simulated hardware."""
    prof = profile(source) if isinstance(source, str) else source
    table = QuirkTable.load(quirk_files, builtin=builtin) if quirk_files or not builtin else BUILTIN
    backend = SimBackend(prof)
    return VirtualDevice.open(backend, table, context), backend


def write_table(folder: Path, text: str, name: str = "operator.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path
