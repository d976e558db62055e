"""DEVICE_GET_REGION_INFO (5) and DEVICE_GET_REGION_IO_FDS (6).

Both replies follow the argsz rule: the reply's ``argsz`` is the size needed
for the full answer; when the request's argsz is smaller the variable part (and
its fds) is left out. Servers build such replies with ``region_info_reply`` and
``region_io_fds_reply`` from the full answer and the request's argsz.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from ._util import expect_argsz, expect_min_size, expect_no_fds, fail
from .constants import (
    IO_FD_TYPE_IOEVENTFD,
    IO_FD_TYPE_IOREGIONFD,
    REGION_INFO_CAP_SPARSE_MMAP,
    REGION_INFO_CAP_TYPE,
    REGION_INFO_FLAG_CAPS,
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    Command,
)
from .message import Buffer, Message, Reply, Request

# argsz, flags, index, cap_offset, size, offset
_REGION_INFO = struct.Struct("=IIIIQQ")
REGION_INFO_SIZE = _REGION_INFO.size  # 32
_CAP_HEADER = struct.Struct("=HHI")  # id, version, next
_SPARSE_HEADER = struct.Struct("=II")  # nr_areas, reserved
_SPARSE_AREA = struct.Struct("=QQ")  # offset, size
_TYPE_BODY = struct.Struct("=II")  # type, subtype


# -- region capabilities ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SparseMmapArea:
    """One mmap-able part of a region: ``offset`` is relative to the region's mmap offset."""

    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class SparseMmapCap:
    """VFIO_REGION_INFO_CAP_SPARSE_MMAP: only these areas may be mmap()ed."""

    areas: tuple[SparseMmapArea, ...]
    version: int = 1

    ID: ClassVar[int] = REGION_INFO_CAP_SPARSE_MMAP

    def pack_body(self) -> bytes:
        body = [_SPARSE_HEADER.pack(len(self.areas), 0)]
        body += [_SPARSE_AREA.pack(a.offset, a.size) for a in self.areas]
        return b"".join(body)


@dataclass(frozen=True, slots=True)
class RegionTypeCap:
    """VFIO_REGION_INFO_CAP_TYPE: a device-specific region's type and subtype."""

    type: int
    subtype: int
    version: int = 1

    ID: ClassVar[int] = REGION_INFO_CAP_TYPE

    def pack_body(self) -> bytes:
        return _TYPE_BODY.pack(self.type, self.subtype)


@dataclass(frozen=True, slots=True)
class UnknownRegionCap:
    """A capability this library does not model, kept as raw bytes after its header."""

    id: int
    body: bytes
    version: int = 1

    @property
    def ID(self) -> int:
        return self.id

    def pack_body(self) -> bytes:
        return self.body


RegionCap = SparseMmapCap | RegionTypeCap | UnknownRegionCap


def _pack_caps(caps: Sequence[RegionCap], base: int) -> bytes:
    """Lay the caps out back to back starting at offset ``base``, chained by ``next``."""
    out: list[bytes] = []
    offset = base
    for i, cap in enumerate(caps):
        body = cap.pack_body()
        end = offset + _CAP_HEADER.size + len(body)
        nxt = end if i + 1 < len(caps) else 0
        out.append(_CAP_HEADER.pack(cap.ID, cap.version, nxt))
        out.append(body)
        offset = end
    return b"".join(out)


def _caps_size(caps: Sequence[RegionCap]) -> int:
    return sum(_CAP_HEADER.size + len(c.pack_body()) for c in caps)


def _unpack_caps(cls: type[Message], payload: Buffer, first: int) -> tuple[RegionCap, ...]:
    caps: list[RegionCap] = []
    offset = first
    end = len(payload)
    while offset:
        # Offsets must move forward inside the payload: no loops, no overlap with the struct.
        if offset < REGION_INFO_SIZE or offset + _CAP_HEADER.size > end:
            fail(cls, f"capability offset {offset} is outside the payload")
        cap_id, version, nxt = _CAP_HEADER.unpack_from(payload, offset)
        if nxt and nxt <= offset:
            fail(cls, f"capability chain goes backwards ({offset} -> {nxt})")
        body_start = offset + _CAP_HEADER.size
        body_end = nxt if nxt else end
        if body_end > end:
            fail(cls, f"capability at {offset} runs past the payload")
        caps.append(_unpack_cap(cls, cap_id, version, payload[body_start:body_end]))
        offset = nxt
    return tuple(caps)


