"""Transport: framing and fd passing over real AF_UNIX socket pairs."""

from __future__ import annotations

import array
import itertools
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.counting_socket import CountingSocket
from vfiouser_trio.protocol.errors import ProtocolError
from vfiouser_trio.protocol.framing import Frame, OversizedFrame
from vfiouser_trio.protocol.header import Header, command_header
from vfiouser_trio.transport import (
    CHUNK_OVERHEAD,
    FRAMES_PER_READ,
    RECV_BUFFER_SIZE,
    SEND_BUFFER_SIZE,
    SLOW_PEER_MISSES,
    SLOW_PEER_READS,
    Transport,
)

pytestmark = pytest.mark.usefixtures("no_fd_leak")


def transport_pair(**limits: int) -> tuple[Transport, Transport]:
    a, b = socket.socketpair()
    return Transport(a, **limits), Transport(b, **limits)


def frame_bytes(msg_id: int, command: int, payload: bytes, flags: int = 0) -> bytes:
    header = Header(msg_id, command, 16 + len(payload), flags)
    return header.pack() + payload


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


async def receive_frames(transport: Transport, count: int) -> list[Frame]:
    frames: list[Frame] = []
    while len(frames) < count:
        for event in await transport.receive():
            assert isinstance(event, Frame)
            frames.append(event)
    return frames


async def test_frames_round_trip_in_order() -> None:
    left, right = transport_pair()
    with trio.fail_after(5):
        for i in range(10):
            left.write(command_header(i, 9, i), bytes(range(i)))
        frames = await receive_frames(right, 10)
    assert [f.header.msg_id for f in frames] == list(range(10))
    assert [f.payload for f in frames] == [bytes(range(i)) for i in range(10)]
    left.close()
    right.close()


async def test_frames_queued_without_flush_leave_in_one_sendmsg() -> None:
    a, b = socket.socketpair()
    counting = CountingSocket(fileno=a.detach())
    left, right = Transport(counting), Transport(b)
    with trio.fail_after(5):
        for i in range(5):
            left.write(command_header(i, 9, 4), b"ping", flush=False)
        assert counting.sendmsg_calls == 0
        left.write(command_header(5, 9, 4), b"ping")
        assert counting.sendmsg_calls == 1
        events = await right.receive()  # one read sees all six frames
    assert [e.header.msg_id for e in events if isinstance(e, Frame)] == list(range(6))
    left.close()
    right.close()


async def test_a_corked_transport_sends_at_uncork_and_wakes_no_writer_for_what_left() -> None:
    """Between cork and uncork even flushing writes only queue; uncork sends them in one
    sendmsg, and the writer task is started only for what the kernel did not take."""

    class FillingSocket(socket.socket):
        """Takes ``room`` bytes, then says EAGAIN (a full kernel buffer) until given more."""

        room = 1 << 30

        def sendmsg(self, buffers: Any, *args: Any) -> int:
            if not self.room:
                raise BlockingIOError
            data = b"".join(map(bytes, buffers))[: self.room]
            self.room -= len(data)
            return super().sendmsg([data], *args)

    a, b = socket.socketpair()
    filling = FillingSocket(fileno=a.detach())
    left, right = Transport(filling), Transport(b)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            left.writer_nursery = nursery
            left.cork()
            left.write(command_header(1, 9, 3), b"one")
            left.write(command_header(2, 9, 3), b"two", flush=False)
            left.write(command_header(3, 9, 5), b"three")
            with pytest.raises(BlockingIOError):
                b.recv(1, socket.MSG_DONTWAIT)  # nothing sent yet
            left.uncork()
            assert left.queued_bytes == 0
            assert left.writer_nursery is nursery  # all sent: no writer started
            events = await right.receive()  # one read sees all three
            assert [(e.header.msg_id, e.payload) for e in events if isinstance(e, Frame)] == [
                (1, b"one"),
                (2, b"two"),
                (3, b"three"),
            ]
            # The kernel takes part of it: the writer sends the rest.
            filling.room = 20
            left.cork()
            left.write(command_header(4, 9, 4), b"four")
            left.write(command_header(5, 9, 4), b"five")
            left.uncork()
            assert left.queued_bytes == 40 - 20
            assert left.writer_nursery is None  # started for the rest
            filling.room = 1 << 30
            frames = await receive_frames(right, 2)
            assert [(f.header.msg_id, f.payload) for f in frames] == [(4, b"four"), (5, b"five")]
            left.close()
    right.close()


