"""What the virtual device tells whoever watches it: trapped accesses, DMA changes, resets.

The device calls a ``DeviceEvents`` it was given and knows nothing of what is
behind it (the daemon's metrics implement it); ``NO_EVENTS`` is the default,
for a device nobody exports (``inspect``, ``scrub``, tests). Calls come from
the thread serving the device's client, except ``reset``, which a hand-off
may also make.
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args

from mediator.quirks.schema import TrapAction

# A trap window's action, or the padding past a BAR's real size.
TrappedAction = Literal[TrapAction, "padding"]
# Who asked for a reset: the guest (a config-space FLR), the client (DEVICE_RESET), a hand-off.
ResetCause = Literal["client", "guest", "handoff"]
TRAPPED_ACTIONS: tuple[TrappedAction, ...] = get_args(TrappedAction)
RESET_CAUSES: tuple[ResetCause, ...] = get_args(ResetCause)


class DeviceEvents(Protocol):
    def trapped_access(self, action: TrappedAction, count: int = 1) -> None:
        """``count`` guest BAR accesses (or pieces of one) answered by a trap window or the padding."""
        ...

    def dma_changed(self, mappings: int, pinned_bytes: int) -> None:
        """The client's DMA mappings now, after a map or unmap."""
        ...

    def reset(self, cause: ResetCause) -> None: ...

    def dma_pin_failed(self) -> None:
        """Guest memory of the device's VM could not be pinned: the device is blocked (from any thread)."""
        ...


class NoEvents:
    def trapped_access(self, action: TrappedAction, count: int = 1) -> None:
        pass

    def dma_changed(self, mappings: int, pinned_bytes: int) -> None:
        pass

    def reset(self, cause: ResetCause) -> None:
        pass

    def dma_pin_failed(self) -> None:
        pass


NO_EVENTS: DeviceEvents = NoEvents()
