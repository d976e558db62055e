"""Connection engine: requests, dispatch, ordering policies, twin sockets, fd passing."""

from __future__ import annotations

import array
import errno
import itertools
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from tests.counting_socket import CountingSocket
from vfiouser_trio.engine import (
    DEFAULT_DISPATCH_BATCH,
    FRAME_OVERHEAD,
    Connection,
    ConnectionHooks,
    Forward,
    Handler,
    HandlerResult,
    Link,
    RawMessage,
    open_connection,
)
from vfiouser_trio.ordering import (
    ConcurrentOrder,
    KeyedOrder,
    OrderingPolicy,
    SpecOrder,
    region_key,
)
from vfiouser_trio.protocol.constants import FLAG_NO_REPLY, FLAG_TYPE_REPLY, Command
from vfiouser_trio.protocol.errors import ProtocolError, VfioUserError
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.protocol.header import Header
from vfiouser_trio.protocol.message import Buffer, Reply, Request
from vfiouser_trio.transport import CHUNK_OVERHEAD, Transport

pytestmark = pytest.mark.usefixtures("no_fd_leak")


# --------------------------------------------------------------------------- test messages


@dataclass(frozen=True, slots=True)
class EchoReply(Reply):
    COMMAND = Command.DEVICE_GET_INFO
    data: bytes

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> EchoReply:
        cls._expect_no_fds(fds)
        return cls(bytes(payload))


@dataclass(frozen=True, slots=True)
class Echo(Request):
    """A test command whose reply echoes its payload."""

    COMMAND = Command.DEVICE_GET_INFO
    REPLY = EchoReply
    data: bytes = b""

    def pack(self) -> bytes:
        return self.data

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Echo:
        cls._expect_no_fds(fds)
        return cls(bytes(payload))


@dataclass(frozen=True, slots=True)
class HandlesReply(Reply):
    COMMAND = Command.DEVICE_SET_IRQS
    handles: tuple[int, ...] = ()

    @property
    def fds(self) -> tuple[int, ...]:
        return self.handles

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> HandlesReply:
        return cls(tuple(fds))


@dataclass(frozen=True, slots=True)
class PassHandles(Request):
    """A test command that carries fds and is answered with fds."""

    COMMAND = Command.DEVICE_SET_IRQS
    REPLY = HandlesReply
    handles: tuple[int, ...] = ()

    @property
    def fds(self) -> tuple[int, ...]:
        return self.handles

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> PassHandles:
        return cls(tuple(fds))


async def echo_handler(frame: Frame) -> HandlerResult:
    return Echo.unpack(frame.payload, frame.fds)


async def no_commands(frame: Frame) -> HandlerResult:
    raise VfioUserError(errno.ENOSYS, command=frame.header.command)


@asynccontextmanager
async def connected(
    handler_a: Callable[[Frame], Awaitable[HandlerResult]] = echo_handler,
    handler_b: Callable[[Frame], Awaitable[HandlerResult]] = echo_handler,
    **options: Any,
) -> AsyncIterator[tuple[Connection, Connection]]:
    a, b = socket.socketpair()
    async with (
        open_connection(a, handler=handler_a, **options) as conn_a,
        open_connection(b, handler=handler_b, **options) as conn_b,
    ):
        yield conn_a, conn_b


class Peer:
    """The far end driven by hand: raw frames out, every frame received collected."""

    def __init__(self, sock: socket.socket, **limits: int) -> None:
        self.transport = Transport(sock, **limits)
        self.frames: list[Frame] = []
        self.eof = trio.Event()

    async def collect(self) -> None:
        try:
            while events := await self.transport.receive():
                self.frames.extend(e for e in events if isinstance(e, Frame))
        except trio.ClosedResourceError:
            pass  # the test closed its end
        self.eof.set()

    def send(self, msg_id: int, command: int, payload: bytes = b"", flags: int = 0) -> None:
        header = Header(msg_id, command, 16 + len(payload), flags)
        self.transport.write(header, payload)

    async def wait_frames(self, count: int) -> list[Frame]:
        while len(self.frames) < count:
            await trio.testing.wait_all_tasks_blocked()
        return self.frames[:count]


@asynccontextmanager
async def peer_and_connection(
    handler: Handler, **options: Any
) -> AsyncIterator[tuple[Peer, Connection]]:
    a, b = socket.socketpair()
    peer = Peer(a, max_recv_fds=8)
    async with trio.open_nursery() as nursery, open_connection(b, handler=handler, **options) as c:
        nursery.start_soon(peer.collect)
        try:
            yield peer, c
        finally:
            peer.transport.close()
            for frame in peer.frames:
                frame.close_fds()


# --------------------------------------------------------------------------- requests


async def test_typed_request_gets_its_typed_reply() -> None:
    with trio.fail_after(5):
        async with connected() as (a, b):
            assert await a.request(Echo(b"hello")) == EchoReply(b"hello")
            assert await b.request(Echo(b"back")) == EchoReply(b"back")


async def test_error_reply_raises_with_errno_and_command() -> None:
    async def handler(frame: Frame) -> HandlerResult:
        raise VfioUserError(errno.ENOENT, "no such map")

    with trio.fail_after(5):
        async with connected(handler_a=handler) as (_a, b):
            with pytest.raises(VfioUserError) as info:
                await b.request(Echo())
            assert info.value.errno == errno.ENOENT
            assert info.value.command == Command.DEVICE_GET_INFO


