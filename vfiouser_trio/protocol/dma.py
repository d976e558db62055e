"""DMA commands: DMA_MAP (2), DMA_UNMAP (3), DMA_READ (11), DMA_WRITE (12).

DMA_READ/DMA_WRITE go server -> client. QEMU's client (``hw/vfio-user/pci.c``) lays
both the DMA_READ reply and the DMA_WRITE request out as ``address u64, count u32,
data`` (its struct is 28 bytes padded to 32: data at payload offset 12, and it wants
the 4 padding bytes in the message, so the payload is still 16 + count), and answers
DMA_WRITE header-only. The spec has ``address u64, count u64, data`` (data at 16) and
echoes ``address, count`` in the DMA_WRITE reply. ``DmaLayout`` names the two; a peer
uses one for both commands. How a server learns it: ``DmaReadRequest.parse_reply``
(a reply only one layout fits) and ``detect_dma_write_layout`` (the reply to a
zero-length DMA_WRITE, which both layouts accept).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from ._util import expect_argsz, expect_min_size, expect_no_fds, fail
from .constants import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    DMA_UNMAP_FLAG_ALL,
    Command,
)
from .message import Buffer, Message, Reply, Request

_DMA_MAP = struct.Struct("=IIQQQ")  # argsz, flags, offset, address, size
_DMA_UNMAP = struct.Struct("=IIQQ")  # argsz, flags, address, size
_DMA_RW = struct.Struct("=QQ")  # address, count
_QEMU_DMA_RW = struct.Struct("=QI")  # address, count (QEMU's layout)
_QEMU_PAD = bytes(4)  # QEMU's DMA_READ/WRITE struct padding, part of its messages

DMA_MAP_FLAGS_KNOWN = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
DMA_UNMAP_FLAGS_KNOWN = DMA_UNMAP_FLAG_ALL


class DmaLayout(enum.Enum):
    """Wire layout a client uses for DMA_READ replies and DMA_WRITE requests and replies."""

    #: address u64, count u64, data; DMA_WRITE answered with address u64, count u64.
    SPEC = "spec"
    #: address u64, count u32, data, 4 zero bytes; DMA_WRITE answered header-only (QEMU).
    QEMU = "qemu"


def dma_rw_pieces(address: int, data: Buffer, layout: DmaLayout) -> tuple[Buffer, ...]:
    """A DMA_READ reply's or DMA_WRITE request's payload in ``layout``, in pieces to send as
    iovecs: the DMA header, ``data`` itself (not copied), and QEMU's padding. (What
    ``DmaReadReply`` / ``DmaWriteRequest.pack_pieces`` give, without the message object:
    the peers make one per message-DMA access.)"""
    if layout is DmaLayout.QEMU:
        return _QEMU_DMA_RW.pack(address, len(data)), data, _QEMU_PAD
    return _DMA_RW.pack(address, len(data)), data


def _pack_rw(address: int, data: Buffer, layout: DmaLayout) -> bytes:
    """A DMA_READ reply's or DMA_WRITE request's payload in ``layout``, joined."""
    return b"".join(dma_rw_pieces(address, data, layout))


def _empty_reply_unpack(cls: type[Message], payload: Buffer, fds: Sequence[int]) -> None:
    expect_no_fds(cls, fds)


# -- DMA_MAP ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DmaMapReply(Reply):
    """DMA_MAP reply: no payload (any received is ignored)."""

    COMMAND: ClassVar[Command] = Command.DMA_MAP

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        _empty_reply_unpack(cls, payload, fds)
        return cls()


@dataclass(frozen=True, slots=True)
class DmaMapRequest(Request):
    """Make ``[address, address+size)`` of client memory available to the server.

    With one fd the region is mmap-able at ``offset`` of that fd; with none it
    is served by DMA_READ/DMA_WRITE messages.
    """

    COMMAND: ClassVar[Command] = Command.DMA_MAP
    REPLY: ClassVar[type[Message]] = DmaMapReply
    SIZE: ClassVar[int] = _DMA_MAP.size

    address: int
    size: int
    flags: int = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
    offset: int = 0
    fds: tuple[int, ...] = ()
    argsz: int = _DMA_MAP.size

    @property
    def fd(self) -> int | None:
        return self.fds[0] if self.fds else None

    @property
    def readable(self) -> bool:
        return bool(self.flags & DMA_MAP_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & DMA_MAP_FLAG_WRITE)

    def pack(self) -> bytes:
        return _DMA_MAP.pack(self.argsz, self.flags, self.offset, self.address, self.size)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_min_size(cls, payload, _DMA_MAP.size)
        argsz, flags, offset, address, size = _DMA_MAP.unpack_from(payload)
        expect_argsz(cls, argsz, _DMA_MAP.size)
        if flags & ~DMA_MAP_FLAGS_KNOWN:
            fail(cls, f"unknown flags {flags:#x}")
        if len(fds) > 1:
            fail(cls, f"{len(fds)} fds, at most 1 expected")
        return cls(address, size, flags, offset, tuple(fds), argsz)


# -- DMA_UNMAP ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DmaUnmapReply(Reply):
    """DMA_UNMAP reply: the request's 24-byte entry, echoed."""

    COMMAND: ClassVar[Command] = Command.DMA_UNMAP

    address: int
    size: int
    flags: int = 0
    argsz: int = _DMA_UNMAP.size

    def pack(self) -> bytes:
        return _DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, _DMA_UNMAP.size)
        argsz, flags, address, size = _DMA_UNMAP.unpack_from(payload)
        return cls(address, size, flags, argsz)


