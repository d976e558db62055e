"""Connection engine under abuse: garbage frames, disconnects, cancellation, leaks, faults."""

from __future__ import annotations

import array
import errno
import itertools
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fd_leaks import fd_count
from vfiouser_trio.engine import (
    Connection,
    ConnectionClosedError,
    ConnectionHooks,
    Forward,
    FramingError,
    HandlerResult,
    Link,
    RawMessage,
    open_connection,
)
from vfiouser_trio.ordering import ConcurrentOrder
from vfiouser_trio.protocol.constants import FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_REPLY, Command
from vfiouser_trio.protocol.errors import ProtocolError, VfioUserError
from vfiouser_trio.protocol.framing import Frame, OversizedFrame
from vfiouser_trio.transport import Transport

pytestmark = pytest.mark.usefixtures("no_fd_leak")

HEADER = struct.Struct("=HHIII")


async def echo(frame: Frame) -> HandlerResult:
    if frame.fds:
        raise ProtocolError("this command carries no file descriptors")
    return RawMessage(frame.payload)


def raw_frame(msg_id: int, command: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, 16 + len(payload), flags, 0) + payload


class RawPeer:
    """A hand-driven peer: writes raw bytes (and fds), collects every frame it receives."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.transport = Transport(sock.dup(), max_recv_fds=8)
        self.frames: list[Frame] = []
        self.eof = trio.Event()

    async def collect(self) -> None:
        try:
            while events := await self.transport.receive():
                self.frames.extend(e for e in events if isinstance(e, Frame))
        except trio.ClosedResourceError:
            pass
        self.eof.set()

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    async def wait_frames(self, count: int) -> list[Frame]:
        while len(self.frames) < count:
            await trio.testing.wait_all_tasks_blocked()
        return self.frames[:count]

    def close(self) -> None:
        self.transport.close()
        self.sock.close()
        for frame in self.frames:
            frame.close_fds()


@asynccontextmanager
async def raw_peer_and_connection(
    handler: Callable[[Frame], Awaitable[HandlerResult]] = echo, **options: Any
) -> AsyncIterator[tuple[RawPeer, Connection]]:

    a, b = socket.socketpair()
    peer = RawPeer(a)
    try:
        async with trio.open_nursery() as nursery:
            async with open_connection(b, handler=handler, **options) as conn:
                nursery.start_soon(peer.collect)
                yield peer, conn
            peer.transport.close()
    finally:
        peer.close()


def write_end_closed(read_end: int) -> bool:
    """True when every copy of the pipe's write end is closed (EOF), without blocking."""
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:
        return False


def is_einval_reply(frame: Frame, msg_id: int) -> bool:
    h = frame.header
    return h.msg_id == msg_id and h.is_reply and h.is_error and h.error == errno.EINVAL


# --------------------------------------------------------------------------- garbage in


async def test_msg_size_below_header_gets_einval_then_a_clean_close() -> None:
    with trio.fail_after(5):
        async with raw_peer_and_connection() as (peer, conn):
            peer.send(HEADER.pack(7, Command.REGION_READ, 8, 0, 0))
            await conn.wait_closed()
            await peer.eof.wait()
            (reply,) = peer.frames
            assert is_einval_reply(reply, 7)
            assert isinstance(conn.close_reason, ProtocolError)


async def test_oversized_message_gets_einval_and_the_stream_stays_in_sync() -> None:
    with trio.fail_after(5):
        async with raw_peer_and_connection(max_msg_size=256) as (peer, _conn):
            peer.send(raw_frame(1, Command.REGION_WRITE, b"w" * 1000))
            peer.send(raw_frame(2, Command.REGION_WRITE, b"n" * 1000, FLAG_NO_REPLY))
            peer.send(raw_frame(3, Command.REGION_READ, b"fine"))
            first, second = await peer.wait_frames(2)
            assert is_einval_reply(first, 1)
            assert second.header.msg_id == 3
            assert second.payload == b"fine"
            await trio.testing.wait_all_tasks_blocked()
            assert len(peer.frames) == 2  # No_reply: never answered, not even with an error