async def test_unexpected_handler_exception_answers_eio_and_keeps_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def handler(frame: Frame) -> HandlerResult:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("device bug")
        return None

    with trio.fail_after(5):
        async with connected(handler_a=handler) as (_a, b):
            with pytest.raises(VfioUserError) as info:
                await b.request_raw(Command.DEVICE_RESET)
            assert info.value.errno == errno.EIO
            reply = await b.request_raw(Command.DEVICE_RESET)
            assert reply.payload == b""
    assert "device bug" in caplog.text


async def test_error_reply_without_errno_raises_eio() -> None:
    async with peer_and_connection(no_commands) as (peer, conn):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def ask() -> None:
                    with pytest.raises(VfioUserError) as info:
                        await conn.request_raw(Command.DMA_READ, b"x")
                    assert info.value.errno == errno.EIO

                nursery.start_soon(ask)
                (cmd,) = await peer.wait_frames(1)
                peer.transport.write(Header(cmd.header.msg_id, Command.DMA_READ, 16, 0x21, 0))


async def test_reply_with_the_wrong_command_is_a_protocol_error() -> None:
    async with peer_and_connection(no_commands) as (peer, conn):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def ask() -> None:
                    with pytest.raises(ProtocolError):
                        await conn.request_raw(Command.DMA_READ, b"x")

                nursery.start_soon(ask)
                (cmd,) = await peer.wait_frames(1)
                peer.send(cmd.header.msg_id, Command.DMA_WRITE, b"", flags=1)


async def test_reply_with_more_fds_than_the_peer_accepts_becomes_einval() -> None:
    r, w = os.pipe()

    async def handler(frame: Frame) -> HandlerResult:
        return RawMessage(b"", [os.dup(r), os.dup(w)], transfer_fds=True)

    with trio.fail_after(5):
        async with connected(handler_a=handler) as (_a, b):  # max_send_fds defaults to 1
            with pytest.raises(VfioUserError) as info:
                await b.request_raw(Command.DEVICE_GET_REGION_IO_FDS)
            assert info.value.errno == errno.EINVAL
    os.close(r)
    os.close(w)


async def test_no_reply_request_returns_once_sent() -> None:
    seen = trio.Event()

    async def handler(frame: Frame) -> HandlerResult:
        assert frame.header.no_reply
        seen.set()
        raise VfioUserError(errno.EINVAL)  # must not be answered

    with trio.fail_after(5):
        async with connected(handler_a=handler) as (_a, b):
            await b.post_raw(Echo.COMMAND, Echo(b"fire").pack())  # returns as soon as it is sent
            await seen.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert not b.core.awaiting_replies


async def test_too_many_fds_for_the_peer_fails_before_sending() -> None:
    r, w = os.pipe()
    with trio.fail_after(5):
        async with connected() as (_a, b):
            with pytest.raises(ProtocolError, match="limit"):
                await b.request(PassHandles((r, w)))
            assert await b.request(Echo(b"still fine")) == EchoReply(b"still fine")
    os.close(r)
    os.close(w)


async def test_payload_length_is_counted_in_bytes() -> None:
    words = array.array("I", [1, 2, 3])
    with trio.fail_after(5):
        async with connected() as (_a, b):
            reply = await b.request_raw(Command.REGION_WRITE, memoryview(words))
    assert reply.payload == words.tobytes()


async def test_a_request_waits_while_every_message_id_is_taken() -> None:
    release = trio.Event()
    seen_ids: list[int] = []

    async def handler(frame: Frame) -> HandlerResult:
        seen_ids.append(frame.header.msg_id)
        if frame.payload == b"hold":
            await release.wait()
        return None

    with trio.fail_after(5):
        async with connected(handler, echo_handler, policy=ConcurrentOrder()) as (_a, b):
            b.next_message_id = 1
            for _ in range(0xFFFF):  # as if 65535 cancelled requests were unanswered
                core = b.core
                msg_id = core.allocate_id()
                assert msg_id is not None
                waiter: Any = object()  # (stands in for the engine's pending request)
                core.expect_reply(msg_id, Command.REGION_READ, waiter)
                assert core.cancel(msg_id, waiter)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(b.request_raw, Command.REGION_READ, b"hold")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(b.request_raw, Command.REGION_READ, b"next")
                await trio.testing.wait_all_tasks_blocked()
                assert seen_ids == [0]  # the second request has no ID to use yet
                release.set()
    assert seen_ids == [0, 0]


async def test_large_messages_both_ways_through_a_small_socket_buffer() -> None:
    a, b = socket.socketpair()
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    blobs = [bytes([i]) * (900_000 + i) for i in range(4)]
    with trio.fail_after(10):
        async with (
            open_connection(a, handler=echo_handler) as _server,
            open_connection(b, handler=echo_handler) as client,
            trio.open_nursery() as nursery,
        ):

            async def ask(blob: bytes) -> None:
                assert await client.request(Echo(blob)) == EchoReply(blob)

            for blob in blobs:
                nursery.start_soon(ask, blob)


async def test_many_pipelined_requests_from_several_tasks() -> None:
    with trio.fail_after(10):
        async with connected() as (_a, b):

            async def client(tag: int) -> None:
                for i in range(100):
                    data = b"%d-%d" % (tag, i) * (i % 7)
                    assert await b.request(Echo(data)) == EchoReply(data)

            async with trio.open_nursery() as nursery:
                for tag in range(10):
                    nursery.start_soon(client, tag)


