"""Requests on a twin link that no task reads (the server's twin): the requester reads its
reply itself, and the link is handed back to the idle watch whatever happens meanwhile."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.fd_leaks import fd_count
from vfiouser_trio.engine import (
    Connection,
    ConnectionHooks,
    Forward,
    Handler,
    HandlerResult,
    Link,
    RawMessage,
    open_connection,
)
from vfiouser_trio.protocol.connection import ConnectionClosedError
from vfiouser_trio.protocol.constants import FLAG_TYPE_REPLY, Command
from vfiouser_trio.protocol.errors import ProtocolError
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.protocol.header import Header
from vfiouser_trio.transport import Transport

IDLE_WATCH_TASK = "vfiouser_trio idle sockets"


class RawPeer:
    """The client's end of both sockets, driven by hand."""

    def __init__(self, main: socket.socket, twin: socket.socket) -> None:
        self.main = Transport(main)
        self.twin = Transport(twin)

    async def command(self, transport: Transport) -> Frame:
        """The next frame on ``transport`` (a command of ours)."""
        events = await transport.receive()
        (frame,) = events
        assert isinstance(frame, Frame)
        return frame

    def reply(self, transport: Transport, to: Frame, payload: bytes) -> None:
        header = to.header
        transport.write(
            Header(header.msg_id, header.command, 16 + len(payload), FLAG_TYPE_REPLY), payload
        )

    def close(self) -> None:
        self.main.close()
        self.twin.close()


async def answer(frame: Frame) -> HandlerResult:
    return RawMessage(b"answered " + frame.payload)


@asynccontextmanager
async def server_with_twin(
    handler: Handler = answer, hooks: ConnectionHooks | None = None
) -> AsyncIterator[tuple[Connection, RawPeer]]:
    """A connection whose requests go on a twin link (as a server's do), and its raw peer."""
    main_ours, main_peer = socket.socketpair()
    twin_ours, twin_peer = socket.socketpair()
    peer = RawPeer(main_peer, twin_peer)
    try:
        async with open_connection(main_ours, handler=handler, hooks=hooks) as conn:
            conn.attach_twin(twin_ours, requests_on_twin=True)
            yield conn, peer
    finally:
        peer.close()


async def ask_until_closed(conn: Connection, errors: list[ConnectionClosedError]) -> None:
    """A request that the connection's end must fail: its error goes to ``errors``."""
    try:
        await conn.request_raw(Command.DMA_READ, b"where")
    except ConnectionClosedError as exc:
        errors.append(exc)


