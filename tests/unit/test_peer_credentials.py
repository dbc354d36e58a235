"""The credentials the server checks a client against: its uid, primary and supplementary groups."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from mediator.vfio_user.server import peer_of

CONNECT = "import socket, sys; c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1]); sys.stdin.read()"


def test_a_peer_s_supplementary_groups_are_read(tmp_path: Path) -> None:
    path = tmp_path / "peer.sock"
    # As root the client gets a group of its own, as QEMU under libvirt gets kvm beside libvirt-qemu.
    extra = [4242] if os.geteuid() == 0 else None
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        client = subprocess.Popen(
            [sys.executable, "-c", CONNECT, str(path)], stdin=subprocess.PIPE, extra_groups=extra
        )
        try:
            accepted, _ = listener.accept()
            with accepted:
                peer = peer_of(accepted)
        finally:
            client.communicate(timeout=10)
    supplementary = set(extra) if extra is not None else set(os.getgroups())
    assert peer.pid == client.pid and peer.uid == os.geteuid()
    assert peer.gids == {os.getegid(), *supplementary}
