"""The command as a user runs it: a real process, its output and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support import PROFILES


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mediator", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def inspect_json(*args: str | Path) -> dict[str, Any]:
    result = run("inspect", "--json", *args)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_inspect_shows_the_default_h100_side_by_side() -> None:
    result = run("inspect")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("h100-sxm5: 10de:2330")
    assert "[09c] std 0x09    Vendor Specific" in out
    assert "hidden  nvidia/nvlink-topology" in out
    assert "guest std chain: 40 -> 48 -> 60 -> b0" in out
    assert "guest ext chain: 100 (Null) -> 12c -> 134 -> 1b8 -> 2a4 -> 2b8 -> 2f0" in out
    assert "trap     0x88000-0x8afff config-mirror" in out
    assert "Guest config space (" in out
    # the hidden vendor capability's first row is marked as changed
    assert "090: 05 00 1e 00 00 00 00 00 00 00 00 00 00*00*00*00*" in out


def test_inspect_json_has_both_views_and_every_decision() -> None:
    report = inspect_json()
    physical = bytes.fromhex(report["physical"]["config"])
    virtual = bytes.fromhex(report["virtual"]["config"])
    assert len(physical) == len(virtual) == 4096
    assert virtual[0x9C:0xB0] == bytes(0x14) and physical[0x9C] == 0x09
    assert {"offset": 0x9C, "kind": "std", "id": 9, "name": "Vendor Specific"} in report["physical"][
        "capabilities"
    ]
    assert all(c["offset"] != 0x9C for c in report["virtual"]["capabilities"])
    bar0 = report["bars"][0]
    assert (bar0["index"], bar0["physical_size"], bar0["virtual_size"]) == (0, 1 << 24, 1 << 24)
    assert [t["offset"] for t in bar0["traps"]] == [0x88000, 0x1800]
    assert bar0["mmap_areas"][0] == [0, 0x1000]
    assert {
        "quirk": "nvidia/nvlink-topology",
        "action": "hide",
        "target": "std 0x09 Vendor Specific @0x9c",
        "detail": "",
    } in report["decisions"]


def test_inspect_gh200_reports_the_rounded_bar_and_its_padding() -> None:
    report = inspect_json("--profile", "gh200")
    bar4 = next(b for b in report["bars"] if b["index"] == 4)
    assert (bar4["physical_size"], bar4["virtual_size"]) == (0x17E0000000, 128 << 30)
    assert bar4["padding"] == [0x17E0000000, (128 << 30) - 0x17E0000000]
    assert bar4["mmap_areas"] == [[0, 0x17E0000000]]


def test_inspect_takes_a_profile_file_and_operator_quirks(tmp_path: Path) -> None:
    table = tmp_path / "ops.toml"
    table.write_text('[[quirk]]\nname = "ops/ltr"\nreason = "test"\nhide = [{ ext = 0x18 }]\n')
    report = inspect_json("--profile", PROFILES["h100-sxm5"], "--quirks", table)
    assert all(c["id"] != 0x18 for c in report["virtual"]["capabilities"] if c["kind"] == "ext")
    assert {"name": "ops/ltr", "source": str(table)} in report["quirks"]


def test_check_accepts_every_shipped_file() -> None:
    builtin = sorted((Path(__file__).parents[2] / "mediator" / "quirks" / "builtin").glob("*.toml"))
    result = run("check", *PROFILES.values(), *builtin)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok: ") == len(PROFILES) + len(builtin)


def test_check_lists_every_error_one_line_each_and_exits_2(tmp_path: Path) -> None:
    bad_table = tmp_path / "bad-quirks.toml"
    bad_table.write_text('[[quirk]]\nname = "a"\nreason = "r"\nhide = [{}]\n[[quirk]]\nname = "b"\n')
    bad_profile = tmp_path / "bad-profile.toml"
    bad_profile.write_text('[config]\nhex = """\n00: zz\n"""\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("[[quirk]\n")
    neither = tmp_path / "neither.toml"
    neither.write_text("x = 1\n")
    result = run("check", bad_table, bad_profile, broken, neither, PROFILES["gh200"])
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines == [
        f"error: {bad_table}: quirk[0] (a).hide[0]: give exactly one of std or ext",
        f"error: {bad_table}: quirk[1]: Object missing required field `reason`",
        f"error: {bad_profile}: config.hex line 1: not an lspci hex row or device line: '00: zz'",
        f"error: {broken}: invalid TOML: Expected ']]' at the end of an array declaration (at line 1, column 8)",
        f"error: {neither}: neither a quirk table ([[quirk]]) nor a device profile ([config])",
    ]
    assert f"ok: {PROFILES['gh200']}" in result.stdout


def test_bad_input_to_inspect_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    missing = run("inspect", "--profile", tmp_path / "nope.toml")
    assert missing.returncode == 2
    assert missing.stderr == f"error: {tmp_path / 'nope.toml'}: cannot read: No such file or directory\n"
    table = tmp_path / "t.toml"
    table.write_text('[[quirk]]\nname = "a"\nreason = "r"\nmatch = { vendor = "nvidia" }\n')
    wrong_type = run("inspect", "--quirks", table)
    assert wrong_type.returncode == 2
    assert (
        wrong_type.stderr
        == f"error: {table}: quirk[0].match.vendor: Expected `int | array | null`, got `str`\n"
    )


def test_a_policy_that_cannot_be_carried_out_exits_1(tmp_path: Path) -> None:
    table = tmp_path / "t.toml"
    table.write_text(
        '[[quirk]]\nname = "a"\nreason = "r"\nsynthesize = [{ kind = "nvidia-gpudirect-clique", clique = 1, at = [0x40] }]\n'
    )
    result = run("inspect", "--quirks", table)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no room for the synthesized nvidia-gpudirect-clique capability")
    assert "Traceback" not in result.stderr


def test_profiles_lists_what_ships() -> None:
    result = run("profiles")
    assert result.returncode == 0
    assert "h100-sxm5" in result.stdout and "(default)" in result.stdout
    assert len(result.stdout.splitlines()) == len(PROFILES)
