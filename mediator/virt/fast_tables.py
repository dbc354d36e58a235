"""A device's policy compiled into the tables the C fast path executes (cshim/fast_path.c).

The C loop decides nothing: every answer it gives follows from these tables,
built here from the same objects the Python path reads, so the two cannot
drift apart (``tests/protocol/test_fast_path.py`` drives both and compares).

- Config space: per byte the virtual and writable masks and the reset-trigger
  bits (``ConfigView.rules``), segment starts (a write reaches the device one
  segment piece at a time), and the bytes Python must see: on reads and
  writes the backend's special ranges (injected faults), on writes the
  registers whose write does more than land (``python_writes``: Command, for
  Bus Master follows pinning; the BARs, for peers' mappings follow them).
  The shadow is shared, ``ConfigView.shadow`` itself: a write Python makes
  is the C loop's next read, with nothing to copy.
- BARs and the ROM: the virtual and real sizes (padding between them reads
  0xFF and drops writes), where the bytes are (``Backend.direct_access``),
  and the ranges only Python answers: every trap window (each is audited or
  counted) and the backend's special ranges. The ROM is read-only here.
- ``refused`` mirrors the device's refusal: while set, every request goes
  to Python, which refuses it.

Nothing here changes while a client is served except the shadow and
``refused``: a reload swaps the device between clients, and a hand-off
runs once the session (and its tables) has ended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from mediator.backends.base import Backend, DirectAccess
from mediator.vfio_abi import BAR_REGIONS, CONFIG_REGION, ROM_REGION
from mediator.virt.config_view import ConfigView
from mediator.virt.plan import DevicePlan

try:
    from mediator._fast_path import ffi, lib
except ImportError as e:  # the optional extension was not built: everything is served in Python
    UNAVAILABLE: str | None = f"the C fast path is not built ({e})"
else:
    UNAVAILABLE = None

MAX_CONFIG = 4096  # the C loop's scratch room for one config piece


class FastTables:
    def __init__(
        self,
        config: ConfigView,
        plan: DevicePlan,
        backend: Backend,
        python_writes: Iterable[tuple[int, int]],
        padding_answered: Callable[[int], None],
    ) -> None:
        """``python_writes``: (start, end) config ranges whose writes Python must make;
        ``padding_answered`` is told how many padding accesses the C loop answered (``publish``).
        """
        assert UNAVAILABLE is None
        self._padding_answered = padding_answered
        if config.size > MAX_CONFIG:
            raise ValueError(f"a {config.size}-byte config space")
        self._keep: list[Any] = []  # every buffer the tables point at lives as long as they do
        self._released: list[Any] = []  # the views of Python's own buffers, given back at close
        self.device = device = ffi.new("struct fp_device *")
        self._config(device.config, config, backend.direct_access(CONFIG_REGION), python_writes)
        for index in (*BAR_REGIONS, ROM_REGION):
            bar = plan.bar(index)
            access = backend.direct_access(index) if bar is not None else None
            if bar is None or access is None:
                continue  # virtual_size 0: every access goes to Python
            c = device.bars[index]
            c.virtual_size, c.physical_size = bar.virtual_size, bar.physical_size
            c.writable = index != ROM_REGION
            self._physical(c.physical, access)
            special = sorted({(t.offset, t.end) for t in bar.traps} | set(access.special))
            c.n_special = len(special)
            c.special = self._array("uint64_t[]", [edge for pair in special for edge in pair])

    def _config(
        self,
        c: Any,
        config: ConfigView,
        access: DirectAccess | None,
        python_writes: Iterable[tuple[int, int]],
    ) -> None:
        rules = config.rules
        flags = bytearray(config.size)
        for start in rules.segment_starts:
            flags[start] |= lib.FP_SEGMENT_START
        for start, end in access.special if access else ((0, config.size),):
            for at in range(start, min(end, config.size)):
                flags[at] |= lib.FP_READ_PYTHON | lib.FP_WRITE_PYTHON
        for start, end in python_writes:
            for at in range(start, min(end, config.size)):
                flags[at] |= lib.FP_WRITE_PYTHON
        c.size = config.size
        c.virtual_bits = self._array("uint8_t[]", rules.virtual)
        c.writable_bits = self._array("uint8_t[]", rules.writable)
        c.reset_bits = self._array("uint8_t[]", rules.reset_bits)
        c.flags = self._array("uint8_t[]", bytes(flags))
        c.shadow = self._shared(config.shadow)
        if access is not None:
            self._physical(c.physical, access)

    def _array(self, kind: str, values: bytes | list[int]) -> Any:
        array = ffi.new(kind, values)
        self._keep.append(array)
        return array

    def _shared(self, buffer: bytearray | Any) -> Any:
        view = ffi.from_buffer("uint8_t[]", buffer, require_writable=True)
        self._released.append(view)
        return view

    def _physical(self, c: Any, access: DirectAccess) -> None:
        c.fd, c.file_offset = access.fd, access.file_offset
        if access.memory is not None:
            c.memory = self._shared(access.memory)

    @property
    def refused(self) -> bool:
        return bool(self.device.refused)

    @refused.setter
    def refused(self, refused: bool) -> None:
        self.device.refused = int(refused)

    def publish(self) -> None:
        """Report what the C loop counted for the device since the last call (it is not running)."""
        count = int(self.device.padding_accesses)
        if count:
            self.device.padding_accesses = 0
            self._padding_answered(count)

    def close(self) -> None:
        """Give Python's buffers back (the simulator may close its memory now); all goes to Python."""
        self.device.refused = 1
        for view in self._released:
            ffi.release(view)
        self._released.clear()
