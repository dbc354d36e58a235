"""The migration state machine, the daemon's stream, and the simulator's device state.

The arcs are checked against the kernel's rules rather than its table: every
step of a path is an arc a driver implements (``vfio.h``), no path passes
through a saving state it does not start or end in, and what the kernel refuses
(STOP_COPY to PRE_COPY, a state the device lacks, leaving ERROR) is EINVAL.
"""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mediator.backends.migration import MigrationError, MigState, path
from mediator.vfio_abi import MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY
from mediator.virt.migration import SAVING, Inbound, Outbound
from tests.support import device

S = MigState
# The arcs a driver implements, by the features that bring them (include/uapi/linux/vfio.h).
ARCS = {
    0: {(S.RUNNING, S.STOP), (S.STOP, S.RUNNING), (S.STOP, S.STOP_COPY), (S.STOP_COPY, S.STOP),
        (S.STOP, S.RESUMING), (S.RESUMING, S.STOP)},
    MIGRATION_P2P: {(S.RUNNING, S.RUNNING_P2P), (S.RUNNING_P2P, S.RUNNING), (S.RUNNING_P2P, S.STOP),
                    (S.STOP, S.RUNNING_P2P)},
    MIGRATION_PRE_COPY: {(S.RUNNING, S.PRE_COPY), (S.PRE_COPY, S.RUNNING), (S.PRE_COPY, S.STOP_COPY)},
    MIGRATION_P2P | MIGRATION_PRE_COPY: {(S.PRE_COPY, S.PRE_COPY_P2P), (S.PRE_COPY_P2P, S.PRE_COPY),
                                         (S.PRE_COPY_P2P, S.STOP_COPY), (S.RUNNING_P2P, S.PRE_COPY_P2P),
                                         (S.PRE_COPY_P2P, S.RUNNING_P2P)},
}  # fmt: skip
FEATURES = [
    MIGRATION_STOP_COPY | extra
    for extra in (0, MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_P2P | MIGRATION_PRE_COPY)
]


def arcs(flags: int) -> set[tuple[MigState, MigState]]:
    found = set().union(*(arcs for needs, arcs in ARCS.items() if needs & flags == needs))
    if flags & MIGRATION_P2P:  # with P2P, RUNNING and STOP meet only through RUNNING_P2P
        found -= {(S.RUNNING, S.STOP), (S.STOP, S.RUNNING)}
    if flags & MIGRATION_P2P and flags & MIGRATION_PRE_COPY:
        found -= {(S.PRE_COPY, S.STOP_COPY)}
    return found


def states(flags: int) -> set[MigState]:
    return {state for arc in arcs(flags) for state in arc}


@given(flags=st.sampled_from(FEATURES), data=st.data())
def test_every_path_is_made_of_the_drivers_arcs_and_saves_only_at_its_end(
    flags: int, data: st.DataObject
) -> None:
    current = data.draw(st.sampled_from(sorted(states(flags))))
    target = data.draw(st.sampled_from(sorted(states(flags))))
    try:
        steps = path(current, target, flags)
    except MigrationError as e:
        assert e.errno == errno.EINVAL
        assert current == S.STOP_COPY and target in (S.PRE_COPY, S.PRE_COPY_P2P)
        return
    assert (steps[-1] if steps else current) == target
    for arc in itertools.pairwise([current, *steps]):
        assert arc in arcs(flags), (arc, steps)
    if current not in SAVING:  # a copy starts only where it was asked for
        assert not SAVING & set(steps[:-1]), steps


@pytest.mark.parametrize(
    ("flags", "current", "target"),
    [
        (MIGRATION_STOP_COPY, S.RUNNING, S.RUNNING_P2P),  # the device has no P2P
        (MIGRATION_STOP_COPY, S.RUNNING, S.PRE_COPY),
        (MIGRATION_STOP_COPY | MIGRATION_PRE_COPY, S.STOP_COPY, S.PRE_COPY),
        (MIGRATION_STOP_COPY, S.ERROR, S.RUNNING),  # only a reset leaves ERROR
        (MIGRATION_STOP_COPY, S.RUNNING, S.ERROR),
    ],
)
def test_what_the_kernel_refuses_is_einval(flags: int, current: MigState, target: MigState) -> None:
    with pytest.raises(MigrationError) as refused:
        path(current, target, flags)
    assert refused.value.errno == errno.EINVAL


def test_the_kernels_combination_transitions() -> None:
    both = MIGRATION_STOP_COPY | MIGRATION_P2P
    assert path(S.RUNNING, S.STOP_COPY, MIGRATION_STOP_COPY) == [S.STOP, S.STOP_COPY]
    assert path(S.RUNNING, S.STOP_COPY, both) == [S.RUNNING_P2P, S.STOP, S.STOP_COPY]
    assert path(S.RESUMING, S.RUNNING, both) == [S.STOP, S.RUNNING_P2P, S.RUNNING]
    assert path(S.STOP_COPY, S.RESUMING, both) == [S.STOP, S.RESUMING]


POLICY = b"p" * 32


def drain(outbound: Outbound, device: bytes, shadow: bytes, size: int) -> bytes:
    """The whole stream, read ``size`` bytes at a time from a device whose state is ``device``."""
    left = bytearray(device)

    def read_device(n: int) -> bytes:
        chunk = bytes(left[:n])
        del left[:n]
        return chunk

    stream = b""
    while not outbound.finished:
        stream += outbound.read(size, read_device, lambda: shadow, last=True)
    return stream


@given(device_state=st.binary(max_size=2000), size=st.integers(1, 97), cut=st.integers(1, 50))
def test_the_stream_carries_device_bytes_and_shadow_in_any_pieces(
    device_state: bytes, size: int, cut: int
) -> None:
    stream = drain(Outbound(POLICY), device_state, b"shadow", size)
    inbound, received = Inbound(POLICY), bytearray()
    for at in range(0, len(stream), cut):
        inbound.write(stream[at : at + cut], received.extend)
    assert bytes(received) == device_state
    assert inbound.complete and inbound.shadow == b"shadow"


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s.replace(POLICY, b"q" * 32),  # another policy
        lambda s: s[:5] + b"X" + s[6:],  # another format
        lambda s: s + b"\x02\0\0\0\0",  # past the end
        lambda s: s[s.index(b"\x02") :],  # no header
    ],
)
def test_a_stream_not_from_this_policy_or_out_of_order_is_einval(damage) -> None:
    stream = drain(Outbound(POLICY), b"device", b"shadow", 4096)
    with pytest.raises(MigrationError) as refused:
        Inbound(POLICY).write(damage(stream), lambda _: None)
    assert refused.value.errno == errno.EINVAL


def test_the_simulator_saves_only_the_written_extents_of_a_sparse_bar() -> None:
    source, _ = device("h100-sxm5")
    source.backend.write_region(2, 40 << 30, b"far out")
    source.backend.write_region(0, 0x100, b"near")
    source.backend.set_migration_state(S.STOP_COPY)
    state = b""
    while chunk := source.backend.read_migration_data(1 << 16):
        state += chunk
    assert len(state) < 1 << 20
    destination, _ = device("h100-sxm5")
    destination.backend.set_migration_state(S.RESUMING)
    destination.backend.write_migration_data(state)
    destination.backend.set_migration_state(S.RUNNING)
    assert destination.backend.read_region(2, 40 << 30, 7) == b"far out"
    assert destination.backend.read_region(0, 0x100, 4) == b"near"