async def test_reply_answering_nothing_is_dropped_with_its_fds() -> None:
    r, w = os.pipe()
    with trio.fail_after(5):
        async with raw_peer_and_connection() as (peer, conn):
            peer.send(raw_frame(99, Command.DMA_READ, b"?", FLAG_TYPE_REPLY), [w])
            os.close(w)
            peer.send(raw_frame(5, Command.REGION_READ, b"after"))
            (reply,) = await peer.wait_frames(1)
            assert reply.header.msg_id == 5
            assert not conn.closed.is_set()
            assert write_end_closed(r)
    os.close(r)


async def test_fds_on_a_message_expecting_none_get_einval_and_are_closed() -> None:
    r, w = os.pipe()
    with trio.fail_after(5):
        async with raw_peer_and_connection() as (peer, _conn):
            peer.send(raw_frame(4, Command.DEVICE_GET_INFO, b"x"), [w])
            os.close(w)
            (reply,) = await peer.wait_frames(1)
            assert is_einval_reply(reply, 4)
            assert write_end_closed(r)
    os.close(r)


async def test_more_fds_than_the_cap_closes_the_connection_and_leaks_nothing() -> None:
    pipes = [os.pipe() for _ in range(6)]
    fds = [fd for pair in pipes for fd in pair]
    with trio.fail_after(5):
        async with raw_peer_and_connection(max_recv_fds=2) as (peer, conn):
            peer.send(raw_frame(1, Command.DEVICE_SET_IRQS, b""), fds)
            await conn.wait_closed()
            await peer.eof.wait()
            assert isinstance(conn.close_reason, ProtocolError)
            assert peer.frames == []
    for fd in fds:
        os.close(fd)


async def test_fds_over_the_cap_that_fit_the_control_buffer_are_still_rejected() -> None:
    # With a cap of 1 the control buffer is padded to room for 2 fds: no MSG_CTRUNC here.
    r, w = os.pipe()
    with trio.fail_after(5):
        async with raw_peer_and_connection(max_recv_fds=1) as (peer, conn):
            peer.send(raw_frame(6, Command.DEVICE_SET_IRQS, b""), [w, w])
            peer.send(raw_frame(7, Command.REGION_READ, b"", flags=0x7), [w])  # unknown type
            os.close(w)
            first, second = await peer.wait_frames(2)
            assert is_einval_reply(first, 6)
            assert is_einval_reply(second, 7)
            assert not conn.closed.is_set()
            assert write_end_closed(r)
    os.close(r)


async def test_unknown_message_type_gets_einval() -> None:
    with trio.fail_after(5):
        async with raw_peer_and_connection() as (peer, _conn):
            peer.send(raw_frame(3, Command.REGION_READ, b"", flags=0x7))
            peer.send(raw_frame(4, Command.REGION_READ, b"", flags=0x7 | FLAG_NO_REPLY))
            peer.send(raw_frame(5, Command.REGION_READ, b"ok"))
            first, second = await peer.wait_frames(2)
            assert is_einval_reply(first, 3)
            assert second.header.msg_id == 5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=300))
def test_random_bytes_never_hang_or_crash(garbage: bytes) -> None:
    async def main() -> None:
        with trio.fail_after(5):
            async with raw_peer_and_connection(max_msg_size=4096) as (peer, conn):
                peer.send(garbage)
                peer.sock.shutdown(socket.SHUT_WR)
                await conn.wait_closed()
                await peer.eof.wait()
                assert all(f.header.is_reply for f in peer.frames)

    trio.run(main)


# --------------------------------------------------------------------------- oversized replies


async def test_oversized_reply_fails_its_request_and_the_next_one_works() -> None:
    async def big(frame: Frame) -> HandlerResult:
        return RawMessage(b"r" * int(frame.payload))

    with trio.fail_after(5):
        a, b = socket.socketpair()
        async with (
            open_connection(a, handler=big) as server,
            open_connection(b, handler=echo, max_msg_size=1024) as client,
        ):
            with pytest.raises(ProtocolError) as info:
                await client.request_raw(Command.REGION_READ, b"5000")
            assert info.value.errno == errno.EMSGSIZE
            reply = await client.request_raw(Command.REGION_READ, b"10")
            assert reply.payload == b"r" * 10
            assert not server.closed.is_set()


# --------------------------------------------------------------------------- disconnects


