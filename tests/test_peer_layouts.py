"""Wire layouts real peers use, replayed over real sockets.

libvfio-user's client sends payloads longer than the structure (kernel VFIO's argsz
rule): its GET_REGION_INFO first asks with argsz 32, learns the size with the caps,
then re-sends its whole zeroed buffer of that size; its GET_INFO and GET_IRQ_INFO
buffers may be the kernel's newer 24-byte structures. QEMU lays DMA_READ replies and
DMA_WRITE requests out as {address u64, count u32, data} and answers DMA_WRITE with a
header-only reply.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.plain_device import served_plain
from tests.raw_client import session
from vfiouser_trio.client import GuestMemory, connect
from vfiouser_trio.engine import Connection, HandlerResult, RawMessage, open_connection
from vfiouser_trio.examples import DmaEngine
from vfiouser_trio.examples import dmaengine as de
from vfiouser_trio.protocol import (
    Capabilities,
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DeviceResetReply,
    DeviceResetRequest,
    DmaLayout,
    DmaMapReply,
    DmaMapRequest,
    DmaUnmapRequest,
    IrqInfoReply,
    IrqInfoRequest,
    Message,
    RegionInfoReply,
    RegionInfoRequest,
    RegionWriteRequest,
    VersionReply,
    VersionRequest,
    decode_request,
)
from vfiouser_trio.protocol.constants import (
    DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET,
    IRQ_INFO_EVENTFD,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    Command,
    PciIrq,
    PciRegion,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY, PciIdentity
from vfiouser_trio.server.regions import SparseArea
from vfiouser_trio.server.serve import serve
from vfiouser_trio.testing import Tracer

pytestmark = pytest.mark.usefixtures("no_fd_leak")

PAGE = mmap.PAGESIZE
BAR1 = 1


def u32(*values: int) -> bytes:
    return struct.pack(f"={len(values)}I", *values)


class Sparse(Device):
    """BAR1 memory-backed with two sparse mmap areas: its caps take GET_REGION_INFO to 80 bytes."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10FF, class_code=0xFF0000))
        self.add_bar(BAR1, 4 * PAGE, sparse=[SparseArea(0, PAGE), SparseArea(2 * PAGE, PAGE)])


def _region_info_buffer(argsz: int, index: int) -> bytes:
    """libvfio-user's buffer: zeroed, argsz and index set, sent whole."""
    return u32(argsz, 0, index) + bytes(argsz - 12)


async def test_libvfio_user_region_info_resent_with_its_whole_buffer() -> None:
    async with session(Sparse()) as conn:
        first = await conn.request_raw(
            Command.DEVICE_GET_REGION_INFO, _region_info_buffer(32, BAR1)
        )
        first.close_fds()
        short = RegionInfoReply.unpack(first.payload)
        assert len(first.payload) == 32 and short.caps == ()
        assert short.argsz == 80  # the size it needs with its caps
        # msg_size 96: header + the 80-byte buffer, argsz 80.
        second = await conn.request_raw(
            Command.DEVICE_GET_REGION_INFO, _region_info_buffer(short.argsz, BAR1)
        )
        try:
            full = RegionInfoReply.unpack(second.payload, second.fds)
            assert len(second.payload) == 80 and full.argsz == 80
            assert full.sparse_mmap is not None
            assert [(a.offset, a.size) for a in full.sparse_mmap.areas] == [
                (0, PAGE),
                (2 * PAGE, PAGE),
            ]
        finally:
            second.close_fds()


async def test_libvfio_user_24_byte_get_info_and_irq_info() -> None:
    async with session(Sparse()) as conn:
        frame = await conn.request_raw(Command.DEVICE_GET_INFO, u32(24, 0, 0, 0, 0, 0))
        info = DeviceGetInfoReply.unpack(frame.payload)
        assert info.num_regions >= BAR1 + 1 and info.is_pci
        frame = await conn.request_raw(Command.DEVICE_GET_IRQ_INFO, u32(24, 0, PciIrq.MSI, 0, 0, 0))
        assert IrqInfoReply.unpack(frame.payload).index == PciIrq.MSI


# --- QEMU's DMA_READ / DMA_WRITE layout ---------------------------------------------------

IOVA = 0x10_0000
LAYOUTS = [DmaLayout.SPEC, DmaLayout.QEMU]


@asynccontextmanager
async def message_dma(
    layout: DmaLayout, memory: GuestMemory, *, configured: DmaLayout | None = None
) -> AsyncIterator[tuple[Device, Tracer]]:
    """Our client imitating ``layout``, ``memory`` mapped at IOVA without its fd.

    The server knows the layout only if ``configured`` (ServerLimits.dma_layout). Yields
    the device and a tracer of the client's connection.
    """
    tracer = Tracer()
    async with (
        served_plain(configured) as (device, ours),
        connect(ours, dma_layout=layout, hooks=tracer) as client,
    ):
        await client.dma_map(memory, IOVA, share_fd=False)
        yield device, tracer


