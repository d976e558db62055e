"""The client driving our server over real sockets: every call, both data paths, DMA both
ways, interrupts, doorbells, errors, server death, cancellation, twin sockets on and off."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.e2e_device import (
    DOORBELL,
    DST,
    PAGE,
    REG_COPY,
    REG_FILL,
    SRC,
    TIMEOUT,
    TestDevice,
    served,
)
from vfiouser_trio.client import (
    ConnectionClosedError,
    GuestMemory,
    VfioUserError,
    connect,
)
from vfiouser_trio.engine import Connection, ConnectionHooks, Forward, Link
from vfiouser_trio.eventfd import EventFd
from vfiouser_trio.protocol import Capabilities, Frame
from vfiouser_trio.protocol.constants import (
    IO_FD_TYPE_IOEVENTFD,
    IRQ_INFO_EVENTFD,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    REGION_INFO_FLAG_MMAP,
    Command,
    PciIrq,
    PciRegion,
)
from vfiouser_trio.server.pci import InterruptPin
from vfiouser_trio.server.serve import serve
from vfiouser_trio.server.session import DEFAULT_SERVER_CAPABILITIES, ServerSession
from vfiouser_trio.testing import Tracer

pytestmark = pytest.mark.usefixtures("no_fd_leak")


# BAR0 register map of the test device (callbacks).
REG_SCRATCH = 0x00


class SentCounter(ConnectionHooks):
    """Counts the frames the client sends, by command."""

    def __init__(self) -> None:
        self.sent: Counter[int] = Counter()

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        if not frame.header.is_reply:
            self.sent[frame.header.command] += 1
        forward(frame)


# --- connecting ---------------------------------------------------------------------------


@pytest.mark.parametrize(("twin", "offer"), [(True, True), (False, True), (True, False)])
async def test_connect_reads_everything(twin: bool, offer: bool) -> None:
    device = TestDevice()
    async with served(device, twin=twin, offer_twin=offer) as (client, _):
        assert client.twin_socket == (twin and offer)
        assert client.connection.has_twin == (twin and offer)
        assert not client.write_multiple  # proposed, but a default server does not offer it
        assert client.max_data_xfer_size == DEFAULT_SERVER_CAPABILITIES.max_data_xfer_size
        assert client.info.is_pci and client.info.supports_reset
        assert sorted(client.regions) == list(range(client.info.num_regions))
        assert client.regions[PciRegion.BAR1].mmappable
        assert client.regions[PciRegion.BAR1].flags & REGION_INFO_FLAG_MMAP
        assert client.regions[PciRegion.BAR2].sparse_areas is not None
        assert client.regions[PciRegion.BAR0].areas == ()
        assert client.regions[PciRegion.CONFIG].size == 256
        region_type = client.regions[9].region_type
        assert region_type is not None
        assert (region_type.type, region_type.subtype) == (0x8086_0000, 3)
        assert client.irq_info[PciIrq.MSIX].count == 4
        assert client.irq_info[PciIrq.MSI].count == 2
        assert client.irq_info[PciIrq.INTX].count == 1
        assert client.irq_info[PciIrq.MSIX].flags & IRQ_INFO_EVENTFD
        assert not client.closed


async def test_connect_by_path(tmp_path: Path) -> None:
    device = TestDevice()
    path = tmp_path / "dev.sock"
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, device, path)
                async with connect(path) as client:
                    await client.write(PciRegion.BAR0, REG_SCRATCH, b"\x11\x22")
                    assert await client.read(PciRegion.BAR0, REG_SCRATCH, 2) == b"\x11\x22"
                # A second connection to the same device finds its state kept.
                async with connect(os.fspath(path), twin_socket=False) as client:
                    assert await client.read(PciRegion.BAR0, REG_SCRATCH, 2) == b"\x11\x22"
                nursery.cancel_scope.cancel()
    finally:
        device.close()


async def test_connect_to_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        async with connect(tmp_path / "nobody"):
            pass  # pragma: no cover


# --- region access ------------------------------------------------------------------------


async def test_message_path_is_split_at_max_data_xfer_size() -> None:
    device = TestDevice()
    caps = Capabilities(max_msg_fds=8, max_data_xfer_size=256, write_multiple=True)
    async with served(device, server_caps=caps) as (client, _):
        assert client.max_data_xfer_size == 256
        data = os.urandom(0x700)
        await client.write(PciRegion.BAR0, 0, data)
        assert [(o, len(d)) for o, d in device.bar0_writes] == [
            (0, 256),
            (256, 256),
            (512, 256),
            (768, 256),
            (1024, 256),
            (1280, 256),
            (1536, 256),
        ]
        assert await client.read(PciRegion.BAR0, 3, 0x600) == data[3:0x603]
        assert device.bar0_reads == [(3 + i * 256, 256) for i in range(6)]
        assert await client.read(PciRegion.BAR0, 0, 0) == b""


async def test_mmap_path_uses_no_messages_and_agrees_with_messages() -> None:
    device = TestDevice()
    counter = SentCounter()
    async with served(device, hooks=counter) as (client, _):
        bar1 = device.region(PciRegion.BAR1)
        assert bar1 is not None
        memory = bar1.memory
        assert memory is not None
        counter.sent.clear()
        data = os.urandom(4 * PAGE)
        await client.write(PciRegion.BAR1, 0, data)  # shared memory
        assert counter.sent == Counter()
        assert bytes(memory.view) == data
        assert await client.read(PciRegion.BAR1, 0, 4 * PAGE, use_mmap=False) == data
        assert counter.sent[Command.REGION_READ] == 1
        # Written by messages, read from memory: the same bytes.
        other = os.urandom(PAGE)
        await client.write(PciRegion.BAR1, 100, other, use_mmap=False)
        counter.sent.clear()
        assert await client.read(PciRegion.BAR1, 100, PAGE) == other
        assert counter.sent == Counter()
        # The device changing its memory is seen at once through the mapping.
        memory.view[7] = 0x5A
        assert await client.read(PciRegion.BAR1, 7, 1) == b"\x5a"


async def test_sparse_areas_mapped_and_the_rest_trapped() -> None:
    device = TestDevice()
    counter = SentCounter()
    async with served(device, hooks=counter) as (client, _):
        region = client.regions[PciRegion.BAR2]
        assert [(a.offset, a.size) for a in region.areas] == [(PAGE, 2 * PAGE)]
        bar2 = device.region(PciRegion.BAR2)
        assert bar2 is not None
        memory = bar2.memory
        assert memory is not None
        counter.sent.clear()
        payload = os.urandom(2 * PAGE)
        await client.write(PciRegion.BAR2, PAGE, payload)  # inside the area: memory
        assert counter.sent == Counter()
        assert device.bar2_calls == []
        assert bytes(memory.view[PAGE : 3 * PAGE]) == payload
        # Both paths read the same bytes.
        via_mmap = await client.read(PciRegion.BAR2, PAGE + 5, 100)
        via_msg = await client.read(PciRegion.BAR2, PAGE + 5, 100, use_mmap=False)
        assert via_mmap == via_msg == payload[5:105]
        # Outside the area, and straddling its edge, the callbacks answer.
        assert await client.read(PciRegion.BAR2, 0, 4) == b"\xb2" * 4
        await client.write(PciRegion.BAR2, PAGE - 2, b"abcd")
        assert device.bar2_calls == [("read", 0, 4), ("write", PAGE - 2, 4)]
        assert counter.sent[Command.REGION_WRITE] == 1


async def test_region_errors_carry_errno_and_command() -> None:
    device = TestDevice()
    async with served(device) as (client, _):
        with pytest.raises(VfioUserError) as info:
            await client.read(PciRegion.BAR0, 0xFFE, 4)
        assert info.value.errno == errno.EINVAL
        assert info.value.command == Command.REGION_READ
        with pytest.raises(VfioUserError) as info:
            await client.write(PciRegion.BAR3, 0, b"x")  # upper half of the 64-bit BAR2
        assert info.value.errno == errno.EINVAL
        assert info.value.command == Command.REGION_WRITE
        with pytest.raises(ValueError, match="negative"):
            await client.read(PciRegion.BAR0, -1, 1)
        # Still usable afterwards.
        await client.write(PciRegion.BAR0, 0, b"ok")
        assert await client.read(PciRegion.BAR0, 0, 2) == b"ok"


@pytest.mark.parametrize("negotiate", [True, False])
async def test_write_multi(negotiate: bool) -> None:
    device = TestDevice()
    counter = SentCounter()
    offered = dataclasses.replace(DEFAULT_SERVER_CAPABILITIES, write_multiple=True)
    serving = served(device, write_multiple=negotiate, server_caps=offered, hooks=counter)
    async with serving as (client, _):
        assert client.write_multiple == negotiate
        counter.sent.clear()
        done = await client.write_multi(
            [(PciRegion.BAR0, 0x20, b"\x01\x02"), (PciRegion.BAR0, 0x30, b"12345678")]
        )
        assert done == 2
        assert device.bar0_writes == [(0x20, b"\x01\x02"), (0x30, b"12345678")]
        if negotiate:
            assert counter.sent == Counter({Command.REGION_WRITE_MULTI: 1})
        else:
            assert counter.sent == Counter({Command.REGION_WRITE: 2})
        with pytest.raises(ValueError, match="at most 8"):
            await client.write_multi([(PciRegion.BAR0, 0, b"123456789")])


async def test_write_multi_split_to_fit_the_server() -> None:
    device = TestDevice()
    caps = Capabilities(max_msg_fds=8, max_data_xfer_size=8 + 32 * 3, write_multiple=True)
    counter = SentCounter()
    async with served(device, server_caps=caps, hooks=counter) as (client, _):
        counter.sent.clear()
        writes = [(PciRegion.BAR0, 0x40 + 4 * i, bytes([i] * 4)) for i in range(7)]
        assert await client.write_multi(writes) == 7
        assert counter.sent == Counter({Command.REGION_WRITE_MULTI: 3})
        assert [o for o, _ in device.bar0_writes] == [0x40 + 4 * i for i in range(7)]


# --- PCI config space ---------------------------------------------------------------------


async def test_config_space_through_the_client() -> None:
    device = TestDevice()
    async with served(device) as (client, _):
        config = client.config
        header = await config.header()
        assert (header.vendor_id, header.device_id) == (0x1AF4, 0x10F0)
        assert header.class_code == 0x018000 and header.revision == 2
        assert header.interrupt_pin == InterruptPin.INTA
        bars = await config.bars()
        assert [(b.index, b.size, b.io, b.is_64bit, b.prefetchable) for b in bars] == [
            (0, 0x1000, False, False, False),
            (1, 4 * PAGE, False, False, False),
            (2, 4 * PAGE, False, True, True),
            (4, 0x40, True, False, False),
        ]
        caps = await config.capabilities()
        assert {c.name for c in caps} == {"MSI-X", "MSI", "Power Management"}
        assert await config.extended_capabilities() == []
        await config.write(0x04, 0x0006, 2)  # memory + bus master
        assert await config.read(0x04, 2) == 0x0006
        assert device.config.bus_master_enabled
        await config.write(0x3C, 0x0B, 1)
        assert device.config.interrupt_line == 0x0B
        dump = await config.dump()
        assert len(dump) == 256 and dump[:4] == bytes.fromhex("f41af010")


async def test_reset() -> None:
    device = TestDevice()
    async with served(device) as (client, _):
        await client.config.write(0x04, 0x0002, 2)
        await client.reset()
        assert device.resets == 1
        assert await client.config.read(0x04, 2) == 0  # config space back to power-on


# --- DMA ----------------------------------------------------------------------------------


@pytest.mark.parametrize("twin", [True, False])
@pytest.mark.parametrize("share_fd", [True, False])
async def test_dma_both_ways(twin: bool, share_fd: bool) -> None:
    device = TestDevice()
    # A small client limit makes the server split its DMA messages.
    caps = Capabilities(max_msg_fds=16, max_data_xfer_size=4096)
    async with served(device, twin=twin, client_caps=caps) as (client, _):
        with GuestMemory(16 * PAGE) as memory:
            source = os.urandom(3 * PAGE + 5)
            memory.write(PAGE, source)
            await client.dma_map(memory, SRC, offset=PAGE, size=4 * PAGE, share_fd=share_fd)
            await client.dma_map(memory, DST, offset=8 * PAGE, size=4 * PAGE, share_fd=share_fd)
            assert [m.iova for m in client.dma_maps] == [SRC, DST]
            assert all(m.shared == share_fd for m in client.dma_maps)
            assert [m.mapped for m in device.dma] == [share_fd, share_fd]
            # The device reads SRC and writes DST while serving our REGION_WRITE.
            await client.write(PciRegion.BAR0, REG_COPY, len(source).to_bytes(8, "little"))
            assert memory.read(8 * PAGE, len(source)) == source[::-1]
            await client.write(PciRegion.BAR0, REG_FILL, b"\x7e")
            assert memory.read(8 * PAGE, 16) == b"\x7e" * 16
            await client.dma_unmap(SRC, 4 * PAGE)
            assert [m.iova for m in client.dma_maps] == [DST]
            assert len(device.dma) == 1
            await client.dma_unmap_all()
            assert client.dma_maps == () and len(device.dma) == 0
            # Unmapped now: the device's DMA fails, our write reports it.
            with pytest.raises(VfioUserError) as info:
                await client.write(PciRegion.BAR0, REG_FILL, b"\x01")
            assert device.dma_error is not None and device.dma_error.errno == errno.EFAULT
            assert info.value.errno == errno.EFAULT


@pytest.mark.parametrize("twin", [True, False])
async def test_a_smaller_transfer_size_the_client_proposes_holds_both_ways(twin: bool) -> None:
    """``connect(capabilities=...)``: the server's 1 MiB does not override the client's 4 KiB."""
    device = TestDevice()
    caps = Capabilities(max_msg_fds=16, max_data_xfer_size=4096)
    tracer = Tracer()
    async with served(device, twin=twin, client_caps=caps, hooks=tracer) as (client, _):
        assert DEFAULT_SERVER_CAPABILITIES.max_data_xfer_size > 4096
        assert client.max_data_xfer_size == 4096
        with GuestMemory(16 * PAGE) as memory:
            source = os.urandom(3 * PAGE + 5)
            memory.write(PAGE, source)
            await client.dma_map(memory, SRC, offset=PAGE, size=4 * PAGE, share_fd=False)
            await client.dma_map(memory, DST, offset=8 * PAGE, size=4 * PAGE, share_fd=False)
            await client.write(PciRegion.BAR0, REG_COPY, len(source).to_bytes(8, "little"))
            assert memory.read(8 * PAGE, len(source)) == source[::-1]
        await client.read(PciRegion.BAR1, 0, 4 * PAGE)  # mmap'd: no messages
        await client.read(PciRegion.BAR2, 0, 4 * PAGE)  # outside the sparse area: messages
    reads = tracer.commands(Command.DMA_READ)
    writes = tracer.commands(Command.DMA_WRITE)
    assert len(reads) == len(writes) == 4  # 3 pages and 5 bytes, in 4 KiB pieces
    # Data rides in DMA_READ replies and DMA_WRITE commands: {address, count} and the data.
    data_sizes = [r.payload_size - 16 for r in tracer.replies(Command.DMA_READ) + writes]
    assert max(data_sizes) == 4096
    region_reads = tracer.commands(Command.REGION_READ)
    assert all(int.from_bytes(r.payload[12:16], "little") <= 4096 for r in region_reads)
    assert sorted(c for _, o, c in device.bar2_calls if o < PAGE or o >= 3 * PAGE) == [
        4096,
        4096,
    ]


async def test_errors_name_the_command() -> None:
    device = TestDevice()  # cannot migrate: MIG_DATA_WRITE is refused
    async with served(device) as (client, _):
        with pytest.raises(VfioUserError) as info:
            await client.write_migration_data(b"state")
    assert info.value.command == Command.MIG_DATA_WRITE
    assert str(info.value).endswith("(MIG_DATA_WRITE)")
    assert "command 18" not in str(info.value)


async def test_dma_permissions_over_messages() -> None:
    device = TestDevice()
    async with served(device) as (client, _):
        with GuestMemory(8 * PAGE) as memory:
            await client.dma_map(memory, SRC, size=PAGE, writable=False, share_fd=False)
            await client.dma_map(
                memory, DST, offset=PAGE, size=PAGE, readable=False, share_fd=False
            )
            memory.write(0, b"abcd")
            await client.write(PciRegion.BAR0, REG_COPY, (4).to_bytes(8, "little"))
            assert memory.read(PAGE, 4) == b"dcba"
            with pytest.raises(ValueError, match="overlaps"):
                await client.dma_map(memory, SRC + PAGE - 1, size=PAGE)
            with pytest.raises(VfioUserError) as info:
                await client.dma_unmap(SRC, 2 * PAGE)  # no exact match
            assert info.value.errno == errno.ENOENT
            assert info.value.command == Command.DMA_UNMAP
            assert len(client.dma_maps) == 2


async def test_client_checks_server_dma_requests() -> None:
    """Raw DMA_READ / DMA_WRITE from the server, bypassing the server's own checks."""
    device = TestDevice()
    ours, theirs = socket.socketpair()
    session = ServerSession(device)
    caps = Capabilities(max_msg_fds=16, max_data_xfer_size=2 * PAGE)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run, theirs)
                async with connect(ours, capabilities=caps) as client:
                    with GuestMemory(4 * PAGE) as memory:
                        memory.write(0, b"guest")
                        await client.dma_map(memory, 0x1000, size=PAGE, share_fd=False)
                        await client.dma_map(
                            memory, 0x1000 + PAGE, offset=PAGE, size=PAGE, writable=False
                        )
                        assert bytes(await session.dma_read(0x1000, 5)) == b"guest"
                        await session.dma_write(0x1002, b"ES")
                        assert memory.read(0, 5) == b"guESt"
                        # Across both maps: allowed for reads.
                        assert len(await session.dma_read(0x1000 + PAGE - 2, 4)) == 4
                        failures = [
                            (session.dma_read(0x1000 + 2 * PAGE, 1), errno.EFAULT),
                            (session.dma_read(0x0FFF, 2), errno.EFAULT),
                            (session.dma_write(0x1000 + PAGE, b"x"), errno.EFAULT),
                            (session.dma_read(0x1000, 2 * PAGE + 1), errno.EINVAL),
                        ]
                        for call, code in failures:
                            with pytest.raises(VfioUserError) as info:
                                await call
                            assert info.value.errno == code
                        assert memory.read(PAGE, 1) == b"\0"
                nursery.cancel_scope.cancel()
    finally:
        device.close()