async def test_an_exception_in_the_body_propagates_unwrapped() -> None:
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(KeyError):
        async with open_connection(a, handler=echo_handler) as conn:
            raise KeyError("mine")
    assert conn.closed.is_set()


async def test_open_connection_closes_a_socket_it_cannot_use() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(ValueError, match="SOCK_STREAM"):
        async with open_connection(a, handler=echo_handler):
            pass
    assert a.fileno() == -1
    b.close()


async def test_a_connection_that_cannot_use_its_socket_closes_it() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(ValueError, match="SOCK_STREAM"):
        Connection(a, handler=echo_handler)
    assert a.fileno() == -1
    b.close()


async def test_run_serves_in_the_calling_task_until_the_peer_leaves() -> None:
    """Connection.run(): the caller's task reads the main link (the engine starts no task
    of its own while the connection is idle) and returns once the peer has left."""
    a_sock, b_sock = socket.socketpair()
    a = Connection(a_sock, handler=echo_handler)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.run)
            async with open_connection(b_sock, handler=no_commands) as b:
                for _ in range(3):
                    reply = await b.request(Echo(b"ping"))
                    assert isinstance(reply, EchoReply) and reply.data == b"ping"
                await trio.testing.wait_all_tasks_blocked()
                assert _engine_tasks() == ["_run", "run"]  # b's first task, a's caller
            await a.wait_closed()
    assert a.close_reason is None


async def test_requests_are_checkpoints() -> None:
    with trio.fail_after(5):
        async with connected() as (_a, b):
            with trio.testing.assert_checkpoints():
                await b.post_raw(Command.DEVICE_RESET)
            with trio.testing.assert_checkpoints():
                await b.request_raw(Command.DEVICE_RESET)


# --------------------------------------------------------------------------- the deadlock case


async def _nested_round_trip(a: Connection, b: Connection) -> None:
    """b asks a (REGION_WRITE); a's handler asks b (DMA_READ) before it answers."""
    assert await b.request_raw(Command.REGION_WRITE, b"kick") is not None


def _nested_handlers(
    holder: dict[str, Connection],
) -> tuple[
    Callable[[Frame], Awaitable[HandlerResult]], Callable[[Frame], Awaitable[HandlerResult]]
]:
    async def server(frame: Frame) -> HandlerResult:
        assert frame.header.command == Command.REGION_WRITE
        dma = await holder["a"].request_raw(Command.DMA_READ, b"addr")
        assert dma.payload == b"guest data"
        return RawMessage(b"done")

    async def client(frame: Frame) -> HandlerResult:
        assert frame.header.command == Command.DMA_READ
        return RawMessage(b"guest data")

    return server, client


async def test_handler_may_request_from_a_peer_awaiting_its_reply_single_socket() -> None:
    holder: dict[str, Connection] = {}
    server, client = _nested_handlers(holder)
    with trio.fail_after(5):
        async with connected(server, client) as (a, b):
            holder["a"] = a
            await _nested_round_trip(a, b)


class LinkRecorder(ConnectionHooks):
    """Records (link, direction, command, is_reply) of every frame."""

    def __init__(self) -> None:
        self.seen: list[tuple[Link, str, int, bool]] = []

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self.seen.append((link, "out", frame.header.command, frame.header.is_reply))
        forward(frame)

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self.seen.append((link, "in", frame.header.command, frame.header.is_reply))
        forward(frame)


async def test_handler_may_request_from_a_peer_awaiting_its_reply_twin_sockets() -> None:
    holder: dict[str, Connection] = {}
    server, client = _nested_handlers(holder)

    async def server_with_version(frame: Frame) -> HandlerResult:
        if frame.header.command != Command.VERSION:
            return await server(frame)
        mine, theirs = socket.socketpair()
        holder["a"].attach_twin(mine, requests_on_twin=True)
        return RawMessage(b"twin", [theirs.detach()], transfer_fds=True)

    a_sock, b_sock = socket.socketpair()
    recorder = LinkRecorder()
    with trio.fail_after(5):
        async with (
            open_connection(a_sock, handler=server_with_version) as a,
            open_connection(b_sock, handler=client, hooks=recorder) as b,
        ):
            holder["a"] = a
            version = await b.request_raw(Command.VERSION, b"twin please")
            (twin_fd,) = version.take_fds()
            b.attach_twin(twin_fd, requests_on_twin=False)
            assert a.has_twin and b.has_twin
            await _nested_round_trip(a, b)
    assert recorder.seen[2:] == [
        (Link.MAIN, "out", Command.REGION_WRITE, False),
        (Link.TWIN, "in", Command.DMA_READ, False),
        (Link.TWIN, "out", Command.DMA_READ, True),
        (Link.MAIN, "in", Command.REGION_WRITE, True),
    ]


# The same interleavings under every policy, with no hooks (hooks turn the inline fast path
# off): the server's reader runs REGION_WRITE inline and its handler must wait for the peer,
# directly (its own DMA_READ) or through another task's request.
POLICIES: dict[str, Callable[[], OrderingPolicy]] = {
    "spec": SpecOrder,
    "concurrent": ConcurrentOrder,
    "keyed": lambda: KeyedOrder(region_key),
}


