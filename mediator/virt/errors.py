"""Refusals of the virtual device, each with the errno a client should get."""

from __future__ import annotations

import errno


class DeviceError(Exception):
    """A request the device refuses, with the errno to report."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value


class RegionAccessError(DeviceError):
    """An access to a region that does not exist, or outside its (virtual) size."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EINVAL, message)