class HoldDmaMapReply(ConnectionHooks):
    """Server-side hook that holds back the DMA_MAP reply."""

    def __init__(self) -> None:
        self.held: list[tuple[Frame, Forward]] = []
        self.holding = trio.Event()

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        if frame.header.is_reply and frame.header.command == Command.DMA_MAP:
            self.held.append((frame, forward))
            self.holding.set()
        else:
            forward(frame)


@pytest.mark.parametrize("twin", [True, False])
async def test_dma_served_before_the_map_reply_arrives(twin: bool) -> None:
    device = TestDevice()
    hold = HoldDmaMapReply()
    async with served(device, twin=twin, server_hooks=hold) as (client, _):
        with GuestMemory(PAGE) as memory:
            memory.write(0, b"early")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(client.dma_map, memory, 0x9000, share_fd=False))
                await hold.holding.wait()
                # The server has the map and uses it; its reply has not reached us yet.
                assert await device.dma.read(0x9000, 5) == b"early"
                frame, forward = hold.held.pop()
                forward(frame)
            assert [m.iova for m in client.dma_maps] == [0x9000]


async def test_dma_map_refused_by_server_is_withdrawn() -> None:
    device = TestDevice()
    caps = Capabilities(max_msg_fds=8, max_dma_maps=1, write_multiple=True)
    async with served(device, server_caps=caps) as (client, _):
        with GuestMemory(2 * PAGE) as memory:
            await client.dma_map(memory, 0, size=PAGE)
            with pytest.raises(VfioUserError) as info:
                await client.dma_map(memory, PAGE, offset=PAGE, size=PAGE)
            assert info.value.errno == errno.ENOSPC
            assert [m.iova for m in client.dma_maps] == [0]


