"""Runs INSIDE the systemd guest: systemd is PID 1, and this is its checks service.

The guest's root is the host's, read-only over 9p under a writable overlay,
so the host's Debian userland, systemd and udev run there as on a real host.
This copies the checkout, runs the README's installation as written (pip
offline from the host's wheels), binds the guest's edu functions to
vfio-pci, then proves what the README claims about the shipped units, one
``RESULT {"check": ...}`` line per claim on the serial console, and powers
the guest off.

    python -m tests.systemd.systemd_guest   (as the guest's tb-checks.service)
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.e2e.harness import ROOT, Machine
from tests.guest.vfio_guest import (
    EDU_IDS,
    NO_RESET,
    bind_to_vfio,
    checked,
    connect_to,
    dma_round_trip,
    find_all,
    inspect,
    report,
)
from tests.support import readme_section
from tests.test_systemd_units import exposure_of

SOURCE = Path("/root/vfio-mediator")  # the copy the README's steps run in: pip builds in it
UNIT = "vfio-mediator@{bdf}"
BAR = 0xE000_0000  # where the nested guest places edu's BAR0


def readme_blocks() -> list[list[str]]:
    """The sh blocks of the README's systemd section, as the commands they hold."""
    blocks = [part.split("```")[0] for part in readme_section("Running under systemd").split("```sh\n")[1:]]
    return [
        [line for line in block.splitlines() if line.strip() and not line.startswith("#")] for block in blocks
    ]


def sh(line: str, **env: str) -> str:
    """One README line, as an operator's root shell runs it in the checkout; its output."""
    result = subprocess.run(
        ["sh", "-ec", line], cwd=SOURCE, env=os.environ | env, capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise RuntimeError(f"`{line}` exited {result.returncode}: {(result.stdout + result.stderr)[-1500:]}")
    return result.stdout


def systemctl(*args: str) -> str:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False).stdout.strip()


def is_active(unit: str) -> bool:
    return systemctl("is-active", unit) == "active"


def show(unit: str, *properties: str) -> dict[str, str]:
    out = systemctl("show", unit, *(f"--property={p}" for p in properties))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines)}


def journal(unit: str) -> list[dict[str, str]]:
    """The unit's journal entries, as journald keeps them (``journalctl -o json``)."""
    command = ["journalctl", "--no-pager", "-o", "json", "-u", unit]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def daemon_lines(entries: list[dict[str, str]]) -> list[dict[str, object]]:
    """The daemon's own lines among a unit's journal entries (JSON objects), with journald's PRIORITY."""
    found = []
    for entry in entries:
        message = entry.get("MESSAGE", "")
        if isinstance(message, str) and message.startswith("{"):
            found.append(json.loads(message) | {"PRIORITY": int(entry["PRIORITY"])})
    return found


