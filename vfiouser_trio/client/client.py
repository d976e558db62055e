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
:class:`~vfiouser_trio.engine.ConnectionClosedError`. Timeouts after ``connect`` are the
caller's (``trio.fail_after``); a cancelled call leaves the connection usable; with
``reply_timeout`` a server that leaves any call unanswered that long is hung up on instead
(every pending call fails). Calls may be made concurrently from several tasks: they are
pipelined on the socket.

The server is not trusted. ``connect`` gives up after ``negotiation_timeout`` seconds
(:class:`NegotiationTimeout`); its answers are bounded by :class:`ClientLimits`; every fd it
sends is checked for its kind before use; the client's receive limit is its own
(``capabilities.max_data_xfer_size``, at least 1 MiB), never the server's advertised one,
and a reply larger than that closes the connection.
"""

from __future__ import annotations

import errno
import logging
import math
import mmap
import os
import socket
import stat
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

import trio

from ..engine import (
    Connection,
    ConnectionClosedError,
    ConnectionHooks,
    PendingReply,
    open_connection,
)
from ..eventfd import EventFd
from ..fdcheck import require_eventfd
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
from ..protocol.framing import Frame, close_fds, max_msg_size_for
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
from .dirty import ClientWrites, DirtyLogging, DirtyPages, merge_reports, split_by_maps
from .dma import DmaMap, DmaMaps, DmaService
from .guest_memory import GuestMemory
from .irqs import Interrupt, InterruptTable
from .pending import PendingResult
from .regions import MAX_ARGSZ, MappedArea, Region, RegionIoFd, query_with_argsz

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_CLIENT_LIMITS",
    "DEFAULT_NEGOTIATION_TIMEOUT",
    "Client",
    "ClientLimits",
    "NegotiationTimeout",
    "connect",
]

log = logging.getLogger(__name__)

#: What the client proposes unless told otherwise: it accepts up to 16 fds per message (as
#: QEMU does; libvfio-user sends one fd per sparse area) and 1 MiB per data transfer.
DEFAULT_CAPABILITIES = Capabilities(max_msg_fds=16, max_data_xfer_size=DEFAULT_MAX_DATA_XFER_SIZE)

#: Seconds ``connect`` waits for the socket, VERSION and the info queries, unless told otherwise.
DEFAULT_NEGOTIATION_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Bounds the client puts on what a server's answers may make it do at ``connect``.

    A server that exceeds one is refused with ProtocolError (EINVAL) and the connection
    closed; the defaults admit any real PCI device.
    """

    #: Most regions (DEVICE_GET_INFO ``num_regions``) the client queries: the 9 VFIO PCI
    #: regions plus room for device-specific ones (VGA, migration, vendor regions).
    max_regions: int = 64
    #: Most IRQ indexes (``num_irqs``) the client queries: 5 for PCI, plus device-specific.
    max_irq_indexes: int = 64
    #: Most vectors one IRQ index may report (``count``): MSI-X's maximum table size.
    max_irq_vectors: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_regions", "max_irq_indexes", "max_irq_vectors"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClientLimits.{name} must be a positive int, got {value!r}")


DEFAULT_CLIENT_LIMITS = ClientLimits()