async def test_write_bytes_joins_corked_replies_and_keeps_their_order() -> None:
    """The engine's inline replies: small ones written while corked share one chunk (and
    count in the backlog), a large one or one after fds is queued as write queues it, all
    leave in order at uncork; uncorked, a reply goes out at once."""
    a, b = socket.socketpair()
    counting = CountingSocket(fileno=a.detach())
    left, right = Transport(counting), Transport(b, max_recv_fds=1)
    large = bytes(range(256)) * 8  # above the size joined to its header
    r, w = os.pipe()
    try:
        with trio.fail_after(5):
            left.cork()
            left.write_bytes(command_header(1, 9, 3).pack(), b"one")
            left.write_bytes(command_header(2, 9, 3).pack(), b"two")
            assert left.queued_bytes == 2 * 19
            assert left.backlog == 2 * 19 + CHUNK_OVERHEAD  # one chunk for both
            left.write(command_header(3, 9, 0), b"", [r])
            left.write_bytes(command_header(4, 9, 4).pack(), b"four")
            left.write_bytes(command_header(5, 9, len(large)).pack(), large)
            left.write_bytes(command_header(6, 9, 3).pack(), b"six")
            assert left.queued_bytes == 2 * 19 + 16 + 20 + 16 + len(large) + 19
            assert counting.sendmsg_calls == 0
            left.uncork()
            sent = counting.sendmsg_calls
            assert left.queued_bytes == 0
            frames = await receive_frames(right, 6)
            assert [(f.header.msg_id, f.payload) for f in frames] == [
                (1, b"one"),
                (2, b"two"),
                (3, b""),
                (4, b"four"),
                (5, large),
                (6, b"six"),
            ]
            assert len(frames[2].fds) == 1
            frames[2].close_fds()
            left.write_bytes(command_header(7, 9, 5).pack(), b"seven")
            assert counting.sendmsg_calls == sent + 1
            assert [(f.header.msg_id, f.payload) for f in await receive_frames(right, 1)] == [
                (7, b"seven")
            ]
            left.close()
            with pytest.raises(trio.ClosedResourceError):
                left.write_bytes(command_header(8, 9, 0).pack(), b"")
    finally:
        os.close(r)
        os.close(w)
        left.close()
        right.close()


async def test_fds_arrive_with_their_own_message_and_are_usable() -> None:
    left, right = transport_pair(max_recv_fds=4)
    memfd = os.memfd_create("transport-test")
    os.write(memfd, b"guest memory")
    efd = os.eventfd(0)
    try:
        with trio.fail_after(5):
            left.write(command_header(1, 2, 3), b"one")
            left.write(command_header(2, 2, 3), b"two", [memfd])
            left.write(command_header(3, 2, 5), b"three")
            left.write(command_header(4, 8, 4), b"four", [efd, memfd])
            frames = await receive_frames(right, 4)
        assert [len(f.fds) for f in frames] == [0, 1, 0, 2]
        received_memfd = frames[1].take_fds()[0]
        assert os.pread(received_memfd, 12, 0) == b"guest memory"
        received_efd, second_memfd = frames[3].take_fds()
        os.eventfd_write(received_efd, 7)
        assert os.eventfd_read(efd) == 7
        assert os.fstat(second_memfd).st_ino == os.fstat(memfd).st_ino
        for fd in (received_memfd, received_efd, second_memfd):
            assert os.get_inheritable(fd) is False  # MSG_CMSG_CLOEXEC
            os.close(fd)
    finally:
        os.close(memfd)
        os.close(efd)
        left.close()
        right.close()


