"""Start a command the way systemd's socket activation does (sd_listen_fds), for tests.

    python tests/commands/activate.py FD,FD,... NAME:NAME:... COMMAND [ARG...]

Moves the given listening sockets to fds 3, 4, ..., sets LISTEN_FDS,
LISTEN_FDNAMES and LISTEN_PID (this process's pid, which exec keeps), and
execs the command.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    fds = [int(fd) for fd in argv[0].split(",")]
    # Out of the way first, so moving one to 3 cannot overwrite another.
    parked = [os.dup(fd) for fd in fds]
    for fd in fds:
        os.close(fd)
    for target, fd in enumerate(parked, start=3):
        os.dup2(fd, target)
        os.set_inheritable(target, True)  # dup2 onto itself would leave close-on-exec set
    for fd in parked:
        if fd >= 3 + len(parked):
            os.close(fd)
    os.environ |= {"LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": argv[1], "LISTEN_PID": str(os.getpid())}
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