@dataclass(frozen=True, slots=True)
class DmaUnmapRequest(Request):
    """Withdraw a DMA region (exact match), or all of them with ``unmap_all``."""

    COMMAND: ClassVar[Command] = Command.DMA_UNMAP
    REPLY: ClassVar[type[Message]] = DmaUnmapReply

    address: int
    size: int
    flags: int = 0
    argsz: int = _DMA_UNMAP.size

    @property
    def unmap_all(self) -> bool:
        return bool(self.flags & DMA_UNMAP_FLAG_ALL)

    def reply(self) -> DmaUnmapReply:
        """The success reply: this entry echoed."""
        return DmaUnmapReply(self.address, self.size, self.flags, self.argsz)

    def pack(self) -> bytes:
        return _DMA_UNMAP.pack(self.argsz, self.flags, self.address, self.size)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, _DMA_UNMAP.size)
        argsz, flags, address, size = _DMA_UNMAP.unpack_from(payload)
        expect_argsz(cls, argsz, _DMA_UNMAP.size)
        if flags & ~DMA_UNMAP_FLAGS_KNOWN:
            fail(cls, f"unknown flags {flags:#x}")
        if flags & DMA_UNMAP_FLAG_ALL and (address or size):
            fail(cls, "UNMAP_ALL requires address = size = 0")
        return cls(address, size, flags, argsz)


# -- DMA_READ -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DmaReadReply(Reply):
    """Data read from client memory. ``layout`` chooses the wire form (default: spec)."""

    COMMAND: ClassVar[Command] = Command.DMA_READ

    address: int
    #: bytes when decoded (a view with ``parse_reply(copy=False)``); any byte buffer to
    #: pack (``pack`` copies it once, ``pack_pieces`` not at all).
    data: Buffer
    layout: DmaLayout = DmaLayout.SPEC

    @property
    def count(self) -> int:
        return len(self.data)

    def pack(self) -> bytes:
        return _pack_rw(self.address, self.data, self.layout)

    def pack_pieces(self) -> tuple[Buffer, ...]:
        """The payload as ``pack`` makes it, in pieces to send as iovecs (``data`` itself
        among them, uncopied: it must stay unchanged until sent)."""
        return dma_rw_pieces(self.address, self.data, self.layout)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        """Decode without knowing the request: the spec layout only."""
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, _DMA_RW.size)
        address, count = _DMA_RW.unpack_from(payload)
        if len(payload) - _DMA_RW.size != count:
            fail(cls, f"count {count} but {len(payload) - _DMA_RW.size} data bytes")
        return cls(address, bytes(payload[_DMA_RW.size :]))


