"""Operator preflight on fake sysfs trees: what `devices` lists and what `doctor` tells an operator."""

from __future__ import annotations

import json
import re
import resource
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest

from mediator.cli import main, parse_size
from mediator.handoff import HandOffRecord, Step
from mediator.pci.registers import Identity
from mediator.pci.rom import build_rom
from mediator.preflight import Finding, doctor, list_devices
from mediator.state import StateStore
from mediator.virt.reset import DEFAULT_CLIENT_TIMEOUT
from tests.fakesysfs import ACS_ISOLATED, FakeSysfs, fake_dev, fake_proc, root_port, with_ats
from tests.support import profile

GPU = "0000:3b:00.0"
AUDIO = "0000:3b:00.1"
PORT = "0000:00:01.0"
MDEV = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
ABSENT = "83b8f4f2-509f-382f-3c1e-e6bfe0fa10ff"
H100 = profile("h100-sxm5").image
CAP_IPC_LOCK = 1 << 14


class Machine:
    """A fake sysfs with a root port above bus 3b, a /proc and a /dev, as doctor reads them."""

    def __init__(self, root: Path, *, acs: int | None = ACS_ISOLATED, cap_eff: int = CAP_IPC_LOCK) -> None:
        self.sysfs = FakeSysfs(root / "sys")
        self.sysfs.add(PORT, root_port(acs), driver="pcieport", group=1)
        self.proc = fake_proc(root / "proc", cap_eff)
        self.dev = fake_dev(root / "dev", "vfio/vfio", "vfio/12")

    def gpu(
        self,
        config: bytes = H100,
        *,
        driver: str | None = "vfio-pci",
        group: int | None = 12,
        reset_method: str | None = "flr bus",
        rom: bytes | Literal["valid"] | None = "valid",
    ) -> Path:
        """The function under test at GPU, below the root port; by default ready to be served."""
        return self.sysfs.add(
            GPU,
            config,
            parent=PORT,
            driver=driver,
            group=group,
            reset_method=reset_method,
            rom=build_rom(Identity.of(config), 0x20000) if rom == "valid" else rom,
        )

    def mtty(self, *, driver: str | None = "mtty", group: int | None = 14) -> Path:
        """The kernel's mtty sample loaded, with one dual-port instance at MDEV; by default ready."""
        self.sysfs.add_mdev_type("mtty", "mtty-1", "Single port serial", available=2)
        self.sysfs.add_mdev_type("mtty", "mtty-2", "Dual port serial", available=1)
        return self.sysfs.add_mdev(MDEV, "mtty", "mtty-2", driver=driver, group=group)

    def doctor(
        self,
        target: str = GPU,
        guest_ram: int | None = None,
        *,
        client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
        state: StateStore | None = None,
    ) -> dict[str, Finding]:
        findings = doctor(
            target,
            self.sysfs.root,
            guest_ram,
            proc=self.proc,
            dev=self.dev,
            client_timeout=client_timeout,
            state=state,
        )
        return {f.check: f for f in findings}


# Every check doctor makes, in the order it prints them.
DOCTOR_CHECKS = (
    "function",
    "driver",
    "iommu",
    "vfio-api",
    "p2p",
    "reset",
    "rom",
    "ats",
    "acs",
    "memlock",
    "pinning",
    "timeout",
)
# A mediated device's: its parent's reset, ROM, ATS and ACS are one finding, and there is no P2P to a BAR.
MDEV_CHECKS = ("mdev", "driver", "iommu", "vfio-api", "parent", "memlock", "pinning", "timeout")


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def severities(findings: dict[str, Finding]) -> dict[str, str]:
    return {check: f.severity for check, f in findings.items()}


