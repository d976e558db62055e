"""The client against scripted servers that behave like other implementations (libvfio-user,
older peers) or break the rules: legacy capabilities, unknown region capabilities, the argsz
dance, one fd per sparse area, and VERSION replies that must close the connection."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from vfiouser_trio.client import Client, GuestMemory, ProtocolError, VfioUserError, connect
from vfiouser_trio.engine import Connection, HandlerResult, RawMessage, open_connection
from vfiouser_trio.memory import MemFd
from vfiouser_trio.protocol import (
    Capabilities,
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DmaLayout,
    DmaMapRequest,
    DmaReadRequest,
    Frame,
    IrqInfoReply,
    IrqInfoRequest,
    RegionInfoReply,
    RegionInfoRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionTypeCap,
    Request,
    SparseMmapArea,
    SparseMmapCap,
    TwinSocket,
    UnknownRegionCap,
    VersionReply,
    VersionRequest,
    decode_request,
    region_info_reply,
)
from vfiouser_trio.protocol.constants import (
    DEVICE_FLAGS_PCI,
    IRQ_INFO_EVENTFD,
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    Command,
)
from vfiouser_trio.protocol.framing import close_fds

pytestmark = pytest.mark.usefixtures("no_fd_leak")

PAGE = os.sysconf("SC_PAGE_SIZE")
RW = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
TIMEOUT = 10
LEGACY = Capabilities.extra_from({"migration": {"pgsize": 4096}, "future_thing": [1, 2]})


VersionAnswer = Callable[[VersionRequest], HandlerResult]


def libvfio_user_version(request: VersionRequest) -> HandlerResult:
    """What libvfio-user answers: minor <= 2, its limits, a legacy migration object."""
    caps = Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 20, extra=LEGACY)
    return VersionReply(0, min(request.minor, 2), caps)


class ScriptedServer:
    """A minimal vfio-user server: VERSION as scripted, one region 0, one IRQ index."""

    def __init__(self, version: VersionAnswer, region: RegionInfoReply) -> None:
        self.version = version
        self.region = region
        self.memory = bytearray(b"scripted" * 8)
        self.requests: list[Request] = []

    async def handle(self, frame: Frame) -> HandlerResult:
        await trio.lowlevel.checkpoint()
        request = decode_request(frame.header.command, frame.payload, frame.fds)
        self.requests.append(request)
        if isinstance(request, VersionRequest):
            return self.version(request)
        if isinstance(request, DeviceGetInfoRequest):
            return DeviceGetInfoReply(DEVICE_FLAGS_PCI, 1, 1)
        if isinstance(request, RegionInfoRequest):
            return region_info_reply(self.region, request.argsz)
        if isinstance(request, IrqInfoRequest):
            return IrqInfoReply(request.index, IRQ_INFO_EVENTFD, 1)
        if isinstance(request, DmaMapRequest):
            close_fds(request.fds)
            return None
        if isinstance(request, RegionReadRequest):
            data = bytes(self.memory[request.offset : request.offset + request.count])
            return RegionReadReply(request.region, request.offset, data)
        raise VfioUserError(errno.EINVAL, "not scripted")


@asynccontextmanager
async def scripted(
    server: ScriptedServer, **options: Any
) -> AsyncIterator[tuple[Client, Connection]]:

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with trio.fail_after(TIMEOUT):
        # The client accepts 16 fds per message (its proposal); a real server would read that.
        async with (
            open_connection(theirs, handler=server.handle, max_send_fds=16) as conn,
            connect(ours, **options) as client,
        ):
            yield client, conn


async def test_libvfio_user_style_server() -> None:
    with MemFd.create("bar", 4 * PAGE) as memfd:
        os.pwrite(memfd.fileno(), b"area-one", PAGE)
        os.pwrite(memfd.fileno(), b"area-two", 3 * PAGE)
        areas = (SparseMmapArea(PAGE, PAGE), SparseMmapArea(3 * PAGE, PAGE))
        region = RegionInfoReply(
            0,
            RW | REGION_INFO_FLAG_MMAP,
            4 * PAGE,
            caps=(
                UnknownRegionCap(0x7777, b"opaque!!", version=3),
                SparseMmapCap(areas),
                RegionTypeCap(0x1234, 5),
            ),
            fds=(memfd.fileno(), memfd.fileno()),  # one fd per sparse area
        )
        server = ScriptedServer(libvfio_user_version, region)
        async with scripted(server) as (client, _):
            negotiated = client.negotiated
            assert negotiated is not None
            assert negotiated.peer.extra_value("migration") == {"pgsize": 4096}
            assert not client.twin_socket  # not offered: requests stay on one socket
            assert not client.write_multiple
            info = client.regions[0]
            assert UnknownRegionCap(0x7777, b"opaque!!", version=3) in info.caps
            assert info.region_type == RegionTypeCap(0x1234, 5)
            assert [(a.offset, a.size) for a in info.areas] == [(PAGE, PAGE), (3 * PAGE, PAGE)]
            assert await client.read(0, PAGE, 8) == b"area-one"
            assert await client.read(0, 3 * PAGE, 8) == b"area-two"
            assert await client.read(0, 0, 8) == b"scripted"  # trapped part: a message
        # The argsz dance: asked small, then with the size the server said it needs.
        asked = [r.argsz for r in server.requests if isinstance(r, RegionInfoRequest)]
        assert asked == [32, region.needed_size]


async def test_read_only_mapped_region_sends_writes_to_the_server() -> None:
    with MemFd.create("rom", PAGE) as memfd:
        os.pwrite(memfd.fileno(), b"firmware", 0)
        region = RegionInfoReply(
            0, REGION_INFO_FLAG_READ | REGION_INFO_FLAG_MMAP, PAGE, fds=(memfd.fileno(),)
        )
        server = ScriptedServer(libvfio_user_version, region)
        async with scripted(server) as (client, _):
            view = client.regions[0].areas[0].view
            assert view is not None
            assert view.readonly
            assert await client.read(0, 0, 8) == b"firmware"
            with pytest.raises(VfioUserError) as info:
                await client.write(0, 0, b"x")  # not through the read-only mapping
            assert info.value.command == Command.REGION_WRITE
        assert os.pread(memfd.fileno(), 8, 0) == b"firmware"


async def test_older_peer_with_minor_zero_and_no_json() -> None:
    region = RegionInfoReply(0, RW, 0x40)
    server = ScriptedServer(lambda request: VersionReply(0, 0, None), region)
    async with scripted(server) as (client, _):
        negotiated = client.negotiated
        assert negotiated is not None
        assert negotiated.minor == 0
        assert negotiated.peer == Capabilities()  # all defaults
        assert client.max_data_xfer_size == 1 << 20
        assert client.connection.max_send_fds == 1
        assert await client.read(0, 8, 8) == b"scripted"


async def test_qemu_dma_read_layout_option() -> None:
    region = RegionInfoReply(0, RW, 0x40)
    server = ScriptedServer(libvfio_user_version, region)
    async with scripted(server, dma_read_layout=DmaLayout.QEMU) as (client, conn):
        with GuestMemory(PAGE) as memory:
            memory.write(0, b"qemu")
            await client.dma_map(memory, 0x4000, share_fd=False)
            request = DmaReadRequest(0x4000, 4)
            frame = await conn.request_raw(request.COMMAND, request.pack())
            assert frame.payload == (0x4000).to_bytes(8, "little") + b"\4\0\0\0qemu" + bytes(4)
            assert request.parse_reply(frame.payload).data == b"qemu"


def _reply_with(caps: Capabilities | None, *, major: int = 0, minor: int = 2) -> VersionAnswer:
    def answer(request: VersionRequest) -> HandlerResult:
        return VersionReply(major, minor, caps)

    return answer


def _reply_with_fds(caps: Capabilities) -> VersionAnswer:
    def answer(request: VersionRequest) -> HandlerResult:
        a, b = socket.socketpair()
        a.close()
        return RawMessage(VersionReply(0, 2, caps).pack(), (b.detach(),), transfer_fds=True)

    return answer


@pytest.mark.parametrize(
    ("answer", "options"),
    [
        (_reply_with(None, major=1), {}),
        (_reply_with(None, minor=3), {}),
        (_reply_with(Capabilities(write_multiple=True)), {"write_multiple": False}),
        (_reply_with(Capabilities(twin_socket=TwinSocket(True, 0))), {}),  # no fd sent
        (_reply_with(Capabilities(twin_socket=TwinSocket(True, 0))), {"twin_socket": False}),
        (_reply_with_fds(Capabilities()), {}),  # an fd without twin mode
        (_reply_with_fds(Capabilities(twin_socket=TwinSocket(True, 1))), {}),  # bad index
        (_reply_with_fds(Capabilities(twin_socket=TwinSocket(True, 0))), {"twin_socket": False}),
    ],
)
async def test_inconsistent_version_reply_closes(
    answer: VersionAnswer, options: dict[str, Any]
) -> None:
    server = ScriptedServer(answer, RegionInfoReply(0, RW, 0x40))
    with pytest.raises(ProtocolError) as info:
        async with scripted(server, **options):
            pass  # pragma: no cover
    assert info.value.errno == errno.EINVAL
    # Only VERSION went out: nothing else was asked of a server we do not understand.
    assert [type(r) for r in server.requests] == [VersionRequest]


async def test_inconsistent_version_reply_hangs_up() -> None:
    server = ScriptedServer(_reply_with(None, minor=9), RegionInfoReply(0, RW, 0x40))
    ours, theirs = socket.socketpair()
    with trio.fail_after(TIMEOUT):
        async with open_connection(theirs, handler=server.handle) as conn:
            with pytest.raises(ProtocolError):
                async with connect(ours):
                    pass  # pragma: no cover
            await conn.wait_closed()  # the server sees the client hang up


async def test_version_error_reply_is_raised() -> None:
    def refuse(request: VersionRequest) -> HandlerResult:
        raise VfioUserError(errno.ENOTSUP)

    server = ScriptedServer(refuse, RegionInfoReply(0, RW, 0x40))
    with pytest.raises(VfioUserError) as info:
        async with scripted(server):
            pass  # pragma: no cover
    assert info.value.errno == errno.ENOTSUP
    assert info.value.command == Command.VERSION


async def test_region_info_for_the_wrong_index_is_refused() -> None:
    server = ScriptedServer(libvfio_user_version, RegionInfoReply(5, RW, 0x40))
    with pytest.raises(ProtocolError, match="region info for 5"):
        async with scripted(server):
            pass  # pragma: no cover
