"""One client's session with a device: VFIO commands in, device calls out.

The session owns the engine connection for one client socket. It insists on
VERSION first, negotiates (offering a twin socket when the client proposes one),
then decodes each command and answers it from the device: info, regions, IRQs,
DMA maps, reset. It also carries the device's DMA to the client over DMA_READ /
DMA_WRITE for maps that came without a file descriptor. When the client goes,
the device's DMA maps and IRQ fds go with it and its state stays (spec: Client
Disconnection).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Coroutine
from typing import Any, Final

import trio

from ..engine import (
    Connection,
    ConnectionHooks,
    HandlerResult,
    RawMessage,
    Role,
)
from ..limits import DEFAULT_LIMITS, ServerLimits
from ..ordering import OrderingPolicy
from ..protocol import (
    Capabilities,
    DeviceFeatureRequest,
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DeviceResetRequest,
    DmaLayout,
    DmaMapRequest,
    DmaUnmapRequest,
    IoEventFdSubRegion,
    IrqInfoReply,
    IrqInfoRequest,
    MigDataReadRequest,
    MigDataWriteRequest,
    Negotiated,
    RegionInfoReply,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionTypeCap,
    RegionWriteMultiRequest,
    Request,
    SetIrqsRequest,
    SparseMmapArea,
    SparseMmapCap,
    VersionRequest,
    decode_request,
    detect_dma_write_layout,
    dma_read_reply_layouts,
    dma_write_probe,
    max_msg_size_for,
    negotiate_server_reply,
    region_info_reply,
    region_io_fds_reply,
    wants_twin_socket,
)
from ..protocol.constants import (
    DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET,
    Command,
)
from ..protocol.dma import (
    check_dma_write_reply,
    dma_read_reply_data,
    dma_read_request_payload,
    dma_rw_pieces,
)
from ..protocol.errors import ProtocolError, VfioUserError
from ..protocol.framing import Frame, close_fds
from ..protocol.region_io import REGION_ACCESS_SIZE, REGION_ACCESS_STRUCT, check_count
from ..protocol.regions import RegionCap
from .device import Device
from .dma import mark_command_task, marked_command_task
from .dma_hooks import DmaHookRunner
from .migration import RUNNING, RUNNING_REFUSES, SessionMigration
from .regions import Region

log = logging.getLogger(__name__)

# Plain ints: compared once per command (the REGION_READ/WRITE fast path).
_VERSION: Final = int(Command.VERSION)
_REGION_READ: Final = int(Command.REGION_READ)
_REGION_WRITE: Final = int(Command.REGION_WRITE)
_DMA_READ: Final = int(Command.DMA_READ)
_DMA_WRITE: Final = int(Command.DMA_WRITE)
_REGION_ACCESS_COMMANDS: Final = {
    _REGION_READ: Command.REGION_READ,
    _REGION_WRITE: Command.REGION_WRITE,
}
_unpack_region_access = REGION_ACCESS_STRUCT.unpack_from
_pack_region_access = REGION_ACCESS_STRUCT.pack
_current_task = trio.lowlevel.current_task

#: What this server advertises unless told otherwise: libvfio-user's message sizes and
#: 4096 DMA maps per client (an fd-backed map holds one of the process's mappings,
#: vm.max_map_count, shared by every client).
#:
#: write_multiple is implemented but not offered, as libvfio-user does not offer it: QEMU
#: (10.1, 10.2) sends every message through its send queue once it is negotiated, so when
#: the server goes away each guest access to the device waits for QEMU's reply timeout
#: (``x-msg-timeout``, 5 s) instead of failing at once. Offer it with
#: ``capabilities=dataclasses.replace(DEFAULT_SERVER_CAPABILITIES, write_multiple=True)``
#: for a client that batches posted writes and a server that outlives it (docs/qemu.md).
DEFAULT_SERVER_CAPABILITIES = Capabilities(
    max_msg_fds=8, max_data_xfer_size=1 << 20, max_dma_maps=4096
)


class ServerSession:
    """Serves ``device`` to the client on one connected socket."""

    def __init__(
        self,
        device: Device,
        *,
        capabilities: Capabilities = DEFAULT_SERVER_CAPABILITIES,
        offer_twin_socket: bool = True,
        policy: OrderingPolicy | None = None,
        hooks: ConnectionHooks | None = None,
        limits: ServerLimits = DEFAULT_LIMITS,
    ) -> None:
        self.device = device
        # The framework's side of the device; building it checks the declarations.
        self._vfu = device._vfu
        self._vfu.build()
        self.limits = limits
        self.capabilities = capabilities
        self.offer_twin_socket = offer_twin_socket
        self.policy = policy
        self.hooks = hooks
        self.negotiated: Negotiated | None = None
        self._xfer_max = 0  # negotiated.recv_max_data_xfer_size, read once per access
        #: The largest ``count`` of our DMA_READ / DMA_WRITE (DmaMessenger's): the smaller of
        #: the client's limit and ours, from VERSION on (0 before: no map exists then).
        self.max_data_xfer_size = 0
        self._conn: Connection | None = None
        self._attached = False
        # The client's DMA_READ/WRITE layout: configured, or learnt once (see dma_read).
        self._dma_layout: DmaLayout | None = limits.dma_layout
        self._dma_probe = trio.Lock()
        self._migration = SessionMigration(device, limits)
        # Decided once (the declarations are frozen by build() above): a device that cannot
        # migrate is never stopped, so its commands need neither the migration state's
        # check nor the quiesce gate's mark (mark_command_task); the hot path skips both.
        self._device_migration = self._vfu.migration

    # --- running -------------------------------------------------------------------------

    async def run(self, sock: socket.socket) -> None:
        """Serve until the client disconnects; takes ownership of ``sock``."""
        device = self.device
        vfu = self._vfu
        async with trio.open_nursery() as nursery:
            vfu.irqs().attach(nursery, state_backlog=self.limits.max_irq_state_backlog)
            try:
                conn = self._conn = Connection(
                    sock,
                    handler=self._handle,
                    role=Role.SERVER,  # VERSION first, once (the engine's core refuses others)
                    policy=self.policy,
                    hooks=self.hooks,
                    max_msg_size=max_msg_size_for(self.capabilities.max_data_xfer_size),
                    max_recv_fds=self.capabilities.max_msg_fds,
                    max_send_backlog=self.limits.max_send_backlog,
                    dispatch_batch=self.limits.dispatch_batch,
                    reply_timeout=self.limits.reply_timeout,
                    name=device.name,
                )
                # This task reads the client's main socket: no task and nursery of its own
                # for each idle connection.
                await conn.run()
                if conn.close_reason is not None:
                    log.info("%s: connection ended: %s", device.name, conn.close_reason)
            finally:
                # This task read the connection and ran commands: it no longer does.
                mark_command_task(False)
                self._conn = None
                self._migration.close()
                if self._attached:
                    self._attached = False
                    await vfu.client_gone()
                else:
                    vfu.irqs().attach(None)
                nursery.cancel_scope.cancel()

    @property
    def connection(self) -> Connection | None:
        return self._conn

    # --- DMA over messages (DmaMessenger) ------------------------------------------------

    async def dma_read(self, address: int, count: int) -> memoryview:
        """The data at ``address``: a read-only view of the reply frame (ours alone)."""
        # (Payloads packed and checked without message objects: once per DMA message.)
        frame = await self._need_conn().request_raw(
            _DMA_READ, dma_read_request_payload(address, count)
        )
        frame.close_fds()
        payload = frame.payload
        layout = self._dma_layout
        if layout is None:
            # A reply only one layout fits tells the peer's layout. When both fit and the
            # two readings differ (QEMU's data starting with 4 zero bytes), ask the peer;
            # when they read alike (or neither fits: refused below) it stays unknown.
            fits = dma_read_reply_layouts(payload, count)
            if len(fits) == 1:
                (layout,) = fits
                self._dma_layout = layout
            elif fits and dma_read_reply_data(
                payload, address, count, DmaLayout.SPEC
            ) != dma_read_reply_data(payload, address, count, DmaLayout.QEMU):
                layout = await self._peer_dma_layout(address)
        try:
            return dma_read_reply_data(payload, address, count, layout)
        except ProtocolError as exc:
            self._refuse_dma_reply(exc)
            raise

    async def dma_write(self, address: int, data: bytes | memoryview) -> None:
        conn = self._need_conn()
        layout = self._dma_layout or await self._peer_dma_layout(address)
        # Header, DMA header and the device's data go out as iovecs: the data is not copied
        # unless the kernel leaves part of it (the transport then copies that part at once).
        frame = await conn.request_raw(_DMA_WRITE, dma_rw_pieces(address, data, layout))
        frame.close_fds()
        try:
            check_dma_write_reply(frame.payload, address, len(data), layout)
        except ProtocolError as exc:
            self._refuse_dma_reply(exc)
            raise

    def _refuse_dma_reply(self, error: ProtocolError) -> None:
        """A malformed DMA reply fails that access (EINVAL to the device) and is logged.
        (Called from an ``except``, not a context manager: this runs once per DMA message.)"""
        log.warning("%s: the client's DMA reply is refused: %s", self.device.name, error)

    async def _peer_dma_layout(self, address: int) -> DmaLayout:
        """Learn the client's DMA layout by a zero-length DMA_WRITE at ``address``, once."""
        async with self._dma_probe:
            if self._dma_layout is None:
                probe = dma_write_probe(address)
                frame = await self._need_conn().request_raw(probe.COMMAND, probe.pack())
                frame.close_fds()
                try:
                    self._dma_layout = detect_dma_write_layout(frame.payload, (), address)
                except ProtocolError as exc:
                    self._refuse_dma_reply(exc)
                    raise
                log.info("%s: client's DMA layout: %s", self.device.name, self._dma_layout.value)
            return self._dma_layout

    def _need_conn(self) -> Connection:
        if self._conn is None:
            raise VfioUserError(errno.ENOTCONN, "the client is gone")
        return self._conn

    # --- command handling ----------------------------------------------------------------

    def _handle(self, frame: Frame) -> HandlerResult | Coroutine[Any, Any, HandlerResult]:
        """Answer a command: at once (the reply's payload) for a REGION_READ/WRITE whose
        region answers without waiting, else a coroutine that answers it."""
        command = frame.header.command
        if command == _VERSION:
            return self._version(frame)  # only ever first: Role.SERVER
        migration = self._device_migration
        if migration is not None:
            # A stopped device refuses most commands (the engine closes the frame's fds);
            # a running one takes all but the migration data's (check_command's rule, its
            # common case tested here: this runs once per command).
            if migration.state != RUNNING or command in RUNNING_REFUSES:
                self._migration.check_command(command)
            # Device DMA from this task fails instead of waiting while the device is
            # stopped (the mark lasts for the task: set once, tested here).
            if marked_command_task() is not _current_task():
                mark_command_task()
        if not frame.fds and command in _REGION_ACCESS_COMMANDS:
            # The hot path, and the only one for these two commands: what the decoder's
            # RegionReadRequest/RegionWriteRequest would accept, without building them
            # (the general path's decoder refuses the rest: fds, a short payload, a count
            # that is not the data's size).
            payload = frame.payload
            size = len(payload)
            if size >= REGION_ACCESS_SIZE:
                offset, index, count = _unpack_region_access(payload)
                if command == _REGION_READ:
                    region = self._accessed_region(command, index, offset, count)
                    data = region.read_now(offset, count)
                    if not isinstance(data, bytes):
                        return _region_read_reply(offset, index, count, data)
                    # RegionReadReply's payload (read_now gives exactly count bytes).
                    return _pack_region_access(offset, index, count) + data
                if count == size - REGION_ACCESS_SIZE:
                    data = bytes(payload[REGION_ACCESS_SIZE:])
                    region = self._accessed_region(command, index, offset, count)
                    pending = region.write_now(offset, data)
                    reply = _pack_region_access(offset, index, count)  # RegionWriteReply's
                    return reply if pending is None else _after(pending, reply)
        return self._handle_request(frame)

    async def _handle_request(self, frame: Frame) -> HandlerResult:
        """A command of the general path: decoded into its request, then dispatched."""
        request = decode_request(frame.header.command, frame.payload, frame.fds)
        # Decoding succeeded: the request now owns the fds.
        frame.take_fds()
        if self._device_migration is None:
            mark_command_task()  # (a device that may be stopped is marked above)
        return await self._dispatch(request)

    async def _dispatch(self, request: Request) -> HandlerResult:
        match request:
            case DeviceGetInfoRequest():
                return self._device_info()
            case RegionInfoRequest():
                return self._region_info(request)
            case RegionIoFdsRequest():
                return self._region_io_fds(request)
            case IrqInfoRequest():
                return self._irq_info(request)
            case SetIrqsRequest():
                return self._set_irqs(request)
            case RegionWriteMultiRequest():
                return await self._region_write_multi(request)
            case DmaMapRequest():
                return await self._dma_map(request)
            case DmaUnmapRequest():
                return await self._dma_unmap(request)
            case DeviceResetRequest():
                return await self._reset()
            case DeviceFeatureRequest():
                return await self._migration.feature(request, self._recv_max)
            case MigDataReadRequest():
                return await self._migration.data_read(request, self._recv_max)
            case MigDataWriteRequest():
                return await self._migration.data_write(request, self._recv_max)
            case _:
                # DMA_READ / DMA_WRITE travel server -> client only; REGION_READ/WRITE
                # never get here (see _handle).
                close_fds(request.fds)
                raise VfioUserError(errno.EINVAL, f"{request.COMMAND.name} is not a client command")

    @property
    def _recv_max(self) -> int:
        """The client's ``max_data_xfer_size`` for what it sends us; 0 before VERSION."""
        return self._xfer_max

    async def _version(self, frame: Frame) -> HandlerResult:
        conn = self._need_conn()
        request = VersionRequest.unpack(frame.payload, frame.fds)
        twin = self.offer_twin_socket and wants_twin_socket(request)
        reply, negotiated = negotiate_server_reply(
            request, self.capabilities, twin_fd_index=0 if twin else None
        )
        # Everything that can fail comes before the session changes: a failed VERSION leaves
        # the session as it was (the client may try again) and holds no fd.
        result: HandlerResult = reply
        theirs: int | None = None
        if twin:
            theirs = self._open_twin(conn)
            result = RawMessage(reply.pack(), (theirs,), transfer_fds=True)
        try:
            conn.max_send_fds = negotiated.send_max_msg_fds
            self.device.dma.max_maps = self.capabilities.max_dma_maps
            self.device.dma.trust_client_memory = self.limits.trust_client_memory
            self.device.dma.messenger = self
            self.negotiated = negotiated
            self._xfer_max = negotiated.recv_max_data_xfer_size
            self.max_data_xfer_size = negotiated.send_max_data_xfer_size
            self._attached = True
            try:
                await self.device.attached()
            except Exception as exc:
                raise self.device._vfu.errors.bug(
                    "VERSION", "in attached()", f"raised {exc!r}", exc
                ) from exc
        except BaseException:
            if theirs is not None:
                close_fds((theirs,))
            raise
        return result

    def _open_twin(self, conn: Connection) -> int:
        """Create the twin socket pair, attach our end; return the client's end (an fd we own)."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("%s: cannot create the twin socket: %s", self.device.name, exc)
            raise VfioUserError(exc.errno or errno.EIO, "cannot create the twin socket") from exc
        try:
            conn.attach_twin(ours, requests_on_twin=True)  # closes `ours` if it fails
        except BaseException as exc:
            theirs.close()
            if isinstance(exc, Exception):
                log.warning("%s: cannot attach the twin socket: %s", self.device.name, exc)
            raise
        return theirs.detach()

    def _device_info(self) -> HandlerResult:
        vfu = self._vfu
        flags = DEVICE_FLAGS_PCI | (DEVICE_FLAGS_RESET if vfu.reset_supported else 0)
        return DeviceGetInfoReply(flags, vfu.num_regions, vfu.irqs().num_irqs)

    def _region_info(self, request: RegionInfoRequest) -> HandlerResult:
        vfu = self._vfu
        if not 0 <= request.index < vfu.num_regions:
            raise VfioUserError(errno.EINVAL, f"no region {request.index}")
        region = vfu.region(request.index)
        if region is None:  # an index below num_regions the device does not implement
            return region_info_reply(RegionInfoReply(request.index, 0, 0), request.argsz)
        caps: list[RegionCap] = []
        if region.sparse:
            areas = tuple(SparseMmapArea(a.offset, a.size) for a in region.sparse)
            caps.append(SparseMmapCap(areas))
        if region.region_type is not None:
            caps.append(RegionTypeCap(region.region_type.type, region.region_type.subtype))
        fds: tuple[int, ...] = ()
        if region.mmap and region.memory is not None:
            fds = (region.memory.fd,)
        full = RegionInfoReply(
            region.index,
            region.info_flags,
            region.size,
            region.mmap_offset,
            caps=tuple(caps),
            fds=fds,
        )
        return region_info_reply(full, request.argsz)

    def _region_io_fds(self, request: RegionIoFdsRequest) -> HandlerResult:
        vfu = self._vfu
        if not 0 <= request.index < vfu.num_regions:
            raise VfioUserError(errno.EINVAL, f"no region {request.index}")
        region = vfu.region(request.index)
        bells = region.doorbells if region is not None else []
        limit = self.negotiated.send_max_msg_fds if self.negotiated else 1
        if len(bells) > limit:
            raise VfioUserError(
                errno.EINVAL, f"{len(bells)} doorbells need more fds than the client's {limit}"
            )
        subs = tuple(
            IoEventFdSubRegion(b.offset, b.size, i, b.kvm_flags, b.datamatch or 0)
            for i, b in enumerate(bells)
        )
        full = RegionIoFdsReply(request.index, subs, tuple(b.fileno() for b in bells))
        return region_io_fds_reply(full, request.argsz)

    def _irq_info(self, request: IrqInfoRequest) -> HandlerResult:
        info = self._vfu.irqs().info(request.index)
        return IrqInfoReply(info.index, info.flags, info.count)

    def _set_irqs(self, request: SetIrqsRequest) -> HandlerResult:
        fds = list(request.fds)
        try:
            irq = self._vfu.irqs()[request.index]
            request.validate_against(irq.count)
        except BaseException:
            close_fds(fds)
            raise
        irq.set_irqs(request.flags, request.start, request.count, request.data, fds)
        return None

    def _accessed_region(self, command: int, index: int, offset: int, count: int) -> Region:
        """The region a REGION_READ/WRITE accesses; EINVAL for a count above our
        max_data_xfer_size, no such region, or an access it does not allow."""
        if count > self._xfer_max:  # (check_count's test, without its call per access)
            check_count(_REGION_ACCESS_COMMANDS[command], count, self._xfer_max)
        region = self._vfu.regions.get(index)  # (_region, without a call per access)
        if region is None:
            region = self._region(index)  # raises: no such region
        region.check_access(offset, count, write=command == _REGION_WRITE)
        return region

    async def _region_write_multi(self, request: RegionWriteMultiRequest) -> HandlerResult:
        assert self.negotiated is not None
        if not self.negotiated.write_multiple:
            raise VfioUserError(errno.EINVAL, "write_multiple was not negotiated")
        for entry in request.writes:
            region = self._region(entry.region)
            region.check_access(entry.offset, entry.count, write=True)
            await region.do_write(entry.offset, entry.data)
        return request.reply()

    def _region(self, index: int) -> Region:
        region = self._vfu.regions.get(index)  # built in __init__
        if region is None:
            raise VfioUserError(errno.EINVAL, f"no region {index}")
        return region

    async def _dma_map(self, request: DmaMapRequest) -> HandlerResult:
        # The device's dma_mapped hook runs before the reply (server/dma_hooks.py).
        device = self.device
        hooks = DmaHookRunner(device, device._vfu.errors)
        await device.dma.map_announced(
            request.address, request.size, request.flags, request.fd, request.offset, hooks
        )
        return None

    async def _dma_unmap(self, request: DmaUnmapRequest) -> HandlerResult:
        if request.unmap_all:
            await self.device.dma.unmap_all()
        else:
            await self.device.dma.unmap(request.address, request.size)
        return request.reply()

    async def _reset(self) -> HandlerResult:
        if not self._vfu.reset_supported:
            raise VfioUserError(errno.EINVAL, "the device does not support reset")
        await self._vfu.do_reset()
        await self._migration.device_reset()
        return None


async def _region_read_reply(
    offset: int, index: int, count: int, data: Coroutine[Any, Any, bytes]
) -> bytes:
    """RegionReadReply's payload once a waiting read callback has answered."""
    return _pack_region_access(offset, index, count) + await data


async def _after(pending: Coroutine[Any, Any, None], reply: bytes) -> bytes:
    """``reply`` once ``pending`` (a waiting write callback) is done."""
    await pending
    return reply
