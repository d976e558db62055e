"""The client against a hostile server (issue 9): connect() gives up in time, the server's
answers are bounded, the client's receive limit is its own, every fd it sends is checked,
and the DMA the client serves cannot be made to fault or allocate without bound."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from vfiouser_trio.client import Client, GuestMemory, ProtocolError, VfioUserError, connect
from vfiouser_trio.client.client import ClientLimits, NegotiationTimeout
from vfiouser_trio.client.dma import DmaMap, DmaMaps, DmaService
from vfiouser_trio.engine import (
    Connection,
    ConnectionClosedError,
    HandlerResult,
    RawMessage,
    ReplyTimeout,
    open_connection,
)
from vfiouser_trio.protocol import (
    Capabilities,
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DmaMapRequest,
    Frame,
    IoEventFdSubRegion,
    IrqInfoReply,
    IrqInfoRequest,
    RegionInfoReply,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionReadReply,
    RegionReadRequest,
    Request,
    TwinSocket,
    VersionReply,
    VersionRequest,
    command_header,
    decode_request,
    region_info_reply,
    region_io_fds_reply,
)
from vfiouser_trio.protocol.constants import (
    DEVICE_FLAGS_PCI,
    IRQ_INFO_EVENTFD,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    Command,
)
from vfiouser_trio.protocol.framing import close_fds, max_msg_size_for
from vfiouser_trio.protocol.header import Header, reply_header

pytestmark = pytest.mark.usefixtures("no_fd_leak")

RW = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
MiB = 1 << 20

Answer = Callable[[Request], Awaitable[HandlerResult]]


class Hostile:
    """A scripted server: sane answers unless a test overrides one command's."""

    def __init__(self, **answers: Answer) -> None:
        self.answers = answers
        self.version_caps = Capabilities(max_msg_fds=8)
        self.num_regions = 1
        self.num_irqs = 1
        self.irq_count = 1
        self.reads: list[int] = []

    async def handle(self, frame: Frame) -> HandlerResult:
        await trio.lowlevel.checkpoint()
        request = decode_request(frame.header.command, frame.payload, frame.fds)
        answer = self.answers.get(type(request).__name__)
        if answer is not None:
            return await answer(request)
        if isinstance(request, VersionRequest):
            return VersionReply(0, 2, self.version_caps)
        if isinstance(request, DeviceGetInfoRequest):
            return DeviceGetInfoReply(DEVICE_FLAGS_PCI, self.num_regions, self.num_irqs)
        if isinstance(request, RegionInfoRequest):
            return region_info_reply(RegionInfoReply(request.index, RW, 0x1000), request.argsz)
        if isinstance(request, IrqInfoRequest):
            return IrqInfoReply(request.index, IRQ_INFO_EVENTFD, self.irq_count)
        if isinstance(request, RegionReadRequest):
            self.reads.append(request.count)
            return RegionReadReply(request.region, request.offset, bytes(request.count))
        if isinstance(request, DmaMapRequest):
            close_fds(request.fds)
            return None
        raise VfioUserError(errno.EINVAL, "not scripted")


async def never(request: Request) -> HandlerResult:
    await trio.sleep_forever()
    raise AssertionError  # pragma: no cover


@asynccontextmanager
async def hostile(server: Hostile, **options: Any) -> AsyncIterator[tuple[Client, Connection]]:
    ours, theirs = socket.socketpair()
    async with (
        open_connection(theirs, handler=server.handle, max_send_fds=16) as conn,
        connect(ours, **options) as client,
    ):
        yield client, conn


# --- connect() gives up in time (autojump clock: the timeouts pass at once) ------------------


