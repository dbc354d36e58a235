"""PCI expansion ROM images: the layout the PCI Firmware spec gives them, read and written.

A ROM holds one or more images back to back. Each starts with the 0x55 0xAA
signature and, at 0x18, a pointer to its PCI Data Structure ("PCIR"): the
vendor and device it is for, its class code, its length in 512-byte units,
its code type (0 x86, 3 EFI) and an indicator whose bit 7 marks the last
image. What follows the last image is not part of the ROM (the kernel's
sysfs ``rom`` file stops there too), so a digest covers the images only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mediator.pci.registers import Identity, u16

SIGNATURE = b"\x55\xaa"
PCIR = b"PCIR"
PCIR_POINTER = 0x18
PCIR_SIZE = 0x1C
UNIT = 512
LAST_IMAGE = 0x80


class RomError(Exception):
    """The ROM is not a well-formed expansion ROM."""


@dataclass(frozen=True)
class RomImage:
    offset: int
    length: int
    vendor: int
    device: int
    code_type: int


@dataclass(frozen=True)
class Rom:
    images: tuple[RomImage, ...]
    length: int  # up to the end of the last image
    sha256: str


def parse_rom(data: bytes) -> Rom:
    """The images in ``data``; raises RomError naming the first thing that is wrong."""
    images: list[RomImage] = []
    offset = 0
    while True:
        where = f"image {len(images)} at {offset:#x}"
        if offset + PCIR_POINTER + 2 > len(data):
            raise RomError(f"{where}: past the end of the {len(data)}-byte ROM (no last-image indicator)")
        if data[offset : offset + 2] != SIGNATURE:
            raise RomError(
                f"{where}: no 0x55AA signature (found {data[offset : offset + 2].hex() or 'nothing'})"
            )
        pcir = offset + u16(data, offset + PCIR_POINTER)
        if pcir + PCIR_SIZE > len(data) or data[pcir : pcir + 4] != PCIR:
            raise RomError(f"{where}: no PCI Data Structure (PCIR) at {pcir:#x}")
        length = u16(data, pcir + 0x10) * UNIT
        if not length or offset + length > len(data):
            raise RomError(f"{where}: image length {length:#x} does not fit the ROM")
        images.append(RomImage(offset, length, u16(data, pcir + 4), u16(data, pcir + 6), data[pcir + 0x14]))
        offset += length
        if data[pcir + 0x15] & LAST_IMAGE:
            return Rom(tuple(images), offset, hashlib.sha256(data[:offset]).hexdigest())


def check_rom(data: bytes, identity: Identity, allowed_sha256: frozenset[str]) -> Rom:
    """The ROM, when it is well formed, made for this vendor, and (given an allow-list) on it."""
    rom = parse_rom(data)
    for i, image in enumerate(rom.images):
        if image.vendor != identity.vendor:
            raise RomError(f"image {i} is for vendor {image.vendor:04x}, the device is {identity.vendor:04x}")
    if allowed_sha256 and rom.sha256 not in allowed_sha256:
        raise RomError(f"SHA-256 {rom.sha256} is not on the allow-list")
    return rom


def build_rom(identity: Identity, size: int) -> bytes:
    """One x86 image for the device, as long as ``size`` allows (at most 64 KiB), padded with 0xFF.

    SeaBIOS runs an x86 image with a valid checksum at boot, so its entry
    point returns at once.
    """
    length = min(size, 0x10000) // UNIT * UNIT
    image = bytearray(b"\xff" * size)
    image[:length] = bytes(length)
    image[0:3] = SIGNATURE + bytes([length // UNIT & 0xFF])
    image[3] = 0xCB  # the init entry point a BIOS far-calls: RETF, so running it does nothing
    image[PCIR_POINTER : PCIR_POINTER + 2] = (0x40).to_bytes(2, "little")
    pcir = bytearray(PCIR_SIZE)
    pcir[0:4] = PCIR
    pcir[4:6] = identity.vendor.to_bytes(2, "little")
    pcir[6:8] = identity.device.to_bytes(2, "little")
    pcir[0xA:0xC] = PCIR_SIZE.to_bytes(2, "little")
    pcir[0xD:0x10] = identity.class_code.to_bytes(3, "little")
    pcir[0x10:0x12] = (length // UNIT).to_bytes(2, "little")
    pcir[0x15] = LAST_IMAGE
    image[0x40 : 0x40 + PCIR_SIZE] = pcir
    image[length - 1] = -sum(image[: length - 1]) & 0xFF  # a legacy image's bytes sum to 0
    return bytes(image)
