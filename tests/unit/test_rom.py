"""Expansion ROM images: well formed or a clear error, whatever the bytes."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mediator.pci.registers import Identity
from mediator.pci.rom import RomError, build_rom, check_rom, parse_rom

GPU = Identity(0x10DE, 0x2330, 0x10DE, 0x16C1, 0x030200, 0xA1)


def two_images() -> bytes:
    """An x86 image followed by a last image (EFI), as GPUs ship them."""
    first = bytearray(build_rom(GPU, 0x1000)[:0x1000])
    first[0x40 + 0x15] = 0  # not the last image any more
    second = bytearray(build_rom(GPU, 0x800)[:0x800])
    second[0x40 + 0x14] = 3  # EFI
    return bytes(first + second) + b"\xff" * 0x800


def test_a_built_image_parses_back_and_its_digest_covers_the_image_only() -> None:
    data = build_rom(GPU, 0x20000)
    rom = parse_rom(data)
    assert [(i.offset, i.length, i.vendor, i.device) for i in rom.images] == [(0, 0x10000, 0x10DE, 0x2330)]
    assert rom.sha256 == hashlib.sha256(data[:0x10000]).hexdigest()
    assert sum(data[:0x10000]) % 256 == 0  # a legacy image checksums to 0


def test_images_are_followed_to_the_last_one() -> None:
    rom = parse_rom(two_images())
    assert [(i.offset, i.code_type) for i in rom.images] == [(0, 0), (0x1000, 3)]
    assert rom.length == 0x1800


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.__setitem__(slice(0, 2), b"\0\0"), "no 0x55AA signature"),
        (lambda d: d.__setitem__(slice(0x40, 0x44), b"XXXX"), "no PCI Data Structure"),
        (lambda d: d.__setitem__(slice(0x50, 0x52), b"\0\0"), "image length 0x0"),
        (lambda d: d.__setitem__(0x55, 0), "no last-image indicator"),
    ],
)
def test_a_broken_rom_names_what_is_wrong(edit, message: str) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(build_rom(GPU, 0x10000))
    edit(data)
    with pytest.raises(RomError, match=message):
        parse_rom(bytes(data))


def test_the_check_wants_the_device_vendor_and_an_allowed_digest() -> None:
    data = build_rom(GPU, 0x10000)
    digest = parse_rom(data).sha256
    assert check_rom(data, GPU, frozenset()).sha256 == digest
    assert check_rom(data, GPU, frozenset({digest, "0" * 64})).sha256 == digest
    with pytest.raises(RomError, match="not on the allow-list"):
        check_rom(data, GPU, frozenset({"0" * 64}))
    other = Identity(0x8086, 0x1234, 0, 0, 0x020000, 0)
    with pytest.raises(RomError, match="for vendor 10de, the device is 8086"):
        check_rom(data, other, frozenset())
    with pytest.raises(RomError, match="no 0x55AA"):
        check_rom(bytes(0x10000), GPU, frozenset())


@given(st.binary(max_size=4096), st.integers(0, 4095), st.binary(min_size=1, max_size=64))
def test_any_bytes_are_a_rom_or_a_rom_error(base: bytes, at: int, patch: bytes) -> None:
    data = bytearray(build_rom(GPU, 4096))
    data[at : at + len(patch)] = patch
    for candidate in (bytes(data), base):
        try:
            rom = parse_rom(candidate)
        except RomError:
            continue
        assert rom.length <= len(candidate) and rom.images