# OSError types errno as optional; ours always has one (ETIMEDOUT).
class NegotiationTimeout(VfioUserError, TimeoutError):  # type: ignore[misc]
    """``connect`` got no answer in time; ``step`` names what it was waiting for.

    A VfioUserError with errno ETIMEDOUT, and a TimeoutError.
    """

    def __init__(self, step: str, timeout: float) -> None:
        self.step = step
        super().__init__(errno.ETIMEDOUT, f"no answer to {step} within {timeout:g} s")


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
    dma_layout: DmaLayout = DmaLayout.SPEC,
    dma_read_layout: DmaLayout | None = None,
    negotiation_timeout: float | None = DEFAULT_NEGOTIATION_TIMEOUT,
    reply_timeout: float | None = None,
    limits: ClientLimits = DEFAULT_CLIENT_LIMITS,
) -> AsyncIterator[Client]:
    """Connect to a vfio-user server and yield a ready :class:`Client`.

    ``target`` is a socket path or a connected socket (which the client then owns).
    ``capabilities`` replaces :data:`DEFAULT_CAPABILITIES` as the proposal (limits, extra
    entries; ValueError outside the protocol's bounds); ``twin_socket`` and
    ``write_multiple`` decide those two proposals. Its ``max_data_xfer_size`` is also the
    client's receive limit: DMA_READ/WRITE counts above it get EINVAL, region reads are
    split to fit it, and any message larger than it (or than 1 MiB, the largest
    region-info reply the client follows) is refused. ``policy`` and ``hooks`` go to the
    engine. ``dma_layout=DmaLayout.QEMU`` serves the server's DMA_READ and DMA_WRITE the
    way QEMU does, to test servers against it: replies to DMA_READ with data at offset 12
    and 4 zero bytes after, reads DMA_WRITE data at offset 12 and answers it header-only
    (``dma_read_layout`` is its former name).

    Opening the socket, VERSION and the info queries must all finish within
    ``negotiation_timeout`` seconds (None: wait for ever), else :class:`NegotiationTimeout`
    naming the step. After that, ``reply_timeout`` (None: no limit) is how long the server
    may leave a call unanswered (up to a quarter more) before the client closes the
    connection (``conn.close_reason`` is a ``ReplyTimeout``, every pending call fails with
    ConnectionClosedError). A VERSION reply that does not fit the proposal, or answers beyond
    ``limits``, close the connection and raise ProtocolError. Leaving the block closes the
    connection, unmaps the regions and closes every fd the client owns.
    """
    proposal = replace(
        capabilities if capabilities is not None else DEFAULT_CAPABILITIES,
        twin_socket=TwinSocket(supported=True) if twin_socket else None,
        write_multiple=write_multiple,
    )
    try:
        proposal.check()
    except ProtocolError as exc:
        if isinstance(target, socket.socket):
            target.close()  # it was handed over to us
        raise ValueError(f"capabilities to propose: {exc.message}") from None
    # One deadline for the whole of connect (socket, VERSION, info queries).
    deadline = (
        math.inf if negotiation_timeout is None else trio.current_time() + negotiation_timeout
    )
    with trio.move_on_at(deadline) as scope:
        sock = await _open_socket(target)
    if scope.cancelled_caught:
        assert negotiation_timeout is not None
        raise NegotiationTimeout("connect", negotiation_timeout)
    maps = DmaMaps()
    dma = DmaService(
        maps, max_data_xfer_size=proposal.max_data_xfer_size, layout=dma_read_layout or dma_layout
    )
    async with open_connection(
        sock,
        handler=dma.handle,
        policy=policy,
        hooks=hooks,
        max_msg_size=_recv_limit(proposal),
        max_recv_fds=proposal.max_msg_fds,
        reply_timeout=reply_timeout,
    ) as conn:
        client = Client(conn, maps)
        try:
            with trio.move_on_at(deadline) as scope:
                await client._start(proposal, limits)
            if scope.cancelled_caught:
                assert negotiation_timeout is not None
                log.warning("connect: no answer to %s: giving up", client._step)
                raise NegotiationTimeout(client._step, negotiation_timeout)
            yield client
        finally:
            client._release()


def _recv_limit(proposal: Capabilities) -> int:
    """The client's own limit on a received message (never raised by the server's claims).

    Requests from the server carry at most ``proposal.max_data_xfer_size``; replies carry
    what we asked for, which is at most that too, or a region-info reply we follow up to
    MAX_ARGSZ.
    """
    return max_msg_size_for(max(proposal.max_data_xfer_size, MAX_ARGSZ))


def _require_twin_socket(fd: int) -> socket.socket:
    """The twin-socket fd as a socket; ProtocolError unless a connected AF_UNIX stream socket.

    The caller still owns ``fd`` when this raises. (Anything else would fail only later,
    in the engine's reader, or never deliver the server's commands.)
    """
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise ProtocolError("VERSION reply: the twin socket fd is not a socket")
    sock = socket.socket(fileno=fd)  # reads SO_DOMAIN / SO_TYPE itself
    problem = _twin_socket_problem(sock)
    if problem is not None:
        sock.detach()
        raise ProtocolError(f"VERSION reply: the twin socket is {problem}")
    return sock


def _twin_socket_problem(sock: socket.socket) -> str | None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        return f"{sock.family!r} {sock.type!r}, not AF_UNIX SOCK_STREAM"
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "a listening socket"
    try:
        sock.getpeername()
    except OSError:
        return "not connected"
    return None