def dma_read_reply_layouts(payload: Buffer, count: int) -> frozenset[DmaLayout]:
    """The layouts a DMA_READ reply to a request for ``count`` bytes fits: none, one or both.

    Both layouts make a 16 + count byte payload. The spec layout has u64 count
    at offset 8; QEMU's has u32 count at 8, data at 12 and 4 zero bytes at the
    end. Both fit only when bytes 12-15 and the last 4 are zero (as QEMU sees
    it: data bytes 0-3 are zero); one that fits alone is the peer's layout.
    """
    if len(payload) != _DMA_RW.size + count:
        return frozenset()
    fits = set()
    if _DMA_RW.unpack_from(payload)[1] == count:
        fits.add(DmaLayout.SPEC)
    if _QEMU_DMA_RW.unpack_from(payload)[1] == count and payload[len(payload) - 4 :] == _QEMU_PAD:
        fits.add(DmaLayout.QEMU)
    return frozenset(fits)


def detect_dma_read_layout(payload: Buffer, count: int) -> DmaLayout | None:
    """The only layout that fits, SPEC when both fit, None when neither does."""
    fits = dma_read_reply_layouts(payload, count)
    if DmaLayout.SPEC in fits:
        return DmaLayout.SPEC
    return DmaLayout.QEMU if fits else None


@dataclass(frozen=True, slots=True)
class DmaReadRequest(Request):
    """Server -> client: read ``count`` bytes at DMA ``address``."""

    COMMAND: ClassVar[Command] = Command.DMA_READ
    REPLY: ClassVar[type[Message]] = DmaReadReply

    address: int
    count: int

    def pack(self) -> bytes:
        return _DMA_RW.pack(self.address, self.count)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        return cls(*dma_read_request_fields(payload))

    def parse_reply(
        self,
        payload: Buffer,
        fds: Sequence[int] = (),
        *,
        layout: DmaLayout | None = None,
        copy: bool = True,
    ) -> DmaReadReply:
        """Decode the reply; it must carry exactly ``count`` bytes.

        With ``layout=None`` the layout is detected (``detect_dma_read_layout``);
        the ambiguous case reads as the spec layout, which is wrong for QEMU: a
        session that does not know its peer's layout yet checks
        ``dma_read_reply_layouts`` first and learns it another way when both fit.
        With ``copy=False`` ``data`` is a read-only view of ``payload`` (valid while
        ``payload`` is), else ``bytes``.
        """
        expect_no_fds(DmaReadReply, fds)
        chosen = layout or detect_dma_read_layout(payload, self.count)
        data = dma_read_reply_data(payload, self.address, self.count, chosen)
        assert chosen is not None  # (None: dma_read_reply_data refused the reply)
        return DmaReadReply(self.address, bytes(data) if copy else data, chosen)


def dma_read_request_fields(payload: Buffer) -> tuple[int, int]:
    """The address and count of a DMA_READ request (``DmaReadRequest.unpack`` without the
    object, and without the fds' check)."""
    expect_min_size(DmaReadRequest, payload, _DMA_RW.size)
    return _DMA_RW.unpack_from(payload)


def dma_read_request_payload(address: int, count: int) -> bytes:
    """A DMA_READ request's payload (``DmaReadRequest(address, count).pack()``, without
    the object: the server sends one per message-DMA access)."""
    return _DMA_RW.pack(address, count)


