"""The daemon's config file and the tenancy it describes."""

from __future__ import annotations

import grp
from datetime import timedelta
from pathlib import Path

import pytest

from mediator.errors import InputErrors
from mediator.settings import Access, load_settings
from mediator.state import Retention
from mediator.tenancy import allowed_links, device_context
from mediator.virt.reset import reply_deadline
from tests.support import device

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


def test_the_fast_path_is_on_unless_the_config_turns_it_off(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, CONFIG)).fast_path
    assert not load_settings(write(tmp_path, "fast_path = false\n" + CONFIG)).fast_path


def test_client_timeout_is_qemus_default_unless_the_config_says_otherwise(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, CONFIG)).client_timeout == 5.0  # x-msg-timeout=5000
    assert load_settings(write(tmp_path, "client_timeout = 12\n" + CONFIG)).client_timeout == 12.0


@pytest.mark.parametrize(
    ("keep", "retention"),
    [
        ("", Retention()),  # every record stays
        ("keep = 200", Retention(newest=200)),
        ('keep = "12h"', Retention(within=timedelta(hours=12))),
        ('keep = { newest = 50, within = "2w" }', Retention(50, timedelta(weeks=2))),
    ],
)
def test_handoff_keep_takes_a_count_an_age_or_both(tmp_path: Path, keep: str, retention: Retention) -> None:
    settings = load_settings(write(tmp_path, CONFIG + keep + "\n"))  # CONFIG ends in [handoff]
    assert settings.handoff.retention == retention


@pytest.mark.parametrize(("timeout", "deadline"), [(5.0, 4.0), (10.0, 9.0), (60.0, 59.0), (1.0, 0.8)])
def test_a_guests_reset_is_answered_with_time_to_spare_before_the_client_gives_up(
    timeout: float, deadline: float
) -> None:
    assert reply_deadline(timeout) == pytest.approx(deadline)


def test_links_are_allowed_only_to_peers_of_the_same_tenant(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CONFIG))
    assert allowed_links(settings, settings.device("gpu0")) == {0, 1}
    assert allowed_links(settings, settings.device("gpu3")) == set()  # gpu0 is alice's
    assert allowed_links(settings, settings.device("spare")) == set()  # no tenant, nothing shared
    context = device_context(settings, settings.device("gpu0"), peer_dma=None)
    assert (context.tenant, context.gpudirect_clique) == ("alice", None)  # gpu0 is alone in its clique
    assert "no other device of the config is in clique 3" in (context.gpudirect_withheld or "")


CLIQUE = """
[[device]]
name = "gpu0"
profile = "h100-sxm5"
socket = "gpu0.sock"
tenant = "alice"
gpudirect_clique = 3
[[device]]
name = "gpu1"
profile = "h100-sxm5"
socket = "gpu1.sock"
tenant = "alice"
gpudirect_clique = 3
[[device]]
name = "bobs"
profile = "h100-sxm5"
socket = "bobs.sock"
tenant = "bob"
gpudirect_clique = 3
[[device]]
name = "trapped"
profile = "h100-sxm5"
socket = "trapped.sock"
tenant = "bob"
gpudirect_clique = 3
bar_access = "trap"
"""


def test_a_gpudirect_clique_is_given_only_where_p2p_can_reach_its_peers(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CLIQUE))
    gpu0 = device_context(settings, settings.device("gpu0"), peer_dma=None)
    assert (gpu0.gpudirect_clique, gpu0.gpudirect_peers) == (3, ("gpu1",))  # bob's GPUs go to another VM
    bobs = device_context(settings, settings.device("bobs"), peer_dma=None)
    assert bobs.gpudirect_clique is None and "no other device" in (bobs.gpudirect_withheld or "")
    trapped = device_context(settings, settings.device("trapped"), peer_dma=None)
    assert trapped.gpudirect_clique is None and 'bar_access = "trap"' in (trapped.gpudirect_withheld or "")
    iommufd = device_context(settings, settings.device("gpu1"), peer_dma="iommufd cannot map it")
    assert iommufd.gpudirect_clique is None and iommufd.gpudirect_withheld == "iommufd cannot map it"


MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"


def test_a_mediated_device_is_named_by_its_uuid(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, f'[[device]]\nname = "vgpu"\nsocket = "s"\nmdev = "{MDEV.upper()}"\n')
    )
    spec = settings.device("vgpu")
    assert (spec.mdev, spec.bdf) == (MDEV, None)
    assert settings.find(MDEV.upper()) is spec


BAD = [
    ('[[device]]\nname = "a"\nsocket = "s"\n', "device[0] (a)", "exactly one of bdf"),
    ('[[device]]\nname = "a"\nsocket = "s"\nbdf = "3b:00"\n', "device[0] (a).bdf", "not a PCI address"),
    ('[[device]]\nname = "a"\nsocket = "s"\nmdev = "mtty-2"\n', "device[0] (a).mdev", "not an mdev UUID"),
    (
        f'[[device]]\nname = "a"\nsocket = "s"\nbdf = "3b:00.0"\nmdev = "{MDEV}"\n',
        "device[0] (a)",
        "exactly one of bdf (a PCI function), mdev (a mediated device) or profile",
    ),
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
    *[
        ('[[device]]\nname = "a"\nsocket = "s"\nprofile = "p"\n[handoff]\nkeep = ' + keep, where, message)
        for keep, where, message in [
            ("0\n", "handoff.keep", ">= 1"),
            ('"30 days"\n', "handoff.keep", "'30 days' is not an age: give a whole number from 1 to 999999"),
            ('"0d"\n', "handoff.keep", "is not an age"),
            ('{ within = "1y" }\n', "handoff.keep.within", "'1y' is not an age"),
            ("{}\n", "handoff.keep", "give newest (a count of records), within (an age) or both"),
            ("1.5\n", "handoff.keep", "Expected `int | str | object | null`, got `float`"),
        ]
    ],
    ("device = []\n", "device", "length >= 1"),
    ('client_timeout = 0\n[[device]]\nname = "a"\nsocket = "s"\nprofile = "p"\n', "client_timeout", "> 0"),
    (
        'client_timeout = inf\n[[device]]\nname = "a"\nsocket = "s"\nprofile = "p"\n',
        "client_timeout",
        "<= 4294967.295",  # what x-msg-timeout, a uint32 of milliseconds, can say
    ),
    ('[[device]\nname = "a"\n', "", "invalid TOML"),
    (
        'fast_path = "yes"\n[[device]]\nname = "a"\nsocket = "s"\nprofile = "p"\n',
        "fast_path",
        "Expected `bool`",
    ),
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


def test_inspect_says_which_peers_the_clique_reaches_or_why_it_is_withheld(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CLIQUE))
    for name, expected in (("gpu0", "P2P reaches gpu1"), ("bobs", "no other device")):
        dev, _ = device("h100-sxm5", context=device_context(settings, settings.device(name), peer_dma=None))
        said = [d for d in dev.plan.decisions if d.quirk == "nvidia/gpudirect-clique"]
        assert len(said) == 1 and expected in said[0].detail, said
