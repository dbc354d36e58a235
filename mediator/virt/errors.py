"""Refusals of the virtual device, each with the errno a client should get."""

from __future__ import annotations

import errno

from mediator.backends.base import BackendError
from mediator.errors import Refused


class DeviceError(Refused):
    """A request the device refuses, or a device that failed it, with the errno to report."""


class RegionAccessError(DeviceError):
    """An access to a region that does not exist, or outside its (virtual) size."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)


def device_error(error: BackendError) -> DeviceError:
    """What the client is told of a backend's failure: its errno, and what failed."""
    return DeviceError(error.errno, f"device error: {error}")
