"""REGION_READ (9), REGION_WRITE (10), REGION_WRITE_MULTI (15), and the xfer limit check."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, Self

from ._util import expect_exact_size, expect_min_size, expect_no_fds, fail
from .constants import Command
from .errors import ProtocolError
from .message import Buffer, Message, Reply, Request

_REGION_ACCESS = struct.Struct("=QII")  # offset, region, count
#: The fixed part of REGION_READ/WRITE payloads (and their replies): offset, region, count.
REGION_ACCESS_STRUCT = _REGION_ACCESS
REGION_ACCESS_SIZE = _REGION_ACCESS.size  # 16
_WR_CNT = struct.Struct("=Q")
_WR_ONE = struct.Struct("=QII8s")  # offset, region, count, data[8]
#: Largest write one REGION_WRITE_MULTI entry can describe.
WRITE_MULTI_DATA_MAX = 8


class _Counted(Protocol):
    COMMAND: ClassVar[Command]

    @property
    def count(self) -> int: ...


def check_xfer_size(message: _Counted, max_data_xfer_size: int) -> None:
    """Reject a data transfer above this side's ``max_data_xfer_size`` (EINVAL).

    Applies to REGION_READ/WRITE (server side) and DMA_READ/WRITE (client
    side): each side enforces its own advertised limit on what it receives.
    """
    check_count(message.COMMAND, message.count, max_data_xfer_size)


def check_count(command: Command, count: int, max_data_xfer_size: int) -> None:
    """:func:`check_xfer_size` for a transfer not decoded into a message."""
    if count > max_data_xfer_size:
        raise ProtocolError(
            f"count {count} exceeds max_data_xfer_size {max_data_xfer_size}", command=command
        )


# -- REGION_READ --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionReadReply(Reply):
    """Bytes read from a region (payload 16 + count)."""

    COMMAND: ClassVar[Command] = Command.REGION_READ

    region: int
    offset: int
    data: bytes

    @property
    def count(self) -> int:
        return len(self.data)

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, REGION_ACCESS_SIZE)
        offset, region, count = _REGION_ACCESS.unpack_from(payload)
        if len(payload) - REGION_ACCESS_SIZE != count:
            fail(cls, f"count {count} but {len(payload) - REGION_ACCESS_SIZE} data bytes")
        return cls(region, offset, bytes(payload[REGION_ACCESS_SIZE:]))


@dataclass(frozen=True, slots=True)
class RegionReadRequest(Request):
    """Read ``count`` bytes at ``offset`` of region ``region``."""

    COMMAND: ClassVar[Command] = Command.REGION_READ
    REPLY: ClassVar[type[Message]] = RegionReadReply

    region: int
    offset: int
    count: int

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, REGION_ACCESS_SIZE)
        offset, region, count = _REGION_ACCESS.unpack_from(payload)
        return cls(region, offset, count)

    def parse_reply(self, payload: Buffer, fds: Sequence[int] = ()) -> RegionReadReply:
        """The reply must carry exactly ``count`` bytes.

        For count 0 an empty payload is accepted too (libvfio-user sends one).
        """
        if self.count == 0 and len(payload) == 0:
            expect_no_fds(RegionReadReply, fds)
            return RegionReadReply(self.region, self.offset, b"")
        reply = RegionReadReply.unpack(payload, fds)
        if reply.count != self.count:
            fail(RegionReadReply, f"{reply.count} bytes returned, {self.count} requested")
        return reply


# -- REGION_WRITE -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionWriteReply(Reply):
    """Write acknowledgement: offset, region and count echoed (16 bytes)."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE

    region: int
    offset: int
    count: int

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, REGION_ACCESS_SIZE)
        offset, region, count = _REGION_ACCESS.unpack_from(payload)
        return cls(region, offset, count)


@dataclass(frozen=True, slots=True)
class RegionWriteRequest(Request):
    """Write ``data`` at ``offset`` of region ``region``."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE
    REPLY: ClassVar[type[Message]] = RegionWriteReply

    region: int
    offset: int
    data: bytes

    @property
    def count(self) -> int:
        return len(self.data)

    def reply(self) -> RegionWriteReply:
        """The success reply (fields echoed)."""
        return RegionWriteReply(self.region, self.offset, len(self.data))

    def pack(self) -> bytes:
        return _REGION_ACCESS.pack(self.offset, self.region, len(self.data)) + self.data

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, REGION_ACCESS_SIZE)
        offset, region, count = _REGION_ACCESS.unpack_from(payload)
        if len(payload) - REGION_ACCESS_SIZE != count:
            fail(cls, f"count {count} but {len(payload) - REGION_ACCESS_SIZE} data bytes")
        return cls(region, offset, bytes(payload[REGION_ACCESS_SIZE:]))

    def parse_reply(self, payload: Buffer, fds: Sequence[int] = ()) -> RegionWriteReply:
        """16-byte echo; for count 0 an empty payload is accepted (libvfio-user)."""
        if self.count == 0 and len(payload) == 0:
            expect_no_fds(RegionWriteReply, fds)
            return RegionWriteReply(self.region, self.offset, 0)
        return RegionWriteReply.unpack(payload, fds)


# -- REGION_WRITE_MULTI -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionWriteEntry:
    """One coalesced write of at most 8 bytes."""

    region: int
    offset: int
    data: bytes

    @property
    def count(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class RegionWriteMultiReply(Reply):
    """Number of writes completed (8 bytes)."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI

    wr_cnt: int

    def pack(self) -> bytes:
        return _WR_CNT.pack(self.wr_cnt)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, _WR_CNT.size)
        return cls(_WR_CNT.unpack_from(payload)[0])


@dataclass(frozen=True, slots=True)
class RegionWriteMultiRequest(Request):
    """Several small writes in one message (only with ``write_multiple`` negotiated)."""

    COMMAND: ClassVar[Command] = Command.REGION_WRITE_MULTI
    REPLY: ClassVar[type[Message]] = RegionWriteMultiReply

    writes: tuple[RegionWriteEntry, ...]

    def reply(self) -> RegionWriteMultiReply:
        return RegionWriteMultiReply(len(self.writes))

    def pack(self) -> bytes:
        out = [_WR_CNT.pack(len(self.writes))]
        for w in self.writes:
            if len(w.data) > WRITE_MULTI_DATA_MAX:
                raise ValueError(f"write of {len(w.data)} bytes does not fit WRITE_MULTI")
            out.append(_WR_ONE.pack(w.offset, w.region, len(w.data), w.data))
        return b"".join(out)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, _WR_CNT.size)
        wr_cnt = _WR_CNT.unpack_from(payload)[0]
        # Exact: the length is the only check of wr_cnt, and bytes past the entries we
        # would read could be writes the peer meant and we silently dropped.
        expect_exact_size(cls, payload, _WR_CNT.size + wr_cnt * _WR_ONE.size)
        writes = []
        for i in range(wr_cnt):
            offset, region, count, data = _WR_ONE.unpack_from(payload, 8 + i * _WR_ONE.size)
            if count > WRITE_MULTI_DATA_MAX:
                fail(cls, f"write {i}: count {count} exceeds {WRITE_MULTI_DATA_MAX}")
            writes.append(RegionWriteEntry(region, offset, data[:count]))
        return cls(tuple(writes))