def test_a_vfio_bound_gpu_in_a_viable_group_passes_every_check(machine: Machine) -> None:
    machine.gpu()
    machine.sysfs.add(AUDIO, profile("h100-sxm5").image, parent=PORT, driver="vfio-pci", group=12)
    findings = machine.doctor(guest_ram=64 << 30)
    assert severities(findings) == {check: "ok" for check in DOCTOR_CHECKS}
    assert findings["function"].found.startswith(f"{GPU} 10de:2330")
    assert findings["driver"].found == "bound to vfio-pci"
    assert findings["iommu"].found == f"group 12 is viable: {GPU} (vfio-pci), {AUDIO} (vfio-pci)"
    assert findings["vfio-api"].found.endswith("the daemon uses the group API (no VFIO cdev for the device)")
    assert findings["reset"].found == "flr, bus (from the kernel's reset_method)"
    assert findings["rom"].found.startswith("1 image(s), 65536 bytes, SHA-256 ")
    assert findings["ats"].found == "no ATS capability"
    assert findings["acs"].found == f"peer-to-peer isolated on the way up ({PORT})"
    assert "has CAP_IPC_LOCK" in findings["memlock"].found
    assert all(not f.fix for f in findings.values())


def test_a_function_bound_to_nvidia_gets_the_commands_to_hand_it_to_vfio(machine: Machine) -> None:
    machine.gpu(driver="nvidia")
    driver = machine.doctor()["driver"]
    devices = machine.sysfs.root / "bus/pci/devices"
    assert driver.severity == "error"
    assert driver.found == "bound to nvidia, not vfio-pci: the daemon refuses the function"
    assert driver.fix == (
        f"modprobe vfio-pci; echo vfio-pci > {devices / GPU}/driver_override; "
        f"echo {GPU} > {devices / GPU}/driver/unbind; echo {GPU} > {machine.sysfs.root}/bus/pci/drivers_probe"
    )


def test_an_unbound_function_needs_no_unbind(machine: Machine) -> None:
    machine.gpu(driver=None)
    driver = machine.doctor()["driver"]
    assert driver.severity == "error" and driver.found.startswith("no driver, not vfio-pci")
    assert "unbind" not in driver.fix and "driver_override" in driver.fix


def test_a_group_shared_with_another_driver_names_the_blocker(machine: Machine) -> None:
    machine.gpu()
    machine.sysfs.add(AUDIO, H100, parent=PORT, driver="snd_hda_intel", group=12)
    iommu = machine.doctor()["iommu"]
    assert iommu.severity == "error"
    assert iommu.found == f"group 12 is not viable: {AUDIO} (bound to snd_hda_intel) shares it"
    assert f"echo {AUDIO} > {machine.sysfs.root}/bus/pci/devices/{AUDIO}/driver/unbind" in iommu.fix


def test_bridges_and_unbound_functions_keep_a_group_viable(machine: Machine) -> None:
    machine.gpu()
    machine.sysfs.add(AUDIO, H100, parent=PORT, group=12)
    machine.sysfs.add("0000:3b:00.2", root_port(None), parent=PORT, driver="pcieport", group=12)
    assert machine.doctor()["iommu"].severity == "ok"


def test_no_iommu_group_says_to_turn_the_iommu_on(machine: Machine) -> None:
    machine.gpu(group=None)
    iommu = machine.doctor()["iommu"]
    assert iommu.severity == "error" and "intel_iommu=on" in iommu.fix


def test_ats_enabled_on_the_host_is_a_warning(machine: Machine) -> None:
    skylake = profile("skylake-igd").image
    machine.gpu(with_ats(skylake, enabled=True))
    ats = machine.doctor()["ats"]
    assert ats.severity == "warning"
    assert "ATS is enabled on the host" in ats.found and "translated requests" in ats.found
    assert "pci=noats" in ats.fix


def test_ats_present_but_disabled_is_fine(machine: Machine) -> None:
    machine.gpu(with_ats(profile("skylake-igd").image, enabled=False))
    ats = machine.doctor()["ats"]
    assert ats.severity == "ok" and "disabled on the host" in ats.found


def test_a_root_port_without_acs_is_a_warning(tmp_path: Path) -> None:
    machine = Machine(tmp_path, acs=None)
    machine.gpu()
    acs = machine.doctor()["acs"]
    assert acs.severity == "warning"
    assert acs.found == f"peer-to-peer can bypass the IOMMU: {PORT} (root port) has no ACS capability"
    assert "same guest" in acs.fix


def test_acs_controls_that_are_off_are_named(tmp_path: Path) -> None:
    machine = Machine(tmp_path, acs=0x01)  # Source Validation only
    machine.gpu()
    assert machine.doctor()["acs"].found.endswith(f"{PORT} (root port) has ACS RR CR UF off")


