"""The C fast path and the Python path are one executor: same replies, same device, every step.

Two sessions of the same shipped profile run side by side, one through the
C loop (``mediator.vfio_user.fast_loop``) and one in Python only. Hypothesis
sends both the same batches of REGION_READs and REGION_WRITEs (config space
and every BAR and the ROM, every size and alignment, at and around the
places the policy changes: segment starts, trap windows, the simulator's
registers, the real and the virtual size; the Command and BAR registers and
reset triggers, which Python must handle; posted writes; regions that do not
exist) and requires byte-identical replies after every batch and identical
device state: the physical config space, the shadow, the refusal, resets
and interrupts raised, and every BAR byte any step touched.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mediator.backends.profile import shipped_profiles
from mediator.metrics.registry import LATENCY_BOUNDS
from mediator.pci.registers import COMMAND, bar_offset
from mediator.vfio_abi import BAR_REGIONS, CONFIG_REGION, ROM_REGION
from mediator.vfio_user.wire import FLAG_NO_REPLY, HEADER, Command
from tests.protocol.client import Reply, Session

PROFILES = sorted(shipped_profiles())
REGIONS = (*BAR_REGIONS, ROM_REGION, CONFIG_REGION, 8, 9)
SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Access:
    write: bool
    region: int
    offset: int
    data: bytes  # a write's, or a read's count in zeros
    posted: bool = False

    def message(self, msg_id: int) -> bytes:
        payload = struct.pack("=QII", self.offset, self.region, len(self.data))
        command = Command.REGION_WRITE if self.write else Command.REGION_READ
        if self.write:
            payload += self.data
        flags = FLAG_NO_REPLY if self.posted else 0
        return HEADER.pack(msg_id, command, 16 + len(payload), flags, 0) + payload


class Counted:
    """RequestEvents that keep how many requests the C loop answered."""

    latency_bounds = LATENCY_BOUNDS

    def __init__(self) -> None:
        self.answered_in_c = 0

    def request(self, command: int, seconds: float) -> None:
        pass

    def requests(self, command: int, count: int, buckets: list[int], seconds: float) -> None:
        assert sum(buckets) == count and seconds >= 0
        self.answered_in_c += count

    def request_failed(self, command: int, errno_value: int) -> None:
        pass


def places(session: Session, region: int) -> list[int]:
    """Where the rules change in a region: the offsets worth probing around."""
    plan = session.device.plan
    if region == CONFIG_REGION:
        starts = [segment.start for segment in plan.segments]
        return [*starts, COMMAND, *(bar_offset(i) for i in range(6)), *plan.reset_triggers, plan.config_size]
    bar = plan.bar(region) if region in (*BAR_REGIONS, ROM_REGION) else None
    if bar is None:
        return [0]
    behaviours = [b.offset for b in session.backend.profile.behaviours if b.bar == region]
    traps = [edge for t in bar.traps for edge in (t.offset, t.end)]
    return [0, *traps, *behaviours, bar.physical_size, bar.virtual_size]


@st.composite
def accesses(draw: st.DrawFn, session: Session) -> Access:
    served = [CONFIG_REGION, *(bar.index for bar in session.device.plan.bars)]
    region = draw(st.sampled_from(REGIONS) if draw(st.integers(0, 7)) == 0 else st.sampled_from(served))
    near = draw(st.sampled_from(places(session, region)))
    offset = max(0, near + draw(st.integers(-9, 9)))
    if draw(st.integers(0, 9)) == 0:  # anywhere, now and then
        offset = draw(st.integers(0, max(places(session, region)) + 16))
    write = draw(st.booleans())
    if region == CONFIG_REGION and draw(st.integers(0, 15)) == 0:
        offset, count = 0, session.device.plan.config_size  # as QEMU reads it at realize
    else:
        count = draw(st.sampled_from(SIZES) | st.integers(0, 64))
    data = draw(st.binary(min_size=count, max_size=count)) if write else bytes(count)
    return Access(write, region, offset, data, posted=write and draw(st.integers(0, 7)) == 0)


SYNC = Access(False, CONFIG_REGION, 0, bytes(2))  # its reply says every request before it is done


def replies(session: Session, batch: list[Access]) -> list[Reply]:
    batch = [*batch, SYNC]
    session.client.sendall(b"".join(access.message(i) for i, access in enumerate(batch)))
    return [session.receive() for access in batch if not access.posted]


def state(session: Session, touched: set[tuple[int, int, int]]) -> tuple[object, ...]:
    backend, device = session.backend, session.device
    bars = sorted(
        (region, offset, bytes(backend.memory(region)[offset : offset + count]))
        for region, offset, count in touched
    )
    return (
        bytes(backend.config),
        bytes(device.config.shadow),
        device.refusal,
        backend.resets,
        backend.interrupts_raised,
        bars,
    )


def touched_bytes(session: Session, access: Access) -> tuple[int, int, int] | None:
    """The real BAR bytes an access may have reached, clipped to the BAR."""
    bar = session.device.plan.bar(access.region) if access.region in (*BAR_REGIONS, ROM_REGION) else None
    if bar is None or access.offset >= bar.physical_size:
        return None
    return access.region, access.offset, min(len(access.data), bar.physical_size - access.offset)


ANSWERED_IN_C: list[tuple[int, int]] = []  # per example: (requests sent, answered by the C loop)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PROFILES), st.data())
def test_both_executors_give_the_same_replies_and_leave_the_same_device(
    profile: str, data: st.DataObject
) -> None:
    counted = Counted()
    with Session(profile, fast=True, events=counted) as fast, Session(profile, fast=False) as python:
        for session in (fast, python):
            assert session.version().ok
        touched: set[tuple[int, int, int]] = set()
        sent = 0
        for _ in range(data.draw(st.integers(1, 12))):
            batch = data.draw(st.lists(accesses(python), min_size=1, max_size=4))
            sent += len(batch) + 1
            answers = replies(fast, batch), replies(python, batch)
            assert answers[0] == answers[1], batch
            touched |= {t for access in batch if (t := touched_bytes(python, access)) is not None}
            assert state(fast, touched) == state(python, touched), batch
    ANSWERED_IN_C.append((sent, counted.answered_in_c))


def test_the_equivalence_test_reached_the_c_loop() -> None:
    """Hypothesis must have given the C loop work: a test whose every request went to Python proves nothing."""
    if not ANSWERED_IN_C:  # run alone
        test_both_executors_give_the_same_replies_and_leave_the_same_device()
    sent, answered = (sum(column) for column in zip(*ANSWERED_IN_C, strict=True))
    assert answered >= sent / 4, (answered, sent)


def test_the_c_loop_answers_plain_config_reads_and_hands_the_rest_to_python() -> None:
    counted = Counted()
    with Session("h100-sxm5", fast=True, events=counted) as session:
        assert session.version().ok
        first = session.region_read(CONFIG_REGION, 0, 4)
        assert first.ok and first.payload[16:] == session.backend.config[0:4]
        assert session.region_read(CONFIG_REGION, 0x100000, 4).error == errno.EINVAL  # Python's refusal
        mirror = session.region_read(0, 0x88000, 4)  # a trap window: Python, audited
        assert mirror.ok and mirror.payload[16:] == first.payload[16:]
        for _ in range(50):
            assert session.region_read(CONFIG_REGION, 0, 4).payload == first.payload
    assert counted.answered_in_c == 51  # the config reads, not the refusal nor the mirror


def test_a_device_blocked_while_the_c_loop_serves_is_refused_at_the_next_request() -> None:
    with Session("h100-sxm5", fast=True) as session:
        assert session.version().ok
        assert session.region_read(CONFIG_REGION, 0, 4).ok
        session.device.block("blocked from another thread, as a pin failure does")
        assert session.region_read(CONFIG_REGION, 0, 4).error == errno.EPERM
