"""Resets: the hardware reset, the post-reset writes that must follow it, and the client's deadline.

``reset_hardware`` resets the function (a secondary bus reset when one is
asked for and reaches this function alone, else a function reset) and
restores the virtual config state; ``apply_post_reset_writes`` then makes
the plan's register writes (NVLink link disable...) and checks the verified
ones, blocking the device when a protection does not hold. A reset the guest
or the client asks for (``within_deadline``) does both in a thread and is
answered within ``reply_deadline`` of the client's timeout (QEMU's
``x-msg-timeout``, the daemon's ``client_timeout``), before the client gives
up on the message and loses the stream; a reset still running then finishes
in the background with the device blocked, and the hand-off that follows
waits for it (``finish_straggler``) before it touches the device.
"""

from __future__ import annotations

import contextvars
import errno
import threading
import time
from collections.abc import Callable
from typing import Literal, NoReturn, get_args

import structlog

from mediator.audit import audit_log
from mediator.backends.base import Backend, BackendError
from mediator.virt.config_view import ConfigView
from mediator.virt.errors import DeviceError
from mediator.virt.events import DeviceEvents, ResetCause
from mediator.virt.plan import DevicePlan, PostResetWrite

log = structlog.get_logger("mediator.virt")

# How a hand-off resets a device: a secondary bus reset where possible, a function reset, or none.
ResetMode = Literal["bus", "function", "none"]
RESET_MODES: tuple[ResetMode, ...] = get_args(ResetMode)
# How long QEMU's vfio-user client waits for each reply unless told otherwise (x-msg-timeout=5000).
DEFAULT_CLIENT_TIMEOUT = 5.0
# x-msg-timeout is a uint32 of milliseconds: a client cannot be told to wait longer.
MAX_CLIENT_TIMEOUT = (2**32 - 1) / 1000


def reply_deadline(client_timeout: float) -> float:
    """How long a guest's reset may run before the daemon answers the client anyway.

    The client's clock runs longer than the reset: from when it sent the
    request, through any requests queued before it, to when the reply
    reaches it, on a host that may be busy. Those delays do not grow with
    the timeout, so the margin is a second (4 s of QEMU's default 5 s), and
    a fifth of a timeout shorter than 5 s, so that a short one keeps a
    deadline.
    """
    return client_timeout - min(1.0, client_timeout / 5)


def client_timeout_for(deadline: float) -> float:
    """The client timeout whose ``reply_deadline`` is ``deadline``."""
    return deadline + 1.0 if deadline >= reply_deadline(5.0) else deadline / 0.8


