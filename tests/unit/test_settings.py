"""The daemon's config file and the tenancy it describes."""

from __future__ import annotations

import grp
from pathlib import Path

import pytest

from mediator.errors import InputErrors
from mediator.settings import Access, load_settings
from mediator.tenancy import allowed_links, device_context

CONFIG = """
state_directory = "state"

[[device]]
name = "gpu0"
profile = "v100-sxm2"
socket = "gpu0.sock"
tenant = "alice"
gpudirect_clique = 3
  [device.links]
  0 = "gpu1"            # by name, same tenant
  1 = "3c:00.0"         # by BDF, same tenant
  2 = "SN-BOB"          # by serial, another tenant
  3 = "0000:99:00.0"    # nobody here
  4 = "gpu0"            # itself: not a peer

[[device]]
name = "gpu1"
profile = "v100-sxm2"
socket = "/run/elsewhere/gpu1.sock"
tenant = "alice"

[[device]]
name = "gpu2"
bdf = "3C:00.0"
socket = "gpu2.sock"
tenant = "alice"

[[device]]
name = "gpu3"
profile = "v100-sxm2"
socket = "gpu3.sock"
tenant = "bob"
serial = "SN-BOB"
  [device.links]
  2 = "gpu0"

[[device]]
name = "spare"
profile = "h100-sxm5"
socket = "spare.sock"
  [device.links]
  0 = "gpu0"

[handoff]
reset = "function"
wipe = ["wipe-tool", "--bdf", "{bdf}", "--tenant", "{tenant}"]
"""


def write(folder: Path, text: str) -> Path:
    path = folder / "config.toml"
    path.write_text(text)
    return path


def test_a_config_loads_with_paths_relative_to_its_folder(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CONFIG))
    assert settings.state_directory == tmp_path / "state"
    assert settings.device("gpu0").socket == str(tmp_path / "gpu0.sock")
    assert settings.device("gpu1").socket == "/run/elsewhere/gpu1.sock"
    assert settings.device("gpu2").bdf == "0000:3c:00.0"
    assert settings.device("gpu0").profile == "v100-sxm2"  # a shipped profile, not a path
    assert settings.handoff.reset == "function"
    assert settings.find("SN-BOB") == settings.device("gpu3")
    assert settings.find("0000:3c:00.0") == settings.device("gpu2")


def test_links_are_allowed_only_to_peers_of_the_same_tenant(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CONFIG))
    assert allowed_links(settings, settings.device("gpu0")) == {0, 1}
    assert allowed_links(settings, settings.device("gpu3")) == set()  # gpu0 is alice's
    assert allowed_links(settings, settings.device("spare")) == set()  # no tenant, nothing shared
    context = device_context(settings, settings.device("gpu0"))
    assert (context.tenant, context.gpudirect_clique) == ("alice", 3)


BAD = [
    ('[[device]]\nname = "a"\nsocket = "s"\n', "device[0] (a)", "exactly one of bdf"),
    ('[[device]]\nname = "a"\nsocket = "s"\nbdf = "3b:00"\n', "device[0] (a).bdf", "not a PCI address"),
    (
        '[[device]]\nname = "a"\nsocket = "s"\nprofile = "p"\n[[device]]\nname = "a"\nsocket = "t"\nprofile = "p"\n',
        "device[1] (a).name",
        "repeats device[0]",
    ),
    ('[[device]]\nname = "a"\nsocket = "s"\nprofile = "p"\nlinks = { x = "b" }\n', "links.x", "numbers 0-63"),
    (
        '[[device]]\nname = "a"\nsocket = "s"\nprofile = "p"\ngpudirect_clique = 16\n',
        "gpudirect_clique",
        "<= 15",
    ),
    (
        '[[device]]\nname = "a"\nsocket = "s"\nprofile = "p"\ncolour = 1\n',
        "device[0]",
        "unknown field `colour`",
    ),
    (
        '[[device]]\nname = "a"\nsocket = "s"\nprofile = "p"\n[handoff]\nwipe = ["w", "{serial}"]\n',
        "handoff.wipe",
        "unknown placeholder {serial}",
    ),
    (
        '[[device]]\nname = "a"\nsocket = "s"\nprofile = "p"\n'
        '[fabric]\nactivate = ["a"]\ndeactivate = ["d"]\n[[fabric.partition]]\nid = 1\ndevices = ["b"]\n',
        "fabric.partition[0].devices",
        "no device named 'b'",
    ),
    ("device = []\n", "device", "length >= 1"),
    ('[[device]\nname = "a"\n', "", "invalid TOML"),
]


@pytest.mark.parametrize(("text", "where", "message"), BAD)
def test_a_bad_config_is_an_error_naming_file_and_key(
    tmp_path: Path, text: str, where: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InputErrors) as raised:
        load_settings(path)
    assert any(
        e.source == str(path) and where in e.where and message in e.message for e in raised.value.errors
    ), [str(e) for e in raised.value.errors]


def test_access_merges_device_keys_over_the_defaults_and_resolves_names(tmp_path: Path) -> None:
    root_group = grp.getgrgid(0).gr_name
    path = write(
        tmp_path,
        f"""
[access]
socket_mode = 0o640
allow_users = ["root", 1234]
[[device]]
name = "a"
profile = "h100-sxm5"
socket = "a.sock"
[[device]]
name = "b"
profile = "h100-sxm5"
socket = "b.sock"
  [device.access]
  allow_users = []
  allow_groups = ["{root_group}"]
[log]
format = "json"
[metrics]
socket = "metrics.sock"
""",
    )
    settings = load_settings(path)
    a, b = settings.access_for("a"), settings.access_for("b")
    assert (a.mode, a.allowed_uids, a.allowed_gids) == (0o640, {0, 1234}, set())
    assert (b.mode, b.allowed_uids, b.allowed_gids) == (0o640, set(), {0})
    assert a.admits(1234, frozenset({99})) and not a.admits(99, frozenset({0}))
    assert b.admits(99, frozenset({5, 0})) and not b.admits(0, frozenset({5}))
    assert Access().admits(4321, frozenset())  # no lists: the socket's permissions decide
    assert settings.log.format == "json"
    assert settings.metrics.socket == str(tmp_path / "metrics.sock")


def test_an_unknown_user_is_an_error_naming_the_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[device]]\nname = "a"\nprofile = "p"\nsocket = "s"\n[device.access]\nallow_users = ["no-such-user-x"]\n',
    )
    with pytest.raises(InputErrors) as raised:
        load_settings(path)
    [error] = raised.value.errors
    assert (
        error.where == "device[0] (a).access.allow_users"
        and "no user named 'no-such-user-x'" in error.message
    )