@pytest.mark.parametrize("hooked", [False, True], ids=["inline", "hooks"])
@pytest.mark.parametrize("policy", POLICIES)
async def test_a_handler_may_answer_at_once_without_a_coroutine(policy: str, hooked: bool) -> None:
    """A plain-function handler returns its result (or raises) instead of an awaitable: the
    engine answers it as it would the awaited result, inline or not, under every policy."""

    def handler(frame: Frame) -> HandlerResult:
        if frame.payload == b"fail":
            raise VfioUserError(errno.EPERM, "refused at once")
        if frame.payload == b"nothing":
            return None
        return b"at once: " + frame.payload

    hooks = ConnectionHooks() if hooked else None
    with trio.fail_after(5):
        async with peer_and_connection(handler, policy=POLICIES[policy](), hooks=hooks) as (
            peer,
            _conn,
        ):
            for msg_id, payload in enumerate((b"one", b"fail", b"posted", b"nothing", b"two")):
                flags = FLAG_NO_REPLY if payload == b"posted" else 0
                peer.send(msg_id, Command.REGION_WRITE, payload, flags)
            frames = await peer.wait_frames(4)
    replies = {f.header.msg_id: f for f in frames}
    assert sorted(replies) == [0, 1, 3, 4]
    assert replies[0].payload == b"at once: one" and replies[4].payload == b"at once: two"
    assert replies[1].header.is_error and replies[1].header.error == errno.EPERM
    assert replies[3].payload == b"" and not replies[3].header.is_error
    assert all(f.header.flags & FLAG_TYPE_REPLY for f in frames)


def _indirect_handlers(
    holder: dict[str, Connection], nursery: trio.Nursery
) -> tuple[
    Callable[[Frame], Awaitable[HandlerResult]], Callable[[Frame], Awaitable[HandlerResult]]
]:
    """a's REGION_WRITE waits for a task of its own, which waits for b's DMA_READ reply."""

    async def dma_task(done: trio.Event) -> None:
        dma = await holder["a"].request_raw(Command.DMA_READ, b"addr")
        assert dma.payload == b"guest data"
        done.set()

    async def server(frame: Frame) -> HandlerResult:
        assert frame.header.command == Command.REGION_WRITE
        done = trio.Event()
        nursery.start_soon(dma_task, done)
        await done.wait()
        return RawMessage(b"done")

    _, client = _nested_handlers(holder)
    return server, client


@asynccontextmanager
async def twin_connected(
    server: Callable[[Frame], Awaitable[HandlerResult]],
    client: Callable[[Frame], Awaitable[HandlerResult]],
    holder: dict[str, Connection],
    policy: Callable[[], OrderingPolicy],
) -> AsyncIterator[tuple[Connection, Connection]]:
    """A connection pair that has negotiated twin sockets (a creates them, as a server)."""

    async def server_with_version(frame: Frame) -> HandlerResult:
        if frame.header.command != Command.VERSION:
            return await server(frame)
        mine, theirs = socket.socketpair()
        holder["a"].attach_twin(mine, requests_on_twin=True)
        return RawMessage(b"twin", [theirs.detach()], transfer_fds=True)

    a_sock, b_sock = socket.socketpair()
    async with (
        open_connection(a_sock, handler=server_with_version, policy=policy()) as a,
        open_connection(b_sock, handler=client, policy=policy()) as b,
    ):
        holder["a"] = a
        version = await b.request_raw(Command.VERSION, b"twin please")
        (twin_fd,) = version.take_fds()
        b.attach_twin(twin_fd, requests_on_twin=False)
        assert a.has_twin and b.has_twin
        yield a, b


def _engine_tasks() -> list[str]:
    """The names of the engine's tasks now running, anywhere in the run."""
    names: list[str] = []
    root = trio.lowlevel.current_root_task()
    assert root is not None
    pending = [root]
    while pending:
        task = pending.pop()
        name = task.name.rsplit(".", 1)[-1]
        if "engine" in task.name or name in {"run_writer", "run_policy"}:
            names.append(name)
        pending.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return sorted(names)


async def test_an_idle_twin_socket_pair_runs_only_the_readers_it_needs() -> None:
    """Idle, a connection holds one task per link it must read: the server (requests on
    the twin) reads its twin only while a reply is awaited (else the process-wide idle
    watch has it); writers and dispatchers start when first needed. (Memory per idle
    connection: bench figure 5.)"""
    holder: dict[str, Connection] = {}
    server, client = _nested_handlers(holder)
    with trio.fail_after(5):
        async with twin_connected(server, client, holder, SpecOrder) as (a, b):
            await _nested_round_trip(a, b)  # a request each way, a handler that waits
            await trio.testing.wait_all_tasks_blocked()
            # Each side's first task (_run) holds its nursery. a: the reader it handed its
            # main link to when the REGION_WRITE handler waited, and the dispatcher that
            # adopted that handler; no twin reader, no writer. b: _run reads its main link,
            # and one reader for its twin (commands come there).
            assert _engine_tasks() == ["_read_loop"] * 2 + ["_run", "_run", "run_policy"]
            await _nested_round_trip(a, b)  # the twin is read again when needed
            await trio.testing.wait_all_tasks_blocked()
            assert _engine_tasks() == ["_read_loop"] * 2 + ["_run", "_run", "run_policy"]