def dma_read_reply_data(
    payload: Buffer, address: int, count: int, layout: DmaLayout | None
) -> memoryview:
    """The data of a DMA_READ reply in ``layout`` to a request for ``count`` bytes at
    ``address``, as a read-only view of ``payload``; ProtocolError unless it carries exactly
    those bytes and echoes the request (``DmaReadRequest.parse_reply``'s rule, without
    objects: this runs once per message-DMA read). ``layout=None`` detects it
    (``detect_dma_read_layout``: the spec's when both fit)."""
    if layout is None:
        layout = detect_dma_read_layout(payload, count)
    # (QEMU's header is 4 bytes shorter, and 4 bytes of padding follow its data.)
    if layout is None or len(payload) != _DMA_RW.size + count:
        expect_min_size(DmaReadReply, payload, _DMA_RW.size)
        fail(DmaReadReply, f"reply does not carry the {count} bytes requested")
    head = _QEMU_DMA_RW if layout is DmaLayout.QEMU else _DMA_RW
    echoed, echoed_count = head.unpack_from(payload)
    if echoed != address or echoed_count != count:
        fail(
            DmaReadReply,
            f"reply {echoed:#x}+{echoed_count:#x} does not echo {address:#x}+{count:#x}",
        )
    start = head.size
    return memoryview(payload).toreadonly()[start : start + count]


# -- DMA_WRITE ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DmaWriteReply(Reply):
    """DMA_WRITE reply: {address u64, count u64} echoed (12 bytes, u32 count, accepted too).

    With ``layout=DmaLayout.QEMU`` it packs to nothing, as QEMU answers. ``unpack``
    reads the spec layout only; ``DmaWriteRequest.parse_reply`` knows both.
    """

    COMMAND: ClassVar[Command] = Command.DMA_WRITE

    address: int
    count: int
    layout: DmaLayout = DmaLayout.SPEC

    def pack(self) -> bytes:
        return dma_write_reply_payload(self.address, self.count, self.layout)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        return cls(*_dma_write_echo(payload))


@dataclass(frozen=True, slots=True)
class DmaWriteRequest(Request):
    """Server -> client: write ``data`` at DMA ``address``, laid out in ``layout``."""

    COMMAND: ClassVar[Command] = Command.DMA_WRITE
    REPLY: ClassVar[type[Message]] = DmaWriteReply

    address: int
    #: bytes when decoded (a view with ``unpack_as(copy=False)``); any byte buffer to
    #: pack (``pack`` copies it once, ``pack_pieces`` not at all).
    data: Buffer
    layout: DmaLayout = DmaLayout.SPEC

    @property
    def count(self) -> int:
        return len(self.data)

    def pack(self) -> bytes:
        return _pack_rw(self.address, self.data, self.layout)

    def pack_pieces(self) -> tuple[Buffer, ...]:
        """The payload as ``pack`` makes it, in pieces to send as iovecs (``data`` itself
        among them, uncopied: it must stay unchanged until sent)."""
        return dma_rw_pieces(self.address, self.data, self.layout)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        """Decode the spec layout: exactly ``count`` data bytes (the length is the data's)."""
        return cls.unpack_as(payload, fds, DmaLayout.SPEC)

    @classmethod
    def unpack_as(
        cls, payload: Buffer, fds: Sequence[int], layout: DmaLayout, *, copy: bool = True
    ) -> Self:
        """Decode in ``layout``; QEMU's is read as QEMU reads it (to imitate QEMU).

        QEMU wants at least its 32-byte struct (payload 16) and count <= payload - 16,
        and takes ``count`` bytes from offset 12, so a spec-layout message reaches it
        shifted by 4 bytes: an imitation that is stricter would hide that. With
        ``copy=False`` ``data`` is a read-only view of ``payload`` (no copy of a large
        write; valid while ``payload`` is), else ``bytes``.
        """
        expect_no_fds(cls, fds)
        address, data = dma_write_request_fields(payload, layout)
        return cls(address, bytes(data) if copy else data, layout)

    def parse_reply(self, payload: Buffer, fds: Sequence[int] = ()) -> DmaWriteReply:
        """Decode the reply in this request's layout; it must echo address and count.

        QEMU's reply must be empty: exact, since the length is what tells the layouts
        apart. A spec reply must echo the request (libvfio-user checks this too).
        """
        expect_no_fds(DmaWriteReply, fds)
        check_dma_write_reply(payload, self.address, self.count, self.layout)
        if self.layout is DmaLayout.QEMU:
            return DmaWriteReply(self.address, self.count, DmaLayout.QEMU)
        return DmaWriteReply.unpack(payload)


