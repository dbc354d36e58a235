"""Reading lspci hex dumps, including bad ones."""

from __future__ import annotations

import pytest

from mediator.errors import InputError
from mediator.pci.hexdump import format_rows, parse_lspci, select_function
from tests.support import PROFILES

FOLDER = PROFILES["h100-sxm5"].parent


def test_a_full_dump_with_vvv_detail_parses_to_4k() -> None:
    text = (FOLDER / "nvidia-10de_1d10-gp108m-geforce-mx150.lspci").read_text()
    [function] = parse_lspci(text, "gp108m")
    image = function.image()
    assert function.address == "02:00.0"
    assert len(image) == 4096
    assert image[:4] == bytes.fromhex("de10101d")
    assert image[0x600:0x604] == bytes.fromhex("0b000190")


def test_a_partial_dump_reads_zero_past_its_rows() -> None:
    text = (FOLDER / "nvidia-10de_2330-h100-sxm5-80gb.partial.lspci").read_text()
    [function] = parse_lspci(text, "h100")
    image = function.image()
    assert len(image) == 256
    assert image[0x48:0x4C] == bytes.fromhex("05608801")
    assert not any(image[0x60:])
    assert len(function.image(4096)) == 4096


def test_a_multi_function_dump_needs_a_function_named() -> None:
    text = (FOLDER / "intel-8086_2a02_2a03-gm965-igd-multifunction.lspci").read_text()
    functions = parse_lspci(text, "gm965")
    assert [f.address for f in functions] == ["00:02.0", "00:02.1"]
    with pytest.raises(InputError, match="several functions"):
        select_function(functions, None, "gm965", "config.function")
    assert select_function(functions, "00:02.1", "gm965", "x").image()[2:4] == bytes.fromhex("032a")
    with pytest.raises(InputError, match=r"no function 00:03\.0"):
        select_function(functions, "00:03.0", "gm965", "config.function")


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("00: de 10\n", 1, "has 2 bytes, expected 16"),
        ("# c\n00: " + "00 " * 16 + "\n08: " + "00 " * 16 + "\n", 3, "not a multiple of 16"),
        ("00: " + "00 " * 16 + "\nzz: 00\n", 2, "not an lspci hex row"),
        ("00: " + "00 " * 16 + "\n00: " + "11 " * 16 + "\n", 2, "appears twice"),
        ("00: " + "0g " * 16 + "\n", 1, "not an lspci hex row"),
    ],
)
def test_a_malformed_row_is_an_error_naming_its_line(text: str, line: int, message: str) -> None:
    with pytest.raises(InputError) as error:
        parse_lspci(text, "dump.lspci")
    assert str(error.value).startswith(f"dump.lspci: line {line}: ")
    assert message in str(error.value)


def test_a_dump_without_rows_is_an_error() -> None:
    with pytest.raises(InputError, match="no hex rows"):
        parse_lspci("02:00.0 VGA compatible controller\n\tdetail\n", "empty.lspci")


def test_rows_round_trip_and_marks_show_changed_bytes() -> None:
    image = bytes(range(256))
    rows = format_rows(image, marked=[0x11])
    assert rows[1].startswith("10: 10 11*12 ")
    [function] = parse_lspci("\n".join(r.replace("*", " ") for r in rows), "round-trip")
    assert function.image() == image
