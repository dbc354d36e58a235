"""A libvirtd of the test's own: Debian's libvirt, in a mount namespace of its own.

libvirt as root reads /etc/libvirt and keeps its state in /run/libvirt,
/var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt, paths no option
moves. So the test starts ``libvirtd`` under ``unshare --mount`` with a
folder of its own bound over each of them: the host's libvirt (running or
not) is neither used nor changed, and whatever the test defines is gone with
the folder. Clients reach it at a socket in that folder
(``qemu+unix:///system?socket=...``). No systemd is needed: the daemon runs
in the foreground as the test's child and is stopped at the end.

Two things the namespace also fixes for the testbed's QEMU (an unpacked
Debian 13 package, ``scripts/testbed qemu``), neither of which a QEMU
installed the usual way needs:

- libvirt runs QEMU as ``libvirt-qemu``, which cannot reach the testbed's
  cache in root's home: the QEMU folder is bound into the test's folder,
  which that user can reach, and run through a copy of the wrapper that
  points there.
- that QEMU falls back to the module folder its build names
  (/usr/lib/x86_64-linux-gnu/qemu) for a module its own folder lacks, and
  aborts on a module of another build there: the host's QEMU 7.2 (which
  Debian's libvirt recommends) has such modules. A tmpfs hides that folder
  from this libvirtd and its QEMUs.

The QEMU config keeps Debian's user and group (``libvirt-qemu``, with
``kvm`` as a supplementary group) and dynamic ownership; it sets
``security_driver = "none"`` (this libvirt has no AppArmor profiles to load
and the socket it does not know of would not be in them) and writes QEMU's
output to a file in the folder (``stdio_handler = "file"``: no virtlogd to
start).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# What libvirt as root keeps where, each replaced by a folder of the test's.
STATE_FOLDERS = {
    "etc": "/etc/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}
START_TIMEOUT = 90  # seconds: libvirtd probes the QEMUs it finds as it starts


class LibvirtError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    """The commands this test needs that the host lacks."""
    return [tool for tool in ("libvirtd", "virsh", "unshare") if shutil.which(tool) is None]


class PrivateLibvirt:
    """libvirtd in its own mount namespace, with its state in ``folder``, until ``close``."""

    def __init__(self, qemu_wrapper: Path) -> None:
        # Not under pytest's tmp_path: that is private to root, and QEMU (libvirt-qemu) opens the
        # device socket, the kernel and the initrd in here.
        self.folder = Path(tempfile.mkdtemp(prefix="vfio-mediator-libvirt-"))
        self.folder.chmod(0o755)
        for name in (*STATE_FOLDERS, "run", "sock", "qemu"):
            (self.folder / name).mkdir()
        self.socket = self.folder / "sock" / "libvirt-sock"
        self.uri = f"qemu+unix:///system?socket={self.socket}"
        self.log = self.folder / "libvirtd.log"
        self.emulator = self._emulator(qemu_wrapper)
        self._write_config()
        self._domains: list[str] = []
        self._stderr = (self.folder / "libvirtd.stderr").open("wb")
        self.process = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-ec",
                self._namespace_script(qemu_wrapper),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
        )
        try:
            self._wait_until_it_answers()
        except BaseException:
            self.close()
            raise

    def _emulator(self, qemu_wrapper: Path) -> Path:
        """A copy of the testbed's wrapper that runs QEMU from the bound folder."""
        text = qemu_wrapper.read_text()
        found = re.search(r'^R="([^"]+)"$', text, re.MULTILINE)
        if found is None:
            raise LibvirtError(f"{qemu_wrapper} does not name its QEMU root (R=...)")
        root = Path(found.group(1))
        bound_root = self.folder / "qemu" / root.relative_to(qemu_wrapper.parent)
        emulator = self.folder / "qemu-system-x86_64"
        emulator.write_text(text.replace(f'R="{root}"', f'R="{bound_root}"'))
        emulator.chmod(0o755)
        self._qemu_modules = self._host_module_folder(text)
        return emulator

    @staticmethod
    def _host_module_folder(wrapper_text: str) -> Path | None:
        """The folder the testbed's QEMU falls back to for modules: its own, relative to /."""
        found = re.search(r'QEMU_MODULE_DIR="\$R/([^"]+)"', wrapper_text)
        return Path("/") / found.group(1) if found else None

    def _write_config(self) -> None:
        etc = self.folder / "etc"
        (etc / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.folder / "sock"}"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{self.log}"\n'
        )
        (etc / "qemu.conf").write_text('security_driver = "none"\nstdio_handler = "file"\n')

    def _namespace_script(self, qemu_wrapper: Path) -> str:
        q = shlex.quote
        lines = [f"mount --bind {q(str(qemu_wrapper.parent))} {q(str(self.folder / 'qemu'))}"]
        if self._qemu_modules is not None and self._qemu_modules.is_dir():
            lines.append(f"mount -t tmpfs vfio-mediator-no-modules {q(str(self._qemu_modules))}")
        # /run/libvirt may not exist on the host: a tmpfs over /run makes room for it.
        lines += ["mount -t tmpfs vfio-mediator-run /run", "mkdir /run/libvirt"]
        lines.append(f"mount --bind {q(str(self.folder / 'run'))} /run/libvirt")
        for name, target in STATE_FOLDERS.items():
            lines.append(f"mount --bind {q(str(self.folder / name))} {target}")
        lines.append(f"exec libvirtd -f {q(str(self.folder / 'etc' / 'libvirtd.conf'))}")
        return "\n".join(lines)

    def _wait_until_it_answers(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise LibvirtError(f"libvirtd exited ({self.process.returncode}):\n{self.diagnostics()}")
            if self.socket.exists() and self.run("list", "--all", "--name", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LibvirtError(f"libvirtd did not answer in {START_TIMEOUT} s:\n{self.diagnostics()}")
            time.sleep(0.5)

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``virsh ARGS`` against this libvirtd."""
        result = subprocess.run(
            ["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode:
            raise LibvirtError(f"virsh {' '.join(args)}: {result.stderr.strip()}\n{self.diagnostics()}")
        return result

    def define(self, xml: str, name: str) -> None:
        path = self.folder / f"{name}.xml"
        path.write_text(xml)
        self.run("define", str(path))
        self._domains.append(name)

    def qemu_log(self, name: str) -> str:
        path = self.folder / "log" / "qemu" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def diagnostics(self) -> str:
        """The end of libvirtd's own output and log, and of each QEMU's, for a failure's message."""
        parts = []
        stderr = self.folder / "libvirtd.stderr"
        for title, path in [("libvirtd stderr", stderr), ("libvirtd log", self.log)]:
            if path.exists():
                parts.append(f"--- {title}:\n{path.read_text(errors='replace')[-3000:]}")
        for name in self._domains:
            parts.append(f"--- QEMU log of {name}:\n{self.qemu_log(name)[-3000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Destroy and undefine the test's domains, stop libvirtd, remove the folder."""
        if self.process.poll() is None:
            for name in self._domains:
                self.run("destroy", name, check=False)
                self.run("undefine", name, check=False)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._kill_leftover_qemus()
        self._stderr.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _kill_leftover_qemus(self) -> None:
        """A QEMU libvirt started for this test and did not end (libvirtd died first): by its pid file."""
        for pid_file in (self.folder / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                # Only a QEMU run from this folder: a stale pid file's number may be another's now.
                if str(self.folder).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> PrivateLibvirt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