def dma_writes(tracer: Tracer) -> list[bytes]:
    """Payloads of the DMA_WRITE commands the client received."""
    return [r.payload for r in tracer.commands(Command.DMA_WRITE)]


def probe(address: int) -> bytes:
    return struct.pack("<QQ", address, 0)  # the same 16 bytes in both layouts


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
async def test_device_dma_write_lands_at_the_right_bytes(layout: DmaLayout) -> None:
    data = b"0123456789abcdef"
    with GuestMemory(PAGE) as memory:
        memory.write(0, b"\xee" * 64)
        async with message_dma(layout, memory) as (device, tracer):
            await device.dma.write(IOVA + 8, data)
            assert memory.read(0, 40) == b"\xee" * 8 + data + b"\xee" * 16
            # Unknown layout before the first write: a zero-length probe, then the write
            # in the client's layout.
            body = struct.pack("<QI", IOVA + 8, 16) + data + bytes(4)
            if layout is DmaLayout.SPEC:
                body = struct.pack("<QQ", IOVA + 8, 16) + data
            assert dma_writes(tracer) == [probe(IOVA + 8), body]
            if layout is DmaLayout.QEMU:
                [_, reply] = tracer.replies(Command.DMA_WRITE)
                assert reply.payload == b""  # QEMU answers header-only