# --- interrupts ---------------------------------------------------------------------------


async def test_irq_delivery_mask_unmask_disable() -> None:
    device = TestDevice()
    async with served(device) as (client, _):
        irqs = await client.enable_irqs(PciIrq.MSIX)
        assert [i.vector for i in irqs] == [0, 1, 2, 3]
        assert client.irq(PciIrq.MSIX, 2) is irqs[2]
        msix = device.irqs[PciIrq.MSIX]
        assert all(msix.has_eventfd(v) for v in range(4))

        assert device.trigger(2, index=PciIrq.MSIX)
        assert await client.irq(PciIrq.MSIX, 2).wait() == 1
        assert irqs[0].try_read() is None

        await client.mask_irqs(PciIrq.MSIX, 1)
        assert msix.is_masked(1)
        assert not device.trigger(1, index=PciIrq.MSIX)
        assert irqs[1].try_read() is None  # held pending by the server
        await client.unmask_irqs(PciIrq.MSIX, 1)
        assert await irqs[1].wait() == 1  # delivered on unmask

        await client.mask_irqs(PciIrq.MSIX, 0, select=[True, False, True, False])
        assert [msix.is_masked(v) for v in range(4)] == [True, False, True, False]
        await client.unmask_irqs(PciIrq.MSIX, 0, select=[True, True, True, True])
        assert not any(msix.is_masked(v) for v in range(4))

        await client.trigger_irqs(PciIrq.MSIX, 3)  # the client raising it via the server
        assert await irqs[3].wait() == 1

        await client.disable_irqs(PciIrq.MSIX)
        assert all(i.closed for i in irqs)
        assert not any(msix.has_eventfd(v) for v in range(4))
        with pytest.raises(LookupError):
            client.irq(PciIrq.MSIX, 0)


