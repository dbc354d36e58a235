"""Tenant hand-off on the simulator: each step, its failures, quarantine and the records."""

from __future__ import annotations

import dataclasses
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mediator.backends.base import BackendError
from mediator.backends.profile import Behaviour, load_profile
from mediator.errors import InputErrors
from mediator.handoff import HandOff, HandOffReason, HandOffRecord, Owner
from mediator.settings import HandoffSpec, WipeSpec, load_settings
from mediator.state import StateStore
from tests.support import StandIn, device, profile

OWNER = Owner("gpu0", "0000:3b:00.0", "alice")

PROFILES = Path(__file__).parents[2] / "mediator" / "profiles"


def results(record) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {step.name: step.result for step in record.steps}


def test_a_clean_device_passes_every_step_with_a_bus_reset(tmp_path: Path) -> None:
    dev, sim = device("v100-sxm2")
    state = StateStore(tmp_path)
    state.prepare()
    with capture_logs() as logs:
        record = HandOff(HandoffSpec(), state).run(dev, OWNER, HandOffReason.CLIENT_GONE)
    assert record.ok, record
    assert results(record) == {
        "release": "ok",
        "reset": "ok",
        "config": "ok",
        "isolation": "ok",
        "rom": "ok",
        "wipe": "skipped",
    }
    steps = {s.name: s.detail for s in record.steps}
    assert steps["reset"] == "bus reset" and sim.bus_resets == 1
    assert steps["isolation"] == "4 post-reset writes made, 1 verified"
    assert "1 image(s)" in steps["rom"] and "SHA-256" in steps["rom"]
    assert dev.refusal is None and state.quarantined("gpu0") is None
    kept = list((tmp_path / "handoffs" / "gpu0").glob("*.json"))
    assert len(kept) == 1
    document = json.loads(kept[0].read_text())
    assert document["ok"] and document["tenant"] == "alice" and document["reason"] == "client gone"
    assert [e for e in logs if e["event"] == "hand-off" and e["audit"] and e["ok"]]


def test_a_function_reset_when_the_policy_says_so(tmp_path: Path) -> None:
    dev, sim = device("h100-sxm5")
    record = HandOff(HandoffSpec(reset="function"), StateStore(None)).run(dev, OWNER, HandOffReason.ON_DEMAND)
    assert record.ok and sim.bus_resets == 0 and sim.resets == 1


def test_a_blank_rom_quarantines_the_device_and_stops_the_hand_off(tmp_path: Path) -> None:
    dev, _ = device(dataclasses.replace(profile("h100-sxm5"), rom_contents="blank"))
    state = StateStore(tmp_path)
    state.prepare()
    wipe = StandIn(tmp_path)
    record = HandOff(HandoffSpec(wipe=wipe.command("wipe", "{bdf}")), state).run(
        dev, OWNER, HandOffReason.CLIENT_GONE
    )
    assert not record.ok
    assert results(record)["rom"] == "failed" and results(record)["wipe"] == "not run"
    assert record.failure is not None and "no 0x55AA signature" in record.failure
    assert wipe.calls() == []
    assert dev.refusal == f"quarantined: {record.failure}"
    quarantined = state.quarantined("gpu0")
    assert quarantined is not None and quarantined["ok"] is False
    assert (tmp_path / "quarantine" / "gpu0.json").exists()


@pytest.mark.parametrize(("rom", "ok"), [("image", True), ("blank", False)])
def test_the_result_is_published_before_the_audit_line_announces_it(
    tmp_path: Path, rom: str, ok: bool
) -> None:
    """An operator (or a test) acting on the audit line must find the metrics and quarantine it implies."""
    dev, _ = device(dataclasses.replace(profile("h100-sxm5"), rom_contents=rom))
    state = StateStore(tmp_path)
    state.prepare()
    seen: list[tuple[bool, str | None, bool, int]] = []
    with capture_logs() as logs:

        def concluded(record: HandOffRecord) -> None:
            announced = sum(1 for e in logs if e["event"] == "hand-off")
            seen.append((record.ok, dev.refusal, state.quarantined("gpu0") is not None, announced))

        HandOff(HandoffSpec(), state).run(dev, OWNER, HandOffReason.CLIENT_GONE, concluded=concluded)
    [(record_ok, refusal, quarantined, announced)] = seen
    assert record_ok is ok and announced == 0
    assert (refusal is None and not quarantined) if ok else (refusal is not None and quarantined)
    assert [e for e in logs if e["event"] == "hand-off" and e["ok"] is ok]