async def test_caller_may_close_its_fds_while_a_frame_is_still_queued() -> None:
    left, right = transport_pair(max_recv_fds=1)
    memfd = os.memfd_create("queued")
    os.write(memfd, b"still here")
    with trio.fail_after(5):
        left.write(command_header(1, 2, 0), b"", flush=False)
        left.write(command_header(2, 2, 0), b"", [memfd], flush=False)
        os.close(memfd)  # the transport kept a duplicate
        left.write(command_header(3, 2, 0))
        frames = await receive_frames(right, 3)
    (fd,) = frames[1].take_fds()
    assert os.pread(fd, 10, 0) == b"still here"
    os.close(fd)
    left.close()
    right.close()


async def test_transfer_fds_closes_them_once_sent() -> None:
    left, right = transport_pair(max_recv_fds=1)
    r, w = os.pipe()
    with trio.fail_after(5):
        left.write(command_header(1, 2, 0), b"", [w], transfer_fds=True)
        with pytest.raises(OSError):
            os.fstat(w)  # closed by the transport once sendmsg took it
        (frame,) = await receive_frames(right, 1)
    (received_w,) = frame.take_fds()
    os.write(received_w, b"x")
    assert os.read(r, 1) == b"x"
    os.close(received_w)
    os.close(r)
    left.close()
    right.close()


async def test_large_frames_survive_partial_sends_and_backpressure() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    left, right = Transport(a), Transport(b, max_msg_size=1 << 21)
    payloads = [bytes([i]) * (300_000 + i) for i in range(6)]
    memfd = os.memfd_create("big")
    received: list[Frame] = []

    async def reader() -> None:
        received.extend(await receive_frames(right, len(payloads)))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.run_writer)
            nursery.start_soon(reader)
            for i, payload in enumerate(payloads):
                fds = [memfd] if i % 2 else []
                await left.send(command_header(i, 10, len(payload)), payload, fds)
            await left.drain()
            assert left.queued_bytes == 0
            while len(received) < len(payloads):
                await trio.testing.wait_all_tasks_blocked()
            left.close()
    assert [f.payload for f in received] == payloads
    assert [len(f.fds) for f in received] == [0, 1, 0, 1, 0, 1]
    for frame in received:
        frame.close_fds()
    os.close(memfd)
    right.close()


class CappedSocket(socket.socket):
    """A socket whose sendmsg takes at most ``cap`` bytes per call, as a full kernel buffer
    does."""

    cap = 1 << 30

    def sendmsg(self, buffers: Any, *args: Any) -> int:
        left = self.cap
        taken: list[bytes] = []
        for buffer in buffers:
            piece = bytes(buffer)[:left]
            taken.append(piece)
            left -= len(piece)
        return super().sendmsg(taken, *args)


def _send_buffer(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


async def test_a_256_kib_frame_goes_to_the_kernel_in_one_write() -> None:
    """The socket's send buffer is raised (SEND_BUFFER_SIZE), so a large DMA frame leaves in
    one sendmsg even while the peer reads nothing; Linux's default buffer took 214 KiB of it
    and left the rest queued for the writer task."""
    a, b = socket.socketpair()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_SIZE)
        if _send_buffer(probe) < 2 * SEND_BUFFER_SIZE:
            pytest.skip("net.core.wmem_max caps the send buffer below SEND_BUFFER_SIZE")
    left, right = Transport(a), Transport(b)
    payload = bytes(256 * 1024)
    left.write(command_header(1, 10, len(payload)), payload)
    assert left.queued_bytes == 0
    left.close()
    right.close()


async def test_a_socket_with_a_larger_send_buffer_keeps_it() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * SEND_BUFFER_SIZE)
    given = _send_buffer(a)
    if given <= 2 * SEND_BUFFER_SIZE:
        pytest.skip("net.core.wmem_max caps the send buffer at SEND_BUFFER_SIZE")
    left = Transport(a)
    assert _send_buffer(a) == given
    left.close()
    b.close()


