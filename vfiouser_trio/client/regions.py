"""What the client knows about a device region, and its mmap fast path.

A :class:`Region` holds the DEVICE_GET_REGION_INFO answer and, for a region the server lets
us mmap, the mapped areas: the whole region, or only the areas of its sparse-mmap
capability. An access that lies entirely inside one mapped area is done on that memory
without any message; everything else goes through REGION_READ / REGION_WRITE.

An area that cannot be mapped (fd refused by mmap, range past the end of the file, zero
size, outside the region) is logged and left to the message path: the fast path is an
optimisation, never a reason to fail.

The server is not trusted with our process either: a server that truncates its region
file under our mapping would make the next access through the mapping a SIGBUS. Each
fd is therefore checked (``fdcheck.require_memory_fd``: a memory file holding the area).
If its file cannot shrink (``F_SEAL_SHRINK`` is set, or we could add it:
``memory.forbid_shrinking``, permanent on the server's file, which can still grow) the
area has a zero-copy ``view``. A file that can still shrink (libvfio-user backs regions
with a plain temporary file) is mapped too, but reached only through the native guarded
copy (``Mapping.load`` / ``store``) that turns that SIGBUS into ``OSError(EFAULT)``: such
an area has no ``view``, and the client drops it at its first fault and goes on by
messages (logged at WARNING).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from ..eventfd import EventFd
from ..fdcheck import require_memory_fd
from ..memory import Mapping, Prot, forbid_shrinking, page_size
from ..protocol.constants import IO_FD_TYPE_IOEVENTFD
from ..protocol.errors import ProtocolError, VfioUserError
from ..protocol.framing import close_fds
from ..protocol.message import Message, Request
from ..protocol.regions import (
    RegionCap,
    RegionInfoReply,
    RegionTypeCap,
    SparseMmapArea,
)

__all__ = ["MappedArea", "Region", "RegionIoFd", "query_with_argsz"]

log = logging.getLogger(__name__)

#: Largest reply ``argsz`` the client follows up on (a guard against absurd server answers).
MAX_ARGSZ = 1 << 20

R = TypeVar("R", bound=Message)


async def query_with_argsz(
    send: Callable[[Request], Awaitable[Message]],
    make: Callable[[int], Request],
    first_argsz: int,
    reply_type: type[R],
) -> R:
    """Ask with ``first_argsz``; if the reply says it needs more, ask again with that size.

    This is the spec's argsz dance ("Message sizes"): a reply whose ``argsz`` exceeds what we
    offered was cut short and is asked for again, once.
    """
    argsz = first_argsz
    for _attempt in range(2):
        reply = await send(make(argsz))
        if not isinstance(reply, reply_type):
            raise TypeError(f"expected {reply_type.__name__}, got {type(reply).__name__}")
        needed = getattr(reply, "argsz", None)
        if not isinstance(needed, int) or needed <= argsz:
            return reply
        if needed > MAX_ARGSZ:
            close_fds(reply.fds)
            raise ProtocolError(f"reply asks for argsz {needed}, above {MAX_ARGSZ}")
        close_fds(reply.fds)
        argsz = needed
    raise ProtocolError(f"reply still cut short with argsz {argsz}")


@dataclass(frozen=True, slots=True, eq=False)
class MappedArea:
    """Part of a region mapped into this process: region bytes ``[offset, offset + size)``.

    ``view`` is the memory itself, or None when the server's file can still shrink: then
    :meth:`read` and :meth:`write` go through guarded copies, which raise ``OSError``
    (EFAULT) instead of a SIGBUS if the file was cut short.
    """

    offset: int
    size: int
    view: memoryview | None
    mapping: Mapping
    #: Where the area starts in ``mapping`` (mmap maps from the page below it).
    lead: int = 0

    def covers(self, offset: int, count: int) -> bool:
        return self.offset <= offset and offset + count <= self.offset + self.size

    def read(self, start: int, count: int) -> bytes:
        """``count`` bytes at ``start`` of the area (OSError only for a guarded area)."""
        if self.view is not None:
            return bytes(self.view[start : start + count])
        return self.mapping.load(self.lead + start, count)

    def write(self, start: int, data: bytes) -> None:
        """Store ``data`` at ``start`` of the area (OSError only for a guarded area)."""
        if self.view is not None:
            self.view[start : start + len(data)] = data
        else:
            self.mapping.store(self.lead + start, data)

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
        try:
            self.mapping.close()
        except BufferError:
            # Someone still holds a slice of the view: the mapping goes when that does.
            log.debug("area %#x+%#x unmapped later: views remain", self.offset, self.size)


class Region:
    """One device region: its info (``info``, without fds) and its mapped areas."""

    def __init__(self, info: RegionInfoReply, areas: Sequence[MappedArea] = ()) -> None:
        self.info = info
        self.areas = tuple(areas)

    @classmethod
    def from_reply(cls, reply: RegionInfoReply) -> Region:
        """Build from a region-info reply, mapping what may be mapped; takes the reply's fds."""
        try:
            areas = _map_areas(reply)
        finally:
            close_fds(reply.fds)
        return cls(replace(reply, fds=()), areas)

    @property
    def index(self) -> int:
        return self.info.index

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def flags(self) -> int:
        return self.info.flags

    @property
    def readable(self) -> bool:
        return self.info.readable

    @property
    def writable(self) -> bool:
        return self.info.writable

    @property
    def mmappable(self) -> bool:
        return self.info.mmappable

    @property
    def caps(self) -> tuple[RegionCap, ...]:
        return self.info.caps

    @property
    def sparse_areas(self) -> tuple[SparseMmapArea, ...] | None:
        """The sparse-mmap areas, or None if the region has no such capability."""
        sparse = self.info.sparse_mmap
        return None if sparse is None else sparse.areas

    @property
    def region_type(self) -> RegionTypeCap | None:
        return self.info.region_type

    def mapped_area(self, offset: int, count: int) -> MappedArea | None:
        """The mapped area holding all of ``[offset, offset + count)``, if any."""
        return next((a for a in self.areas if a.covers(offset, count)), None)

    def drop_area(self, area: MappedArea, reason: BaseException) -> None:
        """Stop using ``area`` (its guarded copy faulted): later accesses go by messages."""
        log.warning(
            "region %d: area %#x+%#x faulted (%s): the server cut its file short; "
            "using REGION_READ/WRITE messages instead",
            self.index,
            area.offset,
            area.size,
            reason,
        )
        self.areas = tuple(a for a in self.areas if a is not area)
        area.close()

    def close(self) -> None:
        """Unmap the areas (idempotent)."""
        areas, self.areas = self.areas, ()
        for area in areas:
            area.close()

    def __repr__(self) -> str:
        return (
            f"<Region {self.index} size={self.size:#x} flags={self.flags:#x} "
            f"mapped={[(hex(a.offset), hex(a.size)) for a in self.areas]}>"
        )