def test_acs_controls_a_port_does_not_implement_count_as_on(tmp_path: Path) -> None:
    machine = Machine(tmp_path)
    machine.sysfs.add("0000:00:02.0", root_port(0x01, acs_capability=0x01), driver="pcieport", group=2)
    machine.sysfs.add("0000:02:00.0", H100, parent="0000:00:02.0", driver="vfio-pci", group=13)
    assert machine.doctor("0000:02:00.0")["acs"].severity == "ok"


def test_a_function_on_the_root_bus_has_no_port_to_check(machine: Machine) -> None:
    machine.sysfs.add("0000:00:04.0", H100, driver="vfio-pci", group=4)
    acs = machine.doctor("0000:00:04.0")["acs"]
    assert acs.severity == "ok" and "root bus" in acs.found


def test_no_reset_method_is_an_error_naming_reset_none(machine: Machine) -> None:
    machine.gpu(profile("gm965-igd").image, reset_method=None)
    reset = machine.doctor()["reset"]
    assert reset.severity == "error"
    assert "no reset method" in reset.found and "quarantines it" in reset.found
    assert 'reset = "none"' in reset.fix


def test_an_empty_reset_method_list_is_no_reset_method(machine: Machine) -> None:
    machine.gpu(reset_method="")
    assert machine.doctor()["reset"].severity == "error"


def test_an_older_kernel_without_reset_method_names_flr_from_the_device_capabilities(
    machine: Machine,
) -> None:
    device = machine.gpu(reset_method=None)
    (device / "reset").write_text("")
    reset = machine.doctor()["reset"]
    assert reset.severity == "ok" and reset.found.startswith("flr (from PCIe Device Capabilities")


def test_an_older_kernel_that_can_reset_without_saying_how(machine: Machine) -> None:
    device = machine.gpu(profile("gm965-igd").image, reset_method=None)
    (device / "reset").write_text("")
    assert machine.doctor()["reset"] == Finding(
        "ok", "reset", "the kernel can reset it (this kernel does not say how)"
    )


def test_flr_in_the_config_space_alone_is_no_reset_method(machine: Machine) -> None:
    machine.gpu(reset_method=None)  # the kernel shows no reset file: it will not do that FLR
    assert machine.doctor()["reset"].severity == "error"


def test_a_missing_rom_is_fine(machine: Machine) -> None:
    machine.gpu(rom=None)
    assert machine.doctor()["rom"] == Finding("ok", "rom", "no ROM")


def test_an_invalid_rom_is_an_error_since_the_hand_off_would_quarantine(machine: Machine) -> None:
    machine.gpu(rom=bytes(0x20000))
    rom = machine.doctor()["rom"]
    assert rom.severity == "error"
    assert "no 0x55AA signature" in rom.found and "quarantine" in rom.found


def test_a_rom_for_another_vendor_is_invalid(machine: Machine) -> None:
    machine.gpu(rom=build_rom(Identity.of(profile("skylake-igd").image), 0x10000))
    rom = machine.doctor()["rom"]
    assert rom.severity == "error" and "image 0 is for vendor 8086, the device is 10de" in rom.found


def test_the_rom_of_a_suspended_function_is_read_awake(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = machine.gpu()
    (device / "power").mkdir()
    (device / "power/runtime_status").write_text("suspended\n")
    (device / "power/control").write_text("auto\n")
    read_bytes, control_while_read = Path.read_bytes, []

    def watched(path: Path) -> bytes:
        if path.name == "rom":
            control_while_read.append((path.parent / "power/control").read_text())
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", watched)
    assert machine.doctor()["rom"].severity == "ok"
    assert control_while_read == ["on"] and (device / "power/control").read_text() == "auto"


def test_an_unreadable_rom_is_a_warning_with_the_reason(machine: Machine) -> None:
    device = machine.gpu(rom=None)
    (device / "rom").mkdir()
    rom = machine.doctor()["rom"]
    assert rom.severity == "warning"
    assert rom.found == "the expansion ROM cannot be read: Is a directory (EISDIR)"
    assert rom.fix.startswith("none needed unless the guest needs the ROM")


def test_memlock_below_the_guest_ram_without_cap_ipc_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine = Machine(tmp_path, cap_eff=0)
    machine.gpu()
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (8 << 20, 8 << 20))
    memlock = machine.doctor(guest_ram=64 << 30)["memlock"]
    assert memlock.severity == "warning"
    assert "RLIMIT_MEMLOCK 8M" in memlock.found and "below the guest's 64G" in memlock.found
    assert "LimitMEMLOCK=" in memlock.fix and "CAP_IPC_LOCK" in memlock.fix
    assert machine.doctor(guest_ram=4 << 20)["memlock"].severity == "ok"
    assert machine.doctor()["memlock"].found.startswith("RLIMIT_MEMLOCK 8M")


