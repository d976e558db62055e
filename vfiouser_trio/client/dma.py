"""The client's DMA maps, and how it serves the server's DMA_READ / DMA_WRITE.

Every ``dma_map`` is recorded here *before* the DMA_MAP request is sent, because the server
may start DMA as soon as it has processed the map, which can be before its reply reaches us
(certainly so with twin sockets). A map leaves the table once the server has confirmed the
unmap, because until then the server may still be finishing DMA on it.

Errors answered to the server (chosen to match the kernel's and QEMU's conventions):

* EINVAL: a malformed request, ``count`` above the ``max_data_xfer_size`` we advertised, or
  a range that runs past the end of the 64-bit address space;
* EFAULT: any byte of the range is outside our maps, or the map forbids the access (a
  DMA_READ from a map without READ, a DMA_WRITE to one without WRITE), or the memory behind
  the map was closed.

A range may span several adjacent maps; each byte is checked against the map holding it.
Zero-length requests succeed without touching memory. The server is not trusted: the count
is checked before anything is allocated (and the engine never buffers a message above our
receive limit), so no request can make the client hold more than ``max_data_xfer_size``.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Iterator
from dataclasses import dataclass

from ..engine import HandlerResult, RawMessage
from ..protocol._util import expect_no_fds
from ..protocol.constants import Command
from ..protocol.dma import (
    DmaLayout,
    DmaReadRequest,
    DmaWriteRequest,
    dma_read_request_fields,
    dma_rw_pieces,
    dma_write_reply_payload,
    dma_write_request_fields,
)
from ..protocol.errors import VfioUserError, command_name
from ..protocol.framing import Frame
from ..protocol.region_io import check_count
from .dirty import ClientWrites
from .guest_memory import GuestMemory

__all__ = ["DmaMap", "DmaMaps", "DmaService"]

#: One past the last IOVA.
_IOVA_END = 1 << 64
_DMA_READ = int(Command.DMA_READ)
_DMA_WRITE = int(Command.DMA_WRITE)


@dataclass(frozen=True, slots=True)
class DmaMap:
    """One DMA window: ``[iova, iova + size)`` backed by ``memory`` from ``offset``."""

    iova: int
    size: int
    memory: GuestMemory
    offset: int = 0
    readable: bool = True
    writable: bool = True
    #: True when the server got the memfd (and accesses the memory directly).
    shared: bool = True

    @property
    def end(self) -> int:
        return self.iova + self.size

    def overlaps(self, iova: int, size: int) -> bool:
        return iova < self.end and self.iova < iova + size


class DmaMaps:
    """The client's DMA maps, sorted by IOVA and never overlapping."""

    #: Where ``write`` marks the pages it writes, while dirty logging runs (set by Client).
    written: ClientWrites | None = None

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._maps: list[DmaMap] = []

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self) -> Iterator[DmaMap]:
        return iter(tuple(self._maps))

    def add(self, dma_map: DmaMap) -> None:
        """Record a map; ValueError if it overlaps one already recorded."""
        clash = next((m for m in self._maps if m.overlaps(dma_map.iova, dma_map.size)), None)
        if clash is not None:
            raise ValueError(
                f"DMA range {dma_map.iova:#x}+{dma_map.size:#x} overlaps the map at "
                f"{clash.iova:#x}+{clash.size:#x}"
            )
        i = bisect.bisect_left(self._starts, dma_map.iova)
        self._starts.insert(i, dma_map.iova)
        self._maps.insert(i, dma_map)

    def remove(self, dma_map: DmaMap) -> None:
        """Forget ``dma_map`` (no error if it is not recorded)."""
        for i, m in enumerate(self._maps):
            if m is dma_map:
                del self._starts[i], self._maps[i]
                return

    def find_exact(self, iova: int, size: int) -> DmaMap | None:
        return next((m for m in self._maps if m.iova == iova and m.size == size), None)

    def clear(self) -> None:
        self._starts.clear()
        self._maps.clear()

    def _segments(self, iova: int, count: int, *, write: bool) -> list[tuple[DmaMap, int, int]]:
        """(map, offset in its memory, length) pieces covering the range; EFAULT if any gap."""
        pieces: list[tuple[DmaMap, int, int]] = []
        address, end = iova, iova + count
        i = bisect.bisect_right(self._starts, address) - 1
        while address < end:
            m = self._maps[i] if 0 <= i < len(self._maps) else None
            if m is None or not m.iova <= address < m.end:
                raise VfioUserError(errno.EFAULT, f"DMA address {address:#x} is not mapped")
            if not (m.writable if write else m.readable):
                what = "write" if write else "read"
                raise VfioUserError(errno.EFAULT, f"DMA map at {m.iova:#x} forbids {what}")
            length = min(end, m.end) - address
            pieces.append((m, m.offset + address - m.iova, length))
            address += length
            i += 1
        return pieces

    def read(self, iova: int, count: int) -> bytes:
        """Copy ``count`` bytes at ``iova`` (VfioUserError EFAULT if not allowed)."""
        parts = self._read_views(iova, count)
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def _read_views(self, iova: int, count: int) -> list[memoryview]:
        """Views of the memory under [iova, iova+count), one per map (checked as ``read``).

        Each holds its GuestMemory open (``close`` raises BufferError) until released."""
        return [
            _view(m)[offset : offset + length]
            for m, offset, length in self._segments(iova, count, write=False)
        ]

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``iova`` (VfioUserError EFAULT if not allowed)."""
        segments = self._segments(iova, len(data), write=True)
        done = 0
        for m, offset, length in segments:
            _view(m)[offset : offset + length] = data[done : done + length]
            done += length
        if self.written is not None:
            self.written.mark(iova, len(data))


def _view(m: DmaMap) -> memoryview:
    if m.memory.closed:
        raise VfioUserError(errno.EFAULT, f"memory behind the DMA map at {m.iova:#x} is closed")
    return m.memory.view


class DmaService:
    """Serves the server-to-client commands (DMA_READ, DMA_WRITE) from ``maps``.

    ``max_data_xfer_size`` is what the client advertised: larger requests get EINVAL.
    ``layout`` is how DMA_READ replies and DMA_WRITE requests and replies are laid out:
    ``DmaLayout.QEMU`` imitates QEMU (to test servers against it), reading DMA_WRITE data
    at offset 12 as QEMU does and answering header-only. ``read_layout`` is its former name.
    """

    def __init__(
        self,
        maps: DmaMaps,
        *,
        max_data_xfer_size: int,
        layout: DmaLayout = DmaLayout.SPEC,
        read_layout: DmaLayout | None = None,
    ) -> None:
        self.maps = maps
        self.max_data_xfer_size = max_data_xfer_size
        self.layout = read_layout or layout

    def handle(self, frame: Frame) -> HandlerResult:
        """The engine handler: answer one command from the server (at once: a plain
        function, so the engine runs no coroutine for it)."""
        # (Decoded and answered without message objects, as DmaReadRequest.unpack and
        # DmaWriteRequest.unpack_as would: this runs once per DMA message.)
        command = frame.header.command
        if command == _DMA_WRITE:
            if frame.fds:
                expect_no_fds(DmaWriteRequest, frame.fds)
            # The data stays a view of the frame: its one copy is into guest memory.
            address, data = dma_write_request_fields(frame.payload, self.layout)
            count = len(data)
        elif command == _DMA_READ:
            if frame.fds:
                expect_no_fds(DmaReadRequest, frame.fds)
            address, count = dma_read_request_fields(frame.payload)
        else:
            raise VfioUserError(errno.EINVAL, f"a client does not serve {command_name(command)}")
        if count > self.max_data_xfer_size:
            check_count(Command(command), count, self.max_data_xfer_size)
        if address + count > _IOVA_END:
            raise VfioUserError(
                errno.EINVAL,
                f"DMA range {address:#x}+{count:#x} wraps the address space",
                command=command,
            )
        if command == _DMA_READ:
            if not count:
                return RawMessage(dma_rw_pieces(address, b"", self.layout))
            parts = self.maps._read_views(address, count)
            if len(parts) == 1:
                # Sent straight from guest memory, the view one iovec of the reply: the engine
                # queues the reply before anything else runs (or joins the pieces when a
                # policy holds it) and the transport copies what the kernel does not take at
                # once, so the view is gone before any unmap or close can come.
                return RawMessage(dma_rw_pieces(address, parts[0], self.layout))
            try:
                joined = b"".join(parts)  # spanning maps: one copy, joined
            finally:
                for part in parts:
                    part.release()
            return RawMessage(dma_rw_pieces(address, joined, self.layout))
        if count:
            self.maps.write(address, data)
        return dma_write_reply_payload(address, count, self.layout)
