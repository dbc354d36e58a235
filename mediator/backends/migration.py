"""The VFIO migration v2 state machine, as the kernel runs it (``vfio_mig_get_next_state``).

``STEP`` says, for each (current, target) pair, the next state on the way;
a device that lacks a state's feature (``REQUIRES``) is walked straight past
it. A target the device cannot reach is EINVAL, as the kernel answers. A
real device's kernel driver walks its own path; the simulator walks this one.
"""

from __future__ import annotations

import errno
from enum import IntEnum

from mediator.backends.base import BackendError
from mediator.errors import Refused
from mediator.vfio_abi import MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY


class MigState(IntEnum):
    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigrationError(BackendError, Refused):
    """A migration request refused or failed: a backend's failure the client is told as it is."""

    def __init__(self, errno_value: int, message: str) -> None:
        Refused.__init__(self, errno_value, message)


S = MigState
# The kernel's table, row by row: from each state, the next step towards each target.
STEP: dict[MigState, dict[MigState, MigState]] = {
    S.STOP: {
        S.STOP: S.STOP, S.RUNNING: S.RUNNING_P2P, S.PRE_COPY: S.RUNNING_P2P,
        S.PRE_COPY_P2P: S.RUNNING_P2P, S.STOP_COPY: S.STOP_COPY, S.RESUMING: S.RESUMING,
        S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR,
    },
    S.RUNNING: {
        S.STOP: S.RUNNING_P2P, S.RUNNING: S.RUNNING, S.PRE_COPY: S.PRE_COPY,
        S.PRE_COPY_P2P: S.RUNNING_P2P, S.STOP_COPY: S.RUNNING_P2P, S.RESUMING: S.RUNNING_P2P,
        S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR,
    },
    S.PRE_COPY: {
        S.STOP: S.RUNNING, S.RUNNING: S.RUNNING, S.PRE_COPY: S.PRE_COPY,
        S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.PRE_COPY_P2P, S.RESUMING: S.RUNNING,
        S.RUNNING_P2P: S.RUNNING, S.ERROR: S.ERROR,
    },
    S.PRE_COPY_P2P: {
        S.STOP: S.RUNNING_P2P, S.RUNNING: S.RUNNING_P2P, S.PRE_COPY: S.PRE_COPY,
        S.PRE_COPY_P2P: S.PRE_COPY_P2P, S.STOP_COPY: S.STOP_COPY, S.RESUMING: S.RUNNING_P2P,
        S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR,
    },
    S.STOP_COPY: {
        S.STOP: S.STOP, S.RUNNING: S.STOP, S.PRE_COPY: S.ERROR, S.PRE_COPY_P2P: S.ERROR,
        S.STOP_COPY: S.STOP_COPY, S.RESUMING: S.STOP, S.RUNNING_P2P: S.STOP, S.ERROR: S.ERROR,
    },
    S.RESUMING: {
        S.STOP: S.STOP, S.RUNNING: S.STOP, S.PRE_COPY: S.STOP, S.PRE_COPY_P2P: S.STOP,
        S.STOP_COPY: S.STOP, S.RESUMING: S.RESUMING, S.RUNNING_P2P: S.STOP, S.ERROR: S.ERROR,
    },
    S.RUNNING_P2P: {
        S.STOP: S.STOP, S.RUNNING: S.RUNNING, S.PRE_COPY: S.RUNNING, S.PRE_COPY_P2P: S.PRE_COPY_P2P,
        S.STOP_COPY: S.STOP, S.RESUMING: S.STOP, S.RUNNING_P2P: S.RUNNING_P2P, S.ERROR: S.ERROR,
    },
    S.ERROR: {target: S.ERROR for target in S},
}  # fmt: skip
# The features a device needs to have a state at all.
REQUIRES: dict[MigState, int] = {
    S.STOP: MIGRATION_STOP_COPY,
    S.RUNNING: MIGRATION_STOP_COPY,
    S.PRE_COPY: MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
    S.PRE_COPY_P2P: MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY,
    S.STOP_COPY: MIGRATION_STOP_COPY,
    S.RESUMING: MIGRATION_STOP_COPY,
    S.RUNNING_P2P: MIGRATION_STOP_COPY | MIGRATION_P2P,
    S.ERROR: ~0,
}
# Where the guest may touch the device's BARs (the uAPI: "the user must not touch the device" in
# every other state), and where the VM's other devices may still reach them by DMA (P2P states:
# the device starts no P2P, but outstanding and incoming P2P still completes).
RUNS = frozenset({S.RUNNING, S.PRE_COPY})
REACHABLE_BY_PEERS = frozenset({S.RUNNING, S.PRE_COPY, S.RUNNING_P2P, S.PRE_COPY_P2P})
# Where the device's state is read out, and where it is read or written (a copy with a data fd).
SAVING = frozenset({S.PRE_COPY, S.PRE_COPY_P2P, S.STOP_COPY})
STREAMS = SAVING | {S.RESUMING}


def _has(flags: int, state: MigState) -> bool:
    return REQUIRES[state] & flags == REQUIRES[state]


def state_named(value: int) -> MigState:
    """The state ``value`` names; EINVAL for none."""
    try:
        return MigState(value)
    except ValueError:
        raise MigrationError(errno.EINVAL, f"no migration state {value}") from None


def path(current: MigState, target: MigState, flags: int) -> list[MigState]:
    """The states a device with ``flags`` passes through from ``current`` to ``target``, in order.

    Raises:
        MigrationError: EINVAL, the device has no such state or cannot get there (STOP_COPY to
            PRE_COPY, ERROR).
    """
    if current == S.ERROR:
        raise MigrationError(errno.EINVAL, "a device in ERROR leaves it only by a reset")
    if not _has(flags, current) or not _has(flags, target):
        raise MigrationError(errno.EINVAL, f"the device has no {target.name} state")
    steps: list[MigState] = []
    at = current
    while at != target:
        step = STEP[at][target]
        while step != S.ERROR and not _has(flags, step):
            step = STEP[step][target]
        if step == S.ERROR:
            raise MigrationError(errno.EINVAL, f"{current.name} cannot go to {target.name}")
        steps.append(step)
        at = step
    return steps