def estimate(pinning: Finding) -> str:
    """What the pinning finding estimates for the guest's RAM in 4K pages, e.g. ``0.41``."""
    found = re.search(r"takes about ([0-9.]+) s in 4K pages", pinning.found)
    assert found, pinning.found
    return found.group(1)


def test_pinning_the_guest_ram_is_estimated_from_an_mlock_sample(machine: Machine) -> None:
    machine.gpu()
    pinning = machine.doctor(guest_ram=64 << 30)["pinning"]
    assert pinning.severity == "ok" and not pinning.fix
    assert pinning.found.startswith("pinning 64G of guest RAM takes about ")
    assert float(estimate(pinning)) > 0
    assert f"the device can DMA about {estimate(pinning)} s after QEMU maps the guest's RAM" in pinning.found
    assert "4K pages: 64M in " in pinning.found and " ms by mlock" in pinning.found
    assert "VFIO maps each one in the IOMMU on top" in pinning.found


def test_without_guest_ram_pinning_is_a_rate(machine: Machine) -> None:
    machine.gpu()
    pinning = machine.doctor()["pinning"]
    assert re.search(r"takes about [0-9.]+ s per 1G in 4K pages \(--guest-ram SIZE", pinning.found), (
        pinning.found
    )


@pytest.mark.parametrize(
    ("limit", "sampled"),
    [
        (16 << 20, "4K pages: 16M in "),  # what the limit allows, still by mlock
        (64 << 10, "4K pages: 64M in "),  # too little to time: faulted in instead
    ],
)
def test_a_low_memlock_limit_samples_what_it_allows_and_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int, sampled: str
) -> None:
    machine = Machine(tmp_path, cap_eff=0)
    machine.gpu()
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (limit, limit))
    pinning = machine.doctor(guest_ram=8 << 30)["pinning"]
    assert sampled in pinning.found and float(estimate(pinning)) > 0
    if limit < 4 << 20:
        assert "by MAP_POPULATE, as RLIMIT_MEMLOCK leaves 64K to mlock" in pinning.found
    else:
        assert " ms by mlock" in pinning.found


def test_huge_pages_are_sampled_when_the_kernel_has_free_ones(machine: Machine) -> None:
    machine.gpu()
    meminfo = machine.proc / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nHugePages_Free:        0\nHugepagesize:       2048 kB\n")
    assert "no free 2M huge pages to sample" in machine.doctor(guest_ram=8 << 30)["pinning"].found
    # This host may have none after all: then the sample says why it could not be taken.
    meminfo.write_text("MemTotal: 8000000 kB\nHugePages_Free:       16\nHugepagesize:       2048 kB\n")
    pinning = machine.doctor(guest_ram=8 << 30)["pinning"]
    assert "2M pages: 32M in " in pinning.found or "2M huge pages could not be sampled (" in pinning.found


def recorded(state: StateStore, name: str, *resets: float, result: str = "ok") -> None:
    """Hand-off records of ``name`` whose resets took ``resets`` seconds, as the daemon keeps them."""
    started = datetime.now(UTC)
    for n, seconds in enumerate(resets):
        record = HandOffRecord(name, GPU, "alice", "client gone", started.isoformat())
        record.steps = [
            Step("release", "ok", "0 DMA mappings, 0 eventfds"),
            Step("reset", result, "", seconds),
        ]
        state.keep_record(name, started + timedelta(seconds=n), record.to_json())