@pytest.mark.parametrize(
    ("stall", "step"),
    [
        ("VersionRequest", "VERSION"),
        ("DeviceGetInfoRequest", "DEVICE_GET_INFO"),
        ("RegionInfoRequest", "DEVICE_GET_REGION_INFO 0"),
        ("IrqInfoRequest", "DEVICE_GET_IRQ_INFO 0"),
    ],
)
async def test_connect_times_out_naming_the_step(
    autojump_clock: trio.testing.MockClock, stall: str, step: str
) -> None:
    server = Hostile(**{stall: never})
    start = trio.current_time()
    with pytest.raises(NegotiationTimeout) as info:
        async with hostile(server, negotiation_timeout=7):
            pass  # pragma: no cover
    assert trio.current_time() - start == pytest.approx(7)
    assert info.value.step == step and step in str(info.value)
    assert info.value.errno == errno.ETIMEDOUT
    assert isinstance(info.value, TimeoutError)


async def test_connect_times_out_on_a_reply_with_the_wrong_message_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = socket.socketpair()
    with theirs:
        tsock = trio.socket.from_stdlib_socket(theirs)

        async def answer_wrongly() -> None:
            data = await tsock.recv(4096)
            header = Header.unpack(data)
            reply = VersionReply(0, 2, Capabilities()).pack()
            wrong = reply_header(header.msg_id + 1, Command.VERSION, len(reply))
            await tsock.send(wrong.pack() + reply)
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_wrongly)
            with pytest.raises(NegotiationTimeout, match="VERSION"):
                async with connect(ours):  # the default timeout
                    pass  # pragma: no cover
            nursery.cancel_scope.cancel()
    assert trio.current_time() == pytest.approx(10.0, abs=1)


async def test_connect_times_out_on_a_server_that_never_accepts(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    # A busy single-client server (libvfio-user's way): connected in the backlog, unanswered.
    path = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.fspath(path))
        listener.listen(4)
        with pytest.raises(NegotiationTimeout, match="VERSION"):
            async with connect(path, negotiation_timeout=3):
                pass  # pragma: no cover


async def test_no_negotiation_timeout_waits_for_a_slow_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(request: Request) -> HandlerResult:
        await trio.sleep(3600)
        return VersionReply(0, 2, Capabilities(max_msg_fds=8))

    async with hostile(Hostile(VersionRequest=slow), negotiation_timeout=None) as (client, _):
        assert client.negotiated is not None


async def test_a_call_left_unanswered_past_reply_timeout_closes_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with hostile(Hostile(RegionReadRequest=never), reply_timeout=6) as (client, _):
        start = trio.current_time()
        with pytest.raises(ConnectionClosedError) as info, trio.fail_after(60):
            await client.read(0, 0, 4)
        assert 6 <= trio.current_time() - start <= 1.25 * 6
        assert isinstance(info.value.__cause__, ReplyTimeout)
        assert "REGION_READ" in str(info.value.__cause__)
        assert client.closed


async def test_without_reply_timeout_a_call_waits_for_a_slow_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(request: Request) -> HandlerResult:
        await trio.sleep(3600)
        return RegionReadReply(0, 0, b"slow")

    async with hostile(Hostile(RegionReadRequest=slow)) as (client, _):
        assert await client.read(0, 0, 4) == b"slow"


DEEP = b'{"capabilities":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}"


@pytest.mark.parametrize(
    "json_text",
    [DEEP, b'{"capabilities":{"max_data_xfer_size":0}}', b'{"capabilities":{"pgsizes":true}}'],
    ids=["deep", "xfer0", "pgsizes-true"],
)
async def test_hostile_version_reply_is_a_protocol_error(json_text: bytes) -> None:
    async def version(request: Request) -> HandlerResult:
        return RawMessage(struct.pack("=HH", 0, 2) + json_text + b"\0")

    server = Hostile(VersionRequest=version)
    with trio.fail_after(10), pytest.raises(ProtocolError) as info:
        async with hostile(server):
            pass  # pragma: no cover
    assert info.value.errno == errno.EINVAL


# --- the server's counts are bounded ----------------------------------------------------


