"""Large frames over a real socket: received straight into a buffer of their size.

The DMA_READ replies and DMA_WRITE requests of message DMA are the large frames of a
connection. A frame missing many bytes after its first read receives the rest into its own
buffer (``FrameDecoder.receive_space``), never past its end; message DMA of large ranges
then moves intact both ways.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import pytest
import trio

from vfiouser_trio.client import GuestMemory
from vfiouser_trio.protocol.framing import Frame, FrameDecoder, FrameEvent
from vfiouser_trio.protocol.header import Header
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.testing import nested_device
from vfiouser_trio.transport import Transport

pytestmark = pytest.mark.usefixtures("no_fd_leak")

IOVA = 0x40_0000


def count_direct_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the reads that went straight into a frame's buffer, from now on."""
    direct: list[int] = []
    received = FrameDecoder.received

    def counting(self: FrameDecoder, count: int, fds: Sequence[int] = ()) -> list[FrameEvent]:
        direct.append(count)
        return received(self, count, fds)

    monkeypatch.setattr(FrameDecoder, "received", counting)
    return direct


async def test_the_rest_of_a_large_frame_is_received_straight_into_its_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 1 MiB frame sent in pieces: the reads after its first go into the frame's own
    buffer, never past it (the small frame behind it arrives whole)."""
    direct = count_direct_reads(monkeypatch)
    a, b = socket.socketpair()
    payload = os.urandom(1 << 20)
    big = Header(1, 9, 16 + len(payload), 0).pack() + payload
    data = big + Header(2, 9, 21, 0).pack() + b"after"
    receiver = Transport(b, max_msg_size=(1 << 20) + 4096)
    a.setblocking(False)
    frames: list[Frame] = []
    with a:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                view = memoryview(data)
                while view:
                    await trio.lowlevel.wait_writable(a)
                    view = view[a.send(view[:100_000]) :]

            nursery.start_soon(send)
            while len(frames) < 2:
                for event in await receiver.receive():
                    assert isinstance(event, Frame)
                    frames.append(event)
    receiver.close()
    first, second = frames
    assert first.payload == payload and second.payload == b"after"
    assert direct and sum(direct) < len(payload)  # part of it came straight in


class Mover(Device):
    """BAR0 write: copy ``length`` (u32) bytes of guest memory from IOVA to IOVA + length,
    reading all of it first (DMA_READ), then writing it back (DMA_WRITE)."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7115), name="mover0")
        self.add_bar(0, 0x1000, write=self.write0)

    async def write0(self, offset: int, data: bytes) -> None:
        length = int.from_bytes(data, "little")
        buffer = bytearray(length)
        await self.dma.read_into(IOVA, buffer)
        await self.dma.write(IOVA + length, buffer)


async def test_message_dma_of_large_ranges_moves_intact_both_ways(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = Mover()
    async with nested_device(device) as pair:
        with GuestMemory(4 << 20) as memory:
            await pair.client.dma_map(memory, IOVA, share_fd=False)  # messages only
            direct = count_direct_reads(monkeypatch)
            for length in (256 << 10, 1 << 20):
                data = os.urandom(length)
                memory.write(0, data)
                await pair.client.write(0, 0, length.to_bytes(4, "little"))
                assert memory.read(length, length) == data
            assert direct  # both sides' large frames: the rest straight into their buffers
