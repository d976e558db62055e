"""FrameDecoder: frame assembly from a byte stream with SCM_RIGHTS fds."""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from tests.fd_leaks import fd_count
from vfiouser_trio.protocol.errors import ProtocolError
from vfiouser_trio.protocol.framing import (
    BrokenStream,
    Frame,
    FrameDecoder,
    FrameEvent,
    OversizedFrame,
    StrayFds,
)
from vfiouser_trio.protocol.header import Header


def frame(msg_id: int, payload: bytes, command: int = 9, flags: int = 0) -> bytes:
    # Header written by hand (not via Header.pack): msg_id u16, command u16,
    # msg_size u32, flags u32, error u32, native byte order.
    return struct.pack("=HHIII", msg_id, command, 16 + len(payload), flags, 0) + payload


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pipe_fds() -> Iterator[list[int]]:
    """Two fds to hand to the decoder; whatever is still open afterwards is closed."""
    r, w = os.pipe()
    fds = [r, w]
    yield fds
    for fd in fds:
        if is_open(fd):
            os.close(fd)


def frames_of(events: list[FrameEvent]) -> list[tuple[int, bytes | bytearray]]:
    out = []
    for ev in events:
        assert isinstance(ev, Frame)
        out.append((ev.header.msg_id, ev.payload))
    return out


STREAM_PARTS = [frame(1, b""), frame(2, b"abc"), frame(3, bytes(range(40))), frame(4, b"z" * 17)]
STREAM = b"".join(STREAM_PARTS)
EXPECTED = [(1, b""), (2, b"abc"), (3, bytes(range(40))), (4, b"z" * 17)]


def test_many_frames_in_one_chunk() -> None:
    d = FrameDecoder()
    events = d.feed(STREAM)
    assert frames_of(events) == EXPECTED
    assert d.at_boundary and d.buffered == 0
    first = events[1]
    assert isinstance(first, Frame)
    assert first.header == Header(2, 9, 19, 0, 0)


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_split_at_every_byte_boundary(cut: int) -> None:
    d = FrameDecoder()
    events = d.feed(STREAM[:cut]) + d.feed(STREAM[cut:])
    assert frames_of(events) == EXPECTED
    assert d.at_boundary


def test_one_byte_at_a_time() -> None:
    d = FrameDecoder()
    events: list[FrameEvent] = []
    for i in range(len(STREAM)):
        events += d.feed(STREAM[i : i + 1])
        assert d.at_boundary == (i + 1 in {16, 35, 91, 124})
    assert frames_of(events) == EXPECTED


def test_accepts_bytearray_and_memoryview() -> None:
    d = FrameDecoder()
    events = d.feed(bytearray(STREAM[:30])) + d.feed(memoryview(STREAM)[30:])
    assert frames_of(events) == EXPECTED


def test_fds_attach_to_frame_starting_the_chunk(pipe_fds: list[int]) -> None:
    d = FrameDecoder()
    events = d.feed(frame(7, b"x" * 32), pipe_fds)
    assert len(events) == 1 and isinstance(events[0], Frame)
    assert events[0].take_fds() == pipe_fds
    assert events[0].fds == []


def test_fds_attach_to_last_frame_starting_in_chunk(pipe_fds: list[int]) -> None:
    # The kernel glues data queued before an fd-carrying sendmsg into the same
    # read (see test_kernel_merges_data_before_scm_rights); the fds then belong
    # to the frame that begins last in the chunk.
    d = FrameDecoder()
    events = d.feed(frame(1, b"aa") + frame(2, b"bb"), pipe_fds)
    a, b = events
    assert isinstance(a, Frame) and isinstance(b, Frame)
    assert a.fds == [] and b.fds == pipe_fds


def test_fds_with_tail_of_previous_frame_go_to_next_frame(pipe_fds: list[int]) -> None:
    d = FrameDecoder()
    f1, f2 = frame(1, b"a" * 20), frame(2, b"b" * 4)
    assert d.feed(f1[:10]) == []
    a, b = d.feed(f1[10:] + f2, pipe_fds)
    assert isinstance(a, Frame) and isinstance(b, Frame)
    assert a.fds == [] and b.fds == pipe_fds


def test_fds_wait_with_an_unfinished_frame(pipe_fds: list[int]) -> None:
    d = FrameDecoder()
    f = frame(5, b"q" * 100)
    assert d.feed(f[:8], pipe_fds) == []  # not even a full header yet
    assert d.feed(f[8:50]) == []
    (ev,) = d.feed(f[50:])
    assert isinstance(ev, Frame) and ev.fds == pipe_fds


def test_fds_with_pure_continuation_bytes_are_closed(pipe_fds: list[int]) -> None:
    before = fd_count()
    d = FrameDecoder()
    f = frame(1, b"c" * 64)
    d.feed(f[:20])
    events = d.feed(f[20:40], pipe_fds)
    assert events == [StrayFds(2)]
    assert not any(is_open(fd) for fd in pipe_fds)
    assert fd_count() == before - 2
    (ev,) = d.feed(f[40:])
    assert isinstance(ev, Frame) and ev.fds == []


