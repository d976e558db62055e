"""The DMA engine example at the Device level: registers, the ring over fd-backed and
message-only DMA maps, errors, the doorbell-driven run loop, MSI-X, reset."""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from tests.dmaengine_program import program_engine
from tests.fd_leaks import fd_count
from vfiouser_trio.atomics import AtomicView, MemoryOrder
from vfiouser_trio.client import GuestMemory
from vfiouser_trio.examples import EXAMPLES
from vfiouser_trio.examples import dmaengine as de
from vfiouser_trio.examples.dmaengine import DmaEngine, DmaEngineState, descriptor
from vfiouser_trio.protocol.constants import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    Command,
    PciIrq,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.pci import COMMAND_BUS_MASTER, COMMAND_MEMORY
from vfiouser_trio.server.pci_caps import MsixCapability
from vfiouser_trio.server.regions import Region
from vfiouser_trio.testing import nested_device

RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
PAGE = mmap.PAGESIZE
RING = 0x10_0000
SRC = 0x20_0000
DST = 0x30_0000


def pending(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class FakeClient:
    """Serves DMA_READ/DMA_WRITE from a bytearray, recording the messages."""

    def __init__(self, base: int, size: int, max_xfer: int = 4096) -> None:
        self.base = base
        self.mem = bytearray(size)
        self.max_data_xfer_size = max_xfer
        self.calls: list[tuple[str, int, int]] = []
        self.gate: trio.Event | None = None

    async def dma_read(self, address: int, count: int) -> bytes:
        assert count <= self.max_data_xfer_size
        self.calls.append(("read", address, count))
        await trio.lowlevel.checkpoint()
        if self.gate is not None:
            await self.gate.wait()
        off = address - self.base
        return bytes(self.mem[off : off + count])

    async def dma_write(self, address: int, data: bytes | memoryview) -> None:
        assert len(data) <= self.max_data_xfer_size
        self.calls.append(("write", address, len(data)))
        await trio.lowlevel.checkpoint()
        off = address - self.base
        self.mem[off : off + len(data)] = data


class Rig:
    """A DmaEngine with guest memory: memfd-backed maps and a fake client for the rest."""

    def __init__(self) -> None:
        self.dev = DmaEngine()
        self.views: list[mmap.mmap] = []
        self.eventfds: list[int] = []

    @property
    def bar0(self) -> Region:
        region = self.dev.region(0)
        assert region is not None
        return region

    def ram(
        self, iova: int, size: int = PAGE, flags: int = RW, *, sealable: bool = True
    ) -> mmap.mmap:
        """Guest RAM at ``iova`` passed to the device with an fd; returns the guest's view.

        Sealable, as a VMM creates it: the table seals it against shrinking and allows
        views. Unsealable, the client could shrink it: no views, guarded copies only.
        """
        fd = os.memfd_create("guest", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING * sealable))
        os.ftruncate(fd, size)
        view = mmap.mmap(fd, size)
        self.views.append(view)
        self.dev.dma.map(iova, size, flags, fd)  # takes the fd
        return view

    def message_ram(self, iova: int, size: int = PAGE, max_xfer: int = 4096) -> FakeClient:
        """Guest RAM at ``iova`` mapped without an fd: reached by DMA messages."""
        client = FakeClient(iova, size, max_xfer)
        self.dev.dma.messenger = client
        self.dev.dma.map(iova, size, RW, None)
        return client

    def msix_eventfd(self) -> int:
        mine = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.eventfds.append(mine)
        self.dev.irqs[PciIrq.MSIX].set_irqs(
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1, b"", [os.dup(mine)]
        )
        return mine

    async def reg(self, offset: int) -> int:
        return int.from_bytes(await self.bar0.do_read(offset, 4), "little")

    async def set_reg(self, offset: int, value: int, size: int = 4) -> None:
        await self.bar0.do_write(offset, value.to_bytes(size, "little"))

    async def start(self, base: int = RING, size: int = 8, *, bus_master: bool = True) -> None:
        """Program the ring and enable the engine with interrupts, as a driver would."""
        if bus_master:
            command = COMMAND_MEMORY | COMMAND_BUS_MASTER
            self.dev.config.write(0x04, command.to_bytes(2, "little"))
        await self.set_reg(de.RING_BASE_LO, base, 8)
        await self.set_reg(de.RING_SIZE, size)
        await self.set_reg(de.CONTROL, de.CONTROL_ENABLE | de.CONTROL_IRQ_ENABLE)

    async def close(self) -> None:
        self.dev.irqs.disable_all()
        await self.dev.dma.unmap_all()
        self.dev.close()
        for view in self.views:
            view.close()
        for fd in self.eventfds:
            os.close(fd)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    before = fd_count()
    r = Rig()
    yield r
    await r.close()
    assert fd_count() == before