async def _open_socket(target: Target) -> socket.socket:
    if isinstance(target, socket.socket):
        await trio.lowlevel.checkpoint()
        return target
    stream = await trio.open_unix_socket(os.fspath(target))
    return socket.socket(fileno=stream.socket.detach())


def _check_count(what: str, value: int, limit: int) -> None:
    if value > limit:
        raise ProtocolError(f"the server reports {what} {value}, above the client's limit {limit}")


def _check_io_fds(reply: RegionIoFdsReply, index: int, region: Region | None) -> None:
    """Refuse sub-regions outside the region (ProtocolError) and fds that are not eventfds
    (VfioUserError EINVAL): each is written to (``ring()``) and may be handed to KVM."""
    for sub in reply.sub_regions:
        if region is not None and sub.offset + sub.size > region.size:
            raise ProtocolError(
                f"io fd sub-region {sub.offset:#x}+{sub.size:#x} beyond region {index}"
            )
    for i, fd in enumerate(reply.fds):
        require_eventfd(fd, f"region {index} io fd {i}")


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
        #: What ``connect`` is waiting for (named by NegotiationTimeout).
        self._step = "VERSION"
        self.info = DeviceGetInfoReply(0, 0, 0)
        #: Every region by index, as DEVICE_GET_REGION_INFO described it.
        self.regions: dict[int, Region] = {}
        #: Every IRQ index's DEVICE_GET_IRQ_INFO answer.
        self.irq_info: dict[int, IrqInfoReply] = {}
        #: Dirty-page logging started by :meth:`start_dirty_logging`, while it is in force.
        self.dirty_logging: DirtyLogging | None = None

    # --- setup ----------------------------------------------------------------------------

    async def _start(self, proposal: Capabilities, limits: ClientLimits) -> None:
        await self._negotiate(proposal)
        self._step = "DEVICE_GET_INFO"
        self.info = await self._call(DeviceGetInfoRequest(), DeviceGetInfoReply)
        _check_count("num_regions", self.info.num_regions, limits.max_regions)
        _check_count("num_irqs", self.info.num_irqs, limits.max_irq_indexes)
        for index in range(self.info.num_regions):
            self._step = f"DEVICE_GET_REGION_INFO {index}"
            reply = await query_with_argsz(
                self._request,
                partial(RegionInfoRequest, index),
                REGION_INFO_SIZE,
                RegionInfoReply,
            )
            region = Region.from_reply(reply)
            self.regions[index] = region
            if region.index != index:
                raise ProtocolError(f"region info for {region.index} when {index} was asked")
        for index in range(self.info.num_irqs):
            self._step = f"DEVICE_GET_IRQ_INFO {index}"
            irq = await self._call(IrqInfoRequest(index), IrqInfoReply)
            if irq.index != index:
                raise ProtocolError(f"IRQ info for {irq.index} when {index} was asked")
            _check_count(f"IRQ index {index} count", irq.count, limits.max_irq_vectors)
            self.irq_info[index] = irq
        self._step = "nothing"

    async def _negotiate(self, proposal: Capabilities) -> None:
        request = VersionRequest(capabilities=proposal)
        reply = await self._call(request, VersionReply)
        fds = reply.fds
        try:
            negotiated = check_server_reply(request, reply, len(fds))
            twin = negotiated.twin_fd_index
            twin_sock = _require_twin_socket(fds[twin]) if twin is not None else None
        except BaseException:
            close_fds(fds)
            raise
        close_fds(fd for i, fd in enumerate(fds) if i != twin)
        if twin_sock is not None:
            self.connection.attach_twin(twin_sock, requests_on_twin=False)
        self.negotiated = negotiated
        self.connection.max_send_fds = negotiated.send_max_msg_fds
        # The receive limit stays the client's own (set by connect): our reads ask for at
        # most send_max_data_xfer_size, which never exceeds what we proposed.

    def _release(self) -> None:
        """Close everything the client owns (on exit from ``connect``)."""
        self._irqs.close()
        io_fds, self._io_fds = self._io_fds, []
        for fd in io_fds:
            fd.close()
        for region in self.regions.values():
            region.close()
        self._maps.clear()

    async def _request(self, request: Request) -> Message:
        """``connection.request``, closing the connection on a reply beyond our limit.

        The engine skips such a reply unread; a server that sends more than we asked for
        is broken or hostile, and nothing it sends after can be trusted.
        """
        try:
            return await self.connection.request(request)
        except ProtocolError as exc:
            self._reply_failed(exc)
            raise

    def _reply_failed(self, exc: BaseException) -> None:
        """Close the connection when a reply was beyond our limit (see :meth:`_request`)."""
        if (
            isinstance(exc, ProtocolError)
            and exc.errno == errno.EMSGSIZE
            and not isinstance(exc, ConnectionClosedError)
        ):
            log.warning("closing the connection: %s", exc.message)
            self.connection.close()

    async def _send_now(self, requests: Sequence[Request]) -> list[PendingReply]:
        """Send ``requests`` now, in order; their replies are awaited later."""
        replies: list[PendingReply] = []
        try:
            for request in requests:
                replies.append(
                    await self.connection.start_request_raw(
                        request.COMMAND, request.pack(), request.fds
                    )
                )
        except BaseException:
            for reply in replies:
                reply.cancel()
            raise
        return replies

    async def _call(self, request: Request, reply_type: type[R]) -> R:
        reply = await self._request(request)
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
        """Largest data transfer the client sends: the smaller of the server's limit and its
        own (region accesses are split to fit)."""
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

    def _mapped(self, region: int, offset: int, count: int, *, write: bool) -> MappedArea | None:
        """The shared memory serving this access, if it may be done there."""
        known = self.regions.get(region)
        # An access the region's flags forbid goes to the server, which answers it.
        if known is None or not (known.writable if write else known.readable):
            return None
        return known.mapped_area(offset, count)

    async def read(self, region: int, offset: int, count: int, *, use_mmap: bool = True) -> bytes:
        """Read ``count`` bytes at ``offset`` of ``region``.

        Inside a mapped area (and ``use_mmap``) this reads shared memory; otherwise it sends
        REGION_READ messages of at most ``max_data_xfer_size`` each.
        """
        _check_span(offset, count)
        self._check_open()
        area = self._mapped(region, offset, count, write=False) if use_mmap else None
        if area is not None or count == 0:
            await trio.lowlevel.checkpoint()
            if area is None:
                return b""
            try:
                return area.read(offset - area.offset, count)
            except OSError as exc:  # a guarded area whose file the server cut short
                self.regions[region].drop_area(area, exc)
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
        posted: bool = False,
    ) -> None:
        """Write ``data`` at ``offset`` of ``region`` (shared memory or REGION_WRITE, as read).

        ``posted``: send each REGION_WRITE with No_reply and return once it is queued, without
        waiting for the server (a write to shared memory is done at once either way). The
        server never answers a No_reply command, not even with an error, so a posted write
        that fails is not reported: only a closed connection raises
        (:class:`~vfiouser_trio.protocol.connection.ConnectionClosedError`). Under the spec's
        order a later request's reply shows that the posted writes before it were
        processed; read back or check the device's state to learn whether they succeeded.
        """
        data = bytes(data)
        _check_span(offset, len(data))
        self._check_open()
        area = self._mapped(region, offset, len(data), write=True) if use_mmap else None
        if area is not None or not data:
            await trio.lowlevel.checkpoint()
            if area is None:
                return
            try:
                area.write(offset - area.offset, data)
                return
            except OSError as exc:  # as in read(); part of data may be stored: all is resent
                self.regions[region].drop_area(area, exc)
        for start, length in _chunks(offset, len(data), self.max_data_xfer_size):
            piece = data[start - offset : start - offset + length]
            request = RegionWriteRequest(region, start, piece)
            if posted:
                await self.connection.post_raw(request.COMMAND, request.pack())
            else:
                await self._call(request, RegionWriteReply)

    async def start_read(
        self, region: int, offset: int, count: int, *, use_mmap: bool = True
    ) -> PendingResult[bytes]:
        """Send the REGION_READ(s) of :meth:`read` now and return without waiting for the
        reply; ``await`` the result later for the bytes (errors as :meth:`read`).

        One task can so pipeline accesses in the order it calls these, with no task per
        request: ``a = await c.start_read(0, 0, 4); b = await c.start_read(1, 0, 4)``, then
        ``await a``, ``await b``. A read served from shared memory is done at once.
        """
        _check_span(offset, count)
        self._check_open()
        if count == 0 or (use_mmap and self._mapped(region, offset, count, write=False)):
            return PendingResult.ready(await self.read(region, offset, count, use_mmap=use_mmap))
        requests = [
            RegionReadRequest(region, start, length)
            for start, length in _chunks(offset, count, self.max_data_xfer_size)
        ]

        def data(frames: list[Frame]) -> bytes:
            parts = []
            for request, frame in zip(requests, frames, strict=True):
                reply = request.parse_reply(frame.payload, frame.fds)
                assert isinstance(reply, RegionReadReply)  # parse_reply guarantees it
                parts.append(reply.data)
            return b"".join(parts)

        return PendingResult(await self._send_now(requests), data, on_error=self._reply_failed)

    async def start_write(
        self,
        region: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        *,
        use_mmap: bool = True,
    ) -> PendingResult[None]:
        """Send the REGION_WRITE(s) of :meth:`write` now; ``await`` the result later for
        the server's answer (errors as :meth:`write`). See :meth:`start_read`."""
        data = bytes(data)
        _check_span(offset, len(data))
        self._check_open()
        if not data or (use_mmap and self._mapped(region, offset, len(data), write=True)):
            await self.write(region, offset, data, use_mmap=use_mmap)
            return PendingResult.ready(None)
        requests = [
            RegionWriteRequest(region, start, data[start - offset : start - offset + length])
            for start, length in _chunks(offset, len(data), self.max_data_xfer_size)
        ]

        def answered(frames: list[Frame]) -> None:
            for request, frame in zip(requests, frames, strict=True):
                request.parse_reply(frame.payload, frame.fds)

        return PendingResult(await self._send_now(requests), answered, on_error=self._reply_failed)

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
            self._request,
            partial(RegionIoFdsRequest, region),
            IO_FDS_SIZE,
            RegionIoFdsReply,
        )
        try:
            _check_io_fds(reply, region, self.regions.get(region))
        except BaseException:
            close_fds(reply.fds)
            raise
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
        if self._maps.written is None or self._maps.written.page_size != chosen:
            self._maps.written = ClientWrites(chosen)  # our own DMA_WRITE service's pages
        return chosen

    async def dirty_pages(self, iova: int, length: int, page_size: int | None = None) -> DirtyPages:
        """The pages of ``[iova, iova + length)`` the device wrote since they were last
        reported (DMA_LOGGING_REPORT; reporting clears them).

        ``page_size`` defaults to the logging's. Large ranges are asked in several reports,
        each bitmap within the server's ``max_data_xfer_size``. While logging runs, the
        pages this client wrote itself serving DMA_WRITE are added, and maps whose fd the
        server was not given are answered from those alone (see ``dirty.py``).
        """
        if page_size is None:
            if self.dirty_logging is None:
                raise ValueError("dirty logging is not started: give a page size")
            page_size = self.dirty_logging.page_size
        if length <= 0 or page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"cannot report {length:#x} bytes at page size {page_size:#x}")
        written = self._maps.written
        if written is None:
            return await self._server_dirty_pages(iova, length, page_size)
        maps = ((m.iova, m.size, m.shared) for m in self._maps)
        server, _ = split_by_maps(iova, length, maps)
        parts = [await self._server_dirty_pages(a, n, page_size) for a, n in server]
        parts.append(written.take(iova, length, page_size))
        return merge_reports(iova, length, page_size, parts)

    async def _server_dirty_pages(self, iova: int, length: int, page_size: int) -> DirtyPages:
        """The server's report of the range, asked in pieces whose bitmaps fit a message."""
        # Whole 64-page words per report, so that the bitmaps simply concatenate.
        pages_per_report = max(64, self.max_data_xfer_size // 8 * 64)
        step = pages_per_report * page_size
        parts = []
        for start, count in _chunks(iova, length, step):
            request = DeviceFeatureRequest.get(
                Feature.DMA_LOGGING_REPORT, DmaLoggingReport(start, count, page_size)
            )
            try:
                data = (await self._feature(request)).data
            except VfioUserError as exc:
                if exc.errno != errno.ENOTSUP or start == iova:
                    raise
                # libvfio-user reports only from a map's start: past one bitmap's worth
                # the rest of a big map cannot be asked at this page size.
                raise VfioUserError(
                    errno.ENOTSUP,
                    f"the server reports dirty pages only from a DMA map's start, and "
                    f"{iova:#x}+{length:#x} at page size {page_size:#x} needs more than one "
                    f"{self.max_data_xfer_size}-byte bitmap: log at a larger page size",
                    command=exc.command,
                ) from exc
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
        self._maps.written = None