@pytest.mark.parametrize("cap", [5, 16, 21], ids=["in-header", "header-only", "in-payload"])
async def test_a_write_to_an_empty_queue_that_the_kernel_takes_in_part(cap: int) -> None:
    """A frame written with nothing queued goes straight to sendmsg; what the kernel does not
    take (part of the header, all the payload, part of it) is queued and sent in order."""
    a, b = socket.socketpair()
    capped = CappedSocket(fileno=a.detach())
    capped.cap = cap
    left, right = Transport(capped), Transport(b)
    payload = bytes(range(40))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.run_writer)
            left.write(command_header(1, 10, len(payload)), payload)
            assert left.queued_bytes == 16 + len(payload) - cap
            left.write(command_header(2, 10, 3), b"two")
            frames = await receive_frames(right, 2)
            left.close()
    assert [(f.header.msg_id, f.payload) for f in frames] == [(1, payload), (2, b"two")]
    right.close()


async def test_more_fds_than_the_limit_is_fatal_and_leaks_nothing() -> None:
    a, b = socket.socketpair()
    right = Transport(b, max_recv_fds=1)
    pipes = [os.pipe() for _ in range(4)]
    fds = [fd for pair in pipes for fd in pair]
    send_with_fds(a, frame_bytes(1, 8, b""), fds)
    for fd in fds:
        os.close(fd)
    with trio.fail_after(5), pytest.raises(ProtocolError, match="file descriptors"):
        await right.receive()
    assert right.closed
    a.close()


async def test_peer_close_is_an_empty_receive() -> None:
    a, b = socket.socketpair()
    right = Transport(b)
    a.sendall(frame_bytes(1, 9, b"last"))
    a.close()
    with trio.fail_after(5):
        (frame,) = await right.receive()
        assert isinstance(frame, Frame)
        assert frame.payload == b"last"
        assert await right.receive() == []
        assert await right.receive() == []
    right.close()


async def test_close_wakes_a_blocked_receive() -> None:
    left, right = transport_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def blocked() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await right.receive()

            nursery.start_soon(blocked)
            await trio.testing.wait_all_tasks_blocked()
            right.close()
    with pytest.raises(trio.ClosedResourceError):
        right.write(command_header(1, 9, 0))
    with pytest.raises(trio.ClosedResourceError):
        await right.receive()
    left.close()


async def test_oversized_frame_is_reported_and_skipped() -> None:
    a, b = socket.socketpair()
    right = Transport(b, max_msg_size=64)
    a.sendall(frame_bytes(1, 10, b"z" * 100) + frame_bytes(2, 9, b"ok"))
    with trio.fail_after(5):
        events = await right.receive()
    assert isinstance(events[0], OversizedFrame)
    assert events[0].header.msg_id == 1
    assert isinstance(events[1], Frame)
    assert events[1].payload == b"ok"
    a.close()
    right.close()


async def test_limits_can_change_after_negotiation() -> None:
    a, b = socket.socketpair()
    right = Transport(b, max_msg_size=64, max_recv_fds=1)
    right.max_msg_size = 4096
    right.max_recv_fds = 3
    pipes = [os.pipe() for _ in range(3)]
    send_with_fds(a, frame_bytes(1, 10, b"z" * 100), [p[0] for p in pipes])
    with trio.fail_after(5):
        (frame,) = await right.receive()
    assert isinstance(frame, Frame)
    assert len(frame.payload) == 100
    assert len(frame.fds) == 3
    frame.close_fds()
    for r, w in pipes:
        os.close(r)
        os.close(w)
    a.close()
    right.close()


async def test_receive_and_send_are_checkpoints() -> None:
    left, right = transport_pair()
    left.write(command_header(1, 9, 0))
    with trio.testing.assert_checkpoints():
        await right.receive()  # data was ready: the fast path still yields
    with trio.testing.assert_checkpoints():
        await left.send(command_header(2, 9, 0))
    left.close()
    right.close()


async def test_an_answer_sent_while_the_receiver_yields_needs_no_wait_on_the_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The ping-pong case: our last read emptied the socket, and the peer's next message is in
    # by the time we read again (in a server, it comes while receive() yields). receive()
    # must read it, not register the fd with epoll and park first (a syscall and a
    # wake-up more on every round trip).
    waits = 0
    wait_readable = trio.lowlevel.wait_readable

    async def counting_wait(sock: Any) -> None:
        nonlocal waits
        waits += 1
        await wait_readable(sock)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait)
    left, right = transport_pair()
    with trio.fail_after(5):
        left.write(command_header(1, 9, 0))
        (first,) = await right.receive()  # a short read: the socket is empty now
        left.write(command_header(2, 9, 0))  # the answer (nothing queued: sent at once)
        (second,) = await right.receive()
    assert isinstance(first, Frame) and isinstance(second, Frame)
    assert second.header.msg_id == 2
    assert waits == 0
    left.close()
    right.close()