class Resets:
    def __init__(
        self,
        backend: Backend,
        config: ConfigView,
        plan: DevicePlan,
        events: DeviceEvents,
        block: Callable[[str], None],
    ) -> None:
        """``block`` refuses the device with a reason (a reset that failed or did not finish in time)."""
        self.backend = backend
        self.config = config
        self.plan = plan
        self.events = events
        self._block = block
        # How long the client waits for a reply; the daemon sets its config's when a client comes.
        self.client_timeout = DEFAULT_CLIENT_TIMEOUT
        self._straggler: threading.Thread | None = None  # a reset still running past its deadline

    def reset_hardware(self, cause: ResetCause, *, bus: bool = False) -> str:
        """Reset the hardware and restore the virtual state; no post-reset writes yet.

        A bus reset when ``bus`` is asked and the backend can reset this
        function alone, else a function reset. Returns which one was done
        (and why not a bus reset, when it was asked).

        Raises:
            DeviceError: ENOTTY when the device has no reset method at all.
            BackendError: the reset failed.
        """
        self.finish_straggler()
        done = self._reset(bus)
        self.config.restore_shadow()
        self.events.reset(cause)
        return done

    def finish_straggler(self) -> float | None:
        """Wait for a guest's reset that outlived its deadline; the seconds waited, None without one.

        The hardware is still in it: nothing may reset, move or serve the device meanwhile.
        """
        straggler, self._straggler = self._straggler, None
        if straggler is None:
            return None
        clock = time.monotonic()
        straggler.join()
        return time.monotonic() - clock

    def _reset(self, bus: bool) -> str:
        obstacle = self.backend.bus_reset_obstacle() if bus else None
        if bus and obstacle is None:
            try:
                self.backend.bus_reset()
            except BackendError as e:
                # The kernel may give up waiting for the device after the reset
                # (ENOTTY from pci_bridge_wait_for_secondary_bus): the config
                # check after the reset shows whether the device came back.
                obstacle = f"the bus reset failed: {e}"
                log.warning("bus reset failed; falling back to a function reset", why=str(e))
            else:
                return "bus reset"
        if self.backend.can_reset:
            self.backend.reset()
            return "function reset" + (f" ({obstacle})" if obstacle else "")
        why = "the device has no reset method (no FLR, PM or bus reset)"
        raise DeviceError(errno.ENOTTY, why + (f"; {obstacle}" if obstacle else ""))

    def within_deadline(self, cause: str, source: ResetCause) -> None:
        """A reset the guest or the client (``source``) asked for, done by the daemon.

        Reset, restore the virtual state, make the post-reset writes, all
        within ``reply_deadline(client_timeout)``: the client waits for the
        answer no longer than ``client_timeout``. A reset still
        running then goes on in the background with the device blocked; a
        reset that fails blocks the device too. Either way the session ends
        and the device is handed off.

        Raises:
            DeviceError: ENOTTY (no reset method), EIO (the reset failed, or a
                verified post-reset write did not hold), ETIMEDOUT (still resetting).
        """
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._reset_now(cause, source)
            except BaseException as e:  # handed to the waiting caller
                failure.append(e)

        context = contextvars.copy_context()  # log lines keep their device and client
        worker = threading.Thread(target=context.run, args=(run,), name=f"reset {cause}", daemon=True)
        worker.start()
        deadline = reply_deadline(self.client_timeout)
        worker.join(deadline)
        if worker.is_alive():
            self._straggler = worker
            self._refuse(
                errno.ETIMEDOUT,
                f"a reset did not finish within {deadline:g} s (client_timeout {self.client_timeout:g} s); "
                "the device is handed off before it is served again",
            )
        if failure:
            raise failure[0]

    def _reset_now(self, cause: str, source: ResetCause) -> None:
        try:
            done = self.reset_hardware(source)
        except BackendError as e:
            self._refuse(
                errno.EIO, f"a reset failed ({e}); the device is handed off before it is served again"
            )
        audit_log.info("guest reset", cause=cause, reset=done, post_reset_writes=len(self.plan.post_reset))
        self.apply_post_reset_writes()

    def apply_post_reset_writes(self) -> None:
        """Make the plan's post-reset writes and check the verified ones hold; block the device if not.

        Raises:
            DeviceError: EIO when a protection did not hold.
        """
        failures = []
        for write in self.plan.post_reset:
            self._write(write)
            if write.verify:
                found = int.from_bytes(
                    self.backend.read_region(write.bar, write.offset, write.size), "little"
                )
                expected = write.value if write.op != "clear" else 0
                held = found == write.value if write.op == "write" else found & write.value == expected
                if not held:
                    where = f"BAR{write.bar}+{write.offset:#x}"
                    failures.append(
                        f"{where} reads {found:#x} after {write.op} {write.value:#x} ({write.quirk})"
                    )
        if failures:
            self._refuse(errno.EIO, "a required protection did not hold: " + "; ".join(failures))

    def _refuse(self, errno_value: int, reason: str) -> NoReturn:
        self._block(reason)
        raise DeviceError(errno_value, reason)

    def _write(self, write: PostResetWrite) -> None:
        if write.op == "write":
            value = write.value
        else:
            current = int.from_bytes(self.backend.read_region(write.bar, write.offset, write.size), "little")
            value = current | write.value if write.op == "set" else current & ~write.value
        self.backend.write_region(write.bar, write.offset, value.to_bytes(write.size, "little"))