def test_resets_longer_than_the_deadline_get_the_timeouts_to_set(machine: Machine, tmp_path: Path) -> None:
    machine.gpu()
    state = StateStore(tmp_path / "state")
    state.prepare()
    recorded(state, GPU, 1.2, 6.2)
    recorded(state, GPU, 30.0, result="skipped")  # not reset (reset = "none"): no time to count
    timeout = machine.doctor(state=state)["timeout"]
    assert timeout.severity == "warning"
    assert timeout.found.startswith(f"resets of {GPU} took up to 6.2 s in 2 recorded hand-offs")
    assert "longer than the 4 s a guest's reset is answered within (client_timeout = 5)" in timeout.found
    assert timeout.fix == (
        "set client_timeout = 9 and x-msg-timeout=9000 on -device vfio-user-pci "
        "(without a config: serve --client-timeout 9)"
    )
    advised = machine.doctor(state=state, client_timeout=9)["timeout"]
    assert advised.severity == "ok" and not advised.fix
    assert advised.found == (
        f"resets of {GPU} took up to 6.2 s in 2 recorded hand-offs: a guest's reset is answered within 8 s "
        "(client_timeout = 9 and x-msg-timeout=9000 on -device vfio-user-pci)"
    )


def test_resets_within_the_deadline_need_no_other_timeout(machine: Machine, tmp_path: Path) -> None:
    machine.gpu()
    state = StateStore(tmp_path / "state")
    state.prepare()
    assert f"no reset of {GPU} is recorded in " in machine.doctor(state=state)["timeout"].found
    recorded(state, GPU, 0.4, 3.9)
    timeout = machine.doctor(state=state)["timeout"]
    assert timeout.severity == "ok" and not timeout.fix
    assert "took up to 3.9 s" in timeout.found and "x-msg-timeout=5000" in timeout.found


def test_the_vfio_api_the_daemon_will_use(machine: Machine) -> None:
    device = machine.gpu()
    assert "/dev/vfio/vfio and " in machine.doctor()["vfio-api"].found
    (device / "vfio-dev/vfio0").mkdir(parents=True)
    fake_dev(machine.dev, "iommu", "vfio/devices/vfio0")
    assert machine.doctor()["vfio-api"].found.endswith(
        "vfio0 and " + str(machine.dev / "iommu") + ": the daemon uses iommufd"
    )
    p2p = machine.doctor()["p2p"]
    assert p2p.severity == "warning" and "peer-to-peer DMA between a VM's devices faults" in p2p.found
    for node in ("iommu", "vfio/devices/vfio0", "vfio/vfio", "vfio/12"):
        (machine.dev / node).unlink()
    missing = machine.doctor()["vfio-api"]
    assert missing.severity == "error" and missing.fix.startswith("modprobe vfio-pci")


def test_without_root_the_checks_that_need_capabilities_say_so(machine: Machine) -> None:
    machine.gpu(H100[:64])
    findings = machine.doctor()
    assert findings["function"].found.startswith(f"{GPU} 10de:2330")
    assert findings["ats"].severity == "warning" and findings["ats"].fix == "run doctor as root"


@pytest.mark.parametrize(
    ("bdf", "message"), [("3b:00", "is not a PCI address"), ("0000:5e:00.0", "no PCI device 0000:5e:00.0")]
)
def test_a_function_that_is_not_there_stops_the_checks(machine: Machine, bdf: str, message: str) -> None:
    findings = doctor(bdf, machine.sysfs.root, proc=machine.proc, dev=machine.dev)
    assert len(findings) == 1 and findings[0].severity == "error" and message in findings[0].found