@pytest.mark.parametrize(
    ("field", "name"),
    [("num_regions", "num_regions"), ("num_irqs", "num_irqs"), ("irq_count", "count")],
)
async def test_absurd_counts_are_refused(field: str, name: str) -> None:
    server = Hostile()
    setattr(server, field, (1 << 32) - 1)
    with trio.fail_after(10), pytest.raises(ProtocolError, match=name) as info:
        async with hostile(server):
            pass  # pragma: no cover
    assert info.value.errno == errno.EINVAL


async def test_count_limits_are_configurable() -> None:
    server = Hostile()
    server.num_regions = 9
    limits = ClientLimits(max_regions=8)
    with trio.fail_after(10), pytest.raises(ProtocolError, match="num_regions 9"):
        async with hostile(server, limits=limits):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="max_regions"):
        ClientLimits(max_regions=0)


# --- the receive limit is the client's own ------------------------------------------------


async def test_the_servers_huge_limit_does_not_raise_ours() -> None:
    server = Hostile()
    server.version_caps = Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 30)
    with trio.fail_after(10):
        async with hostile(server) as (client, _):
            assert client.connection.max_msg_size == max_msg_size_for(MiB)
            assert client.max_data_xfer_size == MiB
            assert len(await client.read(0, 0, 3 * MiB)) == 3 * MiB
            assert server.reads == [MiB] * 3  # split at our limit, not the server's


async def test_a_reply_beyond_our_limit_closes_the_connection() -> None:
    async def flood(request: Request) -> HandlerResult:
        assert isinstance(request, RegionReadRequest)
        return RegionReadReply(request.region, request.offset, bytes(2 * MiB))

    server = Hostile(RegionReadRequest=flood)
    server.version_caps = Capabilities(max_msg_fds=8, max_data_xfer_size=64 * MiB)
    with trio.fail_after(10):
        async with hostile(server) as (client, _):
            with pytest.raises(ProtocolError) as info:
                await client.read(0, 0, 64, use_mmap=False)
            assert info.value.errno == errno.EMSGSIZE
            assert client.closed


async def test_proposed_capabilities_set_the_receive_limit() -> None:
    server = Hostile()
    server.version_caps = Capabilities(max_msg_fds=8, max_data_xfer_size=64 * MiB)
    proposal = Capabilities(max_msg_fds=16, max_data_xfer_size=4 * MiB)
    with trio.fail_after(10):
        async with hostile(server, capabilities=proposal) as (client, conn):
            assert client.connection.max_msg_size == max_msg_size_for(4 * MiB)
            assert client.max_data_xfer_size == 4 * MiB
            # A server DMA above what we proposed is refused (EINVAL), never buffered.
            big = struct.pack("=QQ", 0, 8 * MiB) + bytes(8 * MiB)
            with pytest.raises(VfioUserError) as info:
                await conn.request_raw(Command.DMA_WRITE, big)
            assert info.value.errno == errno.EINVAL
            assert not client.closed
    ours, theirs = socket.socketpair()
    with theirs, pytest.raises(ValueError, match="max_data_xfer_size"):
        async with connect(ours, capabilities=Capabilities(max_data_xfer_size=0)):
            pass  # pragma: no cover
    assert ours.fileno() == -1  # connect owned it, and closed it


# --- fds from the server are checked --------------------------------------------------------


def _not_an_eventfd() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


async def test_region_io_fds_must_be_eventfds() -> None:
    async def io_fds(request: Request) -> HandlerResult:
        assert isinstance(request, RegionIoFdsRequest)
        subs = (IoEventFdSubRegion(0, 4, 0), IoEventFdSubRegion(8, 4, 1))
        reply = region_io_fds_reply(RegionIoFdsReply(0, subs), request.argsz)
        if not reply.sub_regions:  # the argsz dance: first say how much room is needed
            return reply
        fds = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), _not_an_eventfd())
        return RawMessage(reply.pack(), fds, transfer_fds=True)

    with trio.fail_after(10):
        async with hostile(Hostile(RegionIoFdsRequest=io_fds)) as (client, _):
            with pytest.raises(VfioUserError, match="io fd 1: expected an eventfd") as info:
                await client.region_io_fds(0)
            assert info.value.errno == errno.EINVAL
    # The no_fd_leak fixture checks that the client closed both fds it received.


