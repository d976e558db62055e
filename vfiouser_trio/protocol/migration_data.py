"""MIG_DATA_READ (17) and MIG_DATA_WRITE (18): the migration data stream."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from ._util import expect_min_size, expect_no_fds, fail
from .constants import Command
from .message import Buffer, Message, Reply, Request

_MIG_DATA = struct.Struct("=II")  # argsz, size
MIG_DATA_SIZE = _MIG_DATA.size  # 8


@dataclass(frozen=True, slots=True)
class MigDataReadReply(Reply):
    """Migration data; fewer bytes than requested means the stream is drained.

    Like libvfio-user, the payload is padded with zeros to 8 + ``requested``
    bytes (``size`` says how many are valid, ``argsz`` = 8 + size).
    ``requested`` defaults to len(data) (no padding).
    """

    COMMAND: ClassVar[Command] = Command.MIG_DATA_READ

    data: bytes
    requested: int | None = None

    def __post_init__(self) -> None:
        if self.requested is None:
            object.__setattr__(self, "requested", len(self.data))

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def argsz(self) -> int:
        return MIG_DATA_SIZE + len(self.data)

    def pack(self) -> bytes:
        assert self.requested is not None
        pad = self.requested - len(self.data)
        head = _MIG_DATA.pack(self.argsz, len(self.data))
        # One join: the data (up to max_data_xfer_size) is copied once, padding only at the end.
        return b"".join((head, self.data, bytes(pad))) if pad > 0 else head + self.data

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, MIG_DATA_SIZE)
        _argsz, size = _MIG_DATA.unpack_from(payload)
        room = len(payload) - MIG_DATA_SIZE
        if size > room:
            fail(cls, f"size {size} but only {room} data bytes")
        return cls(bytes(payload[MIG_DATA_SIZE : MIG_DATA_SIZE + size]), room)


@dataclass(frozen=True, slots=True)
class MigDataReadRequest(Request):
    """Read up to ``size`` bytes of migration data (PRE_COPY / STOP_COPY)."""

    COMMAND: ClassVar[Command] = Command.MIG_DATA_READ
    REPLY: ClassVar[type[Message]] = MigDataReadReply

    size: int
    argsz: int | None = None

    def __post_init__(self) -> None:
        if self.argsz is None:
            object.__setattr__(self, "argsz", MIG_DATA_SIZE + self.size)

    @property
    def count(self) -> int:
        """Alias of ``size`` for ``check_xfer_size``."""
        return self.size

    def reply(self, data: bytes) -> MigDataReadReply:
        """The success reply carrying ``data`` (at most ``size`` bytes), padded as libvfio-user."""
        if len(data) > self.size:
            raise ValueError(f"{len(data)} bytes for a read of {self.size}")
        return MigDataReadReply(data, self.size)

    def pack(self) -> bytes:
        assert self.argsz is not None
        return _MIG_DATA.pack(self.argsz, self.size)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, MIG_DATA_SIZE)
        argsz, size = _MIG_DATA.unpack_from(payload)
        if argsz < MIG_DATA_SIZE + size:
            fail(cls, f"argsz {argsz} cannot hold {size} bytes of data")
        return cls(size, argsz)

    def parse_reply(self, payload: Buffer, fds: Sequence[int] = ()) -> MigDataReadReply:
        """``size`` must not exceed the request's; bytes past the data are padding (ignored)."""
        reply = MigDataReadReply.unpack(payload, fds)
        if reply.size > self.size:
            fail(MigDataReadReply, f"reply of {reply.size} bytes, {self.size} requested")
        return reply


@dataclass(frozen=True, slots=True)
class MigDataWriteReply(Reply):
    """MIG_DATA_WRITE reply: no payload (any received is ignored)."""

    COMMAND: ClassVar[Command] = Command.MIG_DATA_WRITE

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        return cls()


@dataclass(frozen=True, slots=True)
class MigDataWriteRequest(Request):
    """Write migration data to a RESUMING device."""

    COMMAND: ClassVar[Command] = Command.MIG_DATA_WRITE
    REPLY: ClassVar[type[Message]] = MigDataWriteReply

    data: bytes
    argsz: int | None = None

    def __post_init__(self) -> None:
        if self.argsz is None:
            object.__setattr__(self, "argsz", MIG_DATA_SIZE + len(self.data))

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def count(self) -> int:
        """Alias of ``size`` for ``check_xfer_size``."""
        return len(self.data)

    def pack(self) -> bytes:
        assert self.argsz is not None
        return _MIG_DATA.pack(self.argsz, len(self.data)) + self.data

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, MIG_DATA_SIZE)
        argsz, size = _MIG_DATA.unpack_from(payload)
        if len(payload) - MIG_DATA_SIZE != size:
            fail(cls, f"size {size} but {len(payload) - MIG_DATA_SIZE} data bytes")
        if argsz < MIG_DATA_SIZE + size:
            fail(cls, f"argsz {argsz} is below 8 + size {size}")
        return cls(bytes(payload[MIG_DATA_SIZE:]), argsz)