@pytest.mark.parametrize("configured", [False, True], ids=["learnt", "configured"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
async def test_mixed_dma_reads_and_writes(layout: DmaLayout, configured: bool) -> None:
    pattern = bytes(range(1, 201))
    with GuestMemory(PAGE) as memory:
        memory.write(0, pattern)
        known = layout if configured else None
        async with message_dma(layout, memory, configured=known) as (device, tracer):
            # The first read's reply fits one layout only (its data has no zero bytes).
            assert await device.dma.read(IOVA + 3, 100) == pattern[3:103]
            await device.dma.write(IOVA + 1000, b"first")
            assert await device.dma.read(IOVA + 998, 9) == b"\0\0first\0\0"
            await device.dma.write(IOVA + 5, b"XY")
            await device.dma.write(IOVA + 1001, b"")  # nothing to send
            assert await device.dma.read(IOVA, 10) == pattern[:5] + b"XY" + pattern[7:10]
            assert memory.read(1000, 5) == b"first"
            assert len(dma_writes(tracer)) == 2  # no probe: the layout was known or learnt


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
async def test_a_read_both_layouts_fit_is_resolved_by_the_probe(layout: DmaLayout) -> None:
    # Zero first and last 4 bytes: the reply fits both layouts, and they read it differently.
    data = bytes(4) + b"ABCDEFGH" + bytes(4)
    with GuestMemory(PAGE) as memory:
        memory.write(64, data)
        async with message_dma(layout, memory) as (device, tracer):
            assert await device.dma.read(IOVA, 16) == bytes(16)  # both read zeros: no probe
            assert dma_writes(tracer) == []
            assert await device.dma.read(IOVA + 64, 16) == data
            assert dma_writes(tracer) == [probe(IOVA + 64)]
            await device.dma.write(IOVA + 200, b"z")
            assert len(dma_writes(tracer)) == 2 and memory.read(200, 1) == b"z"


async def test_concurrent_first_writes_probe_once() -> None:
    with GuestMemory(PAGE) as memory:
        async with message_dma(DmaLayout.QEMU, memory) as (device, tracer):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(device.dma.write, IOVA + 16 * i, bytes([i + 1]) * 16)
            assert memory.read(0, 64) == b"".join(bytes([i + 1]) * 16 for i in range(4))
            assert sum(p[8:] == bytes(8) for p in dma_writes(tracer)) == 1


# A scripted client: each DMA command answered with the bytes a test gives.
Answer = Callable[[Frame], RawMessage]


@asynccontextmanager
async def scripted_client(
    answer: Answer, *, configured: DmaLayout | None = None
) -> AsyncIterator[tuple[Device, Connection]]:
    async def handle(frame: Frame) -> RawMessage:
        return answer(frame)

    async with (
        served_plain(configured) as (device, ours),
        open_connection(ours, handler=handle) as conn,
    ):
        reply = await conn.request(VersionRequest(0, 2, Capabilities()))
        assert isinstance(reply, VersionReply)
        await conn.request(DmaMapRequest(IOVA, PAGE))
        yield device, conn


def echo(frame: Frame) -> bytes:
    """The spec's DMA_WRITE reply to ``frame``: its address and count."""
    return bytes(frame.payload[:16])


@pytest.mark.parametrize(
    ("answer", "configured", "reason"),
    [
        (lambda f: RawMessage(b"\0" * 8), None, "expected 12 or 16"),  # to the probe
        (lambda f: RawMessage(echo(f)), DmaLayout.QEMU, "QEMU's layout answers none"),
        (lambda f: RawMessage(b""), DmaLayout.SPEC, "expected 12 or 16"),
        (
            lambda f: RawMessage(struct.pack("<QQ", IOVA, 3)),
            DmaLayout.SPEC,
            "does not echo",
        ),
    ],
    ids=["probe-8-bytes", "qemu-given-a-spec-echo", "spec-given-nothing", "wrong-count"],
)
async def test_garbage_dma_write_replies_are_refused(
    answer: Answer, configured: DmaLayout | None, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with scripted_client(answer, configured=configured) as (device, conn):
        with pytest.raises(VfioUserError) as info:
            await device.dma.write(IOVA, b"data")
        assert info.value.errno == errno.EINVAL and reason in str(info.value)
        assert any(
            r.levelname == "WARNING" and device.name in r.getMessage() and reason in r.getMessage()
            for r in caplog.records
        )
        # Only that access failed: the session goes on.
        reply = await conn.request(DeviceGetInfoRequest())
        assert isinstance(reply, DeviceGetInfoReply) and reply.num_regions > 0


async def test_dma_read_reply_fitting_no_layout_is_refused() -> None:
    def answer(frame: Frame) -> RawMessage:
        return RawMessage(struct.pack("<QQ", IOVA, 5) + b"abcd")

    async with scripted_client(answer) as (device, _):
        with pytest.raises(VfioUserError) as info:
            await device.dma.read(IOVA, 4)
        assert info.value.errno == errno.EINVAL and "4 bytes requested" in str(info.value)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
async def test_dmaengine_with_every_map_by_message(layout: DmaLayout, tmp_path: Path) -> None:
    """QEMU's memory-backend-ram case: ring, source and destination reached only by messages."""
    device = DmaEngine()
    ring, src, dst = IOVA, IOVA + PAGE, IOVA + 2 * PAGE
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, device, tmp_path / "dma.sock")
                async with connect(tmp_path / "dma.sock", dma_layout=layout) as client:
                    with GuestMemory(3 * PAGE) as ram:
                        await client.dma_map(ram, ring, share_fd=False)
                        [irq] = await client.enable_irqs(PciIrq.MSIX)
                        await client.config.write(COMMAND, COMMAND_MEMORY | COMMAND_BUS_MASTER, 2)
                        bar0 = PciRegion.BAR0
                        await client.write(bar0, de.RING_BASE_LO, struct.pack("<Q", ring))
                        await client.write(bar0, de.RING_SIZE, struct.pack("<I", 16))
                        control = de.CONTROL_ENABLE | de.CONTROL_IRQ_ENABLE
                        await client.write(bar0, de.CONTROL, struct.pack("<I", control))
                        payload = bytes(4) + os.urandom(3000) + bytes(4)
                        ram.write(PAGE, payload)
                        ram.write(0, de.descriptor(src, dst, len(payload)))
                        await client.write(bar0, de.TAIL, struct.pack("<I", 1))
                        assert await irq.wait() == 1
                        assert ram.read(2 * PAGE, len(payload)) == payload
                        status = de.descriptor_status(ram.read(0, de.DESCRIPTOR_SIZE))
                        assert status == (0, de.DESC_DONE)
                        await client.dma_unmap_all()
                nursery.cancel_scope.cancel()
    finally:
        device.close()


# --- the client reads replies longer than it needs ----------------------------------------

PADDING = b"\xa5" * 8  # bytes a peer's larger reply buffer carries past the structure


async def padded_server(frame: Frame) -> HandlerResult:
    """Every fixed-layout reply with bytes past its structure."""
    await trio.lowlevel.checkpoint()
    request = decode_request(frame.header.command, frame.payload, frame.fds)
    reply: Message
    match request:
        case VersionRequest():
            return VersionReply(0, 2, Capabilities())
        case DeviceGetInfoRequest():
            reply = DeviceGetInfoReply(DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET, 1, 1)
        case RegionInfoRequest():
            reply = RegionInfoReply(0, REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE, 0x100)
        case IrqInfoRequest():
            reply = IrqInfoReply(request.index, IRQ_INFO_EVENTFD, 1)
        case RegionWriteRequest():
            reply = request.reply()
        case DeviceResetRequest():
            reply = DeviceResetReply()
        case DmaMapRequest():
            reply = DmaMapReply()
        case DmaUnmapRequest():
            reply = request.reply()
        case _:
            raise VfioUserError(errno.EINVAL, "not scripted")
    return RawMessage(reply.pack() + PADDING)


async def test_client_takes_replies_longer_than_their_structure() -> None:
    ours, theirs = socket.socketpair()
    with trio.fail_after(10), GuestMemory(PAGE) as memory:
        async with (
            open_connection(theirs, handler=padded_server) as _,
            connect(ours, twin_socket=False) as client,
        ):
            assert client.info.num_regions == 1 and client.regions[0].size == 0x100
            assert client.irq_info[0].count == 1
            await client.write(0, 0, b"abcd")
            await client.reset()
            await client.dma_map(memory, IOVA, share_fd=False)
            await client.dma_unmap(IOVA, PAGE)
