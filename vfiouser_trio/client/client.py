"""The vfio-user client: connect to a server and drive its device.

    async with connect("/run/dev.sock") as device:
        header = await device.config.header()
        await device.write(PciRegion.BAR0, 0x10, b"\\x01\\0\\0\\0")
        irq = (await device.enable_irqs(PciIrq.MSIX))[0]
        await irq.wait()

``connect`` negotiates (proposing twin sockets and write_multiple, and honouring what the
server answers), then reads the device info, every region's info (mapping what may be
mapped) and every IRQ index's info. Each call on :class:`Client` is one awaitable that
returns the result or raises :class:`VfioUserError` with the server's errno and the command;
when the connection is gone every pending and later call raises
:class:`~vfiouser_trio.engine.ConnectionClosedError`. Timeouts are the caller's
(``trio.fail_after``); a cancelled call leaves the connection usable. Calls may be made
concurrently from several tasks: they are pipelined on the socket.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from typing import TypeVar

import trio

from ..engine import Connection, ConnectionClosedError, ConnectionHooks, open_connection
from ..eventfd import EventFd
from ..ordering import OrderingPolicy
from ..protocol.capabilities import Capabilities, TwinSocket
from ..protocol.constants import (
    DEFAULT_MAX_DATA_XFER_SIZE,
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    DMA_UNMAP_FLAG_ALL,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    Feature,
    MigState,
    PciRegion,
)
from ..protocol.device_info import (
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DeviceResetReply,
    DeviceResetRequest,
)
from ..protocol.dma import (
    DmaLayout,
    DmaMapReply,
    DmaMapRequest,
    DmaUnmapReply,
    DmaUnmapRequest,
)
from ..protocol.errors import ProtocolError, VfioUserError
from ..protocol.features import (
    DeviceFeatureReply,
    DeviceFeatureRequest,
    DmaLoggingBitmap,
    DmaLoggingControl,
    DmaLoggingRange,
    DmaLoggingReport,
    MigDeviceState,
    MigrationInfo,
)
from ..protocol.framing import close_fds, max_msg_size_for
from ..protocol.irqs import IrqInfoReply, IrqInfoRequest, SetIrqsReply, SetIrqsRequest
from ..protocol.message import Message, Request
from ..protocol.migration_data import (
    MigDataReadReply,
    MigDataReadRequest,
    MigDataWriteReply,
    MigDataWriteRequest,
)
from ..protocol.region_io import (
    WRITE_MULTI_DATA_MAX,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteEntry,
    RegionWriteMultiReply,
    RegionWriteMultiRequest,
    RegionWriteReply,
    RegionWriteRequest,
)
from ..protocol.regions import (
    IO_FDS_SIZE,
    REGION_INFO_SIZE,
    RegionInfoReply,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
)
from ..protocol.version import Negotiated, VersionReply, VersionRequest, check_server_reply
from .config import PciConfig
from .dirty import DirtyLogging, DirtyPages
from .dma import DmaMap, DmaMaps, DmaService
from .guest_memory import GuestMemory
from .irqs import Interrupt, InterruptTable
from .regions import Region, RegionIoFd, query_with_argsz

__all__ = ["DEFAULT_CAPABILITIES", "Client", "connect"]

#: What the client proposes unless told otherwise: it accepts up to 16 fds per message (as
#: QEMU does; libvfio-user sends one fd per sparse area) and 1 MiB per data transfer.
DEFAULT_CAPABILITIES = Capabilities(max_msg_fds=16, max_data_xfer_size=DEFAULT_MAX_DATA_XFER_SIZE)

#: Size of one REGION_WRITE_MULTI entry on the wire.
_WRITE_MULTI_ENTRY_SIZE = 32

R = TypeVar("R", bound=Message)

#: Where to connect: a socket path, or an already connected AF_UNIX stream socket.
Target = str | os.PathLike[str] | socket.socket


@asynccontextmanager
async def connect(
    target: Target,
    *,
    twin_socket: bool = True,
    write_multiple: bool = True,
    capabilities: Capabilities | None = None,
    policy: OrderingPolicy | None = None,
    hooks: ConnectionHooks | None = None,
    dma_read_layout: DmaLayout = DmaLayout.SPEC,
) -> AsyncIterator[Client]:
    """Connect to a vfio-user server and yield a ready :class:`Client`.

    ``target`` is a socket path or a connected socket (which the client then owns).
    ``capabilities`` replaces :data:`DEFAULT_CAPABILITIES` as the proposal (limits, extra
    entries); ``twin_socket`` and ``write_multiple`` decide those two proposals. ``policy``
    and ``hooks`` go to the engine. ``dma_read_layout=DmaLayout.QEMU`` answers DMA_READ the
    way QEMU does (to test servers against it). A VERSION reply that does not fit the
    proposal closes the connection and raises ProtocolError. Leaving the block closes the
    connection, unmaps the regions and closes every fd the client owns.
    """
    proposal = replace(
        capabilities if capabilities is not None else DEFAULT_CAPABILITIES,
        twin_socket=TwinSocket(supported=True) if twin_socket else None,
        write_multiple=write_multiple,
    )
    sock = await _open_socket(target)
    maps = DmaMaps()
    dma = DmaService(
        maps, max_data_xfer_size=proposal.max_data_xfer_size, read_layout=dma_read_layout
    )
    async with open_connection(
        sock, handler=dma.handle, policy=policy, hooks=hooks, max_recv_fds=proposal.max_msg_fds
    ) as conn:
        client = Client(conn, maps)
        try:
            await client._start(proposal)
            yield client
        finally:
            client._release()


async def _open_socket(target: Target) -> socket.socket:
    if isinstance(target, socket.socket):
        await trio.lowlevel.checkpoint()
        return target
    stream = await trio.open_unix_socket(os.fspath(target))
    return socket.socket(fileno=stream.socket.detach())


def _chunks(offset: int, count: int, limit: int) -> Iterable[tuple[int, int]]:
    """(offset, length) pieces of at most ``limit`` bytes covering ``[offset, offset+count)``."""
    step = max(1, limit)
    for start in range(offset, offset + count, step):
        yield start, min(step, offset + count - start)


def _check_span(offset: int, count: int) -> None:
    if offset < 0 or count < 0:
        raise ValueError(f"negative offset or count ({offset}, {count})")


def _bool_bytes(select: Sequence[bool]) -> bytes:
    return bytes(1 if b else 0 for b in select)


class Client:
    """A connected vfio-user device, as seen by its client. Create it with :func:`connect`."""

    def __init__(self, connection: Connection, maps: DmaMaps) -> None:
        #: The engine connection, for raw requests (``connection.request(msg)``).
        self.connection = connection
        self._maps = maps
        self._irqs = InterruptTable()
        self._io_fds: list[EventFd] = []
        self.negotiated: Negotiated | None = None
        self.info = DeviceGetInfoReply(0, 0, 0)
        #: Every region by index, as DEVICE_GET_REGION_INFO described it.
        self.regions: dict[int, Region] = {}
        #: Every IRQ index's DEVICE_GET_IRQ_INFO answer.
        self.irq_info: dict[int, IrqInfoReply] = {}
        #: Dirty-page logging started by :meth:`start_dirty_logging`, while it is in force.
        self.dirty_logging: DirtyLogging | None = None

    # --- setup ----------------------------------------------------------------------------

    async def _start(self, proposal: Capabilities) -> None:
        await self._negotiate(proposal)
        self.info = await self._call(DeviceGetInfoRequest(), DeviceGetInfoReply)
        for index in range(self.info.num_regions):
            reply = await query_with_argsz(
                self.connection.request,
                partial(RegionInfoRequest, index),
                REGION_INFO_SIZE,
                RegionInfoReply,
            )
            region = Region.from_reply(reply)
            self.regions[index] = region
            if region.index != index:
                raise ProtocolError(f"region info for {region.index} when {index} was asked")
        for index in range(self.info.num_irqs):
            irq = await self._call(IrqInfoRequest(index), IrqInfoReply)
            if irq.index != index:
                raise ProtocolError(f"IRQ info for {irq.index} when {index} was asked")
            self.irq_info[index] = irq

    async def _negotiate(self, proposal: Capabilities) -> None:
        request = VersionRequest(capabilities=proposal)
        reply = await self._call(request, VersionReply)
        fds = reply.fds
        try:
            negotiated = check_server_reply(request, reply, len(fds))
        except BaseException:
            close_fds(fds)
            raise
        twin = negotiated.twin_fd_index
        close_fds(fd for i, fd in enumerate(fds) if i != twin)
        if twin is not None:
            self.connection.attach_twin(fds[twin], requests_on_twin=False)
        self.negotiated = negotiated
        self.connection.max_send_fds = negotiated.send_max_msg_fds
        # Replies to our reads carry up to the server's limit; its DMA requests up to ours.
        largest = max(negotiated.ours.max_data_xfer_size, negotiated.peer.max_data_xfer_size)
        self.connection.max_msg_size = max_msg_size_for(largest)

    def _release(self) -> None:
        """Close everything the client owns (on exit from ``connect``)."""
        self._irqs.close()
        io_fds, self._io_fds = self._io_fds, []
        for fd in io_fds:
            fd.close()
        for region in self.regions.values():
            region.close()
        self._maps.clear()

    async def _call(self, request: Request, reply_type: type[R]) -> R:
        reply = await self.connection.request(request)
        if not isinstance(reply, reply_type):  # pragma: no cover - parse_reply guarantees it
            raise ProtocolError(f"unexpected reply {type(reply).__name__}")
        return reply

    # --- state ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection has ended (server gone, or closed here)."""
        return self.connection.closed.is_set()

    async def wait_closed(self) -> None:
        """Wait until the connection ends."""
        await self.connection.wait_closed()

    def _negotiated(self) -> Negotiated:
        if self.negotiated is None:
            raise RuntimeError("the client has not negotiated yet")
        return self.negotiated

    @property
    def max_data_xfer_size(self) -> int:
        """Largest data transfer the server accepts (region accesses are split to fit)."""
        return self._negotiated().send_max_data_xfer_size

    @property
    def write_multiple(self) -> bool:
        """Whether REGION_WRITE_MULTI was negotiated."""
        return self._negotiated().write_multiple

    @property
    def twin_socket(self) -> bool:
        """Whether server-to-client commands travel on a twin socket."""
        return self._negotiated().twin_socket

    @property
    def config(self) -> PciConfig:
        """PCI configuration space helpers (region 7)."""
        region = self.regions.get(PciRegion.CONFIG)
        return PciConfig(self, size=region.size if region is not None else 256)

    @property
    def dma_maps(self) -> tuple[DmaMap, ...]:
        """The DMA maps in force (including ones whose DMA_MAP is still in flight)."""
        return tuple(self._maps)

    # --- region access --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionClosedError(errno=errno.ENOTCONN)

    def _mapped(
        self, region: int, offset: int, count: int, *, write: bool
    ) -> tuple[memoryview, int] | None:
        """The shared memory serving this access, if it may be done there."""
        known = self.regions.get(region)
        # An access the region's flags forbid goes to the server, which answers it.
        if known is None or not (known.writable if write else known.readable):
            return None
        area = known.mapped_area(offset, count)
        return None if area is None else (area.view, offset - area.offset)

    async def read(self, region: int, offset: int, count: int, *, use_mmap: bool = True) -> bytes:
        """Read ``count`` bytes at ``offset`` of ``region``.

        Inside a mapped area (and ``use_mmap``) this reads shared memory; otherwise it sends
        REGION_READ messages of at most the server's ``max_data_xfer_size`` each.
        """
        _check_span(offset, count)
        self._check_open()
        mapped = self._mapped(region, offset, count, write=False) if use_mmap else None
        if mapped is not None or count == 0:
            await trio.lowlevel.checkpoint()
            if mapped is None:
                return b""
            view, start = mapped
            return bytes(view[start : start + count])
        parts = []
        for start, length in _chunks(offset, count, self.max_data_xfer_size):
            reply = await self._call(RegionReadRequest(region, start, length), RegionReadReply)
            parts.append(reply.data)
        return b"".join(parts)

    async def write(
        self,
        region: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        use_mmap: bool = True,
    ) -> None:
        """Write ``data`` at ``offset`` of ``region`` (shared memory or REGION_WRITE, as read)."""
        data = bytes(data)
        _check_span(offset, len(data))
        self._check_open()
        mapped = self._mapped(region, offset, len(data), write=True) if use_mmap else None
        if mapped is not None or not data:
            await trio.lowlevel.checkpoint()
            if mapped is not None:
                view, start = mapped
                view[start : start + len(data)] = data
            return
        for start, length in _chunks(offset, len(data), self.max_data_xfer_size):
            piece = data[start - offset : start - offset + length]
            await self._call(RegionWriteRequest(region, start, piece), RegionWriteReply)

    async def write_multi(self, writes: Iterable[tuple[int, int, bytes]]) -> int:
        """Several small writes ``(region, offset, data of at most 8 bytes)``, in order.

        Sent as REGION_WRITE_MULTI when negotiated (split to fit the server's limit), else as
        one REGION_WRITE each. Returns how many writes the server reports completed.
        """
        entries = [RegionWriteEntry(r, o, bytes(d)) for r, o, d in writes]
        if any(len(e.data) > WRITE_MULTI_DATA_MAX for e in entries):
            raise ValueError(
                f"a REGION_WRITE_MULTI entry holds at most {WRITE_MULTI_DATA_MAX} bytes"
            )
        if not self.write_multiple:
            for e in entries:
                await self.write(e.region, e.offset, e.data, use_mmap=False)
            return len(entries)
        per_message = max(1, (self.max_data_xfer_size - 8) // _WRITE_MULTI_ENTRY_SIZE)
        done = 0
        for first in range(0, len(entries), per_message):
            batch = tuple(entries[first : first + per_message])
            reply = await self._call(RegionWriteMultiRequest(batch), RegionWriteMultiReply)
            done += reply.wr_cnt
            if reply.wr_cnt < len(batch):
                break
        return done

    # --- DMA ------------------------------------------------------------------------------

    async def dma_map(
        self,
        memory: GuestMemory,
        iova: int,
        *,
        offset: int = 0,
        size: int | None = None,
        readable: bool = True,
        writable: bool = True,
        share_fd: bool = True,
    ) -> DmaMap:
        """Make ``memory[offset : offset + size]`` the server's DMA window at ``iova``.

        With ``share_fd`` the memfd goes with DMA_MAP and the server accesses it directly;
        otherwise the server uses DMA_READ / DMA_WRITE, which this client serves from
        ``memory`` (checking the window and its permissions). ValueError if the window
        overlaps one of our maps; the map is withdrawn if the server refuses it.
        """
        if size is None:
            size = memory.size - offset
        if offset < 0 or size <= 0 or offset + size > memory.size or iova < 0:
            raise ValueError(f"DMA window {offset:#x}+{size:#x} does not fit {memory!r}")
        dma_map = DmaMap(iova, size, memory, offset, readable, writable, share_fd)
        flags = (DMA_MAP_FLAG_READ if readable else 0) | (DMA_MAP_FLAG_WRITE if writable else 0)
        fds = (memory.fileno(),) if share_fd else ()
        request = DmaMapRequest(iova, size, flags, offset if share_fd else 0, fds)
        self._check_open()
        # Recorded first: the server may DMA before its reply reaches us.
        self._maps.add(dma_map)
        try:
            await self._call(request, DmaMapReply)
        except BaseException:
            self._maps.remove(dma_map)
            raise
        return dma_map

    async def dma_unmap(self, iova: int, size: int) -> None:
        """Withdraw the DMA window ``[iova, iova + size)`` (it must match a map exactly)."""
        await self._call(DmaUnmapRequest(iova, size), DmaUnmapReply)
        dma_map = self._maps.find_exact(iova, size)
        if dma_map is not None:
            self._maps.remove(dma_map)

    async def dma_unmap_all(self) -> None:
        """Withdraw every DMA window at once (VFIO_DMA_UNMAP_FLAG_ALL, as QEMU does)."""
        await self._call(DmaUnmapRequest(0, 0, DMA_UNMAP_FLAG_ALL), DmaUnmapReply)
        self._maps.clear()

    # --- interrupts -----------------------------------------------------------------------

    async def set_irqs(
        self,
        index: int,
        start: int,
        count: int,
        flags: int,
        *,
        eventfds: Sequence[EventFd | int] = (),
        data: bytes | Sequence[bool] = b"",
    ) -> None:
        """Send DEVICE_SET_IRQS as given (the client keeps its eventfds; the server gets copies)."""
        fds = tuple(e if isinstance(e, int) else e.fileno() for e in eventfds)
        payload = bytes(data) if isinstance(data, (bytes, bytearray)) else _bool_bytes(data)
        await self._call(SetIrqsRequest(index, flags, start, count, payload, fds), SetIrqsReply)

    async def enable_irqs(
        self, index: int, count: int | None = None, *, start: int = 0
    ) -> list[Interrupt]:
        """Give the server a fresh eventfd for each vector ``start .. start+count-1``.

        ``count`` defaults to the rest of the index. Replaces (and closes) eventfds given
        before for those vectors. Split into several SET_IRQS when the server accepts fewer
        fds per message.
        """
        if count is None:
            count = self.irq_info[index].count - start
        interrupts = [Interrupt(index, start + i, EventFd()) for i in range(count)]
        try:
            step = max(1, self.connection.max_send_fds)
            for first in range(0, count, step):
                batch = interrupts[first : first + step]
                await self.set_irqs(
                    index,
                    start + first,
                    len(batch),
                    IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
                    eventfds=[irq.eventfd for irq in batch],
                )
        except BaseException:
            for irq in interrupts:
                irq.close()
            raise
        self._irqs.install(interrupts)
        return interrupts

    async def disable_irqs(self, index: int) -> None:
        """Disable every vector of ``index`` (count 0) and close our eventfds for it."""
        await self.set_irqs(index, 0, 0, IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE)
        self._irqs.drop(index)

    def irq(self, index: int, vector: int = 0) -> Interrupt:
        """The enabled interrupt ``vector`` of ``index`` (LookupError if not enabled)."""
        return self._irqs.get(index, vector)

    async def _irq_action(
        self, action: int, index: int, start: int, count: int, select: Sequence[bool] | None
    ) -> None:
        if select is None:
            await self.set_irqs(index, start, count, action | IRQ_SET_DATA_NONE)
        else:
            await self.set_irqs(index, start, len(select), action | IRQ_SET_DATA_BOOL, data=select)

    async def mask_irqs(
        self, index: int, start: int = 0, count: int = 1, *, select: Sequence[bool] | None = None
    ) -> None:
        """Mask vectors ``start ..`` (DATA_NONE), or those ``select`` marks (DATA_BOOL)."""
        await self._irq_action(IRQ_SET_ACTION_MASK, index, start, count, select)

    async def unmask_irqs(
        self, index: int, start: int = 0, count: int = 1, *, select: Sequence[bool] | None = None
    ) -> None:
        """Unmask vectors (see :meth:`mask_irqs`); pending interrupts are then delivered."""
        await self._irq_action(IRQ_SET_ACTION_UNMASK, index, start, count, select)

    async def trigger_irqs(
        self, index: int, start: int = 0, count: int = 1, *, select: Sequence[bool] | None = None
    ) -> None:
        """Ask the server to raise vectors itself (ACTION_TRIGGER with DATA_NONE / DATA_BOOL)."""
        await self._irq_action(IRQ_SET_ACTION_TRIGGER, index, start, count, select)

    # --- other commands -------------------------------------------------------------------

    async def reset(self) -> None:
        """DEVICE_RESET."""
        await self._call(DeviceResetRequest(), DeviceResetReply)

    async def region_io_fds(self, region: int) -> list[RegionIoFd]:
        """The sub-regions of ``region`` the server serves through fds (ioeventfds).

        Each comes with an EventFd owned by the client; signal it (``ring()``) to do what a
        guest write caught by KVM would. Sub-regions outside the region are a ProtocolError.
        """
        reply = await query_with_argsz(
            self.connection.request,
            partial(RegionIoFdsRequest, region),
            IO_FDS_SIZE,
            RegionIoFdsReply,
        )
        known = self.regions.get(region)
        for sub in reply.sub_regions:
            if known is not None and sub.offset + sub.size > known.size:
                close_fds(reply.fds)
                raise ProtocolError(
                    f"io fd sub-region {sub.offset:#x}+{sub.size:#x} beyond region {region}"
                )
        owned: list[EventFd] = []
        try:
            for fd in reply.fds:
                owned.append(EventFd.from_fd(fd))
        except BaseException:
            for eventfd in owned:
                eventfd.close()
            close_fds(reply.fds[len(owned) :])
            raise
        self._io_fds.extend(owned)
        return [
            RegionIoFd(region, s.offset, s.size, s.TYPE, s.flags, s.value, owned[s.fd_index])
            for s in reply.sub_regions
        ]

    # --- migration ------------------------------------------------------------------------

    async def _feature(self, request: DeviceFeatureRequest) -> DeviceFeatureReply:
        return await self._call(request, DeviceFeatureReply)

    async def supports_feature(
        self, feature: Feature, *, get: bool = False, set: bool = False
    ) -> bool:
        """Whether the device supports ``feature`` for GET and/or SET (a DEVICE_FEATURE PROBE).

        False when the server answers EINVAL; other errors are raised.
        """
        try:
            await self._feature(DeviceFeatureRequest.probe(feature, get=get, set=set))
        except VfioUserError as exc:
            if exc.errno == errno.EINVAL and not isinstance(exc, ConnectionClosedError):
                return False
            raise
        return True

    async def migration_info(self) -> MigrationInfo:
        """The device's migration flags (VFIO_DEVICE_FEATURE_MIGRATION GET).

        EINVAL (VfioUserError) from a device that cannot migrate.
        """
        reply = await self._feature(DeviceFeatureRequest.get(Feature.MIGRATION))
        if not isinstance(reply.data, MigrationInfo):  # pragma: no cover - decoder guarantees
            raise ProtocolError("MIGRATION reply without migration flags")
        return reply.data

    async def migration_state(self) -> MigState:
        """The device's migration state (MIG_DEVICE_STATE GET)."""
        reply = await self._feature(DeviceFeatureRequest.get(Feature.MIG_DEVICE_STATE))
        if not isinstance(reply.data, MigDeviceState):  # pragma: no cover - decoder guarantees
            raise ProtocolError("MIG_DEVICE_STATE reply without a state")
        try:
            return MigState(reply.data.device_state)
        except ValueError:
            raise ProtocolError(f"unknown migration state {reply.data.device_state}") from None

    async def set_migration_state(self, state: MigState) -> None:
        """Move the device to ``state`` (MIG_DEVICE_STATE SET; the server runs the whole path).

        After a failure the device may be part way along the path: ask ``migration_state()``.
        """
        await self._feature(
            DeviceFeatureRequest.set(Feature.MIG_DEVICE_STATE, MigDeviceState(state))
        )

    async def read_migration_data(self, size: int | None = None) -> bytes:
        """Up to ``size`` bytes (default and limit: ``max_data_xfer_size``) of the device's
        outgoing migration stream (MIG_DATA_READ). Fewer bytes mean the stream has nothing
        more (for now, in PRE_COPY)."""
        limit = self.max_data_xfer_size
        size = limit if size is None else size
        if not 0 <= size <= limit:
            raise ValueError(f"a migration data read takes 0 to {limit} bytes, not {size}")
        reply = await self._call(MigDataReadRequest(size), MigDataReadReply)
        return reply.data

    async def write_migration_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the device's incoming migration stream (MIG_DATA_WRITE in
        pieces of at most ``max_data_xfer_size``; RESUMING only)."""
        data = bytes(data)
        for start, length in _chunks(0, len(data), self.max_data_xfer_size):
            piece = data[start : start + length]
            await self._call(MigDataWriteRequest(piece), MigDataWriteReply)

    async def start_dirty_logging(
        self,
        page_size: int = mmap.PAGESIZE,
        ranges: Sequence[tuple[int, int]] | None = None,
    ) -> int:
        """Log the device's DMA writes (DMA_LOGGING_START); returns the server's page size.

        ``ranges`` are ``(iova, length)`` pairs; by default the client's DMA maps (ValueError
        when it has none). Starting again with the same page size replaces the ranges and
        keeps the bits already logged.
        """
        if ranges is None:
            ranges = [(m.iova, m.size) for m in self._maps]
            if not ranges:
                raise ValueError("no DMA maps to log: map guest memory or give ranges")
        control = DmaLoggingControl(page_size, tuple(DmaLoggingRange(a, n) for a, n in ranges))
        reply = await self._feature(DeviceFeatureRequest.set(Feature.DMA_LOGGING_START, control))
        if not isinstance(reply.data, DmaLoggingControl):  # pragma: no cover - decoder
            raise ProtocolError("DMA_LOGGING_START reply without its control data")
        chosen = reply.data.page_size
        self.dirty_logging = DirtyLogging(chosen, tuple((a, n) for a, n in ranges))
        return chosen

    async def dirty_pages(self, iova: int, length: int, page_size: int | None = None) -> DirtyPages:
        """The pages of ``[iova, iova + length)`` the device wrote since they were last
        reported (DMA_LOGGING_REPORT; reporting clears them).

        ``page_size`` defaults to the logging's. Large ranges are asked in several reports,
        each bitmap within the server's ``max_data_xfer_size``.
        """
        if page_size is None:
            if self.dirty_logging is None:
                raise ValueError("dirty logging is not started: give a page size")
            page_size = self.dirty_logging.page_size
        if length <= 0 or page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"cannot report {length:#x} bytes at page size {page_size:#x}")
        # Whole 64-page words per report, so that the bitmaps simply concatenate.
        pages_per_report = max(64, self.max_data_xfer_size // 8 * 64)
        step = pages_per_report * page_size
        parts = []
        for start, count in _chunks(iova, length, step):
            request = DeviceFeatureRequest.get(
                Feature.DMA_LOGGING_REPORT, DmaLoggingReport(start, count, page_size)
            )
            data = (await self._feature(request)).data
            if not (
                isinstance(data, DmaLoggingBitmap) and (data.iova, data.length) == (start, count)
            ):
                raise ProtocolError("DMA_LOGGING_REPORT reply does not answer the request")
            parts.append(DirtyPages(start, count, page_size, data.bitmap))
        return DirtyPages.concatenate(parts)

    async def stop_dirty_logging(self) -> None:
        """End dirty-page logging (DMA_LOGGING_STOP; succeeds when it was not started)."""
        await self._feature(DeviceFeatureRequest.set(Feature.DMA_LOGGING_STOP))
        self.dirty_logging = None