def _pipe_end() -> int:
    return _not_an_eventfd()


def _datagram() -> int:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.close()
    return b.detach()


def _inet_stream() -> int:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach()


def _unconnected() -> int:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).detach()


def _listening(tmp: list[Path]) -> Callable[[], int]:
    def make() -> int:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind("\0vfiouser-trio-test-" + str(os.getpid()) + "-" + str(len(tmp)))
        s.listen(1)
        return s.detach()

    return make


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_pipe_end, "not a socket"),
        (_datagram, "SOCK_DGRAM"),
        (_inet_stream, "AF_INET"),
        (_listening([]), "listening"),
        (_unconnected, "not connected"),
    ],
    ids=["pipe", "datagram", "inet", "listening", "unconnected"],
)
async def test_twin_socket_fd_must_be_a_unix_stream_socket(
    make: Callable[[], int], why: str
) -> None:
    async def version(request: Request) -> HandlerResult:
        caps = Capabilities(max_msg_fds=8, twin_socket=TwinSocket(True, 0))
        return RawMessage(VersionReply(0, 2, caps).pack(), (make(),), transfer_fds=True)

    with trio.fail_after(10), pytest.raises(ProtocolError, match=why) as info:
        async with hostile(Hostile(VersionRequest=version)):
            pass  # pragma: no cover
    assert info.value.errno == errno.EINVAL


# --- the DMA the client serves ----------------------------------------------------------------


async def test_absurd_dma_from_the_server_is_refused() -> None:
    with trio.fail_after(10), GuestMemory(0x2000) as memory:
        async with hostile(Hostile()) as (client, conn):
            await client.dma_map(memory, 0x10000, share_fd=False)
            cases = [
                (Command.DMA_READ, struct.pack("=QQ", (1 << 64) - 1, 16), errno.EINVAL),  # wraps
                (Command.DMA_READ, struct.pack("=QQ", 0x10000, (1 << 64) - 1), errno.EINVAL),
                (Command.DMA_READ, struct.pack("=QQ", 0x10000, MiB + 1), errno.EINVAL),
                (Command.DMA_READ, struct.pack("=QQ", 0x10000, 0x2001), errno.EFAULT),
                (Command.DMA_READ, struct.pack("=QQ", 1 << 63, 8), errno.EFAULT),
                (Command.DMA_WRITE, struct.pack("=QQ", (1 << 64) - 4, 8) + bytes(8), errno.EINVAL),
                (Command.DMA_WRITE, struct.pack("=QQ", 0x10000, 1 << 62) + bytes(8), errno.EINVAL),
                (Command.DMA_WRITE, struct.pack("=QQ", 0xFFFF, 2) + b"ab", errno.EFAULT),
                (Command.DMA_READ, b"\0" * 3, errno.EINVAL),
            ]
            for command, payload, code in cases:
                with pytest.raises(VfioUserError) as info:
                    await conn.request_raw(command, payload)
                assert info.value.errno == code, payload.hex()
            assert not client.closed
            frame = await conn.request_raw(Command.DMA_READ, struct.pack("=QQ", 0x10000, 4))
            assert bytes(frame.payload[16:]) == bytes(4)


async def test_dma_service_refuses_a_wrapping_range() -> None:
    with GuestMemory(0x1000) as memory:
        maps = DmaMaps()
        maps.add(DmaMap((1 << 64) - 0x1000, 0x1000, memory))
        service = DmaService(maps, max_data_xfer_size=0x1000)
        payload = struct.pack("=QQ", (1 << 64) - 8, 16)
        frame = Frame(command_header(1, Command.DMA_READ, len(payload)), payload, [])
        with pytest.raises(VfioUserError, match="wraps") as info:
            service.handle(frame)
        assert info.value.errno == errno.EINVAL