def desc_at(view: mmap.mmap | bytearray, index: int) -> tuple[int, int]:
    off = index * de.DESCRIPTOR_SIZE
    return de.descriptor_status(bytes(view[off : off + de.DESCRIPTOR_SIZE]))


def post(view: mmap.mmap | bytearray, index: int, raw: bytes) -> None:
    off = index * de.DESCRIPTOR_SIZE
    view[off : off + de.DESCRIPTOR_SIZE] = raw


async def wait_interrupt(fd: int) -> int:
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(fd)
    return pending(fd)


# --- identity and registers ----------------------------------------------------------------


async def test_identity_bars_and_msix(rig: Rig) -> None:
    config = rig.dev.config
    assert config.read(0, 4) == bytes.fromhex("34120171")  # 0x1234:0x7101
    assert config.read(0x08, 4) == bytes.fromhex("01008008")  # revision 1, class 0x088000
    for bar in (0, 2):
        config.write(0x10 + 4 * bar, b"\xff\xff\xff\xff")
        assert config.read(0x10 + 4 * bar, 4) == (0xFFFFF000).to_bytes(4, "little")
    placed = config.find_capability(MsixCapability)
    assert placed is not None and isinstance(placed.capability, MsixCapability)
    cap = placed.capability
    assert (cap.table_size, cap.table_bar, cap.table_offset) == (1, 2, 0)
    assert (cap.pba_bir, cap.pba_start) == (2, de.MSIX_PBA_OFFSET)
    assert rig.dev.irqs.info(PciIrq.MSIX).count == 1
    assert rig.dev.irqs.info(PciIrq.INTX).count == 0
    assert await rig.reg(de.ID) == int.from_bytes(b"DMAE", "little")
    assert await rig.bar0.do_read(de.ID, 4) == b"DMAE"
    assert await rig.reg(de.VERSION) == 0x0001_0000
    assert await rig.reg(0x800) == 0
    msix_bar = rig.dev.region(2)
    assert msix_bar is not None
    assert await msix_bar.do_read(0x400, 8) == bytes(8)  # between table and PBA


async def test_register_semantics(rig: Rig) -> None:
    await rig.set_reg(de.RING_BASE_LO, 0x1234_5677)
    assert await rig.reg(de.RING_BASE_LO) == 0x1234_5660  # 32-byte aligned
    await rig.set_reg(de.RING_BASE_HI, 0xAB)
    assert rig.dev.state.ring_base == 0xAB_1234_5660
    await rig.set_reg(de.RING_BASE_LO, 0x0000_0001_0000_2000, 8)  # one 8-byte write
    assert rig.dev.state.ring_base == 0x1_0000_2000
    assert await rig.bar0.do_read(de.RING_BASE_LO, 8) == (0x1_0000_2000).to_bytes(8, "little")
    await rig.set_reg(de.RING_SIZE, 5000)
    assert await rig.reg(de.RING_SIZE) == de.MAX_RING_SIZE
    # Byte writes merge into the register.
    await rig.set_reg(de.RING_SIZE + 1, 0x01, 1)
    assert await rig.reg(de.RING_SIZE) == 0x100
    await rig.set_reg(de.TAIL, 5)
    assert await rig.reg(de.TAIL) == 5
    rig.dev.state.head = 3
    # Enabled: the ring registers hold still.
    await rig.set_reg(de.CONTROL, de.CONTROL_ENABLE)
    await rig.set_reg(de.RING_SIZE, 16)
    await rig.set_reg(de.RING_BASE_LO, 0x4000)
    assert (await rig.reg(de.RING_SIZE), rig.dev.state.ring_base) == (0x100, 0x1_0000_2000)
    assert (await rig.reg(de.HEAD), await rig.reg(de.TAIL)) == (3, 5)
    # Disabled: reprogramming the ring resets HEAD and TAIL. HEAD itself is read-only.
    await rig.set_reg(de.CONTROL, 0)
    await rig.set_reg(de.RING_SIZE, 16)
    await rig.set_reg(de.HEAD, 7)
    assert (await rig.reg(de.HEAD), await rig.reg(de.TAIL)) == (0, 0)
    # STATUS is write-1-to-clear, per byte lane.
    rig.dev.state.status = de.STATUS_ERROR | de.STATUS_COMPLETION
    await rig.set_reg(de.STATUS, de.STATUS_ERROR, 1)
    assert await rig.reg(de.STATUS) == de.STATUS_COMPLETION
    await rig.set_reg(de.STATUS + 1, 0xFF, 1)  # other lanes: nothing to clear
    assert await rig.reg(de.STATUS) == de.STATUS_COMPLETION
    # CONTROL keeps only its defined bits; RESET is an action, not state.
    await rig.set_reg(de.CONTROL, 0x7FFF_FFFE)
    assert await rig.reg(de.CONTROL) == de.CONTROL_IRQ_ENABLE
    await rig.set_reg(de.CONTROL, de.CONTROL_RESET)
    assert rig.dev.state == DmaEngineState()