def _unpack_cap(cls: type[Message], cap_id: int, version: int, body: Buffer) -> RegionCap:
    if cap_id == REGION_INFO_CAP_SPARSE_MMAP:
        if len(body) < _SPARSE_HEADER.size:
            fail(cls, "truncated sparse mmap capability")
        nr_areas = _SPARSE_HEADER.unpack_from(body)[0]
        if len(body) < _SPARSE_HEADER.size + nr_areas * _SPARSE_AREA.size:
            fail(cls, f"sparse mmap capability too short for {nr_areas} areas")
        areas = tuple(
            SparseMmapArea(*_SPARSE_AREA.unpack_from(body, _SPARSE_HEADER.size + i * 16))
            for i in range(nr_areas)
        )
        return SparseMmapCap(areas, version)
    if cap_id == REGION_INFO_CAP_TYPE:
        if len(body) < _TYPE_BODY.size:
            fail(cls, "truncated region type capability")
        rtype, subtype = _TYPE_BODY.unpack_from(body)
        return RegionTypeCap(rtype, subtype, version)
    return UnknownRegionCap(cap_id, bytes(body), version)


# -- DEVICE_GET_REGION_INFO -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionInfoReply(Reply):
    """A region's flags, size, mmap offset, capabilities and (if mmap-able) its fd.

    ``flags`` are the wire flags; CAPS is added whenever ``caps`` is non-empty.

    ``argsz`` defaults to the size needed for the full reply. A reply cut short
    because the request's argsz could not hold the capabilities has no caps, no
    fd, no CAPS flag, the needed size in ``argsz`` and ``padding`` zero bytes
    after the 32-byte struct (its payload is min(request argsz, needed)).
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO

    index: int
    flags: int
    size: int
    offset: int = 0
    caps: tuple[RegionCap, ...] = ()
    fds: tuple[int, ...] = ()
    argsz: int | None = None
    padding: int = 0

    def __post_init__(self) -> None:
        if self.caps:
            object.__setattr__(self, "flags", self.flags | REGION_INFO_FLAG_CAPS)
        if self.argsz is None:
            object.__setattr__(self, "argsz", self.needed_size)

    @property
    def needed_size(self) -> int:
        """Payload size of the full reply: the struct plus every capability."""
        return REGION_INFO_SIZE + _caps_size(self.caps)

    @property
    def fd(self) -> int | None:
        return self.fds[0] if self.fds else None

    @property
    def readable(self) -> bool:
        return bool(self.flags & REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & REGION_INFO_FLAG_WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & REGION_INFO_FLAG_MMAP)

    @property
    def sparse_mmap(self) -> SparseMmapCap | None:
        return next((c for c in self.caps if isinstance(c, SparseMmapCap)), None)

    @property
    def region_type(self) -> RegionTypeCap | None:
        return next((c for c in self.caps if isinstance(c, RegionTypeCap)), None)

    def pack(self) -> bytes:
        assert self.argsz is not None
        cap_offset = REGION_INFO_SIZE if self.caps else 0
        head = _REGION_INFO.pack(
            self.argsz, self.flags, self.index, cap_offset, self.size, self.offset
        )
        return head + _pack_caps(self.caps, REGION_INFO_SIZE) + bytes(self.padding)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        """Decode; capabilities are read only when CAPS is set and cap_offset is non-zero.

        fds: 0 or 1. libvfio-user sends one fd per sparse mmap area (all for the
        same file), so ``nr_areas`` fds are accepted when a sparse cap is present.
        """
        expect_min_size(cls, payload, REGION_INFO_SIZE)
        argsz, flags, index, cap_offset, size, offset = _REGION_INFO.unpack_from(payload)
        caps: tuple[RegionCap, ...] = ()
        padding = 0
        if flags & REGION_INFO_FLAG_CAPS and cap_offset:
            if len(payload) < argsz:
                fail(cls, f"CAPS set but payload {len(payload)} is shorter than argsz {argsz}")
            caps = _unpack_caps(cls, payload, cap_offset)
        else:
            padding = len(payload) - REGION_INFO_SIZE
        if len(fds) > 1:
            sparse = next((c for c in caps if isinstance(c, SparseMmapCap)), None)
            if sparse is None or len(fds) != len(sparse.areas):
                fail(cls, f"{len(fds)} fds, at most 1 expected")
        return cls(index, flags, size, offset, caps, tuple(fds), argsz, padding)


@dataclass(frozen=True, slots=True)
class RegionInfoRequest(Request):
    """Ask for region ``index``; ``argsz`` is the largest reply payload wanted."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_INFO
    REPLY: ClassVar[type[Message]] = RegionInfoReply

    index: int
    argsz: int = REGION_INFO_SIZE

    def pack(self) -> bytes:
        return _REGION_INFO.pack(self.argsz, 0, self.index, 0, 0, 0)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, REGION_INFO_SIZE)
        argsz, _flags, index, _cap_offset, _size, _offset = _REGION_INFO.unpack_from(payload)
        expect_argsz(cls, argsz, REGION_INFO_SIZE)
        return cls(index, argsz)

    def parse_reply(self, payload: Buffer, fds: Sequence[int] = ()) -> RegionInfoReply:
        """Decode the reply; one longer than our ``argsz`` is tolerated (the argsz rule)."""
        return RegionInfoReply.unpack(payload, fds)