async def test_peer_disconnect_fails_every_pending_request_at_once() -> None:
    never = trio.Event()

    async def stuck(frame: Frame) -> HandlerResult:
        await never.wait()
        return None

    failures: list[VfioUserError] = []
    a, b = socket.socketpair()
    with trio.fail_after(5):
        async with (
            open_connection(a, handler=stuck) as server,
            open_connection(b, handler=echo) as client,
        ):

            async def ask(i: int) -> None:
                with pytest.raises(ConnectionClosedError) as info:
                    await client.request_raw(Command.REGION_READ, b"%d" % i)
                failures.append(info.value)

            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(ask, i)
                await trio.testing.wait_all_tasks_blocked()
                assert client.core.awaiting_replies == 5
                server.close()
                await client.wait_closed()
                await trio.testing.wait_all_tasks_blocked()
                assert len(failures) == 5
            assert {f.errno for f in failures} == {errno.ECONNRESET}
            assert {f.command for f in failures} == {Command.REGION_READ}
            with pytest.raises(ConnectionClosedError) as info:
                await client.request_raw(Command.REGION_READ)
            assert info.value.errno == errno.ENOTCONN
            assert client.close_reason is None  # a clean end of stream


async def test_a_failed_send_fails_every_pending_request() -> None:
    async with raw_peer_and_connection() as (peer, conn):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def first() -> None:
                    with pytest.raises(ConnectionClosedError) as info:
                        await conn.request_raw(Command.DMA_READ, b"unanswered")
                    assert info.value.errno == errno.ECONNRESET

                nursery.start_soon(first)
                await peer.wait_frames(1)
                peer.sock.shutdown(socket.SHUT_RD)  # our next send gets EPIPE
                with pytest.raises(ConnectionClosedError) as info:
                    await conn.request_raw(Command.DMA_READ, b"second")
                assert info.value.errno == errno.ENOTCONN
            await conn.wait_closed()
            assert isinstance(conn.close_reason, OSError)


async def test_closing_releases_queued_commands_and_unsent_fds() -> None:
    """Commands queued behind a stuck handler, and replies the peer never reads."""
    never = trio.Event()
    memfd = os.memfd_create("queued")

    async def handler(frame: Frame) -> HandlerResult:
        if frame.header.command == Command.DEVICE_RESET:
            await never.wait()
        return RawMessage(b"x" * 60000, [os.dup(memfd)], transfer_fds=True)

    with trio.fail_after(5):
        async with raw_peer_and_connection(
            handler, max_recv_fds=1, max_send_fds=1, max_msg_size=1 << 20
        ) as (peer, conn):
            peer.transport.close()  # this peer reads nothing from now on
            for i in range(40):  # replies pile up in the kernel, then in the engine's queue
                peer.send(raw_frame(i, Command.REGION_READ, b""))
            await trio.testing.wait_all_tasks_blocked()
            assert conn._main.transport.queued_bytes > 0
            peer.send(raw_frame(100, Command.DEVICE_RESET, b""))
            for i in range(3):
                peer.send(raw_frame(101 + i, Command.DMA_MAP, b""), [memfd])
            await trio.testing.wait_all_tasks_blocked()
            assert conn._main.commands.has_pending()
    os.close(memfd)  # the autouse fixture checks that nothing else stayed open


# --------------------------------------------------------------------------- cancellation, IDs


async def test_cancelled_request_leaves_the_stream_in_sync() -> None:
    release = trio.Event()
    seen_ids: list[int] = []

    async def handler(frame: Frame) -> HandlerResult:
        seen_ids.append(frame.header.msg_id)
        if frame.payload == b"slow":
            await release.wait()
        return RawMessage(frame.payload)

    a, b = socket.socketpair()
    with trio.fail_after(5):
        async with (
            open_connection(a, handler=handler),
            open_connection(b, handler=echo) as client,
        ):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.request_raw, Command.REGION_READ, b"slow")
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            assert seen_ids == [0]
            client.next_message_id = 0  # the cancelled request's ID is still reserved
            release.set()
            reply = await client.request_raw(Command.REGION_READ, b"fast")
            assert reply.payload == b"fast"  # not the late "slow" reply
            assert seen_ids == [0, 1]
            await trio.testing.wait_all_tasks_blocked()  # the late reply came and was dropped
            client.next_message_id = 0
            reply = await client.request_raw(Command.REGION_READ, b"again")
            assert reply.payload == b"again"
            assert seen_ids == [0, 1, 0]


