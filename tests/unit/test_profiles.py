"""Device profiles: the shipped ones load and plan; bad ones give one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mediator.backends.profile import DEFAULT_PROFILE, load_profile
from mediator.errors import InputErrors
from tests.support import PROFILES, device

GP108M = PROFILES["gp108m-mx150"].parent / "nvidia-10de_1d10-gp108m-geforce-mx150.lspci"


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_shipped_profile_loads_and_plans(name: str) -> None:
    dev, _ = device(name)
    assert dev.config.read(0, dev.config.size)
    for bar in dev.plan.bars:
        assert bar.virtual_size & (bar.virtual_size - 1) == 0


def test_the_default_profile_is_an_nvlink_capable_h100() -> None:
    prof = load_profile(PROFILES[DEFAULT_PROFILE])
    assert prof.image[:4] == bytes.fromhex("de103023")
    assert prof.irqs.msix == 9 and prof.irqs.intx == 1
    assert [b.kind for b in prof.behaviours] == [
        "config-mirror",
        "config-mirror",
        "irq-doorbell",
        "dma-engine",
    ]


def test_a_stated_bar_type_is_written_into_a_zero_register() -> None:
    prof = load_profile(PROFILES["gh200"])
    assert prof.image[0x20] == 0x0C and prof.image[0x18] == 0x0C
    assert prof.bar_sizes == (0x1000000, 0, 0x40000000, 0, 0x17E0000000, 0)


def write(tmp_path: Path, text: str, dump: str | None = None) -> Path:
    if dump is not None:
        (tmp_path / "dev.lspci").write_text(dump)
    path = tmp_path / "profile.toml"
    path.write_text(text)
    return path


ROW0 = "00: de 10 30 23 07 00 10 00 a1 00 02 03 00 00 00 00\n"
MINIMAL = f'[config]\nhex = """\n{ROW0}"""\n'

BAD_PROFILES = [
    ("[config]\n", "config", "give file, hex, or both"),
    ("colour = 1\n" + MINIMAL, "", "unknown field `colour`"),
    ('[config]\nfile = "missing.lspci"\n', "config.file", "cannot read missing.lspci"),
    ('[config]\nhex = """\n00: de 10\n"""\n', "config.hex line 1", "has 2 bytes"),
    (MINIMAL + "[[bars]]\nindex = 6\nsize = 16\n", "bars[0].index", "<= 5"),
    (MINIMAL + '[[bars]]\nindex = 0\nsize = "16M"\n', "bars[0].size", "Expected `int`"),
    (
        MINIMAL + "[[bars]]\nindex = 0\nsize = 16\n[[bars]]\nindex = 0\nsize = 32\n",
        "bars[1].index",
        "already",
    ),
    (MINIMAL + '[[bars]]\nindex = 5\nsize = 16\ntype = "mem64"\n', "bars[0]", "BAR5 cannot"),
    (
        MINIMAL + '[[bars]]\nindex = 0\nsize = 16\ntype = "mem64"\n[[bars]]\nindex = 1\nsize = 16\n',
        "bars[1].index",
        "upper half",
    ),
    (MINIMAL + "[irqs]\nmsi = 3\n", "irqs.msi", "Invalid enum"),
    (MINIMAL + "[irqs]\nmsix = 4\n", "irqs.msix", "image has none"),
    (MINIMAL + "[irqs]\nintx = 1\n", "irqs.intx", "Interrupt Pin"),
    (
        MINIMAL + '[[behaviours]]\nkind = "config-mirror"\nbar = 0\noffset = 0\nsize = 16\n',
        "behaviours[0].bar",
        "not in bars",
    ),
    ("[config\n", "", "invalid TOML"),
]


@pytest.mark.parametrize(("text", "where", "message"), BAD_PROFILES)
def test_a_bad_profile_is_an_error_naming_file_and_key(
    tmp_path: Path, text: str, where: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InputErrors) as error:
        load_profile(path)
    [problem] = error.value.errors
    assert problem.source == str(path)
    assert problem.where == where, problem.where
    assert message in problem.message, problem.message


def test_a_bad_row_in_a_dump_file_names_that_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[config]\nfile = "dev.lspci"\n', dump="# comment\n" + ROW0 + "10: 00 zz\n")
    with pytest.raises(InputErrors) as error:
        load_profile(path)
    [problem] = error.value.errors
    assert problem.source == str(tmp_path / "dev.lspci")
    assert problem.where == "line 3"


def test_a_bar_type_that_contradicts_the_image_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, f'[config]\nfile = "{GP108M}"\n[[bars]]\nindex = 0\nsize = 16\ntype = "io"\n')
    with pytest.raises(InputErrors, match="image's BAR0 register"):
        load_profile(path)