@pytest.mark.parametrize("how", ["hang-up", "command"])
async def test_the_idle_twin_link_is_watched_without_a_reader(how: str) -> None:
    """The side whose requests go on the twin runs no reader there while idle, yet sees the
    peer close only its twin (its main socket may stay open in another process) and serves
    a command the peer sends there."""
    holder: dict[str, Connection] = {}
    server, client = _nested_handlers(holder)
    with trio.fail_after(5):
        async with twin_connected(server, client, holder, SpecOrder) as (a, b):
            await trio.testing.wait_all_tasks_blocked()
            assert b._twin is not None
            if how == "hang-up":
                # The peer leaves, its main socket kept open elsewhere: only the twin ends.
                kept = os.dup(b._main.transport.fileno())
                try:
                    b.close()
                    await a.wait_closed()
                finally:
                    os.close(kept)
            else:
                assert b._twin is not None
                b._request_link = b._twin  # no client sends commands there, but one may
                frame = await b.request_raw(Command.REGION_WRITE, b"on the twin")
                assert frame.payload == b"done"  # a's handler asked b for DMA meanwhile
                assert not a.closed.is_set()


async def test_the_watched_twin_gets_a_reader_while_it_holds_commands() -> None:
    """Commands arriving on the server's twin are queued by the idle watch; while the link
    holds one, the next read is a reader task's (which can pause reading), and that reader
    leaves after the first read that finds nothing held."""
    holder: dict[str, Connection] = {}
    release = trio.Event()

    async def server(frame: Frame) -> HandlerResult:
        await release.wait()
        return RawMessage(b"done")

    _, client = _nested_handlers(holder)
    with trio.fail_after(5):
        async with twin_connected(server, client, holder, SpecOrder) as (a, b):
            await trio.testing.wait_all_tasks_blocked()
            idle = _engine_tasks()
            assert b._twin is not None
            b._request_link = b._twin  # no client sends commands there, but one may
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(b.request_raw, Command.REGION_WRITE, b"held")
                    await trio.testing.wait_all_tasks_blocked()
                # a: a dispatcher (first command) and a twin reader (second one); b's two
                # requesters are the test's.
                busy = [t for t in _engine_tasks() if t != "request_raw"]
                assert busy == sorted([*idle, "_read_loop", "run_policy"])
                release.set()
            # The reader waits in the kernel until the next message there, then leaves.
            await a.request_raw(Command.DMA_READ, b"addr")
            await trio.testing.wait_all_tasks_blocked()
            assert _engine_tasks().count("_read_loop") == idle.count("_read_loop")


@pytest.mark.parametrize("twin", [False, True], ids=["one-socket", "twin-sockets"])
@pytest.mark.parametrize("indirect", [False, True], ids=["own-request", "other-task"])
@pytest.mark.parametrize("policy", list(POLICIES.values()), ids=list(POLICIES))
async def test_an_inline_handler_that_waits_for_the_peer_completes_under_every_policy(
    policy: Callable[[], OrderingPolicy], indirect: bool, twin: bool
) -> None:
    holder: dict[str, Connection] = {}
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            if indirect:
                server, client = _indirect_handlers(holder, nursery)
            else:
                server, client = _nested_handlers(holder)
            if twin:
                pair = twin_connected(server, client, holder, policy)
            else:
                pair = connected(server, client, policy=policy())
            async with pair as (a, b):
                holder["a"] = a
                # Pipelined: the second REGION_WRITE arrives while the first one waits.
                async with trio.open_nursery() as requests:
                    for _ in range(2):
                        requests.start_soon(_nested_round_trip, a, b)


class TaskSteps(trio.abc.Instrument):
    """The tasks trio runs, in order."""

    def __init__(self) -> None:
        self.tasks: list[trio.lowlevel.Task] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.tasks.append(task)


@pytest.mark.parametrize("policy", list(POLICIES.values()), ids=list(POLICIES))
async def test_a_command_that_never_waits_is_answered_by_the_reader_alone(
    policy: Callable[[], OrderingPolicy],
) -> None:
    """The fast path: no dispatcher task runs between reading a command and its reply."""
    a, b = socket.socketpair()
    with a, trio.fail_after(5):
        async with open_connection(b, handler=echo_handler, policy=policy()):
            await trio.testing.wait_all_tasks_blocked()
            steps = TaskSteps()
            trio.lowlevel.add_instrument(steps)
            try:
                a.sendall(Header(7, Command.DEVICE_GET_INFO, 20, 0).pack() + b"ping")
                await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(steps)
            a.setblocking(False)
            reply = Header(7, Command.DEVICE_GET_INFO, 20, FLAG_TYPE_REPLY).pack() + b"ping"
            assert a.recv(64) == reply
    me = trio.lowlevel.current_task()
    engine_tasks = {task for task in steps.tasks if task is not me}
    # One task: the main link's reader (the connection's first task reads it).
    assert [task.name.rsplit(".", 1)[-1] for task in engine_tasks] == ["_run"]