def test_the_rom_must_be_on_the_allow_list_when_there_is_one() -> None:
    dev, _ = device("h100-sxm5")
    policy = HandoffSpec(rom_sha256=["ab" * 32])
    record = HandOff(policy, StateStore(None)).run(dev, OWNER, HandOffReason.CLIENT_GONE)
    assert results(record)["rom"] == "failed" and "not on the allow-list" in (record.failure or "")
    digest = record.failure.split("SHA-256 ")[1].split()[0] if record.failure else ""
    dev.refusal = None
    record = HandOff(HandoffSpec(rom_sha256=[digest.upper()]), StateStore(None)).run(
        dev, OWNER, HandOffReason.ON_DEMAND
    )
    assert record.ok, record.failure


def test_the_wipe_command_gets_the_device_and_its_failure_quarantines(tmp_path: Path) -> None:
    dev, _ = device("h100-sxm5")
    wipe = StandIn(tmp_path)
    policy = HandoffSpec(
        wipe=wipe.command("wipe", "--bdf", "{bdf}", "--device", "{device}", "--from", "{tenant}")
    )
    assert HandOff(policy, StateStore(None)).run(dev, OWNER, HandOffReason.CLIENT_GONE).ok
    assert wipe.calls() == [("wipe", ["--bdf", "0000:3b:00.0", "--device", "gpu0", "--from", "alice"])]
    wipe.fail("wipe", "HBM row 12 did not scrub")
    with capture_logs() as logs:
        record = HandOff(policy, StateStore(None)).run(dev, OWNER, HandOffReason.CLIENT_GONE)
    assert results(record)["wipe"] == "failed"
    assert "exit 1" in (record.failure or "") and "HBM row 12 did not scrub" in (record.failure or "")
    command = next(e for e in logs if e["event"] == "operator command")
    assert command["purpose"] == "device wipe" and command["ok"] is False and command["audit"]


def test_isolation_that_does_not_hold_after_the_reset_quarantines() -> None:
    base = profile("v100-sxm2")
    behaviours = [b for b in base.behaviours if b.kind != "sticky-bits"]
    dev, _ = device(
        dataclasses.replace(base, behaviours=(*behaviours, Behaviour("read-only", 0, 0xA00148, 4)))
    )
    record = HandOff(HandoffSpec(), StateStore(None)).run(dev, OWNER, HandOffReason.DAEMON_START)
    assert results(record)["isolation"] == "failed"
    assert "0xa00148 reads 0x0" in (record.failure or "")
    assert dev.refusal is not None and dev.refusal.startswith("quarantined: isolation:")


def test_a_device_that_comes_back_different_fails_the_config_check() -> None:
    dev, sim = device("h100-sxm5")
    changed = bytearray(sim.profile.image)
    changed[2:4] = (0x2331).to_bytes(2, "little")  # another device ID after the reset
    sim.profile = dataclasses.replace(sim.profile, image=bytes(changed))
    record = HandOff(HandoffSpec(), StateStore(None)).run(dev, OWNER, HandOffReason.CLIENT_GONE)
    assert results(record)["config"] == "failed"
    assert "now reads as 10de:2331" in (record.failure or "")


def test_the_fabric_is_released_even_when_an_earlier_step_failed() -> None:
    dev, _ = device(dataclasses.replace(profile("h100-sxm5"), rom_contents="blank"))
    released: list[str] = []

    def release(name: str) -> str:
        released.append(name)
        return "partition 1 deactivated"

    record = HandOff(HandoffSpec(), StateStore(None), release).run(dev, OWNER, HandOffReason.CLIENT_GONE)
    assert released == ["gpu0"] and results(record)["fabric"] == "ok"
    assert not record.ok


def test_a_successful_hand_off_lifts_a_block() -> None:
    dev, _ = device("h100-sxm5")
    dev.block("a protection failed earlier")
    assert HandOff(HandoffSpec(), StateStore(None)).run(dev, OWNER, HandOffReason.ON_DEMAND).ok
    assert dev.refusal is None


def test_a_function_reset_when_the_device_shares_its_bus() -> None:
    dev, sim = device(dataclasses.replace(profile("h100-sxm5"), resets=frozenset({"function"})))
    record = HandOff(HandoffSpec(), StateStore(None)).run(dev, OWNER, HandOffReason.CLIENT_GONE)
    assert record.ok and sim.bus_resets == 0 and sim.resets == 1
    assert record.steps[1].detail == "function reset (the profile has no bus reset)"