def test_devices_lists_the_candidates_with_their_group_and_quirks(machine: Machine) -> None:
    machine.gpu()
    machine.sysfs.add(AUDIO, H100, parent=PORT, driver="snd_hda_intel", group=12)
    machine.sysfs.add("0000:00:02.0", profile("gm965-igd").image, driver="i915")  # display, no group
    machine.sysfs.add("0000:00:00.0", profile("rs690-hostbridge").image)  # neither: left out
    found = {d.bdf: d for d in list_devices(machine.sysfs.root)}
    assert sorted(found) == [PORT, "0000:00:02.0", GPU, AUDIO]
    gpu = found[GPU]
    assert (gpu.driver, gpu.iommu_group, gpu.group_viable) == ("vfio-pci", 12, False)
    assert gpu.group_members == ((GPU, "vfio-pci"), (AUDIO, "snd_hda_intel"))
    assert gpu.group_blockers == ((AUDIO, "snd_hda_intel"),)
    assert "nvidia/config-mirrors" in gpu.quirks and "nvidia/nvlink-topology" in gpu.quirks
    assert not [q for q in gpu.quirks if q.startswith(("baseline/", "security/"))]
    assert found[PORT].group_viable and found[PORT].quirks == ()
    assert found["0000:00:02.0"].iommu_group is None and not found["0000:00:02.0"].group_viable


def test_devices_on_a_machine_without_pci(tmp_path: Path) -> None:
    assert list_devices(tmp_path) == []


# the commands


def run(*argv: str | Path) -> int:
    """The `vfio-mediator` command itself, in this process."""
    return main([str(a) for a in argv])


def doctor_args(machine: Machine, *extra: str) -> list[str | Path]:
    trees = {"--sysfs": machine.sysfs.root, "--proc": machine.proc, "--dev": machine.dev}
    return ["doctor", "--device", GPU, *[part for pair in trees.items() for part in pair], *extra]


def test_doctor_prints_one_line_per_check_and_exits_1_on_an_error(
    machine: Machine, capsys: pytest.CaptureFixture[str]
) -> None:
    machine.gpu(driver="nvidia")
    assert run(*doctor_args(machine)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"ok       function  {GPU} 10de:2330")
    assert lines[1] == "error    driver    bound to nvidia, not vfio-pci: the daemon refuses the function"
    assert lines[2].startswith("         fix: modprobe vfio-pci; echo vfio-pci > ")
    assert [line.split()[1] for line in lines if not line.startswith(" ")] == list(DOCTOR_CHECKS)


def test_warnings_do_not_fail_doctor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    machine = Machine(tmp_path, acs=None)
    machine.gpu()
    assert run(*doctor_args(machine, "--guest-ram", "64G")) == 0
    out = capsys.readouterr().out
    assert f"warning  acs       peer-to-peer can bypass the IOMMU: {PORT} (root port)" in out
    assert "         fix: enable ACS on those ports" in out


def test_doctor_json(machine: Machine, capsys: pytest.CaptureFixture[str]) -> None:
    machine.gpu(rom=bytes(16))
    assert run(*doctor_args(machine, "--json")) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["device"] == GPU and document["errors"] == 1
    rom = next(f for f in document["findings"] if f["check"] == "rom")
    assert rom["severity"] == "error" and rom["fix"].startswith("restore the vendor's firmware")


