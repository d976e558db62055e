"""Issue 9, engine side: bounded memory per connection, fairness between connections,
a VERSION handler that holds no fd and changes nothing when it fails, a bounded tracer."""

from __future__ import annotations

import array
import errno
import gc
import os
import socket
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from tests.fd_leaks import fd_count
from tests.raw_client import GuestRam
from vfiouser_trio.engine import (
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
from vfiouser_trio.limits import ServerLimits
from vfiouser_trio.ordering import KeyedOrder, region_key
from vfiouser_trio.protocol import (
    Capabilities,
    RegionReadRequest,
    Request,
    TwinSocket,
    VersionReply,
    VersionRequest,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.protocol.framing import Frame, FrameDecoder, OversizedFrame, StrayFds
from vfiouser_trio.protocol.header import command_header, reply_header
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.serve import serve_connection
from vfiouser_trio.server.session import ServerSession
from vfiouser_trio.transport import FRAMES_PER_READ, RECV_BUFFER_SIZE

pytestmark = pytest.mark.usefixtures("no_fd_leak")

TWIN_CAPS = Capabilities(max_msg_fds=8, twin_socket=TwinSocket(True))


class Counter(Device):
    """BAR0 of 4 KiB whose reads are counted; ``attached()`` calls are counted too."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10FE, class_code=0xFF0000))
        self.add_bar(0, 0x1000, read=self.read0, write=self.write0)
        self.reads = 0
        self.attach_count = 0
        #: Called (synchronously) at each read, with the number of reads so far.
        self.on_read: Callable[[int], None] | None = None

    async def read0(self, offset: int, size: int) -> bytes:
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self.reads)
        return bytes(size)

    async def write0(self, offset: int, data: bytes) -> None:
        pass

    async def attached(self) -> None:
        self.attach_count += 1


@contextmanager
def gc_disabled() -> Iterator[None]:
    """Count fds as the process holds them: nothing is closed behind our back by the GC."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --- VERSION: the twin socket is set up before anything is committed ---------------------


SocketPair = Callable[[], tuple[socket.socket, socket.socket]]
REAL_SOCKETPAIR = socket.socketpair


async def _version_fails_then_succeeds(monkeypatch: pytest.MonkeyPatch, fail: SocketPair) -> int:
    """The first socketpair() of the session fails as ``fail`` does; return the errno the
    client got, after checking that a second VERSION then succeeds."""
    device = Counter()
    client_sock, server_sock = socket.socketpair()
    calls = 0

    def socketpair(*args: object) -> tuple[socket.socket, socket.socket]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return fail()
        return REAL_SOCKETPAIR(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socketpair", socketpair)  # the session calls socket.socketpair
    with gc_disabled():
        before = fd_count()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, device, server_sock)
            async with open_connection(client_sock, handler=GuestRam(0, 0).handle) as conn:
                with pytest.raises(VfioUserError) as failed:
                    await conn.request(VersionRequest(0, 2, TWIN_CAPS))
                # Nothing was committed, no fd is left over: the client may try again.
                assert fd_count() == before
                assert device.attach_count == 0
                reply = await conn.request(VersionRequest(0, 2, TWIN_CAPS))
                assert isinstance(reply, VersionReply) and len(reply.fds) == 1
                conn.attach_twin(reply.fds[0], requests_on_twin=False)
                assert device.attach_count == 1
        device.close()
        assert fd_count() == before - 2  # the initial pair is gone, nothing else
    return failed.value.errno


async def test_version_socketpair_failure_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def emfile() -> tuple[socket.socket, socket.socket]:
        raise OSError(errno.EMFILE, "Too many open files")

    code = await _version_fails_then_succeeds(monkeypatch, emfile)
    assert code == errno.EMFILE


async def test_version_attach_twin_failure_closes_both_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unusable_pair() -> tuple[socket.socket, socket.socket]:
        # Our end is a datagram socket: the engine refuses it (and closes it).
        ours, spare = REAL_SOCKETPAIR(socket.AF_UNIX, socket.SOCK_DGRAM)
        spare.close()
        spare, theirs = REAL_SOCKETPAIR(socket.AF_UNIX, socket.SOCK_STREAM)
        spare.close()
        return ours, theirs

    code = await _version_fails_then_succeeds(monkeypatch, unusable_pair)
    assert code == errno.EINVAL


# --- a client on a bare socket: it reads only when the test says so ---------------------


def frame_bytes(msg_id: int, request: Request) -> bytes:
    payload = request.pack()
    return command_header(msg_id, request.COMMAND, len(payload)).pack() + payload


class RawPeer:
    """A vfio-user client that sends bytes as given and reads replies only when asked."""

    def __init__(self, sock: socket.socket) -> None:
        self.std = sock
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []

    async def read(self, count: int) -> list[Frame]:
        while len(self.frames) < count:
            data = await self.stream.receive_some(1 << 20)
            assert data, "the server hung up"
            for event in self.decoder.feed(data):
                assert isinstance(event, Frame)
                self.frames.append(event)
        taken, self.frames = self.frames[:count], self.frames[count:]
        return taken

    async def negotiate(self) -> None:
        version = VersionRequest(0, 2, Capabilities(max_msg_fds=8))
        await self.stream.send_all(frame_bytes(0, version))
        [reply] = await self.read(1)
        assert not reply.header.is_error

    def close(self) -> None:
        self.stream.socket.close()


async def serve_raw(
    nursery: trio.Nursery, device: Device, limits: ServerLimits
) -> tuple[ServerSession, RawPeer]:
    """Serve ``device`` on a socket pair (one socket, no twin); a negotiated raw peer."""
    client_sock, server_sock = socket.socketpair()
    session = ServerSession(device, limits=limits, offer_twin_socket=False)
    nursery.start_soon(session.run, server_sock)
    peer = RawPeer(client_sock)
    await peer.negotiate()
    return session, peer


READ4 = RegionReadRequest(0, 0, 4)


def pipeline(count: int, request: Request = READ4) -> bytes:
    """``count`` requests back to back, message IDs 0, 1, ... (wrapping at 2**16)."""
    one = frame_bytes(0, request)
    return b"".join(i.to_bytes(2, "little") + one[2:] for i in range(count) for i in (i & 0xFFFF,))


async def test_a_client_that_never_reads_holds_bounded_memory() -> None:
    """Replies to unread requests used to pile up (about 400 B each); now reading stops at
    ``max_send_backlog``, another device still answers, and later every reply arrives."""
    mark = 512 << 10
    limits = ServerLimits(max_send_backlog=mark)
    count = 50_000
    hog, other = Counter(), Counter()
    blob = pipeline(count)
    async with trio.open_nursery() as nursery:
        hog_session, hog_peer = await serve_raw(nursery, hog, limits)
        _, peer = await serve_raw(nursery, other, limits)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            nursery.start_soon(hog_peer.stream.send_all, blob)
            await trio.testing.wait_all_tasks_blocked()
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        conn = hog_session.connection
        assert conn is not None
        # Held: the mark, plus at most one small read (4 KiB of commands, each costing
        # FRAME_OVERHEAD + 16) past it; these replies cost less than their commands.
        assert conn.held_bytes <= mark + 4096 // 16 * (FRAME_OVERHEAD + 16)
        assert grown < 2 * mark
        assert hog.reads < count
        # The other device in the process is not affected.
        await peer.stream.send_all(frame_bytes(7, READ4))
        [reply] = await peer.read(1)
        assert reply.header.msg_id == 7 and not reply.header.is_error
        # The hog reads at last: every reply, in order.
        replies = await hog_peer.read(count)
        assert [r.header.msg_id for r in replies] == [i & 0xFFFF for i in range(count)]
        assert not any(r.header.is_error for r in replies)
        assert hog.reads == count
        hog_peer.close()
        peer.close()
    hog.close()
    other.close()


async def test_a_paused_client_that_hangs_up_frees_its_session() -> None:
    """A reader paused at the mark used to wait for the backlog for ever after its client
    hung up (the failed send closed the transport but woke nobody), so the device stayed
    attached and its next client was refused."""
    limits = ServerLimits(max_send_backlog=64 << 10)
    hog = Counter()
    client_sock, server_sock = socket.socketpair()
    session = ServerSession(hog, limits=limits, offer_twin_socket=False)
    ended = trio.Event()

    async def run_session() -> None:
        await session.run(server_sock)
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_session)
        peer = RawPeer(client_sock)
        await peer.negotiate()
        async with trio.open_nursery() as sending:
            sending.start_soon(peer.stream.send_all, pipeline(20_000))
            await trio.testing.wait_all_tasks_blocked()
            conn = session.connection
            assert conn is not None and not conn.closed.is_set()
            assert hog.reads < 20_000  # paused, not finished
            sending.cancel_scope.cancel()
        peer.close()
        with trio.fail_after(10):  # a hang guard, not a synchronisation
            await ended.wait()
    hog.close()


async def test_a_pipelining_client_does_not_starve_other_devices() -> None:
    """8,000 queued reads on one connection used to run back to back, stalling every other
    connection; now the dispatcher yields every ``dispatch_batch`` commands."""
    limits = ServerLimits()
    count = 4000  # 128 KiB of requests: all in the socket before the server reads
    hog, other = Counter(), Counter()
    async with trio.open_nursery() as nursery:
        _, hog_peer = await serve_raw(nursery, hog, limits)
        _, peer = await serve_raw(nursery, other, limits)
        seen_at: list[int] = []

        def send_other_request(reads: int) -> None:
            # Sent while the hog's first command is running, so the other connection's
            # request is readable from then on.
            if reads == 1:
                peer.std.send(frame_bytes(7, READ4))

        hog.on_read = send_other_request
        other.on_read = lambda _: seen_at.append(hog.reads)
        blob = pipeline(count)
        assert hog_peer.std.send(blob) == len(blob)
        [reply] = await peer.read(1)
        assert reply.header.msg_id == 7 and not reply.header.is_error
        assert seen_at and seen_at[0] <= 4 * limits.dispatch_batch
        replies = await hog_peer.read(count)
        assert [r.header.msg_id for r in replies] == list(range(count))
        hog_peer.close()
        peer.close()
    hog.close()
    other.close()


# --- pausing never hides the reply to our own request ------------------------------------

ASK, WORK, ANSWER = 100, 101, 200


def raw_command(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    return command_header(msg_id, command, len(payload)).pack() + payload


def asking_handler(box: list[Connection]) -> Handler:
    """ASK sends a request back to the peer and awaits its reply; WORK answers 1 KiB."""

    async def handle(frame: Frame) -> HandlerResult:
        if frame.header.command == ASK:
            reply = await box[0].request_raw(ANSWER, b"?")
            return RawMessage(reply.payload)
        return RawMessage(bytes(1024))

    return handle


async def test_a_link_awaiting_a_reply_keeps_reading_past_the_mark(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One socket, the dispatcher waiting for the peer's answer, 1,000 commands queued in
    front of it (1.6 times the mark): the reader does not pause, the answer gets through
    (a paused reader would deadlock here: fail_after, in virtual time, reports it)."""
    count = 1000
    mark = count * FRAME_OVERHEAD * 10 // 16
    box: list[Connection] = []
    server_sock, peer_sock = socket.socketpair()
    peer = RawPeer(peer_sock)
    blob = raw_command(0, ASK) + b"".join(raw_command(i, WORK) for i in range(1, count + 1))
    async with open_connection(
        server_sock, handler=asking_handler(box), max_send_backlog=mark
    ) as conn:
        box.append(conn)
        await peer.stream.send_all(blob)
        [question] = await peer.read(1)
        assert question.header.command == ANSWER
        await trio.testing.wait_all_tasks_blocked()
        assert conn.held_bytes > mark  # read on, although past the mark
        answer = reply_header(question.header.msg_id, ANSWER, 1).pack() + b"!"
        await peer.stream.send_all(answer)
        with trio.fail_after(60):
            replies = await peer.read(count + 1)
        assert [r.header.msg_id for r in replies] == list(range(count + 1))
        assert replies[0].payload == b"!"
    peer.close()


async def test_a_peer_that_floods_while_we_await_its_answer_is_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same, but the peer never answers and sends on: at twice the mark the connection
    closes (ENOBUFS) instead of queueing without bound."""
    count = 3000
    mark = count * FRAME_OVERHEAD // 4
    box: list[Connection] = []
    server_sock, peer_sock = socket.socketpair()
    peer = RawPeer(peer_sock)
    blob = raw_command(0, ASK) + b"".join(raw_command(i, WORK) for i in range(1, count + 1))
    async with open_connection(
        server_sock, handler=asking_handler(box), max_send_backlog=mark, name="dev0"
    ) as conn:
        box.append(conn)
        await peer.stream.send_all(blob)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.closed.is_set()
        [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
        assert "dev0" in warning.getMessage() and "without reading" in warning.getMessage()
        assert isinstance(conn.close_reason, VfioUserError)
        assert conn.close_reason.errno == errno.ENOBUFS
    peer.close()


# --- a partial frame holds at most one frame's bytes and one chunk's fds -----------------


def test_a_dribbled_max_size_frame_holds_one_frame_and_one_chunk_of_fds() -> None:
    """A peer sends a maximal frame in 64 pieces, 2 fds with each: the decoder holds less
    than ``max_msg_size`` bytes and the fds of the first piece only."""
    max_size = 64 << 10
    decoder = FrameDecoder(max_msg_size=max_size)
    body = command_header(5, 1, max_size - 16).pack() + bytes(max_size - 16)
    before = fd_count()
    piece = max_size // 64
    stray = 0
    events = []
    for start in range(0, max_size, piece):
        r, w = os.pipe()
        for event in decoder.feed(body[start : start + piece], [r, w]):
            if isinstance(event, StrayFds):
                stray += event.count
            else:
                events.append(event)
        assert decoder.buffered < max_size
        assert decoder.pending_fds <= 2
        assert fd_count() <= before + 2
    [frame] = events
    assert isinstance(frame, Frame) and len(frame.payload) == max_size - 16
    assert len(frame.fds) == 2 and stray == 2 * 63
    frame.close_fds()
    assert decoder.buffered == 0 and fd_count() == before


def test_an_oversized_frame_is_never_held() -> None:
    decoder = FrameDecoder(max_msg_size=4096)
    huge = command_header(1, 1, (1 << 30) - 16).pack()
    [event] = decoder.feed(huge)
    assert isinstance(event, OversizedFrame)
    for _ in range(64):
        assert decoder.feed(bytes(1 << 16)) == []
        assert decoder.buffered == 0


async def test_with_a_twin_socket_the_main_link_pauses_and_requests_still_complete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Our request and its reply travel on the twin socket: the main link pauses at the mark
    (it never carries a reply we await), is not closed, and resumes once the peer reads."""
    count = 3000
    mark = count * FRAME_OVERHEAD // 4
    box: list[Connection] = []
    server_sock, peer_sock = socket.socketpair()
    server_twin, peer_twin_sock = socket.socketpair()
    peer, peer_twin = RawPeer(peer_sock), RawPeer(peer_twin_sock)
    blob = raw_command(0, ASK) + b"".join(raw_command(i, WORK) for i in range(1, count + 1))
    async with open_connection(
        server_sock, handler=asking_handler(box), max_send_backlog=mark
    ) as conn:
        box.append(conn)
        conn.attach_twin(server_twin, requests_on_twin=True)
        await peer.stream.send_all(blob)
        [question] = await peer_twin.read(1)
        assert question.header.command == ANSWER
        await trio.testing.wait_all_tasks_blocked()
        assert not conn.closed.is_set()
        answer = reply_header(question.header.msg_id, ANSWER, 1).pack() + b"!"
        await peer_twin.stream.send_all(answer)
        await trio.testing.wait_all_tasks_blocked()
        # Commands ran until the replies reached the mark; then the link held on.
        assert not conn.closed.is_set()
        assert conn.held_bytes <= 2 * mark + 17 * 4096 + 4096
        with trio.fail_after(60):
            replies = await peer.read(count + 1)
        assert [r.header.msg_id for r in replies] == list(range(count + 1))
        assert replies[0].payload == b"!"
    peer.close()
    peer_twin.close()


class CountReceived(ConnectionHooks):
    """Counts the frames a connection's reader delivered; calls ``first`` at the first one."""

    def __init__(self, first: Callable[[], object]) -> None:
        self.count = 0
        self.first = first

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self.count += 1
        if self.count == 1:
            self.first()
        forward(frame)


async def test_parsing_one_read_of_tiny_messages_does_not_starve_others() -> None:
    """16,384 header-only commands (256 KiB) used to be parsed in one go from one read;
    now a read completes about FRAMES_PER_READ frames before the reader yields."""
    count = RECV_BUFFER_SIZE // 16
    a_sock, a_peer_sock = socket.socketpair()
    b_sock, b_peer_sock = socket.socketpair()
    a_peer, b_peer = RawPeer(a_peer_sock), RawPeer(b_peer_sock)
    a_peer_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * RECV_BUFFER_SIZE)
    seen_at: list[int] = []
    counter = CountReceived(lambda: b_peer_sock.send(raw_command(7, WORK)))

    async def a_handler(frame: Frame) -> HandlerResult:
        return None

    async def b_handler(frame: Frame) -> HandlerResult:
        seen_at.append(counter.count)
        return None

    blob = b"".join(raw_command(i & 0xFFFF, WORK) for i in range(count))
    async with (
        open_connection(a_sock, handler=a_handler, hooks=counter),
        open_connection(b_sock, handler=b_handler),
    ):
        assert a_peer_sock.send(blob) == len(blob)
        [reply] = await b_peer.read(1)
        assert reply.header.msg_id == 7
        # A few reads (the reader yields after each), not the whole 256 KiB.
        assert seen_at and seen_at[0] <= 4 * FRAMES_PER_READ
        assert len(await a_peer.read(count)) == count
    a_peer.close()
    b_peer.close()


async def test_queued_commands_hold_a_bounded_number_of_fds() -> None:
    """200 commands with 2 fds each, behind a handler that blocks: the reader stops once the
    queued commands hold ``dispatch_batch * max_recv_fds`` fds instead of taking all 400."""
    count, batch, per = 200, 4, 2
    gate = trio.Event()

    async def handler(frame: Frame) -> HandlerResult:
        await gate.wait()
        return None

    server_sock, peer_sock = socket.socketpair()
    peer = RawPeer(peer_sock)
    before = fd_count()
    async with open_connection(
        server_sock,
        handler=handler,
        max_send_backlog=64 << 20,
        max_recv_fds=per,
        dispatch_batch=batch,
    ) as conn:

        async def send_all() -> None:
            for i in range(count):
                fds = [fd for _ in range(per // 2) for fd in os.pipe()]
                try:
                    await trio.lowlevel.wait_writable(peer_sock)
                    peer_sock.sendmsg(
                        [raw_command(i, WORK)],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                    )
                finally:
                    for fd in fds:
                        os.close(fd)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            await trio.testing.wait_all_tasks_blocked()
            # Held by us: the fds of the queued commands (one read may overshoot), of the
            # one being handled, and of the read in progress.
            assert fd_count() - before <= batch * per + 3 * per
            gate.set()
        assert len(await peer.read(count)) == count
        assert not conn.closed.is_set()
    peer.close()


async def test_commands_a_policy_holds_count_until_done() -> None:
    """KeyedOrder takes every command off the queue into its lanes at once; they still count,
    so with the handler stuck the reader stops at the mark instead of reading all 20,000."""
    count, mark = 20_000, 256 << 10
    gate = trio.Event()

    async def handler(frame: Frame) -> HandlerResult:
        await gate.wait()
        return RawMessage(b"")

    server_sock, peer_sock = socket.socketpair()
    peer = RawPeer(peer_sock)
    counter = CountReceived(lambda: None)
    blob = pipeline(count)
    async with (
        open_connection(
            server_sock,
            handler=handler,
            hooks=counter,
            policy=KeyedOrder(region_key),
            max_send_backlog=mark,
        ) as conn,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(peer.stream.send_all, blob)
        await trio.testing.wait_all_tasks_blocked()
        read = counter.count
        assert read < count
        assert read * (FRAME_OVERHEAD + 16) <= mark + 4096 // 16 * (FRAME_OVERHEAD + 16)
        assert conn.held_bytes <= mark + 4096 // 16 * (FRAME_OVERHEAD + 16)
        gate.set()
        assert len(await peer.read(count)) == count
    peer.close()
