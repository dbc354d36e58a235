"""Quirk tables: matching, merging by name, every action, and bad tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from mediator.errors import InputErrors
from mediator.pci import capabilities as caps
from mediator.pci.chain import walk
from mediator.pci.registers import Identity, u16
from mediator.quirks.table import QuirkTable
from mediator.virt.plan import PlanError
from tests.support import BUILTIN, device, image_profile, profile, write_table


def names_for(profile_name: str, table: QuirkTable = BUILTIN) -> list[str]:
    return [q.name for q in table.for_device(Identity.of(profile(profile_name).image))]


def test_nvidia_quirks_match_every_nvidia_display_class_but_nothing_else() -> None:
    assert "nvidia/config-mirrors" in names_for("h100-sxm5")  # 3D controller, class 0302
    assert "nvidia/config-mirrors" in names_for("gp108m-mx150")
    assert "nvidia/config-mirrors" not in names_for("skylake-igd")  # Intel VGA
    assert "nvidia/nvlink-topology" in names_for("v100-sxm2")
    assert "nvidia/nvlink-topology" not in names_for("gp108m-mx150")  # no NVLink on a laptop part


def test_every_decision_names_the_quirk_behind_it() -> None:
    dev, _ = device("gp108m-mx150")
    by_target = {d.target: d for d in dev.plan.decisions}
    assert by_target["ext 0x001e L1 PM Substates @0x258"].quirk == "security/link-and-port-control"
    assert by_target["ext 0x000b Vendor-Specific @0x600"].quirk == "nvidia/vendor-extended-capabilities"
    assert by_target["ext 0x000b Vendor-Specific @0x600"].action == "expose"
    known = {q.name for q in BUILTIN.quirks}
    for decision in dev.plan.decisions:
        assert decision.quirk in known or decision.quirk.startswith("core:"), decision
    for segment in dev.plan.segments:
        assert segment.decided_by in known or segment.decided_by.startswith("core:"), segment


def test_an_operator_table_overrides_a_builtin_by_name(tmp_path: Path) -> None:
    table = write_table(
        tmp_path,
        """
[[quirk]]
name = "nvidia/vendor-extended-capabilities"
reason = "this operator hides NVIDIA's VSEC"
match = { vendor = 0x10de }
hide = [{ ext = 0x0b, vsec_id = 1 }]
""",
    )
    merged = QuirkTable.load([table])
    assert len(merged.quirks) == len(BUILTIN.quirks)
    assert merged.origins["nvidia/vendor-extended-capabilities"] == str(table)
    dev, _ = device("gp108m-mx150", quirk_files=[table])
    ext = [c.offset for c in walk(dev.config.read(0, 4096)).ext]
    assert 0x600 not in ext
    assert dev.config.read(0x600, 0x24) == bytes(0x24)


def test_a_builtin_can_be_switched_off(tmp_path: Path) -> None:
    table = write_table(
        tmp_path, '[[quirk]]\nname = "security/pasid"\nreason = "vIOMMU with PASID"\nenabled = false\n'
    )
    dev, _ = device("skylake-igd", quirk_files=[table])
    ext = walk(dev.config.read(0, 4096)).ext
    assert [(c.offset, c.id) for c in ext] == [(0x100, caps.PASID)]


def test_vendor_selectors_pick_dvsec_by_vendor_and_id(tmp_path: Path) -> None:
    table = write_table(
        tmp_path,
        '[[quirk]]\nname = "cxl"\nreason = "CXL device"\nexpose = [{ ext = 0x23, dvsec_vendor = 0x1e98, dvsec_id = 0 }]\n',
    )
    dev, _ = device("intel-0d93-many-ecaps", quirk_files=[table])
    ext = {c.offset: c.id for c in walk(dev.config.read(0, 4096)).ext}
    assert ext.get(0xE00) == caps.DVSEC  # the CXL DVSEC is back
    assert 0xD00 not in ext  # the Intel VSEC is still hidden


def test_register_rules_hide_ranges_and_gaps(tmp_path: Path) -> None:
    table = write_table(
        tmp_path,
        """