def test_a_device_with_no_reset_is_quarantined_unless_its_config_opts_out() -> None:
    dev, sim = device(dataclasses.replace(profile("h100-sxm5"), resets=frozenset()))
    dev.config.write(0x3C, b"\x42")
    record = HandOff(HandoffSpec(), StateStore(None)).run(dev, OWNER, HandOffReason.CLIENT_GONE)
    assert results(record)["reset"] == "failed" and "no reset method" in (record.failure or "")
    assert dev.refusal is not None
    record = HandOff(HandoffSpec(), StateStore(None)).run(dev, OWNER, HandOffReason.CLIENT_GONE, reset="none")
    assert record.ok and results(record)["reset"] == "skipped" and sim.resets == 0
    assert dev.config.read(0x3C, 1) == b"\x0a"  # the virtual state is reset all the same


def test_a_failed_bus_reset_falls_back_to_a_function_reset() -> None:
    dev, sim = device("h100-sxm5")

    def bus_reset() -> None:  # as the kernel answers when the device is not ready after the reset
        raise BackendError("VFIO_DEVICE_PCI_HOT_RESET failed: ENOTTY")

    sim.bus_reset = bus_reset  # type: ignore[method-assign]
    record = HandOff(HandoffSpec(), StateStore(None)).run(dev, OWNER, HandOffReason.CLIENT_GONE)
    assert record.ok and sim.resets == 1
    assert (
        record.steps[1].detail
        == "function reset (the bus reset failed: VFIO_DEVICE_PCI_HOT_RESET failed: ENOTTY)"
    )


# the records a device keeps


def handed_off(state: StateStore, policy: HandoffSpec, *runs: str, rom: str = "image") -> list[str]:
    """A hand-off for each of ``runs`` (its reason's detail); what the records then left say."""
    dev, _ = device(dataclasses.replace(profile("h100-sxm5"), rom_contents=rom))
    for run in runs:
        HandOff(policy, state).run(dev, OWNER, HandOffReason.ON_DEMAND, detail=run)
    kept = sorted((state.directory or Path()).glob("handoffs/gpu0/*.json"))
    reasons = [json.loads(path.read_text()).get("reason", path.name) for path in kept]
    return [reason.removeprefix("on demand (").removesuffix(")") for reason in reasons]


def test_every_record_stays_unless_keep_says_otherwise(tmp_path: Path) -> None:
    state = StateStore(tmp_path)
    state.prepare()
    assert handed_off(state, HandoffSpec(), "a", "b", "c", "d") == ["a", "b", "c", "d"]


def test_keep_a_count_leaves_the_newest_records_of_each_device(tmp_path: Path) -> None:
    state = StateStore(tmp_path)
    state.prepare()
    other = tmp_path / "handoffs" / "gpu1"
    other.mkdir()
    (other / "20200101T000000.000000Z.json").write_text("{}")  # another device's: not counted
    assert handed_off(state, HandoffSpec(keep=2), "a", "b", "c", "d") == ["c", "d"]
    assert (other / "20200101T000000.000000Z.json").exists()


def test_keep_an_age_and_a_count_removes_what_is_past_either(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[[device]]\nname = "gpu0"\nprofile = "h100-sxm5"\nsocket = "s"\n'
        '[handoff]\nkeep = { newest = 3, within = "30d" }\n'
    )
    policy = load_settings(path).handoff
    state = StateStore(tmp_path / "state")
    state.prepare()
    now = datetime.now(UTC)
    for days in (40, 1):  # left by earlier hand-offs
        state.keep_record("gpu0", now - timedelta(days=days), {"reason": f"{days} days ago"})
    notes = tmp_path / "state" / "handoffs" / "gpu0" / "notes.json"  # not a record: never removed
    notes.write_text("{}")
    # 40 days is too old, though among the newest 3; then 1 day is recent, but past the newest 3
    assert handed_off(state, policy, "a") == ["1 days ago", "a", "notes.json"]
    assert handed_off(state, policy, "b", "c") == ["a", "b", "c", "notes.json"]


def test_a_hand_off_that_takes_longer_than_the_age_keeps_its_own_record(tmp_path: Path) -> None:
    state = StateStore(tmp_path)
    state.prepare()
    slow_wipe = [sys.executable, "-c", "import time; time.sleep(1.5)"]
    assert handed_off(state, HandoffSpec(wipe=slow_wipe, keep="1s"), "a", "b") == ["b"]