# --- processing the ring -------------------------------------------------------------------


async def test_copies_between_fd_backed_maps_without_copying_through_read(rig: Rig) -> None:
    ring, src, dst = rig.ram(RING), rig.ram(SRC), rig.ram(DST)
    src[:PAGE] = bytes(range(256)) * (PAGE // 256)
    post(ring, 0, descriptor(SRC, DST, 100))
    post(ring, 1, descriptor(SRC + 100, DST + 1000, 1000))
    post(ring, 2, descriptor(SRC + 200, DST + 3000, 50))
    post(ring, 3, descriptor(SRC, DST + 3500, 10, valid=False))  # not handed over yet
    reads: list[int] = []
    table_read = rig.dev.dma.read

    async def counting_read(iova: int, length: int, *, messages: bool | None = None) -> bytes:
        reads.append(length)
        return await table_read(iova, length, messages=messages)

    rig.dev.dma.read = counting_read  # type: ignore[method-assign]
    await rig.start()
    assert await rig.dev.process_ring() == 3
    assert dst[:100] == src[:100]
    assert dst[1000:2000] == src[100:1100]
    assert dst[3000:3050] == src[200:250]
    assert dst[3500:3510] == bytes(10)
    for i in range(3):
        assert desc_at(ring, i) == (0, de.DESC_DONE)
    assert desc_at(ring, 3) == (0, 0)
    # Nothing went through DmaTable.read: descriptors are read in place, the data moved
    # between views.
    assert reads == []
    assert await rig.reg(de.HEAD) == 3
    assert await rig.reg(de.COMPLETED) == 3
    assert await rig.reg(de.ERRORS) == 0
    assert await rig.reg(de.STATUS) == de.STATUS_COMPLETION


async def test_a_copy_spanning_adjacent_fd_maps_moves_between_views(rig: Rig) -> None:
    # Source and destination each span two maps, cut at different places: the engine copies
    # piece by piece between views (DmaTable.sgl), never through DmaTable.read.
    ring = rig.ram(RING)
    low, high = rig.ram(SRC), rig.ram(SRC + PAGE)
    dst_low, dst_high = rig.ram(DST), rig.ram(DST + PAGE)
    payload = os.urandom(1000)
    low[PAGE - 100 :] = payload[:100]
    high[:900] = payload[100:]
    post(ring, 0, descriptor(SRC + PAGE - 100, DST + PAGE - 300, 1000))
    reads: list[int] = []
    table_read = rig.dev.dma.read

    async def counting_read(iova: int, length: int, *, messages: bool | None = None) -> bytes:
        reads.append(length)
        return await table_read(iova, length, messages=messages)

    rig.dev.dma.read = counting_read  # type: ignore[method-assign]
    await rig.start()
    assert await rig.dev.process_ring() == 1
    assert dst_low[PAGE - 300 :] + dst_high[:700] == payload
    assert desc_at(ring, 0) == (0, de.DESC_DONE)
    assert reads == []


async def test_maps_the_client_can_shrink_are_copied_without_views(rig: Rig) -> None:
    # A memfd the table cannot seal gives no views (a shrink would fault the device): ring,
    # source or destination in one, the engine copies through the table's guarded copies,
    # and nothing of the copy was done with views first. Its run() once raised here.
    ring = rig.ram(RING, sealable=False)
    src, shrinkable_dst = rig.ram(SRC), rig.ram(DST, sealable=False)
    src[:PAGE] = os.urandom(PAGE)
    post(ring, 0, descriptor(SRC, DST, 300))
    post(ring, 1, descriptor(SRC + 1000, DST + 2000, 500))
    await rig.start()
    assert await rig.dev.process_ring() == 2
    assert shrinkable_dst[:300] == src[:300]
    assert shrinkable_dst[2000:2500] == src[1000:1500]
    assert [desc_at(ring, i) for i in range(2)] == [(0, de.DESC_DONE)] * 2
    assert await rig.reg(de.ERRORS) == 0


async def test_messages_asked_for_go_through_the_clients_dma_servicing() -> None:
    # DmaEngine(messages=True): the client gave fds, yet descriptors, data and the
    # completion travel as DMA_READ/DMA_WRITE (what libvfio-user's sample server can do).
    device = DmaEngine(messages=True)
    async with nested_device(device) as pair:
        client = pair.client
        with GuestMemory(2 * PAGE) as memory:
            await client.dma_map(memory, RING, size=PAGE)
            await client.dma_map(memory, SRC, offset=PAGE, size=PAGE)
            assert all(window.fd_backed for window in device.windows.values())
            payload = os.urandom(500)
            memory.write(PAGE, payload)
            memory.write(0, descriptor(SRC, SRC + 1000, 500))
            [irq] = await client.enable_irqs(PciIrq.MSIX)
            await program_engine(client, RING, 8)
            await client.write(0, de.TAIL, struct.pack("<I", 1))
            assert await irq.wait() == 1
            assert memory.read(PAGE + 1000, 500) == payload
            assert de.descriptor_status(memory.read(0, de.DESCRIPTOR_SIZE)) == (0, de.DESC_DONE)
            reads = pair.tracer.commands(Command.DMA_READ)
            writes = pair.tracer.commands(Command.DMA_WRITE)
            assert len(reads) >= 2 and len(writes) >= 2  # descriptor + data, each way
            await client.dma_unmap_all()


async def test_message_only_maps_go_through_dma_messages(rig: Rig) -> None:
    # Everything without fds: ring, source and destination all in client memory.
    client = rig.message_ram(RING, 4 * PAGE, max_xfer=512)
    data = os.urandom(2000)
    client.mem[PAGE : PAGE + 2000] = data
    post(client.mem, 0, descriptor(RING + PAGE, RING + 2 * PAGE, 2000))
    await rig.start()
    assert await rig.dev.process_ring() == 1
    assert bytes(client.mem[2 * PAGE : 2 * PAGE + 2000]) == data
    assert desc_at(client.mem, 0) == (0, de.DESC_DONE)
    writes = [(a, n) for kind, a, n in client.calls if kind == "write"]
    assert sum(n for a, n in writes if a >= RING + 2 * PAGE) == 2000
    assert all(n <= 512 for _, _, n in client.calls)  # split at max_data_xfer_size


async def test_mixed_maps_copy_both_ways(rig: Rig) -> None:
    ring, src = rig.ram(RING), rig.ram(SRC)
    client = rig.message_ram(DST, PAGE)
    src[:64] = b"from-fd-" * 8
    client.mem[100:164] = b"from-msg" * 8
    post(ring, 0, descriptor(SRC, DST, 64))  # fd -> message
    post(ring, 1, descriptor(DST + 100, SRC + 500, 64))  # message -> fd
    await rig.start()
    assert await rig.dev.process_ring() == 2
    assert bytes(client.mem[:64]) == b"from-fd-" * 8
    assert src[500:564] == b"from-msg" * 8


async def test_bad_descriptors_fail_alone(rig: Rig) -> None:
    ring, src = rig.ram(RING), rig.ram(SRC)
    rig.ram(DST, flags=DMA_MAP_FLAG_READ)  # read-only for the device
    src[:8] = b"good1234"
    post(ring, 0, descriptor(0xDEAD_0000, SRC + 64, 8))  # unmapped source
    post(ring, 1, descriptor(SRC, DST, 8))  # destination not writable
    post(ring, 2, descriptor(SRC, SRC + 64, 0))  # zero length
    post(ring, 3, descriptor(SRC, SRC + 64, de.MAX_TRANSFER + 1))  # too long
    post(ring, 4, descriptor(SRC, SRC + 128, 8))  # fine
    irq = rig.msix_eventfd()
    await rig.start()
    assert await rig.dev.process_ring() == 5
    error = de.DESC_DONE | de.DESC_ERROR
    assert desc_at(ring, 0) == (0, error | de.ERR_READ_FAULT << 8)
    assert desc_at(ring, 1) == (0, error | de.ERR_WRITE_FAULT << 8)
    assert desc_at(ring, 2) == (0, error | de.ERR_BAD_LENGTH << 8)
    assert desc_at(ring, 3) == (0, error | de.ERR_BAD_LENGTH << 8)
    assert desc_at(ring, 4) == (0, de.DESC_DONE)
    assert src[128:136] == b"good1234"
    assert src[64:72] == bytes(8)
    assert await rig.reg(de.ERRORS) == 4
    assert await rig.reg(de.ERROR_CODE) == de.ERR_BAD_LENGTH
    assert await rig.reg(de.ERROR_INDEX) == 3
    assert await rig.reg(de.COMPLETED) == 5
    assert await rig.reg(de.STATUS) == de.STATUS_ERROR | de.STATUS_COMPLETION
    assert await rig.reg(de.CONTROL) & de.CONTROL_ENABLE  # still running
    assert pending(irq) == 1  # one interrupt for the batch


async def test_client_refusing_dma_fails_the_descriptor(rig: Rig) -> None:
    ring = rig.ram(RING)

    class RefusingClient(FakeClient):
        async def dma_read(self, address: int, count: int) -> bytes:
            raise VfioUserError(errno.EFAULT, "no")

    rig.dev.dma.messenger = RefusingClient(DST, PAGE)
    rig.dev.dma.map(DST, PAGE, RW, None)
    rig.ram(SRC)
    post(ring, 0, descriptor(DST, SRC, 16))
    await rig.start()
    assert await rig.dev.process_ring() == 1
    assert desc_at(ring, 0) == (0, de.DESC_DONE | de.DESC_ERROR | de.ERR_READ_FAULT << 8)


async def test_unmapped_ring_is_a_ring_fault_that_stops_the_engine(rig: Rig) -> None:
    irq = rig.msix_eventfd()
    await rig.start(base=0x7000_0000)
    assert await rig.dev.process_ring() == 0
    assert await rig.reg(de.ERROR_CODE) == de.ERR_RING_FAULT
    assert await rig.reg(de.STATUS) == de.STATUS_ERROR
    assert not await rig.reg(de.CONTROL) & de.CONTROL_ENABLE
    assert pending(irq) == 1  # the driver hears about it


async def test_read_only_ring_faults_on_write_back(rig: Rig) -> None:
    ring = rig.ram(RING, flags=DMA_MAP_FLAG_READ)
    src = rig.ram(SRC)
    src[:4] = b"abcd"
    post(ring, 0, descriptor(SRC, SRC + 8, 4))
    await rig.start()
    assert await rig.dev.process_ring() == 0
    assert src[8:12] == b"abcd"  # the copy happened; reporting it could not
    assert (await rig.reg(de.ERROR_CODE), await rig.reg(de.HEAD)) == (de.ERR_RING_FAULT, 0)
    assert desc_at(ring, 0) == (de.DESC_VALID, 0)


async def test_no_dma_without_bus_mastering(rig: Rig) -> None:
    ring, src = rig.ram(RING), rig.ram(SRC)
    src[:4] = b"abcd"
    post(ring, 0, descriptor(SRC, SRC + 8, 4))
    await rig.start(bus_master=False)
    assert await rig.dev.process_ring() == 0
    assert src[8:12] == bytes(4)
    assert desc_at(ring, 0) == (de.DESC_VALID, 0)
    assert await rig.reg(de.ERROR_CODE) == de.ERR_NO_BUS_MASTER


async def test_ring_wraps_around(rig: Rig) -> None:
    ring, src = rig.ram(RING), rig.ram(SRC)
    src[:6] = b"ABCDEF"
    await rig.start(size=4)
    for batch in range(2):
        for k in range(3):
            n = batch * 3 + k
            post(ring, n % 4, descriptor(SRC + n, SRC + 100 + n, 1))
        assert await rig.dev.process_ring() == 3
    assert src[100:106] == b"ABCDEF"
    assert (await rig.reg(de.HEAD), await rig.reg(de.COMPLETED)) == (2, 6)


# --- the run loop: doorbells and interrupts ------------------------------------------------


async def test_tail_write_and_ioeventfd_both_wake_the_engine(rig: Rig) -> None:
    ring, src = rig.ram(RING), rig.ram(SRC)
    src[:8] = b"12345678"
    irq = rig.msix_eventfd()
    await rig.start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.dev.run)
        await trio.testing.wait_all_tasks_blocked()
        pending(irq)  # enabling rang the doorbell: an empty ring, nothing to say
        # A TAIL write that reaches the server (REGION_WRITE).
        post(ring, 0, descriptor(SRC, SRC + 16, 4))
        await rig.set_reg(de.TAIL, 1)
        assert await wait_interrupt(irq) == 1
        assert src[16:20] == b"1234"
        # A TAIL write KVM swallows: only the ioeventfd fires, the value never arrives.
        post(ring, 1, descriptor(SRC + 4, SRC + 20, 4))
        os.eventfd_write(rig.dev.doorbell.fileno(), 1)
        assert await wait_interrupt(irq) == 1
        assert src[20:24] == b"5678"
        assert (await rig.reg(de.HEAD), await rig.reg(de.TAIL)) == (2, 1)
        # Interrupts off: work still gets done, silently.
        await rig.set_reg(de.CONTROL, de.CONTROL_ENABLE)
        post(ring, 2, descriptor(SRC, SRC + 24, 8))
        await rig.set_reg(de.TAIL, 3)
        await trio.testing.wait_all_tasks_blocked()
        assert src[24:32] == b"12345678"
        assert pending(irq) == 0
        nursery.cancel_scope.cancel()


