"""Interrupt routing: VFIO_DEVICE_SET_IRQS checked as vfio-pci checks it, and the eventfds it attaches.

A client's request is validated in full (one data type and one action,
vectors inside the index, masking only where the index is maskable, the
right number of eventfds or bools) before the backend sees it, so a backend
only ever gets what the kernel would accept. The eventfds a successful call
attaches are owned here: each one is closed when it is replaced, when its
index is disabled, or when the client goes (``detach_all``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

from mediator.backends.base import Backend, BackendError, IrqInfo
from mediator.vfio_abi import (
    IRQ_COUNT,
    IRQ_ERR,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INTX,
    IRQ_REQ,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_TYPE,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    IRQ_SET_DATA_TYPE,
)
from mediator.virt.errors import DeviceError, device_error

DISABLE = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER


class Interrupts:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._trigger_fds: dict[tuple[int, int], int] = {}  # (index, vector) -> eventfd we own
        self._resample_fds: dict[int, int] = {}

    def info(self, index: int) -> IrqInfo:
        if not 0 <= index < IRQ_COUNT:
            raise DeviceError(errno.EINVAL, f"no interrupt index {index}")
        try:
            return self.backend.irq_info(index)
        except BackendError as e:
            raise device_error(e) from None

    def set(
        self, index: int, flags: int, start: int, count: int, *, fds: Sequence[int] = (), bools: bytes = b""
    ) -> None:
        """VFIO_DEVICE_SET_IRQS. On success ``fds`` are owned here; on error the caller keeps them.

        ``fds`` empty with DATA_EVENTFD and a count means "detach those vectors"
        (how vfio-user clients send fd -1).
        """
        info = self.info(index)
        _check_vectors(info, index, flags, start, count)
        _check_data(index, flags, count, fds, bools)
        eventfds = list(fds) if fds else [-1] * count
        data: Sequence[int] = eventfds if flags & IRQ_SET_DATA_EVENTFD else list(bools)
        try:
            self.backend.set_irqs(index, flags, start, count, data)
        except BackendError as e:
            raise device_error(e) from None
        self._own(index, flags, start, count, data)

    @property
    def attached(self) -> int:
        """Eventfds attached now."""
        return len(self._trigger_fds) + len(self._resample_fds)

    def detach_all(self) -> None:
        """Disable every index that has an eventfd attached, and close them."""
        for index in range(IRQ_COUNT):
            if any(key[0] == index for key in self._trigger_fds) or index in self._resample_fds:
                self.backend.set_irqs(index, DISABLE, 0, 0, [])
                self._own(index, DISABLE, 0, 0, [])

    def _own(self, index: int, flags: int, start: int, count: int, data: Sequence[int]) -> None:
        action = flags & IRQ_SET_ACTION_TYPE
        if count == 0:
            for key in [k for k in self._trigger_fds if k[0] == index]:
                os.close(self._trigger_fds.pop(key))
            if index in self._resample_fds:
                os.close(self._resample_fds.pop(index))
        elif flags & IRQ_SET_DATA_EVENTFD and action == IRQ_SET_ACTION_TRIGGER:
            for i, fd in enumerate(data):
                _close(self._trigger_fds.pop((index, start + i), None))
                if fd >= 0:
                    self._trigger_fds[(index, start + i)] = fd
        elif flags & IRQ_SET_DATA_EVENTFD and action == IRQ_SET_ACTION_UNMASK:
            _close(self._resample_fds.pop(index, None))
            if data[0] >= 0:
                self._resample_fds[index] = data[0]


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _check_vectors(info: IrqInfo, index: int, flags: int, start: int, count: int) -> None:
    """Flags, the vectors and the action against what the index offers."""
    data_type, action = flags & IRQ_SET_DATA_TYPE, flags & IRQ_SET_ACTION_TYPE
    if flags & ~(IRQ_SET_DATA_TYPE | IRQ_SET_ACTION_TYPE):
        raise DeviceError(errno.EINVAL, f"unknown SET_IRQS flags {flags:#x}")
    if data_type.bit_count() != 1 or action.bit_count() != 1:
        raise DeviceError(errno.EINVAL, "SET_IRQS needs exactly one data type and one action")
    if not info.flags & IRQ_INFO_EVENTFD or info.count == 0:
        raise DeviceError(errno.EINVAL, f"interrupt index {index} is not implemented")
    if count == 0:
        if data_type != IRQ_SET_DATA_NONE or action != IRQ_SET_ACTION_TRIGGER:
            raise DeviceError(errno.EINVAL, "count 0 only disables an index (DATA_NONE|TRIGGER)")
        if start:
            raise DeviceError(errno.EINVAL, "disabling an index takes start 0")
    elif start + count > info.count:
        raise DeviceError(
            errno.EINVAL, f"vectors {start}..{start + count - 1} past index {index}'s {info.count}"
        )
    if action != IRQ_SET_ACTION_TRIGGER and (
        index in (IRQ_ERR, IRQ_REQ) or not info.flags & IRQ_INFO_MASKABLE
    ):
        raise DeviceError(errno.EINVAL, f"interrupt index {index} cannot be masked")


def _check_data(index: int, flags: int, count: int, fds: Sequence[int], bools: bytes) -> None:
    """The eventfds or bools that come with the request."""
    data_type, action = flags & IRQ_SET_DATA_TYPE, flags & IRQ_SET_ACTION_TYPE
    if data_type == IRQ_SET_DATA_BOOL and len(bools) != count:
        raise DeviceError(errno.EINVAL, f"{len(bools)} bools for {count} vectors")
    if data_type != IRQ_SET_DATA_BOOL and bools:
        raise DeviceError(errno.EINVAL, "data bytes without DATA_BOOL")
    if data_type == IRQ_SET_DATA_EVENTFD:
        if fds and len(fds) != count:
            raise DeviceError(errno.EINVAL, f"{len(fds)} eventfds for {count} vectors")
        if action == IRQ_SET_ACTION_MASK or (
            action == IRQ_SET_ACTION_UNMASK and (index != IRQ_INTX or count != 1)
        ):
            raise DeviceError(errno.EINVAL, "eventfds only trigger vectors or resample INTx")
    elif fds:
        raise DeviceError(errno.EINVAL, "file descriptors without DATA_EVENTFD")