def region_info_reply(full: RegionInfoReply, argsz: int) -> RegionInfoReply:
    """The reply a server sends for ``full`` to a request with ``argsz``.

    If the capabilities do not fit: no caps, no CAPS flag, no fd, argsz = the
    needed size, and the payload cut to ``argsz`` bytes (zero padded).
    """
    needed = full.needed_size
    if argsz >= needed:
        return full
    return RegionInfoReply(
        full.index,
        full.flags & ~REGION_INFO_FLAG_CAPS,
        full.size,
        full.offset,
        argsz=needed,
        padding=max(0, argsz - REGION_INFO_SIZE),
    )


# -- DEVICE_GET_REGION_IO_FDS ---------------------------------------------------

_IO_FDS = struct.Struct("=IIII")  # argsz, flags, index, count
IO_FDS_SIZE = _IO_FDS.size  # 16
# offset, size, fd_index, type, flags, padding, datamatch / user_data
_SUB_REGION = struct.Struct("=QQIIIIQ")
SUB_REGION_SIZE = _SUB_REGION.size  # 40


@dataclass(frozen=True, slots=True)
class IoEventFdSubRegion:
    """A sub-region to wire up as a KVM ioeventfd (VFIO_USER_IO_FD_TYPE_IOEVENTFD)."""

    offset: int
    size: int
    fd_index: int
    flags: int = 0
    datamatch: int = 0

    TYPE: ClassVar[int] = IO_FD_TYPE_IOEVENTFD

    @property
    def value(self) -> int:
        return self.datamatch


@dataclass(frozen=True, slots=True)
class IoRegionFdSubRegion:
    """A sub-region to wire up as an ioregionfd (VFIO_USER_IO_FD_TYPE_IOREGIONFD)."""

    offset: int
    size: int
    fd_index: int
    flags: int = 0
    user_data: int = 0

    TYPE: ClassVar[int] = IO_FD_TYPE_IOREGIONFD

    @property
    def value(self) -> int:
        return self.user_data


SubRegion = IoEventFdSubRegion | IoRegionFdSubRegion


