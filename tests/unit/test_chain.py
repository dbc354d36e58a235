"""Capability chains of real dumps, and the walker against hostile images."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediator.pci import capabilities as caps
from mediator.pci.capabilities import CapKind
from mediator.pci.chain import EXT_MAX_STEPS, STD_MAX_STEPS, ChainError, walk
from tests.support import profile


def chain(name: str, kind: CapKind) -> list[tuple[int, int]]:
    chains = walk(profile(name).image)
    return [(c.offset, c.id) for c in (chains.std if kind is CapKind.STD else chains.ext)]


def test_gp108m_chains_follow_the_dump_including_its_non_monotonic_ext_order() -> None:
    assert chain("gp108m-mx150", CapKind.STD) == [(0x60, caps.PM), (0x68, caps.MSI), (0x78, caps.EXP)]
    assert chain("gp108m-mx150", CapKind.EXT) == [
        (0x100, caps.VC),
        (0x250, caps.LTR),
        (0x258, caps.L1SS),
        (0x128, caps.PWR),
        (0x420, caps.AER),
        (0x600, caps.VSEC),
        (0x900, caps.SECPCI),
    ]


def test_lengths_come_from_the_capability_and_stop_at_the_next_one() -> None:
    chains = walk(profile("gp108m-mx150").image)
    lengths = {c.offset: c.length for c in chains.all()}
    assert lengths[0x60] == 8  # PM
    assert lengths[0x68] == 14  # MSI, 64-bit, no per-vector mask
    assert lengths[0x78] == 0x34  # PCIe v2 endpoint
    assert lengths[0x250] == 8  # LTR
    assert lengths[0x258] == 0x10  # L1SS
    assert lengths[0x600] == 0x24  # VSEC header says 0x24
    assert lengths[0x100] == 0x1C  # VC with one VC resource, no arbitration table


def test_null_capabilities_own_only_their_header() -> None:
    chains = walk(profile("h100-sxm5").image)
    head = chains.ext[0]
    assert (head.offset, head.id, head.next, head.length) == (0x100, 0, 0x12C, 4)


def test_an_extended_space_that_aliases_the_header_holds_no_capability() -> None:
    chains = walk(profile("rs690-hostbridge").image)
    assert chains.ext == ()
    assert not chains.extended_space
    assert any("aliases" in a for a in chains.anomalies)


def test_a_256_byte_function_has_no_extended_space() -> None:
    chains = walk(profile("gm965-igd").image)
    assert [(c.offset, c.id) for c in chains.std] == [(0x90, caps.MSI), (0xD0, caps.PM)]
    assert chains.ext == () and not chains.extended_space


def _image_with_std_chain(links: list[tuple[int, int, int]]) -> bytearray:
    image = bytearray(256)
    image[0x06] = 0x10  # Status.CapList
    image[0x34] = links[0][0]
    for offset, cap_id, nxt in links:
        image[offset] = cap_id
        image[offset + 1] = nxt
    return image


def test_a_std_chain_that_loops_ends_at_the_repeat() -> None:
    image = _image_with_std_chain([(0x40, caps.PM, 0x50), (0x50, caps.MSI, 0x40)])
    chains = walk(bytes(image))
    assert [c.offset for c in chains.std] == [0x40, 0x50]
    assert any("loops" in a for a in chains.anomalies)


def test_next_pointers_are_aligned_and_may_not_point_into_the_header() -> None:
    image = _image_with_std_chain([(0x40, caps.PM, 0x53), (0x50, caps.MSI, 0x3C)])
    chains = walk(bytes(image))
    assert [c.offset for c in chains.std] == [0x40, 0x50]
    assert any("points into the space below 0x40" in a for a in chains.anomalies)


@pytest.mark.parametrize("size", [0, 64, 255, 257, 1024, 4097])
def test_an_image_of_the_wrong_size_is_a_chain_error(size: int) -> None:
    with pytest.raises(ChainError, match="256 or 4096"):
        walk(bytes(size))


def _mutated(name: str) -> st.SearchStrategy[bytes]:
    base = profile(name).image

    def apply(mutations: list[tuple[int, int]]) -> bytes:
        image = bytearray(base)
        for offset, value in mutations:
            image[offset % len(image)] = value
        return bytes(image)

    return st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=40).map(apply)


HOSTILE_IMAGES = st.one_of(
    st.binary(min_size=0, max_size=4200),
    st.binary(min_size=256, max_size=256),
    st.binary(min_size=4096, max_size=4096),
    _mutated("gp108m-mx150"),
    _mutated("h100-sxm5"),
    _mutated("skylake-igd"),
    _mutated("intel-0d93-many-ecaps"),
)


@settings(max_examples=400)
@given(HOSTILE_IMAGES)
def test_the_walker_raises_only_its_own_error_and_always_ends(image: bytes) -> None:
    try:
        chains = walk(image)
    except ChainError:
        assert len(image) not in (256, 4096)
        return
    assert len(chains.std) <= STD_MAX_STEPS and len(chains.ext) <= EXT_MAX_STEPS
    offsets = [c.offset for c in chains.all()]
    assert len(offsets) == len(set(offsets))
    for cap in chains.all():
        space_end = 0x100 if cap.kind is CapKind.STD else 0x1000
        assert cap.offset % 4 == 0
        assert cap.length > 0 and cap.end <= space_end