def _map_areas(info: RegionInfoReply) -> list[MappedArea]:
    fds = info.fds
    if not info.mmappable or not fds:
        return []
    sparse = info.sparse_mmap
    spans = [(a.offset, a.size) for a in sparse.areas] if sparse else [(0, info.size)]
    prot = (Prot.READ if info.readable else Prot.NONE) | (
        Prot.WRITE if info.writable else Prot.NONE
    )
    areas: list[MappedArea] = []
    guarded_logged = False
    for i, (offset, size) in enumerate(spans):
        # libvfio-user sends one fd per sparse area (all of the same file); others send one.
        fd = fds[i] if len(fds) == len(spans) else fds[0]
        if size <= 0 or offset + size > info.size or prot == Prot.NONE:
            log.warning("region %d: area %#x+%#x not mapped", info.index, offset, size)
            continue
        # mmap wants a page-aligned file offset: map from the page below and skip the lead.
        file_offset = info.offset + offset
        try:
            file = require_memory_fd(fd, f"region {info.index}", end=file_offset + size)
        except VfioUserError as exc:
            log.warning("region %d: area %#x+%#x not mapped: %s", info.index, offset, size, exc)
            continue
        guarded = not forbid_shrinking(fd, file)
        if guarded and not guarded_logged:
            log.info(
                "region %d: the server's file can shrink (no F_SEAL_SHRINK): "
                "mapped, reached through SIGBUS-guarded copies only",
                info.index,
            )
            guarded_logged = True
        lead = file_offset % page_size()
        try:
            mapping = Mapping(fd, size + lead, offset=file_offset - lead, prot=prot)
        except (OSError, ValueError) as exc:
            log.warning("region %d: cannot map area %#x+%#x: %s", info.index, offset, size, exc)
            continue
        view = None if guarded else mapping.view[lead : lead + size]
        areas.append(MappedArea(offset, size, view, mapping, lead))
    return areas


@dataclass(frozen=True, slots=True, eq=False)
class RegionIoFd:
    """A sub-region from DEVICE_GET_REGION_IO_FDS and the fd the server listens on.

    For an ioeventfd (``type`` IO_FD_TYPE_IOEVENTFD) a hypervisor would register ``eventfd``
    with KVM for writes to ``[offset, offset + size)`` of the region (matching ``value`` when
    ``flags`` has DATAMATCH); ``ring()`` does what such a write would. Several sub-regions
    may share one EventFd. The client owns the EventFds and closes them when it exits.
    """

    region: int
    offset: int
    size: int
    type: int
    flags: int
    #: datamatch (ioeventfd) or user_data (ioregionfd).
    value: int
    eventfd: EventFd

    @property
    def is_ioeventfd(self) -> bool:
        return self.type == IO_FD_TYPE_IOEVENTFD

    def ring(self) -> None:
        """Signal the server, as a matching guest write caught by KVM would."""
        self.eventfd.signal()