async def test_irq_async_iteration() -> None:
    device = TestDevice()
    async with served(device) as (client, _):
        [irq] = await client.enable_irqs(PciIrq.MSI, 1, start=1)
        assert irq.vector == 1
        seen: list[int] = []
        async with trio.open_nursery() as nursery:

            async def consume() -> None:
                async for count in irq:
                    seen.append(count)
                    if len(seen) == 3:
                        return

            nursery.start_soon(consume)
            for _ in range(3):
                await trio.testing.wait_all_tasks_blocked()
                device.irqs[PciIrq.MSI].trigger(1)
        assert seen == [1, 1, 1]


async def test_enable_irqs_split_by_the_servers_fd_limit_and_replaced() -> None:
    device = TestDevice()
    caps = Capabilities(max_msg_fds=3, write_multiple=True)
    counter = SentCounter()
    async with served(device, server_caps=caps, hooks=counter) as (client, _):
        counter.sent.clear()
        first = await client.enable_irqs(PciIrq.MSIX)
        assert counter.sent[Command.DEVICE_SET_IRQS] == 2  # 3 + 1 eventfds
        again = await client.enable_irqs(PciIrq.MSIX, 2, start=1)
        assert first[1].closed and first[2].closed and not first[0].closed
        device.trigger(2, index=PciIrq.MSIX)
        assert await again[1].wait() == 1
        with pytest.raises(VfioUserError) as info:
            await client.enable_irqs(PciIrq.MSIX, 2, start=3)  # beyond the count
        assert info.value.errno == errno.EINVAL
        assert client.irq(PciIrq.MSIX, 3) is first[3]  # untouched by the failure