def dma_write_request_fields(payload: Buffer, layout: DmaLayout) -> tuple[int, memoryview]:
    """The address and data (a read-only view of ``payload``) of a DMA_WRITE request in
    ``layout``: ``DmaWriteRequest.unpack_as`` without the object, and without the fds'
    check. QEMU's layout is read as QEMU reads it (see ``unpack_as``)."""
    expect_min_size(DmaWriteRequest, payload, _DMA_RW.size)
    if layout is DmaLayout.SPEC:
        address, count = _DMA_RW.unpack_from(payload)
        if len(payload) - _DMA_RW.size != count:
            fail(DmaWriteRequest, f"count {count} but {len(payload) - _DMA_RW.size} data bytes")
        start = _DMA_RW.size
    else:
        address, count = _QEMU_DMA_RW.unpack_from(payload)
        if count > len(payload) - _DMA_RW.size:
            fail(
                DmaWriteRequest,
                f"count {count} but room for {len(payload) - _DMA_RW.size} data bytes",
            )
        start = _QEMU_DMA_RW.size
    return address, memoryview(payload).toreadonly()[start : start + count]


def dma_write_reply_payload(address: int, count: int, layout: DmaLayout) -> bytes:
    """The reply to a DMA_WRITE of ``count`` bytes at ``address``, in ``layout``:
    ``DmaWriteReply.pack`` without the object (QEMU answers with the header alone)."""
    return b"" if layout is DmaLayout.QEMU else _DMA_RW.pack(address, count)


def _dma_write_echo(payload: Buffer) -> tuple[int, int]:
    """The address and count a spec-layout DMA_WRITE reply echoes (u64 count, or the spec
    table's u32)."""
    if len(payload) >= _DMA_RW.size:
        return _DMA_RW.unpack_from(payload)
    if len(payload) >= _QEMU_DMA_RW.size:
        return _QEMU_DMA_RW.unpack_from(payload)
    fail(DmaWriteReply, f"payload of {len(payload)} bytes, expected 12 or 16")


def check_dma_write_reply(payload: Buffer, address: int, count: int, layout: DmaLayout) -> None:
    """ProtocolError unless ``payload`` is the reply in ``layout`` to a DMA_WRITE of
    ``count`` bytes at ``address`` (``DmaWriteRequest.parse_reply``'s rule, without objects:
    this runs once per message-DMA write).

    QEMU's reply must be empty: exact, since the length is what tells the layouts apart. A
    spec reply must echo the request (libvfio-user checks this too); its count may be the
    spec table's u32 (12 bytes), as ``DmaWriteReply.unpack`` reads it.
    """
    if layout is DmaLayout.QEMU:
        if len(payload):
            fail(DmaWriteReply, f"{len(payload)} bytes where QEMU's layout answers none")
        return
    echoed, echoed_count = _dma_write_echo(payload)
    if echoed != address or echoed_count != count:
        fail(
            DmaWriteReply,
            f"reply {echoed:#x}+{echoed_count:#x} does not echo {address:#x}+{count:#x}",
        )


def dma_write_probe(address: int) -> DmaWriteRequest:
    """A zero-length DMA_WRITE: the same 16 bytes in both layouts, and writes nothing.

    QEMU accepts it (its struct's 32 bytes, count 0 <= 0; writing 0 bytes is a no-op)
    and answers header-only; a spec peer echoes {address, 0}.
    """
    return DmaWriteRequest(address, b"")


def detect_dma_write_layout(payload: Buffer, fds: Sequence[int], address: int) -> DmaLayout:
    """The layout the reply to ``dma_write_probe(address)`` reveals (ProtocolError if none)."""
    layout = DmaLayout.SPEC if len(payload) else DmaLayout.QEMU
    DmaWriteRequest(address, b"", layout).parse_reply(payload, fds)
    return layout