async def test_a_cancelled_receive_loses_nothing() -> None:
    left, right = transport_pair()
    with trio.move_on_after(0) as scope:
        left.write(command_header(1, 9, 0))
        await right.receive()
    assert scope.cancelled_caught
    with trio.fail_after(5):
        (frame,) = await right.receive()
    assert isinstance(frame, Frame)
    assert frame.header.msg_id == 1
    left.close()
    right.close()


class PeerTiming:
    """Drives ``receiver`` with frames from a raw peer socket, as a slow or a fast peer, and
    tells whether a receive waited on the socket without yielding first.

    A fast peer's frame arrives while the receive yields (trio.lowlevel.checkpoint, which
    the transport yields with, is patched to send it); a slow one's once the receiver
    waits on the socket. Either way the frame comes, so no receive hangs."""

    def __init__(
        self,
        receiver: Transport,
        counting: CountingSocket,
        peer: socket.socket,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        self.receiver, self.counting, self.peer = receiver, counting, peer
        self.msg_id = 0
        self._answer_at_yield = False
        self._answered_at_yield = False
        checkpoint = trio.lowlevel.checkpoint

        async def answering_checkpoint() -> None:
            if self._answer_at_yield:
                self._answered_at_yield = True
                self._send()
            await checkpoint()

        monkeypatch.setattr(trio.lowlevel, "checkpoint", answering_checkpoint)

    def _send(self) -> None:
        self._answer_at_yield = False
        self.msg_id += 1
        self.peer.send(frame_bytes(self.msg_id, 9, b""))

    async def _exchange(self, *, fast: bool) -> bool:
        empty_reads = self.counting.empty_reads
        sent = self.msg_id

        async def send_when_parked() -> None:
            await trio.testing.wait_all_tasks_blocked()
            if self.msg_id == sent:
                self._send()

        self._answer_at_yield, self._answered_at_yield = fast, False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_when_parked)
            (frame,) = await self.receiver.receive()
        assert isinstance(frame, Frame) and frame.header.msg_id == self.msg_id == sent + 1
        waited_first = fast and not self._answered_at_yield
        # A receive that waits first reads only once the socket has data.
        assert not waited_first or self.counting.empty_reads == empty_reads
        return waited_first

    async def slow(self) -> None:
        """A peer that answers only once the receiver waits on the socket."""
        await self._exchange(fast=False)

    async def within_a_pass(self) -> bool:
        """A peer that answers while the receiver yields; True if the receive waited on the
        socket without yielding first (so the answer came once it waited)."""
        return await self._exchange(fast=True)


@pytest.fixture
async def peer_timing(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PeerTiming]:
    a, b = socket.socketpair()
    counting = CountingSocket(fileno=a.detach())
    receiver = Transport(counting)
    yield PeerTiming(receiver, counting, b, monkeypatch)
    receiver.close()
    b.close()


async def test_a_peer_slower_than_a_pass_is_waited_for_without_a_yield(
    peer_timing: PeerTiming,
) -> None:
    """Against a peer that never answers within the yield, receive stops yielding first
    (a scheduler pass and a read spent for nothing on every message) and waits on the
    socket at once; every SLOW_PEER_READS + 1-th receive yields first again, and one that
    finds data then goes back to yielding first."""
    with trio.fail_after(5):
        assert not await peer_timing.within_a_pass()  # a fresh transport yields first
        for _ in range(SLOW_PEER_MISSES):
            await peer_timing.slow()
        for _ in range(SLOW_PEER_READS):
            assert await peer_timing.within_a_pass()  # waited on the socket at once
        assert not await peer_timing.within_a_pass()  # the probe: yields first, finds it
        for _ in range(3 * SLOW_PEER_READS):
            assert not await peer_timing.within_a_pass()  # a fast peer again