async def test_set_irqs_low_level() -> None:
    device = TestDevice()
    async with served(device) as (client, _):
        with EventFd() as mine:
            await client.set_irqs(
                PciIrq.INTX, 0, 1, IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD, eventfds=[mine]
            )
            device.trigger(0, index=PciIrq.INTX)
            assert await mine.wait() == 1
            # INTx masks itself after firing; unmasking with the DATA_BOOL form.
            assert device.irqs[PciIrq.INTX].is_masked(0)
            await client.unmask_irqs(PciIrq.INTX, select=[True])
            assert not device.irqs[PciIrq.INTX].is_masked(0)


# --- doorbells ----------------------------------------------------------------------------


async def test_region_io_fds_ring_the_doorbell() -> None:
    device = TestDevice()
    async with served(device) as (client, _):
        subs = await client.region_io_fds(PciRegion.BAR0)
        assert [(s.region, s.offset, s.size, s.type) for s in subs] == [
            (PciRegion.BAR0, DOORBELL, 4, IO_FD_TYPE_IOEVENTFD)
        ]
        assert subs[0].is_ioeventfd
        subs[0].ring()
        assert await device.doorbell.wait() == 1
        # A plain REGION_WRITE to the doorbell rings it too.
        await client.write(PciRegion.BAR0, DOORBELL, b"\1\0\0\0")
        assert await device.doorbell.wait() == 1
        assert await client.region_io_fds(PciRegion.BAR1) == []