async def test_msix_table_masking_holds_the_completion(rig: Rig) -> None:
    ring = rig.ram(RING)
    rig.ram(SRC)
    irq = rig.msix_eventfd()
    placed = rig.dev.config.find_capability(MsixCapability)
    msix_bar = rig.dev.region(2)
    assert placed is not None and msix_bar is not None
    # The guest enables MSI-X and programs entry 0, leaving it masked.
    rig.dev.config.write(placed.offset + 2, (0x8000).to_bytes(2, "little"))
    await msix_bar.do_write(0, (0xFEE0_0000).to_bytes(4, "little"))
    post(ring, 0, descriptor(SRC, SRC + 8, 8))
    await rig.start()
    assert await rig.dev.process_ring() == 1
    assert pending(irq) == 0
    assert await msix_bar.do_read(de.MSIX_PBA_OFFSET, 8) == (1).to_bytes(8, "little")
    await msix_bar.do_write(12, bytes(4))  # unmask: the held interrupt goes out
    assert pending(irq) == 1


async def test_reset_abandons_in_flight_work(rig: Rig) -> None:
    client = rig.message_ram(RING, 2 * PAGE)
    client.gate = trio.Event()
    client.mem[PAGE : PAGE + 8] = b"stale..."
    post(client.mem, 0, descriptor(RING + PAGE, RING + PAGE + 8, 8))
    irq = rig.msix_eventfd()
    await rig.start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.dev.run)
        await trio.testing.wait_all_tasks_blocked()
        assert client.calls  # the engine is waiting for the descriptor
        await rig.dev._vfu.do_reset()
        client.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert rig.dev.state == DmaEngineState()
        assert desc_at(client.mem, 0) == (de.DESC_VALID, 0)  # never written back
        assert bytes(client.mem[PAGE + 8 : PAGE + 16]) == bytes(8)  # nor copied
        assert pending(irq) == 0
        # The loop lives on: set up again and the descriptor is processed.
        client.gate = None
        client.mem[PAGE : PAGE + 8] = b"survived"
        await rig.start()
        await trio.testing.wait_all_tasks_blocked()
        assert bytes(client.mem[PAGE + 8 : PAGE + 16]) == b"survived"
        assert desc_at(client.mem, 0) == (0, de.DESC_DONE)
        nursery.cancel_scope.cancel()