async def test_a_peer_that_answers_within_a_pass_half_the_time_keeps_the_yield(
    peer_timing: PeerTiming,
) -> None:
    """A C client on another core answers within the yield about half the time: misses must
    be SLOW_PEER_MISSES in a row before the yield goes."""
    with trio.fail_after(5):
        for _ in range(4 * SLOW_PEER_MISSES):
            await peer_timing.slow()
            assert not await peer_timing.within_a_pass()
        for _ in range(SLOW_PEER_MISSES - 1):
            await peer_timing.slow()
        assert not await peer_timing.within_a_pass()


async def test_a_cancelled_receive_from_a_slow_peer_loses_nothing(
    peer_timing: PeerTiming,
) -> None:
    """Waiting first or not, a receive cancelled before it returns leaves the frame waiting."""
    with trio.fail_after(5):
        for _ in range(SLOW_PEER_MISSES):
            await peer_timing.slow()
        peer_timing.peer.send(frame_bytes(100, 9, b""))  # waiting before the receive
        with trio.CancelScope() as scope:
            scope.cancel()
            await peer_timing.receiver.receive()
        assert scope.cancelled_caught
        (frame,) = await peer_timing.receiver.receive()
    assert isinstance(frame, Frame) and frame.header.msg_id == 100
    with trio.testing.assert_checkpoints():
        peer_timing.peer.send(frame_bytes(101, 9, b""))
        (frame,) = await peer_timing.receiver.receive()  # waits first: still a checkpoint
    assert isinstance(frame, Frame) and frame.header.msg_id == 101


def test_rejects_sockets_that_are_not_unix_streams() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(ValueError, match="SOCK_STREAM"):
        Transport(a)
    a.close()
    b.close()


_HEADER = struct.Struct("=HHIII")


@st.composite
def frame_streams(draw: st.DrawFn) -> tuple[list[tuple[bytes, int]], list[int]]:
    """Frames (bytes, fd count) and cut points; fd frames start their own send."""
    sizes = draw(st.lists(st.integers(0, 3000), min_size=1, max_size=12))
    frames = []
    for i, size in enumerate(sizes):
        nfds = draw(st.integers(0, 2))
        payload = bytes((i + j) & 0xFF for j in range(size))
        frames.append((frame_bytes(i, 9, payload), nfds))
    total = sum(len(f) for f, _ in frames)
    cuts = draw(st.lists(st.integers(1, total - 1), max_size=20)) if total > 1 else []
    return frames, cuts


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame_streams())
def test_random_chunking_of_a_frame_stream(
    stream: tuple[list[tuple[bytes, int]], list[int]],
) -> None:
    frames, cuts = stream
    data = b"".join(f for f, _ in frames)
    starts = []
    offset = 0
    for raw, _ in frames:
        starts.append(offset)
        offset += len(raw)
    # fds go with the first byte of their frame's send, and that send ends within the frame.
    fd_cuts = {starts[i] for i, (_, n) in enumerate(frames) if n}
    fd_cuts |= {starts[i] + len(raw) for i, (raw, n) in enumerate(frames) if n}
    points = sorted(set(cuts) | fd_cuts | {0, len(data)})
    fd_at = {starts[i]: n for i, (_, n) in enumerate(frames) if n}
    r, w = os.pipe()

    async def main() -> None:
        a, b = socket.socketpair()
        right = Transport(b, max_recv_fds=2)
        got: list[Frame] = []

        async def sender() -> None:
            sender_sock = trio.socket.from_stdlib_socket(a)
            for lo, hi in itertools.pairwise(points):
                chunk = memoryview(data)[lo:hi]
                if lo in fd_at:
                    fds = array.array("i", [r] * fd_at[lo])
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
                    chunk = chunk[await sender_sock.sendmsg([chunk], anc) :]
                while chunk:
                    chunk = chunk[await sender_sock.send(chunk) :]
            sender_sock.close()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                while True:
                    events = await right.receive()
                    if not events:
                        break
                    for event in events:
                        assert isinstance(event, Frame)
                        got.append(event)
        right.close()
        assert [(f.header.pack() + f.payload) for f in got] == [raw for raw, _ in frames]
        assert [len(f.fds) for f in got] == [n for _, n in frames]
        for frame in got:
            for fd in frame.fds:
                assert os.fstat(fd).st_ino == os.fstat(r).st_ino
            frame.close_fds()

    try:
        trio.run(main)
    finally:
        os.close(r)
        os.close(w)


