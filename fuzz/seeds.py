"""Writes the seed inputs of ``fuzz/corpus/protocol``: short client sessions, encoded for ``protocol.decode``.

    .venv/bin/python fuzz/seeds.py

Theory of operation: atheris's ``FuzzedDataProvider`` takes bytes and
booleans (the low bit of a byte) from the front of an input and integers
from its end, each in as many bytes as its range needs, most significant
first. A ``Tape`` writes the same choices the other way round: ``raw`` and
``boolean`` to the front, ``integer`` to the back (in the order they are
consumed), and the input is the front followed by the back reversed.
Every seed is decoded again and must give exactly the reads it was written
from, so a change to ``decode`` that this script does not follow is caught
here rather than leaving the seeds meaningless.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from protocol import (
    ANY_COMMAND,
    BLOCKING_EVENTFD,
    CHOSEN_SIZE_ODDS,
    EVENTFD,
    FD_KINDS,
    FILLER,
    FLAG_CHOICES,
    LIMITS,
    MAX_FDS,
    MAX_FILLER,
    MAX_MEMFD,
    MAX_PAYLOAD,
    MAX_PIECES,
    MAX_RAW,
    MEMFD,
    MESSAGE,
    PIECE_KINDS,
    PIPE_READ,
    RAW,
    TRUNCATED,
    VERSION,
    VERSION_PAYLOAD,
    Fd,
    Read,
    decode,
)

from mediator.vfio_user.wire import FLAG_NO_REPLY, HEADER, HEADER_SIZE, TYPE_REPLY, Command

CORPUS = Path(__file__).parent / "corpus" / "protocol"
BAR0, ROM, CONFIG = 0, 6, 7
DOORBELL, DMA_ENGINE = 0x4000, 0x5000  # the H100 profile's simulated registers in BAR0
MIRROR_4K, MIRROR_256 = 0x88000, 0x1800  # NVIDIA's config mirrors, trapped
MSIX_TRIGGER = 0x24  # DATA_EVENTFD | ACTION_TRIGGER
INTX, MSIX = 0, 2


class Tape:
    """An input for ``decode``, written choice by choice."""

    def __init__(self, *, version_first: bool) -> None:
        self._front = bytearray()
        self._back = bytearray()  # in the order decode consumes it
        self._reads: list[Read] = [Read(VERSION)] if version_first else []
        self.boolean(version_first)

    def integer(self, value: int, low: int, high: int) -> None:
        assert low <= value <= high, (value, low, high)
        self._back += (value - low).to_bytes(((high - low).bit_length() + 7) // 8, "big")

    def boolean(self, value: bool) -> None:
        self._front.append(value)

    def raw(self, data: bytes) -> None:
        self._front += data

    def read(
        self, *pieces: bytes | Message | Filler, fds: tuple[Fd, ...] = (), truncated: bool = False
    ) -> None:
        """One read of ``pieces`` (raw bytes, up to 255 each, messages, zeros) with ``fds``."""
        self.integer(len(pieces), 1, MAX_PIECES)
        data = b""
        for piece in pieces:
            if isinstance(piece, Message):
                self.integer(MESSAGE, 0, PIECE_KINDS - 1)
                data += piece.write(self)
            elif isinstance(piece, Filler):
                self.integer(FILLER, 0, PIECE_KINDS - 1)
                self.integer(piece.size, 0, MAX_FILLER)
                data += bytes(piece.size)
            else:
                self.integer(RAW, 0, PIECE_KINDS - 1)
                self.integer(len(piece), 0, MAX_RAW)
                self.raw(piece)
                data += piece
        self.integer(len(fds), 0, MAX_FDS)
        for fd in fds:
            self.integer(fd.kind, 0, FD_KINDS - 1)
            if fd.kind == MEMFD:
                self.integer(fd.size, 0, MAX_MEMFD)
        self.integer(TRUNCATED if truncated else 0, 0, TRUNCATED)
        self._reads.append(Read(data, fds, truncated))

    def encoded(self) -> bytes:
        data = bytes(self._front) + bytes(reversed(self._back))
        assert decode(data) == self._reads, "decode does not read back what the tape wrote"
        return data


@dataclass(frozen=True)
class Filler:
    size: int


class Message:
    def __init__(
        self, command: int, payload: bytes = b"", *, flags: int = 0, size: int | None = None, msg_id: int = 1
    ) -> None:
        self.command, self.payload, self.flags, self.size, self.msg_id = command, payload, flags, size, msg_id

    def write(self, tape: Tape) -> bytes:
        tape.integer(self.msg_id, 0, 0xFFFF)
        tape.integer(min(self.command, ANY_COMMAND), 0, ANY_COMMAND)
        if self.command >= ANY_COMMAND:
            tape.integer(self.command, 0, 0xFFFF)
        if self.flags in FLAG_CHOICES:
            tape.integer(FLAG_CHOICES.index(self.flags), 0, len(FLAG_CHOICES))
        else:
            tape.integer(len(FLAG_CHOICES), 0, len(FLAG_CHOICES))
            tape.integer(self.flags, 0, 0xFFFFFFFF)
        tape.integer(len(self.payload), 0, MAX_PAYLOAD)
        tape.raw(self.payload)
        size = HEADER_SIZE + len(self.payload)
        if self.size is None:
            tape.integer(0, 0, CHOSEN_SIZE_ODDS)
        else:
            tape.integer(CHOSEN_SIZE_ODDS, 0, CHOSEN_SIZE_ODDS)
            tape.integer(self.size, 0, 0xFFFFFFFF)
            size = self.size
        return HEADER.pack(self.msg_id, self.command, size, self.flags, 0) + self.payload


def region_read(region: int, offset: int, count: int, msg_id: int = 1) -> Message:
    return Message(Command.REGION_READ, struct.pack("=QII", offset, region, count), msg_id=msg_id)


def region_write(region: int, offset: int, data: bytes, *, flags: int = 0, msg_id: int = 1) -> Message:
    payload = struct.pack("=QII", offset, region, len(data)) + data
    return Message(Command.REGION_WRITE, payload, flags=flags, msg_id=msg_id)


def dma_map(iova: int, size: int, offset: int = 0, flags: int = 3) -> Message:
    return Message(Command.DMA_MAP, struct.pack("=IIQQQ", 32, flags, offset, iova, size))


def dma_unmap(iova: int, size: int, flags: int = 0) -> Message:
    return Message(Command.DMA_UNMAP, struct.pack("=IIQQ", 24, flags, iova, size))


def set_irqs(index: int, flags: int, start: int, count: int, data: bytes = b"") -> Message:
    return Message(
        Command.DEVICE_SET_IRQS, struct.pack("=IIIII", 20 + len(data), flags, index, start, count) + data
    )


def region_info(index: int, argsz: int = 32) -> Message:
    return Message(Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", argsz, 0, index, 0, 0, 0))


def seeds() -> dict[str, Tape]:  # noqa: PLR0915  a table of tapes, one paragraph each
    tapes = {}

    def tape(name: str, *, version_first: bool = True) -> Tape:
        tapes[name] = Tape(version_first=version_first)
        return tapes[name]

    tape("version")
    t = tape("version-by-hand", version_first=False)
    t.read(Message(Command.VERSION, struct.pack("=HH", 1, 0)))  # another major: ENOTSUP
    t.read(Message(Command.VERSION, VERSION_PAYLOAD[:4] + b'{"capabilities":{"write_multiple":true}}\0'))
    t.read(Message(Command.VERSION, VERSION_PAYLOAD))  # a second VERSION: EINVAL

    t = tape("before-version", version_first=False)
    t.read(region_read(CONFIG, 0, 4), Message(Command.VERSION, VERSION_PAYLOAD[:4] + b"[[[{}]]]\0"))

    t = tape("dma-map-memfd")
    t.read(dma_map(0x100000, 1 << 20), fds=(Fd(MEMFD, 1 << 20),))
    t.read(dma_map(0x200000, 0x1000), dma_map(0x180000, 0x1000))  # unbacked; overlapping: EEXIST
    for register, value in ((0, 0x100), (8, 0x100000), (0x10, 8), (0x18, 0x3)):
        t.read(region_write(BAR0, DMA_ENGINE + register, struct.pack("=Q", value)))
    t.read(dma_unmap(0x100000, 0x1000), dma_unmap(0x100000, 1 << 20), dma_unmap(0, 0, flags=2))

    t = tape("config")
    t.read(region_read(CONFIG, 0, 4), region_read(CONFIG, 0, 256), region_write(CONFIG, 4, b"\x06\x04"))
    t.read(region_write(CONFIG, 0x3C, b"\x42"), region_read(CONFIG, 0xFFE, 4), region_read(CONFIG, 0x100, 4))

    t = tape("bar0")
    t.read(region_write(BAR0, 0x100, b"\x11\x22\x33\x44"), region_read(BAR0, 0x100, 8))
    t.read(region_read(BAR0, MIRROR_256, 4), region_read(BAR0, MIRROR_4K + 0x100, 8))
    t.read(region_write(BAR0, MIRROR_4K + 4, b"\x00\x00"), region_read(BAR0, (16 << 20) - 4, 8))
    t.read(region_read(ROM, 0, 2), region_write(ROM, 0, b"\0"), region_read(2, 1 << 36, 16))

    t = tape("set-irqs-eventfds")
    t.read(set_irqs(MSIX, MSIX_TRIGGER, 0, 2), fds=(Fd(EVENTFD), Fd(EVENTFD)))
    t.read(region_write(BAR0, DOORBELL, struct.pack("=I", 1)), set_irqs(MSIX, MSIX_TRIGGER, 0, 2))
    t.read(set_irqs(INTX, MSIX_TRIGGER, 0, 1), fds=(Fd(BLOCKING_EVENTFD),))
    t.read(set_irqs(INTX, 0x14, 0, 1), fds=(Fd(BLOCKING_EVENTFD),))  # the resample eventfd
    t.read(region_write(BAR0, DOORBELL, bytes(4)), region_write(BAR0, DOORBELL, bytes(4)))
    t.read(set_irqs(INTX, 0x11, 0, 1), set_irqs(INTX, 0x22, 0, 1, b"\x01"), set_irqs(INTX, 0x21, 0, 0))
    t.read(set_irqs(MSIX, MSIX_TRIGGER, 0, 1), fds=(Fd(PIPE_READ),))  # not an eventfd

    t = tape("info")
    t.read(Message(Command.DEVICE_GET_INFO, struct.pack("=IIII", 16, 0, 0, 0)), region_info(0))
    t.read(region_info(0, 0x100), region_info(2, 0x100), region_info(7), region_info(9))
    t.read(Message(Command.DEVICE_GET_IRQ_INFO, struct.pack("=IIII", 16, 0, MSIX, 0)), region_info(4, 0x100))

    t = tape("oversized")
    t.read(Message(Command.REGION_WRITE, bytes(200), size=LIMITS.max_message_size + 1))
    t.read(Filler(LIMITS.max_message_size - 300), b"\xaa" * 85, region_read(CONFIG, 0, 4))

    t = tape("truncated-header")
    whole = HEADER.pack(7, Command.REGION_READ, 32, 0, 0) + struct.pack("=QII", 0, CONFIG, 4)
    t.read(whole[:10])
    t.read(whole[10:], whole[:5])

    t = tape("reply-where-a-command-belongs")
    t.read(Message(Command.REGION_READ, struct.pack("=QII", 0, CONFIG, 4), flags=TYPE_REPLY))

    t = tape("fds-where-none-belong")
    t.read(region_read(CONFIG, 0, 4), fds=(Fd(MEMFD, 4096), Fd(EVENTFD)))
    t.read(dma_map(0, 0x1000), fds=(Fd(MEMFD, 0x1000), Fd(MEMFD, 0x1000)))
    t.read(dma_map(0, 0x1000), fds=(Fd(MEMFD, 0x1000),), truncated=True)

    t = tape("posted-and-reset")
    t.read(region_write(BAR0, 0x200, b"\x55", flags=FLAG_NO_REPLY), region_info(0, 0x100))
    t.read(Message(Command.DEVICE_RESET), region_write(CONFIG, 0x68, b"\x00\x80"))  # and an FLR
    t.read(Message(Command.REGION_WRITE_MULTI, struct.pack("=QQII8s", 1, 0x300, BAR0, 4, bytes(8))))
    t.read(Message(Command.DEVICE_FEATURE, struct.pack("=II", 8, 0x10001)), Message(0x1234))
    return tapes


def main() -> None:
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, tape in seeds().items():
        (CORPUS / f"seed-{name}").write_bytes(tape.encoded())


if __name__ == "__main__":
    main()
