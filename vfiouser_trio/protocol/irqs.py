"""DEVICE_GET_IRQ_INFO (7) and DEVICE_SET_IRQS (8)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from ._util import expect_argsz, expect_min_size, expect_no_fds, fail
from .constants import (
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_TYPE_MASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    IRQ_SET_DATA_TYPE_MASK,
    Command,
)
from .message import Buffer, Message, Reply, Request

_IRQ_INFO = struct.Struct("=IIII")  # argsz, flags, index, count
IRQ_INFO_SIZE = _IRQ_INFO.size  # 16
_IRQ_SET = struct.Struct("=IIIII")  # argsz, flags, index, start, count
IRQ_SET_SIZE = _IRQ_SET.size  # 20
IRQ_SET_FLAGS_KNOWN = IRQ_SET_DATA_TYPE_MASK | IRQ_SET_ACTION_TYPE_MASK


@dataclass(frozen=True, slots=True)
class IrqInfoReply(Reply):
    """How many interrupts IRQ type ``index`` has and what it supports (16 bytes)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO

    index: int
    flags: int
    count: int
    argsz: int = IRQ_INFO_SIZE

    @property
    def eventfd(self) -> bool:
        return bool(self.flags & IRQ_INFO_EVENTFD)

    @property
    def maskable(self) -> bool:
        return bool(self.flags & IRQ_INFO_MASKABLE)

    @property
    def automasked(self) -> bool:
        return bool(self.flags & IRQ_INFO_AUTOMASKED)

    @property
    def noresize(self) -> bool:
        return bool(self.flags & IRQ_INFO_NORESIZE)

    def pack(self) -> bytes:
        return _IRQ_INFO.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, IRQ_INFO_SIZE)
        argsz, flags, index, count = _IRQ_INFO.unpack_from(payload)
        return cls(index, flags, count, argsz)


@dataclass(frozen=True, slots=True)
class IrqInfoRequest(Request):
    """Ask about IRQ type ``index`` (e.g. PciIrq.MSIX)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_IRQ_INFO
    REPLY: ClassVar[type[Message]] = IrqInfoReply

    index: int
    argsz: int = IRQ_INFO_SIZE

    def pack(self) -> bytes:
        return _IRQ_INFO.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, IRQ_INFO_SIZE)
        argsz, _flags, index, _count = _IRQ_INFO.unpack_from(payload)
        expect_argsz(cls, argsz, IRQ_INFO_SIZE)
        return cls(index, argsz)


@dataclass(frozen=True, slots=True)
class SetIrqsReply(Reply):
    """SET_IRQS reply: no payload (any received is ignored)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        return cls()


def _one_bit(value: int) -> bool:
    return value != 0 and value & (value - 1) == 0


@dataclass(frozen=True, slots=True)
class SetIrqsRequest(Request):
    """Apply an action to interrupts ``start .. start+count-1`` of IRQ type ``index``.

    ``flags`` holds exactly one DATA_* and one ACTION_* bit. DATA_BOOL carries
    ``count`` bytes in ``data``; DATA_EVENTFD carries ``count`` eventfds in
    ``fds`` (or none: de-assign). ``argsz`` defaults to 20 + len(data).

    ``unpack`` enforces the structural rules; range checks need the device's
    IRQ count and are done by ``validate_against``. Per-index rules (ERR/REQ
    take only TRIGGER with count <= 1) are the server's.
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_SET_IRQS
    REPLY: ClassVar[type[Message]] = SetIrqsReply

    index: int
    flags: int
    start: int = 0
    count: int = 0
    data: bytes = b""
    fds: tuple[int, ...] = ()
    argsz: int | None = None

    def __post_init__(self) -> None:
        if self.argsz is None:
            object.__setattr__(self, "argsz", IRQ_SET_SIZE + len(self.data))

    @property
    def data_type(self) -> int:
        return self.flags & IRQ_SET_DATA_TYPE_MASK

    @property
    def action(self) -> int:
        return self.flags & IRQ_SET_ACTION_TYPE_MASK

    @property
    def bools(self) -> tuple[bool, ...]:
        """DATA_BOOL: whether each interrupt of the range is affected."""
        return tuple(b != 0 for b in self.data)

    @property
    def disables_all(self) -> bool:
        """count 0 with TRIGGER|DATA_NONE: disable every interrupt of the index."""
        return self.count == 0

    def pack(self) -> bytes:
        assert self.argsz is not None
        head = _IRQ_SET.pack(self.argsz, self.flags, self.index, self.start, self.count)
        return head + self.data

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_min_size(cls, payload, IRQ_SET_SIZE)
        argsz, flags, index, start, count = _IRQ_SET.unpack_from(payload)
        expect_argsz(cls, argsz, IRQ_SET_SIZE)
        if flags & ~IRQ_SET_FLAGS_KNOWN:
            fail(cls, f"unknown flags {flags:#x}")
        data_type = flags & IRQ_SET_DATA_TYPE_MASK
        if not _one_bit(data_type) or not _one_bit(flags & IRQ_SET_ACTION_TYPE_MASK):
            fail(cls, f"flags {flags:#x}: need exactly one DATA and one ACTION bit")
        if count == 0 and (start != 0 or flags != IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE):
            fail(cls, "count 0 needs start 0 and TRIGGER|DATA_NONE")
        if fds and data_type != IRQ_SET_DATA_EVENTFD:
            fail(cls, f"{len(fds)} fds with a non-EVENTFD data type")
        if data_type == IRQ_SET_DATA_EVENTFD and len(fds) not in (0, count):
            fail(cls, f"{len(fds)} eventfds for count {count}")
        data = b""
        if data_type == IRQ_SET_DATA_BOOL:
            data = bytes(payload[IRQ_SET_SIZE:])
            if len(data) != count:
                fail(cls, f"{len(data)} BOOL bytes for count {count}")
        # DATA_NONE / DATA_EVENTFD: bytes past the struct carry nothing; QEMU sends none.
        return cls(index, flags, start, count, data, tuple(fds), argsz)

    def validate_against(self, irq_count: int) -> None:
        """Check the range against the index's IRQ count (ProtocolError EINVAL).

        Saturating, like C servers: start beyond the count, or start + count
        past it, is rejected. count 0 (disable all) always fits.
        """
        if self.count == 0:
            return
        if self.start >= irq_count or self.count > irq_count - self.start:
            fail(
                type(self),
                f"start {self.start} count {self.count} beyond {irq_count} interrupts",
            )