async def test_message_ids_skip_in_flight_ids_across_wraparound() -> None:
    release = trio.Event()
    seen_ids: list[int] = []

    async def handler(frame: Frame) -> HandlerResult:
        seen_ids.append(frame.header.msg_id)
        if frame.payload == b"hold":
            await release.wait()
        return None

    a, b = socket.socketpair()
    with trio.fail_after(5):
        async with (
            open_connection(a, handler=handler, policy=ConcurrentOrder()),
            open_connection(b, handler=echo) as client,
        ):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.request_raw, Command.REGION_READ, b"hold")  # ID 0
                await trio.testing.wait_all_tasks_blocked()
                client.next_message_id = 0xFFFF
                nursery.start_soon(client.request_raw, Command.REGION_READ, b"hold")  # 65535
                await trio.testing.wait_all_tasks_blocked()
                client.next_message_id = 0xFFFF
                await client.request_raw(Command.REGION_READ, b"quick")  # skips 65535, 0
                await client.request_raw(Command.REGION_READ, b"quick")
                release.set()
            assert seen_ids == [0, 0xFFFF, 1, 2]


# --------------------------------------------------------------------------- hooks


class Tracer(ConnectionHooks):
    def __init__(self) -> None:
        self.log: list[tuple[float, Link, str, int, bool]] = []

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self.log.append(
            (trio.current_time(), link, "out", frame.header.msg_id, frame.header.is_reply)
        )
        forward(frame)

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self.log.append(
            (trio.current_time(), link, "in", frame.header.msg_id, frame.header.is_reply)
        )
        forward(frame)


async def test_hooks_hear_of_framing_errors() -> None:
    class Recorder(ConnectionHooks):
        def __init__(self) -> None:
            self.errors: list[FramingError] = []

        def on_framing_error(self, conn: Connection, link: Link, event: FramingError) -> None:
            self.errors.append(event)

    recorder = Recorder()
    with trio.fail_after(5):
        async with raw_peer_and_connection(max_msg_size=64, hooks=recorder) as (peer, _conn):
            peer.send(raw_frame(9, Command.REGION_WRITE, b"w" * 100))
            await peer.wait_frames(1)
    (error,) = recorder.errors
    assert isinstance(error, OversizedFrame)
    assert error.header.msg_id == 9


class DisconnectAt(ConnectionHooks):
    """Fault injection: drop the Nth received frame, and disconnect at the Mth."""

    def __init__(self, drop: int, disconnect: int) -> None:
        self.count = 0
        self.drop = drop
        self.disconnect = disconnect

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self.count += 1
        if self.count == self.disconnect:
            frame.close_fds()
            conn.close()
        elif self.count == self.drop:
            frame.close_fds()
        else:
            forward(frame)


async def test_tracer_sees_every_message_both_ways_with_timestamps() -> None:
    tracer = Tracer()
    a, b = socket.socketpair()
    with trio.fail_after(5):
        async with (
            open_connection(a, handler=echo) as server,
            open_connection(b, handler=echo, hooks=tracer) as client,
        ):
            await client.request_raw(Command.REGION_READ, b"1")
            await server.request_raw(Command.DMA_READ, b"2")
    assert [entry[1:] for entry in tracer.log] == [
        (Link.MAIN, "out", 0, False),
        (Link.MAIN, "in", 0, True),
        (Link.MAIN, "in", 0, False),
        (Link.MAIN, "out", 0, True),
    ]
    times = [entry[0] for entry in tracer.log]
    assert times == sorted(times)


