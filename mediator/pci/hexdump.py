"""Config images in ``lspci -xxx``/``-xxxx`` text form, both ways.

The reader takes what lspci prints (and what pciutils keeps in its test
corpus): device lines (``02:00.0 3D controller: ...``), optional indented
``-vvv`` detail, and hex rows ``offset: 16 bytes``. Rows may be missing (a
partial dump); missing bytes read as zero. A file may hold several functions;
each device line starts a new one. The image is 4 KiB when any row lies at or
above 0x100, else 256 bytes.

Every malformed line is an ``InputError`` naming the line, so a typo in a
profile is a one-line message, not a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from mediator.errors import InputError
from mediator.pci.registers import CONFIG_SPACE_SIZE, EXTENDED_CONFIG_SPACE_SIZE

ROW_BYTES = 16
_ROW = re.compile(r"^([0-9a-fA-F]{2,3}):((?:\s+[0-9a-fA-F]{2})+)\s*$")
_DEVICE = re.compile(r"^((?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s+(.*)$")


@dataclass
class DumpedFunction:
    address: str | None
    title: str
    rows: dict[int, bytes] = field(default_factory=dict)

    def image(self, size: int | None = None) -> bytes:
        """The config image; ``size`` forces 256 or 4096 bytes."""
        highest = max(self.rows, default=0)
        natural = EXTENDED_CONFIG_SPACE_SIZE if highest >= CONFIG_SPACE_SIZE else CONFIG_SPACE_SIZE
        image = bytearray(size or natural)
        for offset, row in self.rows.items():
            if offset < len(image):
                image[offset : offset + ROW_BYTES] = row
        return bytes(image)


def parse_lspci(text: str, source: str, where: str = "") -> list[DumpedFunction]:
    """Every function in an lspci hex dump.

    Args:
        text: the dump.
        source: the file name used in errors.
        where: a prefix for the line position in errors, for dumps embedded in
            another file (e.g. ``config.hex``).

    Raises:
        InputError: a line that is neither a device line, indented detail,
            a comment, nor a well-formed hex row; a repeated row; no rows at all.
    """
    functions: list[DumpedFunction] = []
    current: DumpedFunction | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        position = f"{where} line {number}".strip()
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or line[0] in " \t":
            continue
        device = _DEVICE.match(stripped)
        if device:
            current = DumpedFunction(device.group(1).lower(), device.group(2))
            functions.append(current)
            continue
        row = _ROW.match(stripped)
        if not row:
            raise InputError(source, position, f"not an lspci hex row or device line: {stripped[:60]!r}")
        offset = int(row.group(1), 16)
        data = bytes(int(b, 16) for b in row.group(2).split())
        if offset % ROW_BYTES:
            raise InputError(source, position, f"row offset {offset:#x} is not a multiple of 16")
        if len(data) != ROW_BYTES:
            raise InputError(source, position, f"row {offset:#x} has {len(data)} bytes, expected 16")
        if current is None:
            current = DumpedFunction(None, "")
            functions.append(current)
        if offset in current.rows:
            raise InputError(source, position, f"row {offset:#x} appears twice")
        current.rows[offset] = data
    functions = [f for f in functions if f.rows]
    if not functions:
        raise InputError(source, where, "no hex rows (expected lspci -xxx or -xxxx output)")
    return functions


def select_function(
    functions: list[DumpedFunction], address: str | None, source: str, where: str
) -> DumpedFunction:
    """The function at ``address``, or the only one when no address is given."""
    if address is None:
        if len(functions) > 1:
            found = ", ".join(str(f.address) for f in functions)
            raise InputError(source, where, f"the dump holds several functions ({found}); name one")
        return functions[0]
    wanted = address.lower()
    for function in functions:
        if function.address is not None and (
            function.address == wanted or function.address.endswith(":" + wanted)
        ):
            return function
    found = ", ".join(str(f.address) for f in functions)
    raise InputError(source, where, f"no function {address} in the dump (it has {found})")


def format_rows(image: bytes, marked: Iterable[int] = ()) -> list[str]:
    """lspci-style rows; bytes whose offset is in ``marked`` get a ``*`` after them.

    All-zero rows of unmarked bytes are left out past the first 64 bytes, as
    they carry nothing a reader needs.
    """
    marks = set(marked)
    width = 3 if len(image) > CONFIG_SPACE_SIZE else 2
    lines = []
    for offset in range(0, len(image), ROW_BYTES):
        row = image[offset : offset + ROW_BYTES]
        row_marked = any(o in marks for o in range(offset, offset + ROW_BYTES))
        if offset >= 0x40 and not row_marked and not any(row):
            continue
        cells = "".join(f"{b:02x}{'*' if offset + i in marks else ' '}" for i, b in enumerate(row))
        lines.append(f"{offset:0{width}x}: {cells.rstrip()}")
    return lines