async def test_a_waiting_inline_command_is_ordered_before_the_next_one_under_spec_order() -> None:
    """The reader hands its role on when the first command waits; the second, in the same
    read, is queued behind it and starts only once the first is done."""
    gate = trio.Event()
    log: list[str] = []

    async def handler(frame: Frame) -> HandlerResult:
        log.append(f"start {frame.header.msg_id}")
        if frame.header.msg_id == 1:
            await gate.wait()
        log.append(f"end {frame.header.msg_id}")
        return None

    async with peer_and_connection(handler) as (peer, _conn):
        with trio.fail_after(5):
            peer.transport.write(Header(1, Command.REGION_READ, 16, 0), flush=False)
            peer.send(2, Command.REGION_READ)
            await trio.testing.wait_all_tasks_blocked()
            assert log == ["start 1"]
            gate.set()
            replies = await peer.wait_frames(2)
    assert [f.header.msg_id for f in replies] == [1, 2]
    assert log == ["start 1", "end 1", "start 2", "end 2"]


async def test_closing_while_an_inline_command_waits_cancels_it_and_closes_its_fds() -> None:
    waiting = trio.Event()
    cancelled = trio.Event()

    async def handler(frame: Frame) -> HandlerResult:
        waiting.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    async with peer_and_connection(handler) as (peer, conn):
        with trio.fail_after(5):
            fd = os.eventfd(0)
            header = Header(1, Command.DMA_MAP, 16, 0)
            peer.transport.write(header, b"", [fd])  # the transport sends a duplicate
            os.close(fd)
            await waiting.wait()
            conn.close()
            await cancelled.wait()
    # no_fd_leak: the fd the command carried was closed with it.


async def test_inline_commands_respect_the_send_backlog_mark_within_one_read() -> None:
    """32 small commands in one read, each asking for a 64 KiB reply, of a peer that never
    reads: the reader runs commands inline only below the mark, so at most one reply is
    queued past it (the rest wait in the queue, as the dispatcher keeps them)."""
    mark = 128 << 10
    reply_size = 64 << 10
    count = 32
    big = bytes(reply_size)

    async def handler(frame: Frame) -> HandlerResult:
        return RawMessage(big)

    a, b = socket.socketpair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    blob = b"".join(
        Header(i, Command.REGION_READ, 32, 0).pack() + _region_read(0) for i in range(count)
    )
    with a, trio.fail_after(5):
        async with open_connection(b, handler=handler, max_send_backlog=mark) as conn:
            a.sendall(blob)
            await trio.testing.wait_all_tasks_blocked()
            held = conn.held_bytes
            assert held <= mark + reply_size + count * (FRAME_OVERHEAD + 16 + CHUNK_OVERHEAD)


async def test_inline_commands_yield_every_dispatch_batch() -> None:
    """64 commands in one read run inline, but the reader lets the rest of the process run
    every ``dispatch_batch`` commands, as the dispatcher does: another connection's command,
    readable from the first one on, is answered within two batches (not after all 64)."""
    batch = 4
    count = 64
    a_peer, a_sock = socket.socketpair()
    b_peer, b_sock = socket.socketpair()
    ran = 0
    seen_at: list[int] = []

    async def a_handler(frame: Frame) -> HandlerResult:
        nonlocal ran
        ran += 1
        if ran == 1:
            b_peer.sendall(Header(7, Command.DEVICE_RESET, 16, 0).pack())
        return None

    async def b_handler(frame: Frame) -> HandlerResult:
        seen_at.append(ran)
        return None

    blob = b"".join(Header(i, Command.DEVICE_RESET, 16, 0).pack() for i in range(count))
    with a_peer, b_peer, trio.fail_after(5):
        async with (
            open_connection(a_sock, handler=a_handler, dispatch_batch=batch),
            open_connection(b_sock, handler=b_handler, dispatch_batch=batch),
        ):
            # Both readers wait on their sockets first: else B's reader may still be
            # starting (a scheduler pass or two) when its command arrives, and this would
            # measure its start, not the reader of A yielding.
            await trio.testing.wait_all_tasks_blocked()
            a_peer.sendall(blob)
            while ran < count or not seen_at:
                await trio.testing.wait_all_tasks_blocked()
    assert seen_at[0] <= 2 * batch


async def test_attach_twin_rejects_what_is_not_a_stream_socket() -> None:
    with trio.fail_after(5):
        async with connected() as (a, _b):
            r, w = os.pipe()
            with pytest.raises(ProtocolError, match="twin"):
                a.attach_twin(r, requests_on_twin=True)  # closed by attach_twin
            os.close(w)
            assert not a.has_twin


# --------------------------------------------------------------------------- ordering


def _region_read(region: int) -> bytes:
    return struct.pack("=QII", 0, region, 4)


async def test_spec_order_processes_pipelined_commands_one_at_a_time_in_order() -> None:
    log: list[tuple[str, int]] = []

    async def handler(frame: Frame) -> HandlerResult:
        msg_id = frame.header.msg_id
        log.append(("start", msg_id))
        for _ in range((msg_id * 7) % 5):  # later commands finish faster
            await trio.lowlevel.checkpoint()
        log.append(("end", msg_id))
        return RawMessage(frame.payload)

    async with peer_and_connection(handler) as (peer, _conn):
        with trio.fail_after(5):
            for i in range(20):
                peer.send(i, Command.REGION_READ, _region_read(i % 3))
            replies = await peer.wait_frames(20)
    assert [r.header.msg_id for r in replies] == list(range(20))
    assert log == [(step, i) for i in range(20) for step in ("start", "end")]


