"""Migration v2 over vfio-user, as a migration client drives it: DEVICE_FEATURE, MIG_DATA_READ/WRITE.

Source and destination are two simulated H100s under the same policy, each
served by the daemon's transport, connection, service and C fast path on a
real socket. The test is the client a VMM would be: it stops the source,
reads its stream, resumes the destination from it and checks the device
state (BAR memory, a sparse 64-bit BAR far from its start, and the guest's
virtual config registers) arrived; and that each arc the kernel refuses is
refused with its errno, that BARs are out of reach while the device is
stopped while config space keeps working, and that a stream from a device
under another policy is refused.
"""

from __future__ import annotations

import errno
import struct

import pytest

from mediator.backends.migration import MigState
from mediator.vfio_abi import (
    FEATURE_GET,
    FEATURE_MIG_DEVICE_STATE,
    FEATURE_MIGRATION,
    FEATURE_PROBE,
    FEATURE_SET,
    MIGRATION_P2P,
    MIGRATION_STOP_COPY,
)
from mediator.vfio_user.wire import Command
from tests.protocol.client import Session

CONFIG, BAR0, BAR2 = 7, 0, 2
INTERRUPT_LINE = 0x3C  # a virtual register the guest writes: the policy's shadow holds it
FAR = 40 << 30  # deep inside the H100's 128 GiB BAR2: only written extents travel


def stopped(session: Session, state: MigState = MigState.STOP_COPY) -> Session:
    assert session.set_migration_state(state).ok
    assert session.migration_state() == state
    return session


@pytest.fixture
def source() -> Session:
    with Session() as s:
        assert s.version().ok
        yield s


@pytest.fixture
def destination() -> Session:
    with Session() as s:
        assert s.version().ok
        yield s


def test_the_device_state_arrives_on_the_destination(source: Session, destination: Session) -> None:
    source.region_write(BAR0, 0x100, b"the source's registers")
    source.region_write(BAR2, FAR, b"device memory far out")
    source.region_write(CONFIG, INTERRUPT_LINE, b"\x0b")
    flags = source.migration_flags()
    assert flags.ok and struct.unpack_from("=Q", flags.payload, 8)[0] == MIGRATION_STOP_COPY | MIGRATION_P2P
    stream = stopped(source).save(chunk=4096)
    assert len(stream) < 1 << 20  # the untouched gigabytes of BAR2 do not travel

    stopped(destination, MigState.RESUMING).resume(stream, chunk=1000)
    assert destination.set_migration_state(MigState.RUNNING).ok
    assert destination.region_read(BAR0, 0x100, 22).payload[16:] == b"the source's registers"
    assert destination.region_read(BAR2, FAR, 21).payload[16:] == b"device memory far out"
    assert destination.region_read(CONFIG, INTERRUPT_LINE, 1).payload[16:] == b"\x0b"
    assert source.set_migration_state(MigState.RUNNING).ok  # a failed migration: the source runs on
    assert source.region_read(BAR0, 0x100, 22).ok


def test_a_stopped_device_answers_config_but_not_its_bars(source: Session) -> None:
    source.region_write(BAR0, 0x100, b"x")  # the C fast path answered this one
    for state in (MigState.RUNNING_P2P, MigState.STOP, MigState.STOP_COPY):
        stopped(source, state)
        read, write = source.region_read(BAR0, 0x100, 4), source.region_write(BAR0, 0x100, b"y")
        assert (read.error, write and write.error) == (errno.EBUSY, errno.EBUSY), state
        assert source.region_read(CONFIG, 0, 4).ok
    stopped(source, MigState.RUNNING)
    assert source.region_read(BAR0, 0x100, 1).payload[16:] == b"x"


@pytest.mark.parametrize(
    ("start", "target", "why"),
    [
        (MigState.STOP_COPY, MigState.PRE_COPY, "no PRE_COPY state"),
        (MigState.RUNNING, MigState.PRE_COPY_P2P, "no PRE_COPY_P2P state"),
        (MigState.RUNNING, MigState.ERROR, "cannot go to ERROR"),
        (MigState.RUNNING, 99, "no such state"),
    ],
)
def test_an_arc_the_kernel_refuses_is_einval(source: Session, start: MigState, target: int, why: str) -> None:
    stopped(source, start)
    assert source.set_migration_state(target).error == errno.EINVAL, why
    assert source.migration_state() == start


def test_resuming_is_left_only_with_the_whole_stream_of_this_policy(source: Session) -> None:
    stream = stopped(source).save()
    with Session("v100-sxm2") as other:  # another device: another policy
        assert other.version().ok
        stopped(other, MigState.RESUMING)
        assert other.mig_data_write(stream[:100]).error == errno.EINVAL
    with Session() as late:
        assert late.version().ok
        stopped(late, MigState.RESUMING).resume(stream[: len(stream) // 2])
        assert late.set_migration_state(MigState.RUNNING).error == errno.EINVAL  # half a stream
        assert late.migration_state() == MigState.RESUMING
        late.resume(stream[len(stream) // 2 :])
        assert late.mig_data_write(b"more").error == errno.EINVAL  # past the end
        assert late.set_migration_state(MigState.RUNNING).ok


def test_data_moves_only_in_its_states_and_within_the_transfer_size(source: Session) -> None:
    assert source.mig_data_read(16).error == errno.EINVAL  # RUNNING: nothing to read
    assert source.mig_data_write(b"x").error == errno.EINVAL
    stopped(source)
    assert source.mig_data_read(2 << 20).error == errno.EINVAL  # over max_data_xfer_size
    assert source.mig_data_write(b"x").error == errno.EINVAL  # STOP_COPY is read from


def test_feature_operations_are_checked_as_the_kernel_checks_them(source: Session) -> None:
    state = struct.pack("=II", MigState.STOP, 0)
    probe = source.feature(FEATURE_PROBE | FEATURE_SET | FEATURE_MIG_DEVICE_STATE, state)
    assert probe.ok and source.migration_state() == MigState.RUNNING  # a probe changes nothing
    assert source.feature(FEATURE_SET | FEATURE_MIGRATION, bytes(8)).error == errno.EINVAL
    assert source.feature(FEATURE_GET | FEATURE_SET | FEATURE_MIG_DEVICE_STATE, state).error == errno.EINVAL
    assert source.feature(FEATURE_MIG_DEVICE_STATE, state).error == errno.EINVAL  # no operation
    assert source.feature(FEATURE_SET | FEATURE_MIG_DEVICE_STATE, b"\1").error == errno.EINVAL  # short
    assert source.feature(FEATURE_GET | 6, bytes(8)).error == errno.ENOTSUP  # no dirty page logging


def test_a_reset_returns_a_device_in_error_to_running(source: Session) -> None:
    garbage = _garbage_stream()
    stopped(source, MigState.RESUMING).resume(garbage)
    assert source.set_migration_state(MigState.STOP).error == errno.EINVAL  # the state does not parse
    assert source.migration_state() == MigState.ERROR
    assert source.request(Command.DEVICE_RESET).ok
    assert source.migration_state() == MigState.RUNNING


def _garbage_stream() -> bytes:
    """A stream of the right policy whose device state does not parse: taken from a real one."""
    with Session() as twin:
        assert twin.version().ok
        stream = stopped(twin).save()
    header = 5 + struct.unpack_from("<I", stream, 1)[0]
    return stream[:header] + struct.pack("<BI", 2, 3) + b"bad" + stream[-(5 + 4096 + 5) :]
