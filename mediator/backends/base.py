"""What every backend offers the virtual device.

Region indexes follow vfio-pci: 0-5 are BAR0-5, 6 the expansion ROM, 7 the
config space. Sizes are the *real* sizes; rounding to what a guest can take
is the virtual device's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

BAR_REGIONS = range(6)
ROM_REGION = 6
CONFIG_REGION = 7


@dataclass(frozen=True)
class IrqCounts:
    intx: int
    msi: int
    msix: int


class BackendError(Exception):
    """The device failed an operation (an I/O error, a reset that did not happen)."""


class Backend(Protocol):
    description: str
    config_size: int
    irqs: IrqCounts

    def read_config(self, offset: int, length: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def region_size(self, index: int) -> int:
        """Real size of BAR0-5 or the ROM (index 6); 0 when not implemented."""
        ...

    def read_region(self, index: int, offset: int, length: int) -> bytes: ...

    def write_region(self, index: int, offset: int, data: bytes) -> None: ...

    def reset(self) -> None: ...