# --- failures -----------------------------------------------------------------------------


async def test_server_death_fails_every_pending_call_at_once() -> None:
    device = TestDevice()
    device.blocker = trio.Event()
    async with served(device) as (client, server_sock):
        outcomes: list[ConnectionClosedError] = []

        async def call() -> None:
            try:
                await client.read(PciRegion.BAR0, 0, 4)
            except ConnectionClosedError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(call)
            await device.entered.wait()
            await trio.testing.wait_all_tasks_blocked()
            server_sock.shutdown(socket.SHUT_RDWR)  # the server dies mid-call
        assert len(outcomes) == 3
        assert all(e.errno == errno.ECONNRESET for e in outcomes)
        assert client.closed
        with pytest.raises(ConnectionClosedError) as info:
            await client.read(PciRegion.BAR0, 0, 4)
        assert info.value.errno == errno.ENOTCONN
        with pytest.raises(ConnectionClosedError):
            await client.read(PciRegion.BAR1, 0, 4)  # even where memory would answer


async def test_cancelled_call_leaves_the_connection_usable() -> None:
    device = TestDevice()
    device.blocker = trio.Event()
    device.bar0[0:4] = b"live"
    async with served(device) as (client, _):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.read, PciRegion.BAR0, 0, 4)
                await device.entered.wait()
                scope.cancel()
        assert scope.cancelled_caught
        device.blocker.set()  # the late reply arrives and is dropped
        device.blocker = None
        assert await client.read(PciRegion.BAR0, 0, 4) == b"live"
        await client.write(PciRegion.BAR0, 4, b"more")
        assert await client.read(PciRegion.BAR0, 0, 8) == b"livemore"


async def test_timeout_with_fail_after(autojump_clock: trio.testing.MockClock) -> None:
    device = TestDevice()
    device.blocker = trio.Event()
    async with served(device) as (client, _):
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(1):
                await client.read(PciRegion.BAR0, 0, 4)
        assert device.entered.is_set()  # it timed out while the server was on it
        device.blocker.set()
        device.blocker = None
        assert await client.read(PciRegion.BAR0, 0, 4) == bytes(4)


async def test_busy_device_refuses_a_second_client(tmp_path: Path) -> None:
    device = TestDevice()
    path = tmp_path / "busy.sock"
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, device, path)
                async with connect(path):
                    with pytest.raises(VfioUserError) as info:
                        async with connect(path):
                            pass  # pragma: no cover
                    assert info.value.errno == errno.EBUSY
                    assert info.value.command == Command.VERSION
                nursery.cancel_scope.cancel()
    finally:
        device.close()