async def test_small_frames_queued_back_to_back_share_one_chunk() -> None:
    """Small frames without fds queued behind each other are joined into one buffer; a
    buffer the kernel took part of, a frame with fds and a large payload (the caller's
    bytearray, never written to) each end the join, and everything arrives in order."""
    a, b = socket.socketpair()
    capped = CappedSocket(fileno=a.detach())
    capped.cap = 50
    left, right = Transport(capped, max_recv_fds=1), Transport(b, max_recv_fds=1)
    memfd = os.memfd_create("coalesce")
    large = bytearray(b"L" * 2000)
    sent: list[tuple[int, bytes]] = []

    def write(msg_id: int, payload: bytes | bytearray, **kwargs: Any) -> None:
        left.write(command_header(msg_id, 10, len(payload)), payload, **kwargs)
        sent.append((msg_id, bytes(payload)))

    for i in range(10):
        write(i, bytes([i]) * 4, flush=False)
    assert left.backlog - left.queued_bytes == CHUNK_OVERHEAD  # one chunk for ten frames
    write(10, b"flushed")  # the kernel takes 50 bytes of the joined buffer
    write(11, b"after a partial send", flush=False)
    write(12, b"fd", fds=[memfd], flush=False)
    write(13, b"after the fd", flush=False)
    write(14, large, flush=False)
    write(15, b"after the large one", flush=False)
    assert large == b"L" * 2000
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.run_writer)
            frames = await receive_frames(right, len(sent))
            left.close()
    assert [(f.header.msg_id, f.payload) for f in frames] == sent
    assert [len(f.fds) for f in frames] == [1 if i == 12 else 0 for i in range(16)]
    assert large == b"L" * 2000
    for frame in frames:
        frame.close_fds()
    os.close(memfd)
    right.close()


async def test_backlog_counts_chunks_and_progress_is_reported() -> None:
    left, right = transport_pair()
    left_sock = socket.socket(fileno=os.dup(left.fileno()))
    left_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    left_sock.close()
    progress: list[int] = []
    left.on_progress = lambda: progress.append(left.queued_bytes)
    for i in range(400):
        left.write(command_header(i, 1, 100), bytes(100))
    # The kernel took some; the rest is queued, each chunk counted with its overhead.
    assert left.queued_bytes > 0 and progress
    chunks = left.backlog - left.queued_bytes
    assert chunks > 0 and chunks % CHUNK_OVERHEAD == 0
    progress.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(left.run_writer)
        assert len(await receive_frames(right, 400)) == 400
        await left.drain()
        nursery.cancel_scope.cancel()
    assert left.backlog == 0 and progress and progress[-1] == 0
    left.close()
    right.close()


async def test_tiny_messages_are_read_a_bounded_number_at_a_time() -> None:
    left, right = transport_pair()
    count = RECV_BUFFER_SIZE // 16
    blob = b"".join(command_header(i & 0xFFFF, 1, 0).pack() for i in range(count))
    sender = socket.socket(fileno=os.dup(left.fileno()))
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * RECV_BUFFER_SIZE)
    sender.setblocking(False)
    assert sender.send(blob) == len(blob)
    sender.close()
    seen = 0
    while seen < count:
        events = await right.receive()
        assert len(events) <= FRAMES_PER_READ
        seen += len(events)
    # And a caller may ask for less still.
    left.write(command_header(1, 1, 64), bytes(64))
    left.write(command_header(2, 1, 64), bytes(64))
    [first] = await right.receive(max_bytes=80)
    [second] = await right.receive()
    assert isinstance(first, Frame) and isinstance(second, Frame)
    assert (first.header.msg_id, second.header.msg_id) == (1, 2)
    left.close()
    right.close()