async def test_fault_hooks_drop_then_disconnect() -> None:
    faults = DisconnectAt(drop=2, disconnect=3)
    a, b = socket.socketpair()
    with trio.fail_after(5):
        async with (
            open_connection(a, handler=echo),
            open_connection(b, handler=echo, hooks=faults) as client,
        ):
            assert (await client.request_raw(Command.REGION_READ, b"1")).payload == b"1"
            finished = []

            async def second() -> None:
                await client.request_raw(Command.REGION_READ, b"2")
                finished.append(True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(second)
                await trio.testing.wait_all_tasks_blocked()  # its reply came and was dropped
                assert finished == []
                assert client.core.awaiting_replies == 1
                nursery.cancel_scope.cancel()
            with pytest.raises(ConnectionClosedError):
                await client.request_raw(Command.REGION_READ, b"3")
            assert client.closed.is_set()


async def test_hook_may_delay_and_reorder_outgoing_frames() -> None:
    class HoldFirst(ConnectionHooks):
        held: tuple[Frame, Forward] | None = None

        def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
            if self.held is None and not frame.header.is_reply:
                self.held = (frame, forward)
                return
            forward(frame)
            if self.held is not None:
                held, self.held = self.held, None
                held[1](held[0])

    order: list[bytes | bytearray] = []

    async def record(frame: Frame) -> HandlerResult:
        order.append(frame.payload)
        return None

    memfd = os.memfd_create("held")
    a, b = socket.socketpair()
    with trio.fail_after(5):
        async with (
            open_connection(a, handler=record, max_recv_fds=1),
            open_connection(b, handler=echo, hooks=HoldFirst()) as client,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(client.request_raw, Command.REGION_READ, b"first", [memfd])
            await trio.testing.wait_all_tasks_blocked()
            os.close(memfd)  # the held frame owns a duplicate
            nursery.start_soon(client.request_raw, Command.REGION_READ, b"second")
    assert order == [b"second", b"first"]


# --------------------------------------------------------------------------- leaks, fuzz


async def test_no_fd_leaks_over_a_thousand_connections() -> None:
    memfd = os.memfd_create("cycle")
    before = fd_count()

    async def take(frame: Frame) -> HandlerResult:
        for fd in frame.take_fds():
            os.close(fd)
        return None

    with trio.fail_after(60):
        for i in range(1000):
            a, b = socket.socketpair()
            async with (
                open_connection(a, handler=take, max_recv_fds=1),
                open_connection(b, handler=echo) as client,
            ):
                await client.request_raw(Command.DMA_MAP, b"", [memfd])
                if i % 2:
                    client.close()  # half end from the far side, half from this one
    assert fd_count() == before
    os.close(memfd)


@st.composite
def pipelined_commands(draw: st.DrawFn) -> tuple[list[tuple[bytes, bool]], list[int]]:
    sizes = draw(st.lists(st.integers(0, 2000), min_size=1, max_size=15))
    commands = [
        (bytes((i * 31 + j) & 0xFF for j in range(size)), draw(st.booleans()))
        for i, size in enumerate(sizes)
    ]
    total = sum(16 + len(p) for p, _ in commands)
    cuts = draw(st.lists(st.integers(1, total - 1), max_size=25))
    return commands, cuts


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pipelined_commands())
def test_randomly_chunked_command_stream_is_answered_in_order(
    case: tuple[list[tuple[bytes, bool]], list[int]],
) -> None:
    commands, cuts = case
    stream = b"".join(
        raw_frame(i, Command.REGION_WRITE, payload, FLAG_NO_REPLY if no_reply else 0)
        for i, (payload, no_reply) in enumerate(commands)
    )
    points = sorted({0, len(stream), *cuts})
    expected = [(i, p) for i, (p, no_reply) in enumerate(commands) if not no_reply]
    processed: list[int] = []

    async def handler(frame: Frame) -> HandlerResult:
        processed.append(frame.header.msg_id)
        return RawMessage(frame.payload)

    async def main() -> None:
        with trio.fail_after(10):
            async with raw_peer_and_connection(handler) as (peer, _conn):
                sender = trio.socket.from_stdlib_socket(peer.sock)
                for lo, hi in itertools.pairwise(points):
                    chunk = memoryview(stream)[lo:hi]
                    while chunk:
                        chunk = chunk[await sender.send(chunk) :]
                replies = await peer.wait_frames(len(expected))
                while len(processed) < len(commands):
                    await trio.testing.wait_all_tasks_blocked()
                assert [(r.header.msg_id, r.payload) for r in replies] == expected
                assert not any(r.header.flags & FLAG_ERROR for r in replies)
                assert processed == list(range(len(commands)))

    trio.run(main)