def wait_for(condition: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {condition}")
        time.sleep(0.5)


# Under TCG a socket-activated daemon takes tens of seconds to start and answer QEMU's first
# message; QEMU waits x-msg-timeout (5 s by default) for each reply.
QEMU_REPLY_WAIT_MS = 150_000
PATIENT_QEMU = ("-global", f"vfio-user-pci.x-msg-timeout={QEMU_REPLY_WAIT_MS}")


def patient_qemu(sock: Path) -> Machine:
    """A nested QEMU (qtest) with the device on ``sock``, that waits for a daemon starting on demand."""
    return Machine(sock, behind_root_port=False, extra=PATIENT_QEMU, patience=180)


def guest_session(sock: Path) -> dict[str, object]:
    """A nested QEMU (qtest) on ``sock``: its config view of the device, an edu DMA round trip, and
    how long QEMU took to start (with the device realized: the daemon answered)."""
    started = time.monotonic()
    with patient_qemu(sock) as vm:
        realized = round(time.monotonic() - started, 1)
        ids = vm.cfg_read(0, 4)
        view = vm.config_space(0x100)
        dma = dma_round_trip(vm, vm.bdf, BAR, 0x200000)
    return {"ids": ids, "view": view, "dma": dma, "realized": realized}


CONFIG = Path("/etc/vfio-mediator/config.toml")
SITE_QUIRKS = Path("/etc/vfio-mediator/site.toml")


def wipe_fails(device: str) -> Path:
    """While this file exists, the operator's wipe of ``device`` fails (the config's wipe tests it)."""
    return Path(f"/etc/vfio-mediator/wipe-fails-{device}")


def site_quirks(subsystem: int) -> str:
    """An operator table that gives edu a virtual subsystem vendor ID: a policy change a guest sees."""
    return (
        '[[quirk]]\nname = "site/edu-subsystem"\nreason = "the tenant sees our subsystem vendor"\n'
        "match = { vendor = 0x1234, device = 0x11e8 }\n"
        f"[[quirk.registers]]\noffset = 0x2c\nsize = 2\nvirtual = true\nwritable = 0\nvalue = {subsystem:#x}\n"
    )


def config_text(edus: list[str]) -> str:
    """Two devices: gpu0 lets in the kvm group as the README's config does, gpu1 only named users."""
    devices = "".join(
        f'[[device]]\nname = "gpu{n}"\nbdf = "{bdf}"\nsocket = "/run/vfio-mediator/gpu{n}.sock"\n'
        f'quirks = ["{SITE_QUIRKS}"]\n'
        + ('[device.access]\nallow_users = ["libvirt-qemu", "root"]\nallow_groups = []\n' if n else "")
        for n, bdf in enumerate(edus)
    )
    return (
        'state_directory = "/var/lib/vfio-mediator"\n'
        f"client_timeout = {QEMU_REPLY_WAIT_MS / 1000}\n"
        '[access]\nallow_users = ["root"]\nallow_groups = ["kvm"]\n'
        # edu has no reset method; a wipe that fails on demand quarantines a device.
        f'[handoff]\nreset = "none"\nwipe = ["/bin/sh", "-c", "test ! -e {wipe_fails("{device}")}"]\n'
        + devices
    )


# A VMM's first message, sent as another user by the system's Python (stdlib only): what came back.
PROBE = """
import json, socket, struct, sys
client = socket.socket(socket.AF_UNIX)
try:
    client.connect(sys.argv[1])
except OSError as e:
    sys.exit(print(json.dumps({"connect": e.strerror})))
payload = struct.pack("=HH", 0, 0) + b"{}\\0"
client.settimeout(150)
try:
    client.sendall(struct.pack("=HHIII", 1, 1, 16 + len(payload), 0, 0) + payload)
    reply = client.recv(4096)
except OSError:  # a refused client is closed at once, maybe before it has sent
    reply = b""
msg_id, command, size, flags, error = struct.unpack("=HHIII", reply[:16]) if len(reply) >= 16 else (0,) * 5
print(json.dumps({"reply": "closed" if not reply else f"command {command} error {error}"}))
"""


def probe_as(user: str, sock: Path) -> dict[str, str]:
    """A client's first exchange on ``sock`` when it runs as ``user`` with that user's groups."""
    account = pwd.getpwnam(user)
    result = subprocess.run(
        [
            *["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups"],
            *["/usr/bin/python3", "-c", PROBE, str(sock)],
        ],
        capture_output=True,
        text=True,
        timeout=200,
        check=True,
    )
    return json.loads(result.stdout)


def socket_file(sock: Path) -> dict[str, str]:
    return {"owner": sock.owner(), "group": sock.group(), "mode": oct(sock.stat().st_mode & 0o777)}


UNIT_SOCKET = {"owner": "vfio-mediator", "group": "kvm", "mode": "0o660"}  # the shipped units' socket


def subsystem_vendor(sock: Path) -> int:
    with patient_qemu(sock) as vm:
        return vm.cfg_read(0x2C, 2)


def config_service(edus: list[str], enable: list[str]) -> None:  # noqa: PLR0915  one check per claim
    """The config service: two devices, per-device socket units, as the README's second way."""
    service = "vfio-mediator.service"
    sockets = [Path(f"/run/vfio-mediator/gpu{n}.sock") for n in range(2)]

    @checked("config-service")
    def _() -> dict[str, object]:
        # The one-device unit of the first checks holds gpu0's function: it goes first.
        systemctl("disable", "--now", f"vfio-mediator@{edus[0]}.socket", f"vfio-mediator@{edus[0]}.service")
        CONFIG.parent.mkdir(exist_ok=True)
        SITE_QUIRKS.write_text(site_quirks(0x1111))
        CONFIG.write_text(config_text(edus[:2]))
        for line in enable:
            if "vfio-mediator.service" in line:
                sh(line)
        wait_for("READY", lambda: is_active(service), timeout=300)
        status = show(service, "StatusText", "Type", "NotifyAccess")
        text = systemctl("status", "--no-pager", service)
        seen = subsystem_vendor(sockets[1])
        assert status["StatusText"] == "serving 2 devices", status
        assert 'Status: "serving 2 devices"' in text, text
        assert seen == 0x1111, hex(seen)
        return {"status": status, "subsystem_vendor": hex(seen)}

    @checked("reload")
    def _() -> dict[str, object]:
        pid = show(service, "MainPID")["MainPID"]
        SITE_QUIRKS.write_text(site_quirks(0x2222))
        systemctl("reload", service)
        wait_for("the reload", lambda: is_active(service))
        seen = subsystem_vendor(sockets[1])
        after = show(service, "MainPID", "NRestarts")
        assert seen == 0x2222 and after["MainPID"] == pid, (hex(seen), pid, after)
        return {"subsystem_vendor": hex(seen), "same_pid": True}

    @checked("quarantine-restart-release")
    def _() -> dict[str, object]:
        wipe_fails("gpu0").touch()
        subsystem_vendor(sockets[0])  # the session's end hands gpu0 off: the wipe fails
        wait_for("quarantine", lambda: "1 refused" in show(service, "StatusText")["StatusText"])
        systemctl("restart", service)
        wait_for("the restart", lambda: is_active(service), timeout=300)
        after_restart = show(service, "StatusText")["StatusText"]
        wipe_fails("gpu0").unlink()
        released = sh("vfio-mediator release --device gpu0 --config /etc/vfio-mediator/config.toml")
        seen = subsystem_vendor(sockets[0])
        assert "1 refused" in after_restart, after_restart
        assert "released from quarantine" in released and seen == 0x2222, (released, hex(seen))
        return {"after_restart": after_restart, "released": released.strip()}

    @checked("access")
    def _() -> dict[str, object]:
        # Debian's QEMU user (libvirt-qemu, in kvm); a kvm member gpu1's list does not name; a user
        # outside the socket's group.
        subprocess.run(["useradd", "--system", "--no-create-home", "tb-outsider"], check=True)
        subprocess.run(["useradd", "--system", "--no-create-home", "-G", "kvm", "tb-kvm-member"], check=True)
        files = {sock.name: socket_file(sock) for sock in sockets}
        seen = {
            "outsider": probe_as("tb-outsider", sockets[0]),
            "kvm-member-gpu0": probe_as("tb-kvm-member", sockets[0]),
            "kvm-member-gpu1": probe_as("tb-kvm-member", sockets[1]),
            "libvirt-qemu-gpu1": probe_as("libvirt-qemu", sockets[1]),
        }
        member = pwd.getpwnam("tb-kvm-member").pw_uid
        refusals = [
            line
            for line in daemon_lines(journal(service))
            if "refused a client" in str(line.get("event")) and f'"uid": {member}' in json.dumps(line)
        ]
        assert all(f == UNIT_SOCKET for f in files.values()), files
        assert seen["outsider"] == {"connect": "Permission denied"}, seen
        assert seen["kvm-member-gpu0"] == seen["libvirt-qemu-gpu1"] == {"reply": "command 1 error 0"}, seen
        assert seen["kvm-member-gpu1"] == {"reply": "closed"}, seen
        assert refusals and refusals[-1].get("audit") and refusals[-1].get("device") == "gpu1", refusals
        return {"sockets": files, "clients": seen, "refusal": refusals[-1]}

    @checked("watchdog")
    def _() -> dict[str, object]:
        before = show(service, "MainPID", "NRestarts", "WatchdogUSec")
        # A client mid-session that holds no fd of the device (QEMU's BAR mmaps would hold its
        # VFIO group until QEMU exits: the README says what that means for a restart).
        with connect_to(sockets[1]) as client:
            assert client.region_read(7, 0, 4).payload[16:] == EDU_IDS.to_bytes(4, "little")
            stopped = time.monotonic()
            os.kill(int(before["MainPID"]), signal.SIGSTOP)
            wait_for(
                "the restart",
                lambda: show(service, "NRestarts")["NRestarts"] != before["NRestarts"] and is_active(service),
                timeout=300,
            )
            restarted = round(time.monotonic() - stopped, 1)
        entries = journal(service)
        fired = [e["MESSAGE"] for e in entries if "Watchdog timeout" in str(e.get("MESSAGE"))]
        recovery = [
            line
            for line in daemon_lines(entries)
            if line.get("event") == "hand-off" and "recovery" in json.dumps(line)
        ]
        served = subsystem_vendor(sockets[1])  # the device the stopped daemon left is served again
        files = {sock.name: socket_file(sock) for sock in sockets}
        units = {n: show(f"vfio-mediator-device@gpu{n}.socket", "ActiveState", "SubState") for n in range(2)}
        assert fired and recovery and served == 0x2222, (fired, recovery, hex(served))
        assert all(f == UNIT_SOCKET for f in files.values()), (files, units)  # still the socket units'
        return {
            "watchdog": fired[-1],
            "restarted_after_s": restarted,
            "recovery": recovery[-1]["record"],
            "sockets": files,
        }

    @checked("busy-after-restart")
    def _() -> dict[str, object]:
        # A QEMU that mapped gpu1's BAR holds its VFIO group after the daemon dies: the restarted
        # daemon finds it busy, closes gpu1's clients at once, and serves it once that QEMU is gone.
        before = show(service, "NRestarts")["NRestarts"]
        with patient_qemu(sockets[1]) as vm:
            assert vm.cfg_read(0, 4) == EDU_IDS
            systemctl("kill", "--signal=SIGKILL", service)
            wait_for(
                "the restart",
                lambda: show(service, "NRestarts")["NRestarts"] != before and is_active(service),
                timeout=300,
            )
            waiting = show(service, "StatusText")["StatusText"]
            turned_away = probe_as("root", sockets[1])
            busy = [
                line
                for line in daemon_lines(journal(service))
                if line.get("event") == "device not served yet" and line.get("device") == "gpu1"
            ]
            gone = time.monotonic()
        wait_for("gpu1 opened", lambda: show(service, "StatusText")["StatusText"] == "serving 2 devices")
        opened_after = round(time.monotonic() - gone, 1)
        served = subsystem_vendor(sockets[1])
        opened = [
            line
            for line in daemon_lines(journal(service))
            if line.get("event") == "device opened: served from now on"
        ]
        assert waiting == "serving 1 device; 1 not opened: gpu1", waiting
        assert busy and "EBUSY" in str(busy[-1]["why"]), busy
        assert turned_away == {"reply": "closed"}, turned_away
        assert opened and opened[-1].get("device") == "gpu1" and served == 0x2222, (opened, hex(served))
        return {
            "status_while_busy": waiting,
            "why": busy[-1]["why"],
            "opened_after_qemu_exit_s": opened_after,
            "opened": opened[-1],
        }


def main() -> None:  # noqa: PLR0915  one nested function per check, in the order they run
    started = time.monotonic()
    edus = find_all("edu")
    edu = edus[0]
    unit = UNIT.format(bdf=edu)
    sock = Path(f"/run/vfio-mediator/{edu}.sock")
    install, enable = readme_blocks()

    @checked("systemd")
    def _() -> dict[str, object]:
        pid1 = Path("/proc/1/comm").read_text().strip()
        # The boot is still "starting" while this service (part of it) runs: ask for the units.
        state = {
            unit: systemctl("is-active", unit)
            for unit in ("basic.target", "systemd-journald", "systemd-udevd")
        }
        failed = systemctl("--failed", "--no-legend", "--plain")
        assert pid1 == "systemd" and set(state.values()) == {"active"}, (pid1, state)
        return {"pid1": pid1, "units": state, "failed": failed.splitlines(), "edus": edus}

    @checked("install")
    def _() -> dict[str, object]:
        shutil.copytree(
            ROOT, SOURCE, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.so", ".cache")
        )
        wheels = os.environ["TB_WHEELS"]
        for line in install:
            sh(line, PIP_NO_INDEX="1", PIP_FIND_LINKS=wheels, PIP_DISABLE_PIP_VERSION_CHECK="1")
        for bdf in edus:
            bind_to_vfio(bdf)
        inspect(edu)  # the policy's view, while no daemon holds the device
        sh("udevadm settle")
        groups = {path.name: path.group() for path in Path("/dev/vfio").iterdir() if path.name != "vfio"}
        assert set(groups.values()) == {"vfio-mediator"}, groups  # the udev rule
        return {"steps": len(install), "seconds": round(time.monotonic() - started), "groups": groups}

    @checked("socket-activation")
    def _() -> dict[str, object]:
        one_device = [line.replace("0000:3b:00.0", edu) for line in enable if "@0000:3b:00.0" in line]
        assert one_device, enable
        # edu has no reset method: its hand-off would quarantine it (an operator's drop-in says so).
        dropin = Path(f"/etc/systemd/system/{unit}.service.d/reset.conf")
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(
            f"[Service]\nExecStart=\nExecStart=/usr/bin/vfio-mediator serve --device %I --reset {NO_RESET}\n"
        )
        systemctl("daemon-reload")
        for line in one_device:
            sh(line)
        before = systemctl("is-active", f"{unit}.service")
        assert before == "inactive" and is_active(f"{unit}.socket"), before
        made = socket_file(sock)
        assert made == UNIT_SOCKET, made
        seen = guest_session(sock)
        service = show(f"{unit}.service", "ActiveState", "MainPID", "NRestarts")
        pid = int(service["MainPID"])
        process = status_of(pid)
        sandbox = {
            "user": process["Uid"].split()[0],
            "CapEff": process["CapEff"],
            "CapBnd": process["CapBnd"],
            "NoNewPrivs": process["NoNewPrivs"],
            "Seccomp": process["Seccomp"],
            # A process that may not dump core has its /proc files (not the folder) owned by root.
            "proc_owner": Path(f"/proc/{pid}/environ").stat().st_uid,
        }
        policy = bytes.fromhex(inspect(edu)["virtual"]["config"])
        assert service["ActiveState"] == "active", service
        assert sandbox["user"] == str(pwd.getpwnam("vfio-mediator").pw_uid), sandbox
        assert sandbox["CapEff"] == sandbox["CapBnd"] == "0000000000000000", sandbox
        assert sandbox["NoNewPrivs"] == "1" and sandbox["Seccomp"] == "2", sandbox
        assert sandbox["proc_owner"] == 0, sandbox  # no core dump can carry guest RAM to disk
        assert seen["ids"] == EDU_IDS and seen["dma"], seen
        # Identity, class, header type, subsystem and capability pointer: QEMU owns the BARs.
        for start, end in ((0x00, 0x04), (0x08, 0x10), (0x2C, 0x30), (0x34, 0x35)):
            assert seen["view"][start:end] == policy[start:end], (
                hex(start),
                seen["view"].hex(),
                policy.hex(),
            )
        return {
            "before": before,
            "socket": made,
            "sandbox": sandbox,
            "dma": seen["dma"],
            "qemu_started_s": seen["realized"],
        }

    @checked("memlock")
    def _() -> dict[str, object]:
        dropin = Path(f"/etc/systemd/system/{unit}.service.d/memlock.conf")
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text("[Service]\nLimitMEMLOCK=64K\n")
        systemctl("daemon-reload")
        systemctl("stop", f"{unit}.service")
        try:
            guest_session(sock)
        except RuntimeError as e:  # QEMU maps the guest's RAM while it realizes the device
            qemu = str(e)
        else:
            qemu = "QEMU started"
        finally:
            dropin.unlink()
            systemctl("daemon-reload")
            systemctl("stop", f"{unit}.service")
        refusal = [
            line
            for line in daemon_lines(journal(unit))
            if "RLIMIT_MEMLOCK" in json.dumps(line) and "LimitMEMLOCK=" in json.dumps(line)
        ]
        assert "command 2 error Operation not permitted" in qemu and refusal, (qemu[-500:], refusal)
        return {"qemu": qemu.splitlines()[-1][-300:], "message": refusal[0]}

    @checked("journal")
    def _() -> dict[str, object]:
        try:
            seen = guest_session(sock)
        finally:
            systemctl("stop", f"{unit}.service")
        lines = daemon_lines(journal(unit))
        session = [line for line in lines if line.get("client") is not None]
        audits = [line for line in lines if line.get("audit")]
        levels = {str(line.get("level")): line["PRIORITY"] for line in lines}
        assert seen["dma"] and session and all(line.get("device") for line in session), session[-3:]
        assert audits, lines[-5:]
        assert levels.get("info") == 6 and levels.get("warning", 4) == 4, levels
        return {"lines": len(lines), "session": session[0], "audit": audits[0], "levels": levels}

    @checked("hardening")
    def _() -> dict[str, object]:
        with patient_qemu(sock):
            wait_for("the service", lambda: is_active(f"{unit}.service"))
            out = subprocess.run(
                ["systemd-analyze", "security", "--no-pager", f"{unit}.service"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        exposure = exposure_of(out)
        # Offline the units rate as the README says (tests/test_systemd_units.py); running, systemd
        # also sees the unit's real user and devices.
        assert exposure <= 2.0, f"the running unit rates {exposure}:\n{out}"
        return {"exposure": exposure, "analysis": [line for line in out.splitlines() if "✗" in line]}

    config_service(edus, enable)

    tail = subprocess.run(
        ["journalctl", "--no-pager", "-o", "cat", "-n", "60", "-u", "vfio-mediator*"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    report("journal-tail", ok=True, lines=tail.splitlines())  # for whoever reads a failure
    report("done", ok=True, seconds=round(time.monotonic() - started))


if __name__ == "__main__":
    try:
        main()
    finally:
        subprocess.run(["systemctl", "poweroff", "--no-block"], check=False)