class TaskSteps(trio.abc.Instrument):
    """The names of the tasks trio steps."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


async def test_the_requester_reads_its_reply_itself() -> None:
    """No idle watch task, no second wake-up: the reply wakes the requester from the socket."""
    with trio.fail_after(5):
        async with server_with_twin() as (conn, peer), trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def ask() -> None:
                got.append(bytes((await conn.request_raw(Command.DMA_READ, b"where")).payload))

            nursery.start_soon(ask)
            command = await peer.command(peer.twin)
            await trio.testing.wait_all_tasks_blocked()
            steps = TaskSteps()
            trio.lowlevel.add_instrument(steps)
            try:
                peer.reply(peer.twin, command, b"data")
                await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert got == [b"data"]
            assert IDLE_WATCH_TASK not in steps.names
            assert [name for name in steps.names if name.endswith(".ask")] == [
                f"{__name__}.{ask.__qualname__}"
            ]


async def test_concurrent_requests_get_their_replies_in_any_order_then_the_twin_is_watched() -> (
    None
):
    before = fd_count()
    with trio.fail_after(5):
        async with server_with_twin() as (conn, peer):
            got: dict[bytes, bytes] = {}

            async def ask(what: bytes) -> None:
                got[what] = bytes((await conn.request_raw(Command.DMA_READ, what)).payload)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, b"first")
                first = await peer.command(peer.twin)
                nursery.start_soon(ask, b"second")
                second = await peer.command(peer.twin)
                peer.reply(peer.twin, second, b"2")
                await trio.testing.wait_all_tasks_blocked()
                peer.reply(peer.twin, first, b"1")
            assert got == {b"first": b"1", b"second": b"2"}
            # Nobody reads the twin now, yet its hang-up is seen.
            peer.twin.close()
            await conn.wait_closed()
    assert fd_count() == before


async def test_a_reply_on_the_main_socket_closes_the_connection_instead_of_hanging() -> None:
    with trio.fail_after(5):
        async with server_with_twin() as (conn, peer):
            errors: list[ConnectionClosedError] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_until_closed, conn, errors)
                command = await peer.command(peer.twin)
                peer.reply(peer.main, command, b"wrong socket")
            (error,) = errors
            assert isinstance(error.__cause__, ProtocolError)
            assert "another socket" in str(error.__cause__)
            assert conn.closed.is_set()


async def test_a_cancelled_requester_gives_the_twin_back_to_the_idle_watch() -> None:
    with trio.fail_after(5):
        async with server_with_twin() as (conn, peer):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.request_raw, Command.DMA_READ, b"where")
                    command = await peer.command(peer.twin)
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
            # The late reply is consumed by the idle watch; a command there is served.
            peer.reply(peer.twin, command, b"late")
            peer.twin.write(Header(9, Command.DEVICE_GET_INFO, 16 + 4), b"ping")
            frame = await peer.command(peer.twin)
            assert frame.header.msg_id == 9 and frame.payload == b"answered ping"
            assert not conn.closed.is_set()


async def test_the_requester_leaves_a_command_held_there_to_a_reader_task() -> None:
    """A command of the peer on the twin that waits makes the link hold something: the
    requester stops reading (a reader task, which can pause reading, takes over), and its
    reply still comes."""
    release = trio.Event()

    async def slow(frame: Frame) -> HandlerResult:
        await release.wait()
        return RawMessage(b"late answer")

    with trio.fail_after(5):
        async with server_with_twin(slow) as (conn, peer), trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def ask() -> None:
                got.append(bytes((await conn.request_raw(Command.DMA_READ, b"where")).payload))

            nursery.start_soon(ask)
            command = await peer.command(peer.twin)
            peer.twin.write(Header(9, Command.DEVICE_GET_INFO, 16), b"")
            await trio.testing.wait_all_tasks_blocked()
            peer.reply(peer.twin, command, b"data")
            await trio.testing.wait_all_tasks_blocked()
            assert got == [b"data"]
            release.set()
            frame = await peer.command(peer.twin)
            assert frame.header.msg_id == 9 and frame.payload == b"late answer"


@pytest.mark.parametrize("where", ["twin", "main"])
async def test_a_hang_up_while_the_requester_reads_fails_its_request(where: str) -> None:
    with trio.fail_after(5):
        async with server_with_twin() as (conn, peer):
            errors: list[ConnectionClosedError] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_until_closed, conn, errors)
                await peer.command(peer.twin)
                await trio.testing.wait_all_tasks_blocked()
                (peer.twin if where == "twin" else peer.main).close()
            assert len(errors) == 1 and f"{where} socket closed" in str(errors[0])
            assert conn.closed.is_set()


class HeldReplies(ConnectionHooks):
    """Holds every received frame; the test forwards them later, from its own task."""

    def __init__(self) -> None:
        self.held: list[tuple[Frame, Forward]] = []

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self.held.append((frame, forward))


async def test_a_reply_a_hook_delivers_later_from_another_task_completes_the_request() -> None:
    hooks = HeldReplies()
    with trio.fail_after(5):
        async with server_with_twin(hooks=hooks) as (conn, peer), trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def ask() -> None:
                got.append(bytes((await conn.request_raw(Command.DMA_READ, b"where")).payload))

            nursery.start_soon(ask)
            command = await peer.command(peer.twin)
            peer.reply(peer.twin, command, b"data")
            while not hooks.held:
                await trio.testing.wait_all_tasks_blocked()
            ((frame, forward),) = hooks.held
            forward(frame)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [b"data"]