[[quirk]]
name = "ops/gp108m"
reason = "test every config action"
match = { vendor = 0x10de, device = 0x1d10 }
gaps = "hidden"
hide_ranges = [{ offset = 0x700, size = 0x200 }]
  [[quirk.registers]]
  offset = 0x40        # NVIDIA's writable subsystem alias: read it, never write it
  size = 4
  [[quirk.registers]]
  capability = { std = 0x10 }
  offset = 0x10        # Link Control: the guest may toggle ASPM, virtually
  size = 2
  virtual = 0x0003
  writable = 0x0003
  value = 0
""",
    )
    dev, sim = device("gp108m-mx150", quirk_files=[table])
    physical = dev.plan.physical
    assert dev.config.read(0x40, 4) == physical[0x40:0x44]
    dev.config.write(0x40, b"\x11\x22\x33\x44")
    assert sim.config[0x40:0x44] == physical[0x40:0x44]
    assert dev.config.read(0x700, 0x200) == bytes(0x200)
    assert dev.config.read(0xB4, 4) == bytes(4)  # the unlinked vendor capability sits in a gap
    dev.config.write(0x88, b"\x03\x00")
    assert u16(dev.config.read(0x88, 2), 0) & 3 == 3
    assert u16(sim.config, 0x88) & 3 == u16(physical, 0x88) & 3


def test_gaps_are_read_only_by_default() -> None:
    dev, sim = device("gp108m-mx150")
    assert dev.config.read(0xB4, 4) == dev.plan.physical[0xB4:0xB8]
    dev.config.write(0xB4, b"\0\0\0\0")
    assert sim.config[0xB4:0xB8] == dev.plan.physical[0xB4:0xB8]


def test_gpudirect_clique_is_synthesized_at_c8_or_else_d4(tmp_path: Path) -> None:
    table = write_table(
        tmp_path,
        """
[[quirk]]
name = "ops/clique"
reason = "GPUs 0-3 share an NVLink clique"
match = { vendor = 0x10de }
synthesize = [{ kind = "nvidia-gpudirect-clique", clique = 5 }]
""",
    )
    dev, _ = device("h100-sxm5", quirk_files=[table])
    view = dev.config.read(0, 256)
    std = walk(view).std
    assert [c.offset for c in std][-1] == 0xC8
    assert view[0xC8:0xD0] == bytes([0x09, 0x00, 0x08, 0x50, 0x32, 0x50, 5 << 3, 0x00])
    assert view[0xB1] == 0xC8  # MSI-X, the last physical capability, now leads to it
    dev.config.write(0xCE, b"\x00")
    assert dev.config.read(0xCE, 1) == bytes([5 << 3])  # the guest cannot change the clique


def test_gpudirect_moves_to_d4_when_c8_is_taken(tmp_path: Path) -> None:
    table = write_table(
        tmp_path,
        '[[quirk]]\nname = "c"\nreason = "r"\nsynthesize = [{ kind = "nvidia-gpudirect-clique", clique = 1 }]\n',
    )
    image = bytearray(profile("h100-sxm5").image)
    image[0xB1] = 0xC8  # MSI-X -> a vendor capability at 0xC8
    image[0xC8:0xCC] = bytes([0x09, 0x00, 0x0C, 0x00])
    dev, _ = device(image_profile(bytes(image)), quirk_files=[table])
    std = walk(dev.config.read(0, 256)).std
    assert std[-1].offset == 0xD4 and std[-1].id == caps.VENDOR


def test_no_room_for_a_synthesized_capability_is_a_plan_error(tmp_path: Path) -> None:
    table = write_table(
        tmp_path,
        '[[quirk]]\nname = "c"\nreason = "r"\nsynthesize = [{ kind = "nvidia-gpudirect-clique", clique = 1, at = [0x60] }]\n',
    )
    with pytest.raises(PlanError, match="no room"):
        device("h100-sxm5", quirk_files=[table])


def test_bar_flags_and_post_reset_writes(tmp_path: Path) -> None:
    table = write_table(
        tmp_path,
        """