async def test_pipelined_replies_leave_in_one_sendmsg() -> None:
    a, b = socket.socketpair()
    counting = CountingSocket(fileno=b.detach())
    peer = Peer(a)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery, open_connection(counting, handler=echo_handler):
            nursery.start_soon(peer.collect)
            # Fewer than one dispatch batch: the dispatcher yields (and the writer sends
            # what is queued) every DEFAULT_DISPATCH_BATCH commands, for fairness.
            count = DEFAULT_DISPATCH_BATCH - 1
            for i in range(count):
                header = Header(i, Command.DEVICE_GET_INFO, 17, 0)
                peer.transport.write(header, b"x", flush=i == count - 1)
            await peer.wait_frames(count)
            assert counting.sendmsg_calls == 1
            peer.transport.close()


@pytest.mark.parametrize("others", [0, 1], ids=["alone", "beside-another-connection"])
async def test_a_read_answered_inline_sends_its_replies_itself_at_each_fairness_cut(
    others: int,
) -> None:
    """The reader corks its link while it answers a read's commands: their replies leave in
    one sendmsg per fairness batch, sent by the reader before it yields, and the writer task
    is never started (waking it would cost a scheduler pass per batch). Alone in its trio run
    a connection makes no fairness cut (its reads yield): one sendmsg for the read."""
    a, b = socket.socketpair()
    counting = CountingSocket(fileno=b.detach())
    peer = Peer(a)
    other_socks = [socket.socketpair() for _ in range(others)]
    with trio.fail_after(5):
        async with (
            trio.open_nursery() as nursery,
            open_connection(counting, handler=echo_handler) as conn,
            AsyncExitStack() as stack,
        ):
            for _ours, theirs in other_socks:
                await stack.enter_async_context(open_connection(theirs, handler=echo_handler))
            nursery.start_soon(peer.collect)
            count = 3 * DEFAULT_DISPATCH_BATCH
            for i in range(count):
                header = Header(i, Command.DEVICE_GET_INFO, 17, 0)
                peer.transport.write(header, bytes([i]), flush=i == count - 1)
            replies = await peer.wait_frames(count)
            assert [(r.header.msg_id, r.payload) for r in replies] == [
                (i, bytes([i])) for i in range(count)
            ]
            assert counting.sendmsg_calls == (3 if others else 1)
            assert conn._main.transport.writer_nursery is not None  # the writer never ran
            peer.transport.close()
    for ours, _theirs in other_socks:
        ours.close()


async def _no_reply_then_reply(policy: OrderingPolicy) -> tuple[list[Frame], list[str]]:
    """Send a slow No_reply command, then a normal one; report replies seen while it runs."""
    release = trio.Event()
    log: list[str] = []

    async def handler(frame: Frame) -> HandlerResult:
        if frame.header.no_reply:
            log.append("slow start")
            await release.wait()
            log.append("slow end")
        return None

    async with peer_and_connection(handler, policy=policy) as (peer, _conn):
        with trio.fail_after(5):
            peer.send(1, Command.REGION_WRITE, b"posted", flags=FLAG_NO_REPLY)
            peer.send(2, Command.REGION_READ, b"read")
            await trio.testing.wait_all_tasks_blocked()
            early = list(peer.frames)
            release.set()
            (reply,) = await peer.wait_frames(1)
            assert reply.header.msg_id == 2
            await trio.testing.wait_all_tasks_blocked()
            assert len(peer.frames) == 1  # the No_reply command was never answered
    return early, log


async def test_spec_order_finishes_a_no_reply_command_before_a_later_reply() -> None:
    early, log = await _no_reply_then_reply(ConcurrentOrder(1))
    assert early == []
    assert log == ["slow start", "slow end"]
    early, log = await _no_reply_then_reply(KeyedOrder(lambda frame: None))
    assert early == []


async def test_concurrent_order_really_overlaps_commands() -> None:
    early, log = await _no_reply_then_reply(ConcurrentOrder(4))
    assert [f.header.msg_id for f in early] == [2]  # answered while the first still ran
    assert log == ["slow start", "slow end"]


async def test_concurrent_order_respects_its_limit() -> None:
    running = 0
    peak = 0
    gate = trio.Event()

    async def handler(frame: Frame) -> HandlerResult:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        return None

    async with peer_and_connection(handler, policy=ConcurrentOrder(3)) as (peer, _conn):
        with trio.fail_after(5):
            for i in range(8):
                peer.send(i, Command.REGION_READ, b"")
            await trio.testing.wait_all_tasks_blocked()
            assert running == 3
            gate.set()
            await peer.wait_frames(8)
    assert peak == 3


async def test_keyed_order_serialises_per_region_and_barriers_the_rest() -> None:
    gate = trio.Event()
    started: list[int] = []

    async def handler(frame: Frame) -> HandlerResult:
        started.append(frame.header.msg_id)
        if frame.header.msg_id == 1:
            await gate.wait()
        return None

    async with peer_and_connection(handler, policy=KeyedOrder(region_key)) as (peer, _conn):
        with trio.fail_after(5):
            peer.send(1, Command.REGION_READ, _region_read(0))  # blocks
            peer.send(2, Command.REGION_READ, _region_read(1))  # other region: overtakes
            peer.send(3, Command.REGION_WRITE, _region_read(0))  # same region: waits for 1
            peer.send(4, Command.DEVICE_RESET)  # barrier: waits for everything
            peer.send(5, Command.REGION_READ, _region_read(1))  # after the barrier
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(started) == [1, 2]  # separate lanes: either may start first
            assert [f.header.msg_id for f in peer.frames] == [2]
            gate.set()
            replies = await peer.wait_frames(5)
    assert [f.header.msg_id for f in replies] == [2, 1, 3, 4, 5]
    assert started[2:] == [3, 4, 5]