def test_close_releases_fds_of_unfinished_frame(pipe_fds: list[int]) -> None:
    d = FrameDecoder()
    d.feed(frame(1, b"p" * 10)[:20], pipe_fds)
    assert all(is_open(fd) for fd in pipe_fds)
    assert not d.at_boundary
    d.close()
    assert not any(is_open(fd) for fd in pipe_fds)
    assert d.at_boundary


def test_frame_close_fds(pipe_fds: list[int]) -> None:
    (ev,) = FrameDecoder().feed(frame(1, b""), pipe_fds)
    assert isinstance(ev, Frame)
    ev.close_fds()
    assert ev.fds == [] and not any(is_open(fd) for fd in pipe_fds)
    ev.close_fds()  # idempotent


def test_oversized_frame_is_skipped_without_buffering() -> None:
    d = FrameDecoder(max_msg_size=64)
    big = frame(9, b"B" * 1000, command=10)
    after = frame(10, b"ok")
    data = big + after
    events: list[FrameEvent] = []
    for i in range(0, len(data), 7):
        events += d.feed(data[i : i + 7])
        assert d.buffered < 64  # never holds the oversized body
    assert events[0] == OversizedFrame(Header(9, 10, 1016, 0, 0), 0)
    assert frames_of(events[1:]) == [(10, b"ok")]
    assert d.at_boundary


def test_oversized_frame_in_one_chunk_then_more() -> None:
    d = FrameDecoder(max_msg_size=32)
    events = d.feed(frame(1, b"x" * 40) + frame(2, b"y"))
    assert isinstance(events[0], OversizedFrame) and events[0].header.msg_size == 56
    assert frames_of(events[1:]) == [(2, b"y")]


def test_oversized_frame_fds_are_closed(pipe_fds: list[int]) -> None:
    d = FrameDecoder(max_msg_size=32)
    events = d.feed(frame(1, b"x" * 40)[:30], pipe_fds)
    assert events == [OversizedFrame(Header(1, 9, 56, 0, 0), 2)]
    assert not any(is_open(fd) for fd in pipe_fds)
    assert not d.at_boundary  # 26 bytes still to skip
    assert d.feed(b"\0" * 26) == [] and d.at_boundary


def test_oversized_header_split_over_chunks(pipe_fds: list[int]) -> None:
    d = FrameDecoder(max_msg_size=32)
    big = frame(3, b"x" * 100)
    assert d.feed(big[:5], pipe_fds) == []
    events = d.feed(big[5:] + frame(4, b""))
    assert events[0] == OversizedFrame(Header(3, 9, 116, 0, 0), 2)
    assert frames_of(events[1:]) == [(4, b"")]
    assert not any(is_open(fd) for fd in pipe_fds)


def test_max_msg_size_is_settable() -> None:
    d = FrameDecoder(max_msg_size=16)
    assert isinstance(d.feed(frame(1, b"a"))[0], OversizedFrame)
    d.max_msg_size = 17
    assert frames_of(d.feed(frame(2, b"a"))) == [(2, b"a")]
    with pytest.raises(ValueError):
        FrameDecoder(max_msg_size=15)


@pytest.mark.parametrize("msg_size", [0, 1, 15])
def test_undersized_msg_size_breaks_the_stream(msg_size: int, pipe_fds: list[int]) -> None:
    d = FrameDecoder()
    bad = struct.pack("=HHIII", 3, 1, msg_size, 0, 0)
    events = d.feed(frame(1, b"good") + bad + b"trailing", pipe_fds)
    assert frames_of(events[:1]) == [(1, b"good")]
    assert events[1] == BrokenStream(
        f"msg_size {msg_size} is below the header size", Header(3, 1, msg_size, 0, 0)
    )
    assert d.broken
    assert not any(is_open(fd) for fd in pipe_fds)
    with pytest.raises(ProtocolError):
        d.feed(frame(2, b""))


def test_undersized_msg_size_in_split_header(pipe_fds: list[int]) -> None:
    d = FrameDecoder()
    bad = struct.pack("=HHIII", 3, 1, 4, 0, 0)
    assert d.feed(bad[:6], pipe_fds) == []
    (ev,) = d.feed(bad[6:])
    assert isinstance(ev, BrokenStream)
    assert not any(is_open(fd) for fd in pipe_fds)


def test_many_small_frames_in_one_feed() -> None:
    data = b"".join(frame(i & 0xFFFF, b"0123") for i in range(20000))
    events = FrameDecoder().feed(data)
    assert len(events) == 20000
    last = events[-1]
    assert isinstance(last, Frame) and last.payload == b"0123"