def test_state_round_trips_and_examples_registry() -> None:
    state = DmaEngineState(3, 2, 0x1_2345_6780, 64, 5, 7, 100, 2, 4, 9)
    assert DmaEngineState.unpack(state.pack()) == state
    assert set(EXAMPLES) == {"gpio", "null", "dmaengine", "nvme", "vendorcap"}
    first, second = EXAMPLES["dmaengine"](), EXAMPLES["dmaengine"]()
    assert isinstance(first, DmaEngine) and first is not second
    first.close()
    second.close()


async def test_a_batch_is_at_most_one_lap(rig: Rig) -> None:
    ring = rig.ram(RING)
    rig.ram(SRC)
    await rig.start(size=2)
    for i in range(2):
        post(ring, i, descriptor(SRC, SRC + 8, 1))
    # The driver re-posts each descriptor as soon as it completes: endless work.
    complete = rig.dev._complete

    async def complete_and_repost(address: int, status: int) -> None:
        await complete(address, status)
        post(ring, (address - RING) // de.DESCRIPTOR_SIZE, descriptor(SRC, SRC + 8, 1))

    rig.dev._complete = complete_and_repost  # type: ignore[method-assign]
    bell = rig.dev.doorbell.fileno()
    assert pending(bell) == 1  # enabling the engine rang it
    assert await rig.dev.process_ring() == 2
    assert pending(bell) == 1  # it asked to be woken for the rest
    assert await rig.dev.process_ring() == 2
    assert await rig.reg(de.COMPLETED) == 4


# --- ordering of the ring in shared memory, and the DMA hooks ------------------------------


async def test_ring_ownership_is_an_acquire_load_and_a_release_store(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver sets VALID last and polls DONE: in memory both sides map, the device's
    load of VALID is an acquire and its store of the status a release (after VALID clears)."""
    accesses: list[tuple[str, int, MemoryOrder]] = []

    class Recording(AtomicView):
        def load_u32(self, offset: int, order: MemoryOrder = MemoryOrder.SEQ_CST) -> int:
            accesses.append(("load", offset, order))
            return super().load_u32(offset, order)

        def store_u32(
            self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
        ) -> None:
            accesses.append(("store", offset, order))
            super().store_u32(offset, value, order)

    monkeypatch.setattr(de, "AtomicView", Recording)
    ring, src = rig.ram(RING), rig.ram(SRC)
    src[:4] = b"abcd"
    post(ring, 0, descriptor(SRC, SRC + 8, 4))
    await rig.start()
    assert await rig.dev.process_ring() == 1
    assert desc_at(ring, 0) == (0, de.DESC_DONE)
    assert accesses == [
        ("load", de.FLAGS_OFFSET, MemoryOrder.ACQUIRE),  # descriptor 0: handed over
        ("store", de.FLAGS_OFFSET, MemoryOrder.RELAXED),
        ("store", de.STATUS_OFFSET, MemoryOrder.RELEASE),
        ("load", de.FLAGS_OFFSET, MemoryOrder.ACQUIRE),  # descriptor 1: not yet
    ]


async def test_the_hooks_track_windows_and_an_unmapped_ring_stops_a_running_engine() -> None:
    device = DmaEngine()
    async with nested_device(device) as pair:
        client = pair.client
        with GuestMemory(2 * PAGE) as memory:
            await client.dma_map(memory, RING, size=PAGE)
            await client.dma_map(memory, SRC, offset=PAGE, size=PAGE, share_fd=False)
            assert sorted(device.windows) == [RING, SRC]
            assert not device.windows[SRC].fd_backed
            [irq] = await client.enable_irqs(PciIrq.MSIX)
            await program_engine(client, RING, 8)
            await client.dma_unmap(SRC, PAGE)  # not the ring: nothing happens
            assert await client.read(0, de.STATUS, 4) == bytes(4)
            await client.dma_unmap(RING, PAGE)  # the ring, under a running engine
            assert sorted(device.windows) == []
            assert await irq.wait() == 1
            code, control_now = (
                await client.read(0, de.ERROR_CODE, 4),
                await client.read(0, de.CONTROL, 4),
            )
            assert int.from_bytes(code, "little") == de.ERR_RING_FAULT
            assert not int.from_bytes(control_now, "little") & de.CONTROL_ENABLE