def test_quarantine_records_are_never_pruned(tmp_path: Path) -> None:
    state = StateStore(tmp_path)
    state.prepare()
    policy = HandoffSpec(keep=1)
    assert handed_off(state, policy, "a", rom="blank") == ["a"]
    assert handed_off(state, policy, "b", "c") == ["c"]  # a's record went, its quarantine stays
    quarantined = state.quarantined("gpu0")
    assert quarantined is not None and quarantined["reason"] == "on demand (a)"


H100_DUMP = "nvidia-10de_2330-h100-sxm5-like.lspci"


def editable_h100(folder: Path) -> Path:
    """The shipped H100 profile and its config dump as files of the test's own, which a wipe tool
    may edit; the profile's path."""
    (folder / H100_DUMP).write_text((PROFILES / H100_DUMP).read_text())
    path = folder / "gpu.toml"
    path.write_text((PROFILES / "h100-sxm5.toml").read_text())
    return path


def rewriting(path: Path, old: str, new: str) -> list[str]:
    """A wipe tool that changes the simulated device while it has it: its profile file, edited."""
    script = "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.write_text(p.read_text().replace(*sys.argv[2:]))"
    return [sys.executable, "-c", script, str(path), old, new]


def test_a_wipe_that_needs_the_device_has_it_released_and_checked_again_after(tmp_path: Path) -> None:
    dev, _ = device(load_profile(editable_h100(tmp_path)))
    wipe = StandIn(tmp_path)
    policy = HandoffSpec(wipe=WipeSpec(wipe.command("wipe", "{bdf}"), release_device=True))
    record = HandOff(policy, StateStore(None)).run(dev, OWNER, HandOffReason.CLIENT_GONE)
    assert record.ok, record.failure
    assert wipe.calls() == [("wipe", ["0000:3b:00.0"])]
    detail = next(step.detail for step in record.steps if step.name == "wipe")
    assert "the device was released to it and came back" in detail
    assert "identity, 12 capabilities and BAR types as before" in detail and "SHA-256" in detail


@pytest.mark.parametrize(
    ("edited", "old", "new", "failure"),
    [
        (H100_DUMP, "00: de 10 30 23", "00: de 10 31 23", "now reads as 10de:2331"),
        ("gpu.toml", "size = 0x20000\n", 'size = 0x20000\ncontents = "blank"\n', "no 0x55AA signature"),
    ],
    ids=["identity", "rom"],
)
def test_a_wipe_tool_that_changes_the_device_gets_it_quarantined(
    tmp_path: Path, edited: str, old: str, new: str, failure: str
) -> None:
    dev, _ = device(load_profile(editable_h100(tmp_path)))
    policy = HandoffSpec(wipe=WipeSpec(rewriting(tmp_path / edited, old, new), release_device=True))
    state = StateStore(tmp_path)
    state.prepare()
    record = HandOff(policy, state).run(dev, OWNER, HandOffReason.CLIENT_GONE)
    assert results(record)["wipe"] == "failed", record.failure
    assert "the device came back changed" in (record.failure or "") and failure in (record.failure or "")
    assert dev.refusal is not None and dev.refusal.startswith("quarantined: wipe:")
    assert state.quarantined("gpu0") is not None


def test_a_wipe_that_needs_the_device_is_a_table_in_the_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[[device]]\nname = "gpu0"\nprofile = "h100-sxm5"\nsocket = "gpu0.sock"\n'
        '[handoff]\nwipe = { command = ["gpu-wipe", "{bdf}"], release_device = true }\n'
    )
    wiping = load_settings(config).handoff.wiping
    assert wiping == WipeSpec(["gpu-wipe", "{bdf}"], release_device=True)
    config.write_text(config.read_text().replace("{bdf}", "{serial}"))
    with pytest.raises(InputErrors) as unknown:
        load_settings(config)
    assert "handoff.wipe" in str(unknown.value) and "serial" in str(unknown.value)


def test_a_device_a_wipe_tool_kept_is_taken_back_at_its_next_hand_off(tmp_path: Path) -> None:
    dev, _ = device(load_profile(editable_h100(tmp_path)))
    dev.let_go()  # what a wipe whose tool did not bind it back leaves: quarantined, let go
    record = HandOff(HandoffSpec(), StateStore(None)).run(dev, OWNER, HandOffReason.BLOCKED)
    assert record.ok and not dev.released, record.failure
    assert "taken back from the wipe tool that had it" in record.steps[0].detail