def test_doctor_reads_the_config_for_the_client_timeout_and_the_recorded_resets(
    machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    machine.gpu()
    config = tmp_path / "config.toml"
    config.write_text(
        f'state_directory = "state"\nclient_timeout = 6\n[[device]]\nname = "gpu0"\nbdf = "{GPU}"\n'
        'socket = "gpu0.sock"\n'
    )
    recorded(StateStore(tmp_path / "state"), "gpu0", 5.5)
    assert run(*doctor_args(machine, "--config", str(config))) == 0  # a warning
    out = capsys.readouterr().out
    assert (
        "warning  timeout   resets of gpu0 took up to 5.5 s in 1 recorded hand-offs, longer than the 5 s"
        in out
    )
    assert "         fix: set client_timeout = 8 and x-msg-timeout=8000 on -device vfio-user-pci" in out
    assert run(*doctor_args(machine, "--config", str(config), "--client-timeout", "9")) == 2
    assert "error: the command line: --client-timeout goes in the config file" in capsys.readouterr().err


def test_devices_text_and_json(machine: Machine, capsys: pytest.CaptureFixture[str]) -> None:
    machine.gpu()
    machine.sysfs.add(AUDIO, H100, parent=PORT, driver="snd_hda_intel", group=12)
    assert run("devices", "--sysfs", machine.sysfs.root) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["BDF", "ID", "CLASS", "DRIVER", "IOMMU", "QUIRKS"]
    gpu = next(line for line in lines if line.startswith(GPU))
    assert gpu.split()[:6] == [GPU, "10de:2330", "030200", "vfio-pci", "group", "12"]
    assert "NOT viable" in gpu and "nvidia/config-mirrors" in gpu
    assert (
        f"group 12 also holds {AUDIO} (snd_hda_intel): they go to one VM together"
        in lines[lines.index(gpu) + 1]
    )
    assert run("devices", "--json", "--sysfs", machine.sysfs.root) == 0
    listed = {d["bdf"]: d for d in json.loads(capsys.readouterr().out)}
    assert listed[GPU]["group_blockers"] == [{"bdf": AUDIO, "driver": "snd_hda_intel"}]
    assert listed[GPU]["vendor"] == "10de" and listed[GPU]["class"] == "030200"


@pytest.mark.parametrize(
    ("text", "size"), [("64G", 64 << 30), ("512MiB", 512 << 20), ("4096", 4096), ("1t", 1 << 40)]
)
def test_guest_ram_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_bad_guest_ram_size_is_a_usage_error(machine: Machine, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        run(*doctor_args(machine, "--guest-ram", "lots"))
    assert usage.value.code == 2
    assert "'lots' is not a size" in capsys.readouterr().err


# mediated devices


def test_a_bound_mdev_in_its_own_group_passes_every_check(machine: Machine, tmp_path: Path) -> None:
    machine.mtty()
    state = StateStore(tmp_path / "state")
    recorded(state, MDEV, 0.2)  # `serve --device UUID` keeps its records under the UUID
    findings = machine.doctor(MDEV.upper(), guest_ram=1 << 30, state=state)
    assert severities(findings) == {check: "ok" for check in MDEV_CHECKS}
    assert findings["mdev"].found == f"{MDEV}: type mtty-2 (Dual port serial) on mtty"
    assert findings["driver"].found == "bound to mtty, the vendor driver of mtty's mdevs"
    assert findings["iommu"].found == f"group 14 is viable: {MDEV} (mtty)"
    assert findings["vfio-api"].found.endswith("the daemon uses the group API (no VFIO cdev for the device)")
    assert findings["parent"].found.startswith("reset, expansion ROM, ATS and ACS are the parent's, and mtty")
    assert findings["timeout"].found.startswith(f"resets of {MDEV} took up to 0.2 s in 1 recorded hand-offs")
    assert all(not f.fix for f in findings.values())


def test_an_mdev_on_a_pci_parent_sends_its_reset_rom_ats_and_acs_to_the_parents_doctor(
    machine: Machine,
) -> None:
    machine.gpu(driver="nvidia")
    machine.sysfs.add_mdev_type(GPU, "nvidia-35", "GRID T4-1Q", available=16)
    machine.sysfs.add_mdev(MDEV, GPU, "nvidia-35", driver="nvidia-vgpu-vfio", group=30, vfio_cdev="vfio3")
    fake_dev(machine.dev, "iommu", "vfio/devices/vfio3")
    findings = machine.doctor(MDEV)
    assert severities(findings) == {check: "ok" for check in MDEV_CHECKS}
    assert findings["mdev"].found == f"{MDEV}: type nvidia-35 (GRID T4-1Q) on {GPU}"
    assert f"vfio-mediator doctor --device {GPU} checks them" in findings["parent"].found
    assert findings["vfio-api"].found.endswith(
        "vfio3 and " + str(machine.dev / "iommu") + ": the daemon uses iommufd"
    )


def test_doctor_on_an_mdev_not_created_says_how_to_create_it(
    machine: Machine, capsys: pytest.CaptureFixture[str]
) -> None:
    machine.mtty()
    types = machine.sysfs.root / "class/mdev_bus/mtty/mdev_supported_types"
    args = doctor_args(machine)
    args[args.index(GPU)] = ABSENT
    assert run(*args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"error    mdev      no mediated device {ABSENT}: nothing at "
        f"{machine.sysfs.root}/bus/mdev/devices/{ABSENT}",
        f"         fix: create it with: echo {ABSENT} > {types}/mtty-1/create (types offered here: "
        "mtty/mtty-1 (2 available), mtty/mtty-2 (1 available))",
    ]


def test_doctor_on_an_mdev_without_the_mdev_bus_says_to_load_the_vendor_driver(machine: Machine) -> None:
    [absent] = machine.doctor(ABSENT).values()
    assert (absent.severity, absent.found) == (
        "error",
        f"no mediated device {ABSENT}: the kernel has no mdev bus",
    )
    assert "modprobe mtty" in absent.fix


def test_an_mdev_bound_to_no_driver_gets_the_vendor_driver_to_load(machine: Machine) -> None:
    machine.mtty(driver=None, group=None)
    findings = machine.doctor(MDEV)
    driver, iommu = findings["driver"], findings["iommu"]
    assert driver.severity == "error"
    assert driver.found == "bound to no driver: nothing registers the mediated device with VFIO"
    assert driver.fix.startswith(
        "load the parent device's vendor driver (the kernel's sample: modprobe mtty)"
    )
    assert driver.fix.endswith(f"echo {MDEV} > {machine.sysfs.root}/bus/mdev/drivers_probe")
    assert (
        iommu.severity == "error"
        and iommu.found == "no IOMMU group: its driver (none) did not register it with VFIO"
    )
    assert "intel_iommu" not in iommu.fix


def test_devices_lists_mdevs_with_their_parent_and_the_types_offered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    machine = Machine(tmp_path)
    machine.mtty()
    machine.sysfs.add_mdev_type("mtty", "mtty-ccw", "Not PCI", device_api="vfio-ccw")
    types = machine.sysfs.root / "class/mdev_bus/mtty/mdev_supported_types"
    assert run("devices", "--json", "--sysfs", machine.sysfs.root) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [row["bdf"] for row in listing if "bdf" in row] == [PORT]
    rows = {row.get("mdev"): row for row in listing if row.get("mdev")}
    assert rows == {
        MDEV: {
            "mdev": MDEV,
            "parent": "mtty",
            "type": "mtty-2",
            "type_name": "Dual port serial",
            "device_api": "vfio-pci",
            "driver": "mtty",
            "iommu_group": 14,
            "vfio_cdev": None,
        }
    }
    offered = {row["mdev_type"]: row for row in listing if "mdev_type" in row}
    assert offered["mtty-1"] == {
        "mdev_type": "mtty-1",
        "parent": "mtty",
        "type_name": "Single port serial",
        "device_api": "vfio-pci",
        "available_instances": 2,
        "create": f"{types}/mtty-1/create",
    }
    assert sorted(offered) == ["mtty-1", "mtty-2", "mtty-ccw"]

    (types / "mtty-2/available_instances").write_text("0\n")
    assert run("devices", "--sysfs", machine.sysfs.root) == 0
    sections = capsys.readouterr().out.split("\n\n")
    assert len(sections) == 3 and sections[0].startswith("BDF ")
    mdevs, kinds = sections[1].splitlines(), sections[2].splitlines()
    assert [line.split() for line in mdevs] == [
        ["MDEV", "PARENT", "TYPE", "DRIVER", "IOMMU"],
        [MDEV, "mtty", "mtty-2", "mtty", "group", "14"],
    ]
    assert kinds[0].split() == ["MDEV", "TYPE", "PARENT", "API", "AVAILABLE", "NAME"]
    assert kinds[1].split() == ["mtty-1", "mtty", "vfio-pci", "2", "Single", "port", "serial"]
    assert kinds[2].strip() == f"create one: echo $(uuidgen) > {types}/mtty-1/create"
    assert kinds[4].strip() == "none left to create: mtty has no room for another"
    assert kinds[6].strip() == "not servable: the daemon serves vfio-pci mediated devices only"


def test_devices_with_mdevs_and_no_pci_candidate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sysfs = FakeSysfs(tmp_path)
    assert run("devices", "--sysfs", tmp_path) == 0
    assert capsys.readouterr().out.startswith("no candidate for VFIO: ")
    sysfs.add_mdev_type("mtty", "mtty-2", "Dual port serial")
    sysfs.add_mdev(MDEV, "mtty", "mtty-2", driver="mtty", group=3)
    assert run("devices", "--sysfs", tmp_path) == 0
    out = capsys.readouterr().out
    assert "no candidate" not in out and out.startswith("MDEV ") and f"\n{MDEV}  mtty " in out
