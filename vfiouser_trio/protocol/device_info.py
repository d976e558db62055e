"""DEVICE_GET_INFO (4) and DEVICE_RESET (13)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from ._util import expect_argsz, expect_min_size, expect_no_fds
from .constants import DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, Command
from .message import Buffer, Message, Reply, Request

_DEVICE_INFO = struct.Struct("=IIII")  # argsz, flags, num_regions, num_irqs
DEVICE_INFO_SIZE = _DEVICE_INFO.size


@dataclass(frozen=True, slots=True)
class DeviceGetInfoReply(Reply):
    """Device flags and how many regions and IRQ types it has (16 bytes)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO

    flags: int
    num_regions: int
    num_irqs: int
    argsz: int = DEVICE_INFO_SIZE

    @property
    def supports_reset(self) -> bool:
        return bool(self.flags & DEVICE_FLAGS_RESET)

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & DEVICE_FLAGS_PCI)

    def pack(self) -> bytes:
        return _DEVICE_INFO.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, DEVICE_INFO_SIZE)
        argsz, flags, num_regions, num_irqs = _DEVICE_INFO.unpack_from(payload)
        return cls(flags, num_regions, num_irqs, argsz)


@dataclass(frozen=True, slots=True)
class DeviceGetInfoRequest(Request):
    """Query the device. Fields other than argsz are zero on the wire (and ignored)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_INFO
    REPLY: ClassVar[type[Message]] = DeviceGetInfoReply

    argsz: int = DEVICE_INFO_SIZE

    def pack(self) -> bytes:
        return _DEVICE_INFO.pack(self.argsz, 0, 0, 0)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, DEVICE_INFO_SIZE)
        argsz = _DEVICE_INFO.unpack_from(payload)[0]
        expect_argsz(cls, argsz, DEVICE_INFO_SIZE)
        return cls(argsz)


@dataclass(frozen=True, slots=True)
class DeviceResetReply(Reply):
    """DEVICE_RESET reply: no payload (any received is ignored, as for every fixed layout)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_RESET

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        return cls()


@dataclass(frozen=True, slots=True)
class DeviceResetRequest(Request):
    """Reset the device: no payload either way (any received is ignored)."""

    COMMAND: ClassVar[Command] = Command.DEVICE_RESET
    REPLY: ClassVar[type[Message]] = DeviceResetReply

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        return cls()