def test_large_frame_in_small_chunks() -> None:
    payload = os.urandom(1 << 20)
    data = frame(1, payload)
    d = FrameDecoder()
    events: list[FrameEvent] = []
    for i in range(0, len(data), 4096):
        events += d.feed(data[i : i + 4096])
    assert frames_of(events) == [(1, payload)]


def test_kernel_merges_data_before_scm_rights(pipe_fds: list[int]) -> None:
    """Real AF_UNIX stream: recvmsg may return earlier data together with an fd send.

    This is why fds go to the last frame starting in a chunk, not the first.
    """
    before = fd_count()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a.send(frame(1, b"first"))
        a.sendmsg(
            [frame(2, b"second")],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", pipe_fds[:1]))],
        )
        a.send(frame(3, b"third"))
        d = FrameDecoder()
        events: list[FrameEvent] = []
        chunks: list[int] = []
        while len(events) < 3:
            data, anc, _flags, _addr = b.recvmsg(4096, socket.CMSG_SPACE(4 * 8))
            chunks.append(len(data))
            fds: list[int] = []
            for level, kind, blob in anc:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                fds += array.array("i", blob[: len(blob) - len(blob) % 4]).tolist()
            events += d.feed(data, fds)
        # Frames 1 and 2 (the fd send) came in one read; frame 3 did not join them.
        assert chunks[0] == 2 * 16 + len(b"first") + len(b"second")
        f1, f2, f3 = events
        assert isinstance(f1, Frame) and isinstance(f2, Frame) and isinstance(f3, Frame)
        assert f1.fds == [] and f3.fds == []
        assert len(f2.fds) == 1 and f2.payload == b"second"
        f2.close_fds()
    finally:
        a.close()
        b.close()
    assert fd_count() == before


# --- a large frame received in place (receive_space / received) -------------------------


def test_a_frame_gets_a_buffer_of_its_size_and_the_rest_is_received_into_it(
    pipe_fds: list[int],
) -> None:
    d = FrameDecoder(max_msg_size=1 << 20)
    body = bytes(range(256)) * 1024  # 256 KiB
    data = frame(7, body) + frame(8, b"next")
    assert d.receive_space() is None  # at a boundary
    assert d.feed(data[:1000], pipe_fds[:1]) == []
    assert d.buffered == len(body)  # allocated at once, of the announced size
    space = d.receive_space()
    assert space is not None and len(space) == len(body) - (1000 - 16)
    # A transport's recv_into writes the rest there, in two reads; nothing past the frame.
    first = len(space) // 2
    space[:first] = data[1000 : 1000 + first]
    assert d.received(first) == []
    space = d.receive_space()
    assert space is not None and len(space) == len(body) - (1000 - 16) - first
    space[:] = data[1000 + first : 16 + len(body)]
    [event] = d.received(len(space))
    assert isinstance(event, Frame) and event.header.msg_id == 7 and event.payload == body
    assert event.take_fds() == pipe_fds[:1]  # the fds of the chunk it started in
    assert d.at_boundary and d.buffered == 0 and d.receive_space() is None
    assert frames_of(d.feed(data[16 + len(body) :])) == [(8, b"next")]


def test_bytes_received_in_place_and_fed_mix_and_stray_fds_are_closed(
    pipe_fds: list[int],
) -> None:
    d = FrameDecoder()
    body = b"x" * 5000
    data = frame(1, body)
    d.feed(data[:10])  # not even the header: nothing to receive into yet
    assert d.receive_space() is None and d.buffered == 10
    d.feed(data[10:100])
    space = d.receive_space()
    assert space is not None
    space[:900] = data[100:1000]
    [stray] = d.received(900, pipe_fds)  # fds with continuation bytes are stray
    assert stray == StrayFds(2) and not any(is_open(fd) for fd in pipe_fds)
    [event] = d.feed(data[1000:])
    assert isinstance(event, Frame) and event.payload == body and event.fds == []


def test_received_beyond_the_frame_is_refused() -> None:
    d = FrameDecoder()
    with pytest.raises(ValueError):
        d.received(1)  # no frame being received
    d.feed(frame(1, b"abcd")[:18])
    with pytest.raises(ValueError):
        d.received(3)  # only 2 bytes missing
    assert d.received(0) == [] and not d.at_boundary


def test_a_frame_of_the_largest_size_allowed_is_allocated_on_its_header_alone() -> None:
    """What a peer can make us allocate without sending: one frame's worth, at most the
    limit (a bigger announcement is an OversizedFrame, skipped without a buffer)."""
    d = FrameDecoder(max_msg_size=64 << 10)
    d.feed(struct.pack("=HHIII", 1, 9, 64 << 10, 0, 0))
    assert d.buffered == (64 << 10) - 16 < d.max_msg_size
    d.close()
    assert d.buffered == 0 and d.at_boundary
    [event] = d.feed(struct.pack("=HHIII", 2, 9, (64 << 10) + 1, 0, 0))
    assert isinstance(event, OversizedFrame) and d.buffered == 0