[[quirk]]
name = "ops/bar0"
reason = "test"
match = { device = 0x2330 }
bar_flags = [{ bar = 4, prefetchable = false }]
post_reset = [
  { bar = 0, offset = 0x200, value = 0x02000000, op = "set" },
  { bar = 0, offset = 0x12004c, value = 4 },
]
""",
    )
    dev, sim = device("h100-sxm5", quirk_files=[table])
    bar4 = dev.plan.bar(4)
    assert bar4 is not None and not bar4.type.prefetchable and bar4.physical_type.prefetchable
    sim.write_region(0, 0x200, (0x11).to_bytes(4, "little"))
    dev.reset()
    assert int.from_bytes(sim.read_region(0, 0x200, 4), "little") == 0x02000011
    assert int.from_bytes(sim.read_region(0, 0x12004C, 4), "little") == 4
    assert sim.resets == 1


BAD_TABLES = [
    (
        '[[quirk]]\nname = "a"\nreason = "r"\nhide = [{ std = 1, ext = 2 }]\n',
        "quirk[0] (a).hide[0]",
        "exactly one",
    ),
    ('[[quirk]]\nname = "a"\nreason = "r"\ncolour = 1\n', "quirk[0]", "unknown field `colour`"),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\nmatch = { vendor = "nvidia" }\n',
        "quirk[0].match.vendor",
        "Expected",
    ),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\nmatch = { vendor = 0x10000 }\n',
        "quirk[0].match.vendor",
        "<= 65535",
    ),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\nhide_ranges = [{ offset = 0x10, size = 8 }]\n',
        "hide_ranges[0]",
        "BAR",
    ),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\nregisters = [{ capability = { std = 1 }, offset = 1, size = 1 }]\n',
        "registers[0].offset",
        "after the header",
    ),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\nregisters = [{ offset = 0x40 }]\n',
        "registers[0].size",
        "required",
    ),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\nregisters = [{ offset = 0x40, size = 1, writable = 0x100 }]\n',
        "registers[0].writable",
        "fit",
    ),
    ('[[quirk]]\nname = "a"\nreason = "r"\nhide = [{ std = 1, vsec_id = 2 }]\n', "hide[0]", "vsec_id"),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\n[[quirk]]\nname = "a"\nreason = "r"\n',
        "quirk[1] (a).name",
        "repeats",
    ),
    ('[[quirk]]\nname = "A b"\nreason = "r"\n', "quirk[0].name", "matching regex"),
    ('[[quirk]]\nname = "a"\n', "quirk[0]", "missing required field `reason`"),
    ("quirks = []\n", "quirks", "unknown key"),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\nbar_traps = [{ bar = 0, offset = 0, size = 1, action = "ignore" }]\n',
        "bar_traps[0].action",
        "Invalid enum",
    ),
    ('[[quirk]\nname = "a"\n', "", "invalid TOML"),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\nregisters = [{ offset = 0x40, size = 2, reset_on = 0x8000 }]\n',
        "registers[0].reset_on",
        "virtual",
    ),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\npost_reset = [{ bar = 0, offset = 0, value = "foreign-links" }]\n',
        "post_reset[0].links",
        "number of links",
    ),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\n'
        'post_reset = [{ bar = 0, offset = 0, value = "foreign-links", links = 6, shift = 28 }]\n',
        "post_reset[0].value",
        "does not fit",
    ),
    (
        '[[quirk]]\nname = "a"\nreason = "r"\nsynthesize = [{ kind = "nvidia-gpudirect-clique", clique = 16 }]\n',
        "synthesize[0].clique",
        "",
    ),
]


@pytest.mark.parametrize(("text", "where", "message"), BAD_TABLES)
def test_a_bad_table_is_an_error_naming_file_and_key(
    tmp_path: Path, text: str, where: str, message: str
) -> None:
    path = write_table(tmp_path, text)
    with pytest.raises(InputErrors) as error:
        QuirkTable.load([path])
    [problem] = error.value.errors
    assert problem.source == str(path)
    assert where in problem.where, problem.where
    assert message in problem.message, problem.message
    assert "\n" not in str(problem)


def test_every_problem_in_a_table_is_reported(tmp_path: Path) -> None:
    path = write_table(
        tmp_path,
        '[[quirk]]\nname = "a"\nreason = "r"\nhide = [{}]\n[[quirk]]\nname = "b"\nreason = 7\n',
    )
    with pytest.raises(InputErrors) as error:
        QuirkTable.load([path])
    assert [e.where.split(".")[0] for e in error.value.errors] == ["quirk[0] (a)", "quirk[1]"]


def test_every_builtin_quirk_is_documented() -> None:
    documented = (Path(__file__).parents[2] / "docs" / "quirks.md").read_text()
    missing = [q.name for q in BUILTIN.quirks if f"`{q.name}`" not in documented]
    assert not missing, f"docs/quirks.md does not describe {missing}"
