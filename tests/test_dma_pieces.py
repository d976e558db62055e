"""Message DMA without fresh copies of the data: payloads in pieces, frames handed on whole.

The server's DMA_WRITE and the client's DMA_READ reply go out as iovecs (header, DMA header,
the data itself: the device's buffer, a view of guest memory); what the kernel does not take
at once is copied before ``Transport.write`` returns, so no view of the caller's memory
outlives the call. A frame received in place is handed on as the buffer it was received
into (the frame's own: later receives never touch it), and a DMA_READ reply's data goes from
it straight into the device's buffer. Real sockets, real memfds.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import trio
import trio.testing

from tests.plain_device import served_plain
from vfiouser_trio.client import GuestMemory, connect
from vfiouser_trio.client.client import Client
from vfiouser_trio.engine import HandlerResult, RawMessage, open_connection
from vfiouser_trio.ordering import CommandJob, OrderingPolicy, PolicyContext
from vfiouser_trio.protocol import DmaLayout
from vfiouser_trio.protocol.constants import Command
from vfiouser_trio.protocol.dma import DmaReadReply, DmaReadRequest, DmaWriteRequest
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.protocol.header import Header
from vfiouser_trio.protocol.message import byte_buffer
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.dma import DmaError
from vfiouser_trio.transport import Transport

pytestmark = pytest.mark.usefixtures("no_fd_leak")

IOVA = 0x40_0000
LAYOUTS = [DmaLayout.SPEC, DmaLayout.QEMU]


def test_byte_buffer_keeps_byte_buffers_and_casts_every_other_view() -> None:
    """The one rule the transport (sizes, iovecs) and the DMA table (copies into a view)
    share: a buffer comes out measured and sliced in unsigned bytes."""
    data, scratch = b"12345678", bytearray(8)
    view = memoryview(scratch)
    assert byte_buffer(data) is data
    assert byte_buffer(scratch) is scratch
    assert byte_buffer(view) is view
    others: list[memoryview] = [view.cast("I"), view.cast("b")]
    for other in [*others, view.cast("B", (2, 4))]:
        cast = byte_buffer(other)
        assert isinstance(cast, memoryview)
        assert (cast.format, cast.ndim, len(cast)) == ("B", 1, 8)
        cast[0:2] = b"ab"  # a slice takes bytes, as a copy into it needs
    assert scratch.startswith(b"ab")
    words: Any = array.array("I", [1, 2])  # (not a Buffer to the type checker)
    assert (len(byte_buffer(words)), bytes(byte_buffer(words))[:4]) == (8, b"\1\0\0\0")


SIZES = [256 << 10, 1 << 20]


@asynccontextmanager
async def message_dma(
    layout: DmaLayout, memory: GuestMemory
) -> AsyncIterator[tuple[Device, Client]]:
    """A Plain device served over a socket pair to our client imitating ``layout`` (no
    hooks: they would join every frame), ``memory`` mapped at IOVA without its fd."""
    async with (
        served_plain(layout, seconds=20) as (device, ours),
        connect(ours, dma_layout=layout) as client,
    ):
        await client.dma_map(memory, IOVA, share_fd=False)
        yield device, client


@contextmanager
def recorded_iovecs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """(id of the exporting object, length) of every memoryview iovec sent from now on:
    ids only, so that no record keeps guest memory's buffer (and its mapping) alive."""
    sent: list[tuple[int, int]] = []
    sendmsg = socket.socket.sendmsg

    def recording(sock: socket.socket, buffers: Any, *args: Any) -> int:
        buffers = list(buffers)
        for buffer in buffers:
            if isinstance(buffer, memoryview):
                sent.append((id(buffer.obj), len(buffer)))
        return sendmsg(sock, buffers, *args)

    monkeypatch.setattr(socket.socket, "sendmsg", recording)
    yield sent


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s >> 10}KiB")
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
async def test_message_dma_sends_the_data_itself_and_moves_it_intact(
    monkeypatch: pytest.MonkeyPatch, layout: DmaLayout, size: int
) -> None:
    """DMA_WRITE from the device's buffer and the DMA_READ reply from guest memory are
    iovecs of their frames (never joined to their headers), in both layouts; the bytes
    land intact both ways."""
    with GuestMemory(4 << 20) as memory:
        async with message_dma(layout, memory) as (device, _):
            with recorded_iovecs(monkeypatch) as sent:
                out = bytearray(os.urandom(size))
                await device.dma.write(IOVA + 4096, out)
                assert memory.read(4096, size) == out
                assert (id(out), size) in sent  # the device's buffer itself, uncopied
                memory.write(8 << 10, os.urandom(size))
                back = bytearray(size)
                await device.dma.read_into(IOVA + (8 << 10), back)
                assert back == memory.read(8 << 10, size)
                assert (id(memory.view.obj), size) in sent  # straight from guest memory


async def drain_frames(sender: Transport, receiver: Transport) -> list[Frame]:
    """Run ``sender``'s writer until ``receiver`` has frames; close both; those frames."""
    frames: list[Frame] = []
    with trio.fail_after(10):  # a write that loses bytes hangs: fail instead
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.run_writer)
            while not frames:
                frames.extend(e for e in await receiver.receive() if isinstance(e, Frame))
            nursery.cancel_scope.cancel()
    sender.close()
    receiver.close()
    return frames