@dataclass(frozen=True, slots=True)
class RegionIoFdsReply(Reply):
    """Sub-regions of region ``index`` with the fds they use (``fd_index`` into ``fds``).

    ``count`` and ``argsz`` default to the full answer. A reply cut short by a
    small request argsz keeps ``count`` and ``argsz`` but has no sub-regions and
    no fds.
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS

    index: int
    sub_regions: tuple[SubRegion, ...] = ()
    fds: tuple[int, ...] = ()
    count: int | None = None
    argsz: int | None = None

    def __post_init__(self) -> None:
        if self.count is None:
            object.__setattr__(self, "count", len(self.sub_regions))
        if self.argsz is None:
            object.__setattr__(self, "argsz", self.needed_size)

    @property
    def needed_size(self) -> int:
        assert self.count is not None
        return IO_FDS_SIZE + self.count * SUB_REGION_SIZE

    def pack(self) -> bytes:
        assert self.argsz is not None and self.count is not None
        out = [_IO_FDS.pack(self.argsz, 0, self.index, self.count)]
        out += [
            _SUB_REGION.pack(s.offset, s.size, s.fd_index, s.TYPE, s.flags, 0, s.value)
            for s in self.sub_regions
        ]
        return b"".join(out)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_min_size(cls, payload, IO_FDS_SIZE)
        argsz, flags, index, count = _IO_FDS.unpack_from(payload)
        if flags:
            fail(cls, f"flags must be zero, got {flags:#x}")
        rest = len(payload) - IO_FDS_SIZE
        if rest == 0:  # no sub-regions (none exist, or argsz was too small)
            expect_no_fds(cls, fds)
            return cls(index, (), (), count, argsz)
        # Entry size is (payload - 16) / count: 40 today, "not to be relied on".
        if count == 0 or rest % count or rest // count < SUB_REGION_SIZE:
            fail(cls, f"{rest} bytes of sub-regions do not hold {count} entries")
        if not fds:
            fail(cls, "sub-regions sent without any fd")
        step = rest // count
        subs: list[SubRegion] = []
        for i in range(count):
            off, size, fd_index, typ, sflags, _pad, value = _SUB_REGION.unpack_from(
                payload, IO_FDS_SIZE + i * step
            )
            if fd_index >= len(fds):
                fail(cls, f"sub-region {i}: fd_index {fd_index} but {len(fds)} fds")
            if typ == IO_FD_TYPE_IOEVENTFD:
                subs.append(IoEventFdSubRegion(off, size, fd_index, sflags, value))
            elif typ == IO_FD_TYPE_IOREGIONFD:
                subs.append(IoRegionFdSubRegion(off, size, fd_index, sflags, value))
            else:
                fail(cls, f"sub-region {i}: unknown type {typ}")
        return cls(index, tuple(subs), tuple(fds), count, argsz)


@dataclass(frozen=True, slots=True)
class RegionIoFdsRequest(Request):
    """Ask which sub-regions of region ``index`` can be driven through fds."""

    COMMAND: ClassVar[Command] = Command.DEVICE_GET_REGION_IO_FDS
    REPLY: ClassVar[type[Message]] = RegionIoFdsReply

    index: int
    argsz: int = IO_FDS_SIZE

    def pack(self) -> bytes:
        return _IO_FDS.pack(self.argsz, 0, self.index, 0)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, IO_FDS_SIZE)
        argsz, flags, index, count = _IO_FDS.unpack_from(payload)
        expect_argsz(cls, argsz, IO_FDS_SIZE)
        if flags or count:
            fail(cls, "flags and count must be zero in the request")
        return cls(index, argsz)

    def parse_reply(self, payload: Buffer, fds: Sequence[int] = ()) -> RegionIoFdsReply:
        """Decode the reply; one longer than our ``argsz`` is tolerated (the argsz rule)."""
        return RegionIoFdsReply.unpack(payload, fds)


def region_io_fds_reply(full: RegionIoFdsReply, argsz: int) -> RegionIoFdsReply:
    """The reply a server sends for ``full`` to a request with ``argsz``.

    If the sub-regions do not fit: count and argsz of the full answer, no
    sub-regions, no fds (as libvfio-user answers).
    """
    if argsz >= full.needed_size:
        return full
    return RegionIoFdsReply(full.index, (), (), full.count, full.argsz)