def test_region_key_reads_the_region_index() -> None:
    read = Frame(Header(1, Command.REGION_READ, 32), _region_read(7))
    assert region_key(read) == 7
    assert region_key(Frame(Header(1, Command.REGION_READ, 20), b"shrt")) is None
    assert region_key(Frame(Header(1, Command.DMA_MAP, 32), _region_read(7))) is None


def test_concurrent_order_needs_a_positive_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        ConcurrentOrder(0)


# --------------------------------------------------------------------------- fd passing


async def test_memfds_and_eventfds_travel_both_ways_with_the_right_message() -> None:
    memfd = os.memfd_create("guest-ram")
    os.write(memfd, b"ram contents")
    irq = os.eventfd(0)
    doorbells: list[int] = []

    async def server(frame: Frame) -> HandlerResult:
        if frame.header.command == Command.DEVICE_SET_IRQS:
            (fd,) = frame.take_fds()
            try:
                assert os.pread(fd, 12, 0) == b"ram contents"
            finally:
                os.close(fd)
            doorbell = os.eventfd(0)
            doorbells.append(os.dup(doorbell))
            return RawMessage(b"", [doorbell], transfer_fds=True)
        return await echo_handler(frame)

    async def client(frame: Frame) -> HandlerResult:
        (efd,) = frame.take_fds()
        os.eventfd_write(efd, 3)  # the server->client request carried an eventfd
        os.close(efd)
        return None

    try:
        with trio.fail_after(5):
            async with connected(server, client) as (a, b):
                assert await b.request(Echo(b"before")) == EchoReply(b"before")
                reply = await b.request(PassHandles((memfd,)))
                assert await b.request(Echo(b"after")) == EchoReply(b"after")
                assert isinstance(reply, HandlesReply)
                (doorbell,) = reply.handles
                os.eventfd_write(doorbell, 5)
                assert os.eventfd_read(doorbells[0]) == 5
                os.close(doorbell)
                await a.request_raw(Command.DMA_WRITE, b"irq", [irq])
                assert os.eventfd_read(irq) == 3
    finally:
        os.close(memfd)
        os.close(irq)
        for fd in doorbells:
            os.close(fd)


class _TaskSteps(trio.abc.Instrument):
    """Counts each task's steps (the runs between two of its yields)."""

    def __init__(self) -> None:
        self.steps: dict[trio.lowlevel.Task, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task] = self.steps.get(task, 0) + 1


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "dispatcher"])
async def test_a_cut_hook_decides_before_each_command_where_the_link_yields(inline: bool) -> None:
    """ConnectionCore.cut_hook is asked before every command a link starts, in the reader
    (inline) and in the dispatcher (a policy that runs nothing inline), and the link yields
    exactly where it says: six commands of one read run in two task steps, cut before #3."""
    count = 6
    peer, sock = socket.socketpair()
    asked: list[int] = []
    step_of: list[int] = []
    steps = _TaskSteps()

    def cut(started: int, header: Header) -> bool:
        asked.append(header.msg_id)
        return header.msg_id == 3

    async def handler(frame: Frame) -> HandlerResult:
        step_of.append(steps.steps[trio.lowlevel.current_task()])
        return None

    class NotInline(SpecOrder):
        runs_inline = False

    blob = b"".join(Header(i, Command.DEVICE_RESET, 16, 0).pack() for i in range(count))
    policy = SpecOrder() if inline else NotInline()
    trio.lowlevel.add_instrument(steps)
    try:
        with peer, trio.fail_after(5):
            async with open_connection(sock, handler=handler, policy=policy) as conn:
                conn.core.cut_hook = cut
                peer.sendall(blob)
                while len(step_of) < count:
                    await trio.testing.wait_all_tasks_blocked()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert asked == list(range(count))
    first = step_of[0]
    assert step_of == [first] * 3 + [first + 1] * 3


async def test_commands_arriving_one_per_read_never_make_the_reader_yield_for_fairness() -> None:
    """A receive yields to the scheduler, so a reader whose commands come one per read
    starts a new batch with each: no extra yield every ``dispatch_batch`` commands. Two
    task steps per command here: the receive's yield, then (this peer sends only once
    answered) its wait on the socket; there was a cut, a step more, every second command."""
    count = 6
    peer, sock = socket.socketpair()
    step_of: list[int] = []
    steps = _TaskSteps()

    async def handler(frame: Frame) -> HandlerResult:
        step_of.append(steps.steps[trio.lowlevel.current_task()])
        return None

    trio.lowlevel.add_instrument(steps)
    try:
        with peer, trio.fail_after(5):
            async with open_connection(sock, handler=handler, dispatch_batch=2):
                for i in range(count):
                    peer.sendall(Header(i, Command.DEVICE_RESET, 16, 0).pack())
                    while len(step_of) <= i:
                        await trio.testing.wait_all_tasks_blocked()
                    assert Header.unpack(peer.recv(16)).msg_id == i  # answered at once
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert [b - a for a, b in itertools.pairwise(step_of)] == [2] * (count - 1)
