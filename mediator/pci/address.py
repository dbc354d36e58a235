"""PCI addresses (segment:bus:device.function), as lspci -D prints them."""

from __future__ import annotations

import re

BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
SHORT_BDF = re.compile(r"^[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class AddressError(ValueError):
    """Text that is not a PCI address."""


def normalize_bdf(text: str) -> str:
    """``3b:00.0`` or ``0000:3b:00.0`` -> ``0000:3b:00.0``.

    Raises:
        AddressError: ``text`` is not a PCI address.
    """
    bdf = text.strip().lower()
    if SHORT_BDF.match(bdf):
        bdf = "0000:" + bdf
    if not BDF.match(bdf):
        raise AddressError(f"{text!r} is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:3b:00.0)")
    return bdf


def format_bdf(segment: int, bus: int, devfn: int) -> str:
    return f"{segment:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}"