async def test_pieces_the_kernel_leaves_are_copied_before_write_returns() -> None:
    """A payload in pieces larger than the socket takes: what is left is queued as a copy,
    so guest memory changed (or closed) once ``write`` returns does not change the frame."""
    a, b = socket.socketpair()
    sender, receiver = Transport(a), Transport(b, max_msg_size=(4 << 20) + 64)
    memory = GuestMemory(4 << 20)
    data = os.urandom(4 << 20)
    memory.write(0, data)
    view = memory.view[: len(data)]
    header = Header(7, 9, 16 + 8 + len(data) + 4, 0)
    sender.write(header, (b"DMA-HEAD", view, b"tail"))
    assert sender.queued_bytes > 0  # the kernel took part of it only
    view.release()
    memory.write(0, bytes(len(data)))  # overwritten, then unmapped: the frame is unchanged
    memory.close()  # no view of it is left (BufferError otherwise)
    frames = await drain_frames(sender, receiver)
    [frame] = frames
    assert frame.payload == b"DMA-HEAD" + data + b"tail"


async def test_a_frame_received_in_place_is_never_changed_by_later_receives() -> None:
    """Three 256 KiB frames, each received into a buffer of its own, handed on as it is (no
    copy); the first one's payload, held meanwhile, is intact after the others came."""
    a, b = socket.socketpair()
    sender, receiver = Transport(a), Transport(b, max_msg_size=(1 << 20))
    contents = [os.urandom(256 << 10) for _ in range(3)]
    frames: list[Frame] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.run_writer)
        for i, content in enumerate(contents):
            sender.write(Header(i + 1, 9, 16 + len(content), 0), content)
        while len(frames) < 3:
            frames.extend(e for e in await receiver.receive() if isinstance(e, Frame))
        nursery.cancel_scope.cancel()
    sender.close()
    receiver.close()
    first = frames[0].payload
    assert type(first) is bytearray  # the buffer it was received into, handed on
    assert [f.payload for f in frames] == contents


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_pieces_join_to_the_packed_payload_and_replies_decode_to_views(
    layout: DmaLayout,
) -> None:
    data = bytearray(os.urandom(5000))
    for message in (DmaWriteRequest(0x1000, data, layout), DmaReadReply(0x1000, data, layout)):
        pieces = message.pack_pieces()
        assert any(piece is data for piece in pieces)  # the data itself, not a copy
        assert b"".join(pieces) == message.pack()
    payload = DmaReadReply(0x1000, data, layout).pack()
    reply = DmaReadRequest(0x1000, len(data)).parse_reply(payload, layout=layout, copy=False)
    assert isinstance(reply.data, memoryview) and reply.data.obj is payload
    assert reply.data.readonly and reply.data == data


async def test_an_unmap_racing_message_dma_leaves_no_view_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The client unmaps (and closes) guest memory while the device reads it through 1 MiB
    DMA_READs answered from views of it: each read is whole until they are refused, and
    the memory closes at once after the unmap (no reply's view outlives its send)."""
    memory = GuestMemory(4 << 20)
    guest = id(memory.view.obj)
    data = os.urandom(4 << 20)
    memory.write(0, data)
    outcomes: list[bool] = []
    try:
        async with message_dma(DmaLayout.SPEC, memory) as (device, client):
            with recorded_iovecs(monkeypatch) as sent:
                started = trio.Event()

                async def reader() -> None:
                    for i in range(64):
                        offset = (i % 4) << 20
                        buffer = bytearray(1 << 20)
                        try:
                            await device.dma.read_into(IOVA + offset, buffer)
                        except DmaError:
                            outcomes.append(False)
                            return
                        assert buffer == data[offset : offset + (1 << 20)]
                        outcomes.append(True)
                        started.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader)
                    await started.wait()
                    await client.dma_unmap(IOVA, 4 << 20)
                    memory.close()  # BufferError if a reply still held a view of it
            assert (guest, 1 << 20) in sent  # the replies were sent from views of it
    finally:
        memory.close()
    assert outcomes[0] and outcomes[-1] is False


async def test_a_reply_a_policy_holds_carries_what_its_handler_lent() -> None:
    """A handler's reply in pieces (a view of its buffer) that the policy holds is copied
    before it waits: the buffer changed meanwhile does not change the reply."""
    jobs: list[CommandJob] = []

    class HoldReplies(OrderingPolicy):
        async def serve(self, ctx: PolicyContext) -> None:
            while True:
                jobs.append(ctx.execute(await ctx.commands.get()))

    lent = bytearray(b"before" * 10_000)

    async def server(frame: Frame) -> HandlerResult:
        return RawMessage((b"head", memoryview(lent)))

    async def client_handler(frame: Frame) -> HandlerResult:
        return None

    replies: list[Frame] = []
    a, b = socket.socketpair()
    with trio.fail_after(10):
        async with (
            open_connection(a, handler=client_handler) as client,
            open_connection(b, handler=server, policy=HoldReplies()),
            trio.open_nursery() as nursery,
        ):

            async def ask() -> None:
                replies.append(await client.request_raw(Command.REGION_READ, b""))

            nursery.start_soon(ask)
            while not jobs:
                await trio.testing.wait_all_tasks_blocked()
            await jobs[0].wait_handled()
            lent[:] = b"after!" * 10_000
            await jobs[0].release_reply()
            while not replies:
                await trio.testing.wait_all_tasks_blocked()
    assert replies[0].payload == b"head" + b"before" * 10_000


async def test_a_piece_of_wider_items_counts_its_bytes() -> None:
    """A memoryview of 4-byte items as a piece: what the kernel leaves is cut by bytes."""
    a, b = socket.socketpair()
    sender, receiver = Transport(a), Transport(b, max_msg_size=(2 << 20) + 64)
    data = os.urandom(2 << 20)
    sender.write(Header(3, 9, 16 + 4 + len(data), 0), (b"head", memoryview(data).cast("I")))
    assert sender.queued_bytes > 0
    frames = await drain_frames(sender, receiver)
    assert frames[0].payload == b"head" + data
