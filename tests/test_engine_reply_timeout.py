"""``reply_timeout``: a peer that leaves one of our requests unanswered closes the connection,
whether the requester waits for a reader task or reads its reply from the socket itself."""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.fd_leaks import fd_count
from vfiouser_trio.engine import Connection, HandlerResult, open_connection
from vfiouser_trio.protocol.connection import ConnectionClosedError, ReplyTimeout
from vfiouser_trio.protocol.constants import FLAG_TYPE_REPLY, Command
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.protocol.header import Header
from vfiouser_trio.transport import Transport

pytestmark = pytest.mark.usefixtures("no_fd_leak")

TIMEOUT = 8.0
READ = int(Command.REGION_READ)


async def unused(frame: Frame) -> HandlerResult:
    raise AssertionError("the peer sends no commands here")


class Peer:
    """The other end, driven by hand: it answers what and when a test says."""

    def __init__(self, sock: socket.socket) -> None:
        self.transport = Transport(sock)

    async def request(self) -> Frame:
        (frame,) = await self.transport.receive()
        assert isinstance(frame, Frame)
        return frame

    def answer(self, frame: Frame) -> None:
        header = frame.header
        self.transport.write(Header(header.msg_id, header.command, 16, FLAG_TYPE_REPLY), b"")


@asynccontextmanager
async def connection(*, twin: bool) -> AsyncIterator[tuple[Connection, Peer]]:
    """A connection with ``reply_timeout=TIMEOUT`` whose requests go to a :class:`Peer`: on
    the main link (read by a reader task) or on a twin link no task reads (the requester
    reads it), as a server's DMA requests go."""
    ours, theirs = socket.socketpair()
    # (A bound of its own, so that a clock that never fires fails the test, not hangs it.)
    with trio.fail_after(100 * TIMEOUT):
        async with open_connection(ours, handler=unused, reply_timeout=TIMEOUT) as conn:
            if twin:
                twin_ours, twin_theirs = socket.socketpair()
                conn.attach_twin(twin_ours, requests_on_twin=True)
                peer = Peer(twin_theirs)
            else:
                peer = Peer(theirs)
            try:
                yield conn, peer
            finally:
                peer.transport.close()
    theirs.close()


@pytest.mark.parametrize("twin", [False, True], ids=["reader-task", "requester-reads"])
async def test_an_unanswered_request_closes_the_connection_after_the_timeout(
    twin: bool, autojump_clock: trio.testing.MockClock
) -> None:
    async with connection(twin=twin) as (conn, peer):
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.request)  # read, never answered
            with pytest.raises(ConnectionClosedError) as failure:
                await conn.request_raw(READ, b"x" * 24)
        waited = trio.current_time() - started
        assert TIMEOUT <= waited <= 1.25 * TIMEOUT
        reason = conn.close_reason
        assert isinstance(reason, ReplyTimeout) and isinstance(reason, TimeoutError)
        assert reason.errno == errno.ETIMEDOUT and reason.command == READ
        assert failure.value.__cause__ is reason
        assert conn.closed.is_set()


@pytest.mark.parametrize("twin", [False, True], ids=["reader-task", "requester-reads"])
async def test_slow_answers_within_the_timeout_keep_the_connection(
    twin: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """The clock times each request, not the connection: many requests, each answered after
    0.9 of the timeout, two at a time, over ten timeouts."""
    async with connection(twin=twin) as (conn, peer):

        async def serve_slowly() -> None:
            while True:
                frame = await peer.request()
                await trio.sleep(0.9 * TIMEOUT)
                peer.answer(frame)

        async def ask(count: int) -> None:
            for _ in range(count):
                await conn.request_raw(READ)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_slowly)
            await ask(12)
            nursery.cancel_scope.cancel()
        assert not conn.closed.is_set()


async def test_a_cancelled_request_is_no_longer_timed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(twin=False) as (conn, peer):
        with trio.move_on_after(TIMEOUT / 2):
            await conn.request_raw(READ)
        await peer.request()  # never answered: the requester gave up
        await trio.sleep(3 * TIMEOUT)
        assert not conn.closed.is_set()


async def test_the_clock_stops_while_nothing_waits_and_starts_with_the_next_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(twin=False) as (conn, peer):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.request_raw, READ)
            peer.answer(await peer.request())
        await trio.sleep(TIMEOUT)  # the clock's next check finds nothing waiting
        assert not conn._reply_clock
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.request)
            with pytest.raises(ConnectionClosedError):
                await conn.request_raw(READ)
        assert isinstance(conn.close_reason, ReplyTimeout)


async def test_no_timeout_waits_as_long_as_the_peer_takes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = socket.socketpair()
    peer = Peer(theirs)
    async with open_connection(ours, handler=unused) as conn:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.request_raw, READ)
            frame = await peer.request()
            await trio.sleep(100 * TIMEOUT)
            peer.answer(frame)
        assert not conn.closed.is_set()
    peer.transport.close()


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
async def test_a_reply_timeout_must_be_positive(value: float) -> None:
    before = fd_count()
    ours, theirs = socket.socketpair()
    with pytest.raises(ValueError, match="reply_timeout"):
        Connection(ours, handler=unused, reply_timeout=value)
    theirs.close()
    assert fd_count() == before  # the connection owned the socket and closed it
