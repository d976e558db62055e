"""The gpio card and the DMA engine migrate mid-use between two in-process servers.

Real sockets and `vfiouser_trio.client.connect`; the migration commands go raw over each
client's `connection`. The engine's two servers share one guest memory (a memfd both
clients map), as a source and a destination host share a migrating guest's RAM here.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.fd_leaks import fd_count
from vfiouser_trio.client import Client, GuestMemory, Interrupt, connect
from vfiouser_trio.engine import Connection
from vfiouser_trio.examples import dmaengine as de
from vfiouser_trio.examples import gpio
from vfiouser_trio.examples.dmaengine import DmaEngine, DmaEngineState, descriptor
from vfiouser_trio.examples.gpio import GpioDevice, GpioState
from vfiouser_trio.protocol import (
    DeviceFeatureReply,
    DeviceFeatureRequest,
    Feature,
    MigDataReadReply,
    MigDataReadRequest,
    MigDataWriteRequest,
    MigDeviceState,
    MigState,
)
from vfiouser_trio.protocol.constants import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    PciIrq,
    PciRegion,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY, STATUS_INTERRUPT
from vfiouser_trio.server.pci_caps import MSIX_CONTROL_ENABLE, MsixCapability
from vfiouser_trio.server.serve import serve_connection

S = MigState
CONFIG = PciRegion.CONFIG
INTX = PciIrq.INTX
MSIX = PciIrq.MSIX


@asynccontextmanager
async def served(device: Device) -> AsyncIterator[Client]:
    """A client of ``device`` served in-process over a socketpair; the device's run() too."""
    client_sock, server_sock = socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.run)
        nursery.start_soon(serve_connection, device, server_sock)
        async with connect(client_sock) as client:
            yield client
        nursery.cancel_scope.cancel()


async def to_state(conn: Connection, state: int) -> None:
    request = DeviceFeatureRequest.set(Feature.MIG_DEVICE_STATE, MigDeviceState(state))
    assert isinstance(await conn.request(request), DeviceFeatureReply)


async def read_stream(conn: Connection, step: int = 4096) -> bytes:
    data = bytearray()
    while True:
        reply = await conn.request(MigDataReadRequest(step))
        assert isinstance(reply, MigDataReadReply)
        data += reply.data
        if len(reply.data) < step:
            return bytes(data)


async def write_stream(conn: Connection, data: bytes, step: int = 4096) -> None:
    for pos in range(0, len(data), step):
        await conn.request(MigDataWriteRequest(data[pos : pos + step]))


async def save(src: Client) -> bytes:
    """Source side: stop, read the whole stream, stay stopped."""
    await to_state(src.connection, S.STOP_COPY)
    stream = await read_stream(src.connection, 100)
    await to_state(src.connection, S.STOP)
    return stream


# --- gpio ---------------------------------------------------------------------------------


async def reg(client: Client, offset: int) -> int:
    return (await client.read(gpio.BAR, offset, 1))[0]


async def test_gpio_migrates_outputs_inputs_and_a_latched_interrupt() -> None:
    before = fd_count()
    source, target = GpioDevice(), GpioDevice()
    async with served(source) as src, served(target) as dst:
        await reg(src, gpio.IRQ_CONTROL)  # reading it enables the IRQ
        await src.write(gpio.BAR, gpio.OUT_0_7, b"\xef")
        await src.write(gpio.BAR, gpio.OUT_8_15, b"\xbe")
        await src.write(gpio.BAR, gpio.FILTER_0_7, b"\x0f")
        src_intx = (await src.enable_irqs(INTX))[0]
        source.set_inputs(0x0101)  # both input groups change: latched, INTA asserted
        assert src_intx.try_read() == 1
        assert source.irqs[INTX].is_masked(0)  # INTx masks itself until the driver unmasks

        stream = await save(src)
        await to_state(dst.connection, S.RESUMING)
        await write_stream(dst.connection, stream, 5)
        await to_state(dst.connection, S.RUNNING)

        assert target.state == source.state
        assert target.outputs == 0xBEEF and target.inputs == 0x0101
        assert await dst.read(gpio.BAR, gpio.OUT_0_7, 2) == b"\xef\x01"
        assert await reg(dst, gpio.OUT_8_15) == 0xBE and await reg(dst, gpio.IN_8_15) == 0x01
        latched = gpio.IRQ_STATUS_PENDING | gpio.IRQ_STATUS_INPUTS_0_7 | gpio.IRQ_STATUS_INPUTS_8_15
        assert await reg(dst, gpio.IRQ_STATUS) == latched
        assert await reg(dst, gpio.FILTER_0_7) == 0x0F
        assert target.config.status & STATUS_INTERRUPT
        assert target.irqs[INTX].is_masked(0) and not target.irqs[INTX].is_pending(0)

        # The driver on the destination handles the interrupt, and the card works on.
        dst_intx = (await dst.enable_irqs(INTX))[0]
        await dst.write(gpio.BAR, gpio.IN_0_7, b"\0")  # clear the latch
        assert not target.config.status & STATUS_INTERRUPT
        await dst.unmask_irqs(INTX)
        target.set_input(15, True)
        assert dst_intx.try_read() == 1
        assert await reg(dst, gpio.IRQ_STATUS) == gpio.IRQ_STATUS_PENDING | 0x02
    source.close()
    target.close()
    assert fd_count() == before


async def test_gpio_interrupt_raised_while_stopped_is_delivered_by_the_destination() -> None:
    source, target = GpioDevice(), GpioDevice()
    async with served(source) as src, served(target) as dst:
        await reg(src, gpio.IRQ_CONTROL)
        src_intx = (await src.enable_irqs(INTX))[0]
        await to_state(src.connection, S.STOP)
        source.set_input(4, True)  # the field wiring does not stop with the card
        assert src_intx.try_read() is None  # a stopped device raises nothing: held
        assert source.irqs[INTX].is_pending(0)
        stream = await save(src)
        await to_state(dst.connection, S.RESUMING)
        await write_stream(dst.connection, stream)
        dst_intx = (await dst.enable_irqs(INTX))[0]
        await to_state(dst.connection, S.RUNNING)
        assert dst_intx.try_read() == 1
        assert await reg(dst, gpio.IN_0_7) == 0x10
        assert target.config.status & STATUS_INTERRUPT
    source.close()
    target.close()


def test_gpio_state_load_refuses_what_the_card_cannot_have_saved() -> None:
    good = GpioState(outputs=1, inputs=2, irq_enabled=True, irq_status=5, filters=3).pack()
    assert GpioState.load(good) == GpioState.unpack(good)
    for bad in (
        good[:-1],
        GpioState(irq_status=0x08).pack(),  # not a status bit
        GpioState(irq_status=0x01).pack(),  # a group bit without the pending bit
    ):
        with pytest.raises(ValueError):
            GpioState.load(bad)


# --- DMA engine ---------------------------------------------------------------------------

IOVA = 0x10_0000
MEMORY_SIZE = 0x10000
RING_SIZE = 16
SRC = 0x1000  # offsets in guest memory
DST = 0x8000
LENGTH = 0x200
TOTAL = 12  # descriptors in the whole job
FIRST = 6  # done before the migration begins


def new_guest_memory() -> GuestMemory:
    memory = GuestMemory(MEMORY_SIZE)
    for i in range(TOTAL):
        memory.write(SRC + i * LENGTH, bytes([(7 * i + j) & 0xFF for j in range(LENGTH)]))
    return memory


def post(memory: GuestMemory, index: int) -> None:
    src, dst = IOVA + SRC + index * LENGTH, IOVA + DST + index * LENGTH
    memory.write(index * de.DESCRIPTOR_SIZE, descriptor(src, dst, LENGTH))


async def engine_reg(client: Client, offset: int) -> int:
    return int.from_bytes(await client.read(de.REGISTER_BAR, offset, 4), "little")


async def ring_doorbell(client: Client, tail: int) -> None:
    await client.write(de.REGISTER_BAR, de.TAIL, tail.to_bytes(4, "little"))


async def setup_interrupt(client: Client, engine: DmaEngine) -> Interrupt:
    """MSI-X on, entry 0 unmasked, an eventfd for vector 0."""
    placed = engine.config.find_capability(MsixCapability)
    assert placed is not None
    await client.write(CONFIG, placed.offset + 2, MSIX_CONTROL_ENABLE.to_bytes(2, "little"))
    await client.write(de.MSIX_BAR, 0, bytes(16))  # address/data 0, unmasked
    return (await client.enable_irqs(MSIX))[0]


async def start_engine(client: Client) -> None:
    command = COMMAND_MEMORY | COMMAND_BUS_MASTER
    await client.write(CONFIG, COMMAND, command.to_bytes(2, "little"))
    await client.write(de.REGISTER_BAR, de.RING_BASE_LO, IOVA.to_bytes(8, "little"))
    await client.write(de.REGISTER_BAR, de.RING_SIZE, RING_SIZE.to_bytes(4, "little"))
    control = de.CONTROL_ENABLE | de.CONTROL_IRQ_ENABLE
    await client.write(de.REGISTER_BAR, de.CONTROL, control.to_bytes(4, "little"))


async def registers(client: Client) -> dict[str, int]:
    names = ("HEAD", "COMPLETED", "STATUS", "ERRORS", "CONTROL", "RING_SIZE")
    return {name: await engine_reg(client, getattr(de, name)) for name in names}


async def reference_run() -> tuple[bytes, dict[str, int]]:
    """The whole job on one engine, never migrated: guest memory and registers after it."""
    engine = DmaEngine()
    with new_guest_memory() as memory:
        async with served(engine) as client:
            await client.dma_map(memory, IOVA)
            irq = await setup_interrupt(client, engine)
            await start_engine(client)
            for i in range(TOTAL):
                post(memory, i)
            await ring_doorbell(client, TOTAL)
            with trio.fail_after(5):
                await irq.wait()
            result = bytes(memory.view), await registers(client)
    engine.close()
    return result


@pytest.mark.parametrize("rung", [False, True], ids=["posted", "posted-and-rung"])
async def test_dmaengine_migrates_in_the_middle_of_a_ring(rung: bool) -> None:
    """The source does part of the ring; the destination finishes it as if nothing happened.

    ``posted``: the rest is posted but the doorbell not rung: the destination must look at
    the ring by itself. ``posted-and-rung``: the engine may be mid-batch when the stop
    comes; it finishes the descriptor it is on and parks.
    """
    expected_memory, expected_registers = await reference_run()
    before = fd_count()
    source, target = DmaEngine(), DmaEngine()
    with new_guest_memory() as memory:
        async with served(source) as src, served(target) as dst:
            await src.dma_map(memory, IOVA)
            src_irq = await setup_interrupt(src, source)
            await start_engine(src)
            for i in range(FIRST):
                post(memory, i)
            await ring_doorbell(src, FIRST)
            with trio.fail_after(5):
                await src_irq.wait()
            assert await engine_reg(src, de.HEAD) == FIRST
            for i in range(FIRST, TOTAL):
                post(memory, i)
            if rung:
                await ring_doorbell(src, TOTAL)

            stream = await save(src)
            done_on_source = source.state.completed
            if not rung:
                assert done_on_source == FIRST
            assert source.state.head == done_on_source

            await to_state(dst.connection, S.RESUMING)
            await dst.dma_map(memory, IOVA)  # the client maps guest memory for its device
            dst_irq = (await dst.enable_irqs(MSIX))[0]
            await write_stream(dst.connection, stream, 16)
            await to_state(dst.connection, S.RUNNING)
            await trio.testing.wait_all_tasks_blocked()

            assert await registers(dst) == expected_registers
            assert bytes(memory.view) == expected_memory
            if done_on_source < TOTAL:
                assert dst_irq.try_read() == 1  # the destination's batch completed
            # The source stays stopped: it did nothing more.
            assert source.state.completed == done_on_source
    source.close()
    target.close()
    assert fd_count() == before


class GatedMemory:
    """Guest memory reached by DMA messages; reads wait while ``gate`` is closed."""

    def __init__(self, size: int) -> None:
        self.mem = bytearray(size)
        self.max_data_xfer_size = 1 << 20
        self.gate: trio.Event | None = None

    async def dma_read(self, address: int, count: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.gate is not None:
            await self.gate.wait()
        return bytes(self.mem[address - IOVA : address - IOVA + count])

    async def dma_write(self, address: int, data: bytes | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.mem[address - IOVA : address - IOVA + len(data)] = data


def _status(memory: bytearray, index: int) -> tuple[int, int]:
    off = index * de.DESCRIPTOR_SIZE
    return de.descriptor_status(bytes(memory[off : off + de.DESCRIPTOR_SIZE]))


def _pending(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


async def _engine_with_messages() -> tuple[DmaEngine, GatedMemory, int]:
    """An engine whose guest memory goes through DMA messages, MSI-X vector 0 on an eventfd."""
    engine = DmaEngine()
    memory = GatedMemory(MEMORY_SIZE)
    engine.dma.messenger = memory
    engine.dma.map(IOVA, MEMORY_SIZE, DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE, None)
    engine.config.write(COMMAND, (COMMAND_MEMORY | COMMAND_BUS_MASTER).to_bytes(2, "little"))
    eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
    engine.irqs[MSIX].set_irqs(flags, 0, 1, b"", [os.dup(eventfd)])
    bar0 = engine.region(de.REGISTER_BAR)
    assert bar0 is not None
    await bar0.do_write(de.RING_BASE_LO, IOVA.to_bytes(8, "little"))
    await bar0.do_write(de.RING_SIZE, RING_SIZE.to_bytes(4, "little"))
    control = de.CONTROL_ENABLE | de.CONTROL_IRQ_ENABLE
    await bar0.do_write(de.CONTROL, control.to_bytes(4, "little"))
    return engine, memory, eventfd


async def _close_engine(engine: DmaEngine, eventfd: int) -> None:
    engine.irqs.disable_all()
    await engine.dma.unmap_all()
    engine.close()
    os.close(eventfd)


async def test_dmaengine_stop_waits_for_the_descriptor_in_flight_then_parks() -> None:
    before = fd_count()
    engine, memory, eventfd = await _engine_with_messages()
    migration = engine.migration
    assert migration is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.run)
        await trio.testing.wait_all_tasks_blocked()
        _pending(eventfd)  # enabling looked at an empty ring
        for i in range(3):
            memory.mem[i * 32 : (i + 1) * 32] = descriptor(
                IOVA + SRC + 8 * i, IOVA + DST + 8 * i, 8
            )
        memory.mem[SRC : SRC + 24] = b"first...second..third..."
        memory.gate = trio.Event()
        engine.doorbell.ring()
        await trio.testing.wait_all_tasks_blocked()  # the engine waits on descriptor 0

        stopped = trio.Event()

        async def stop() -> None:
            await migration.set_state(S.STOP)
            stopped.set()

        nursery.start_soon(stop)
        await trio.testing.wait_all_tasks_blocked()
        assert not stopped.is_set()  # on_stop waits for the descriptor in flight
        memory.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert stopped.is_set() and engine.dma.stopped
        assert (engine.state.head, engine.state.completed) == (1, 1)
        assert memory.mem[DST : DST + 8] == b"first..."
        assert [_status(memory.mem, i)[0] for i in range(3)] == [0, de.DESC_VALID, de.DESC_VALID]
        assert _pending(eventfd) == 1  # the partial batch reported itself before the stop

        # Parked: a doorbell while stopped does nothing.
        registers = engine.region(de.REGISTER_BAR)
        assert registers is not None
        await registers.do_write(de.TAIL, (3).to_bytes(4, "little"))
        await trio.testing.wait_all_tasks_blocked()
        assert engine.state.head == 1

        await migration.set_state(S.RUNNING)
        await trio.testing.wait_all_tasks_blocked()
        assert (engine.state.head, engine.state.completed) == (3, 3)
        assert memory.mem[DST : DST + 24] == b"first...second..third..."
        assert _pending(eventfd) == 1
        nursery.cancel_scope.cancel()
    await _close_engine(engine, eventfd)
    assert fd_count() == before


async def test_dmaengine_runs_again_after_a_failed_resume_and_device_reset() -> None:
    engine, memory, eventfd = await _engine_with_messages()
    migration = engine.migration
    assert migration is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.run)
        await migration.set_state(S.RESUMING)
        with pytest.raises(VfioUserError) as exc:
            await migration.write(b"not a migration stream at all..")
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(VfioUserError) as exc:
            await migration.set_state(S.RUNNING)
        assert exc.value.errno == errno.EINVAL and migration.state == S.ERROR
        # What the session does for DEVICE_RESET.
        await engine._vfu.do_reset()
        await migration.reset()
        assert S(migration.state) == S.RUNNING
        command = COMMAND_MEMORY | COMMAND_BUS_MASTER
        engine.config.write(COMMAND, command.to_bytes(2, "little"))
        bar0 = engine.region(de.REGISTER_BAR)
        assert bar0 is not None
        await bar0.do_write(de.RING_BASE_LO, IOVA.to_bytes(8, "little"))
        await bar0.do_write(de.RING_SIZE, RING_SIZE.to_bytes(4, "little"))
        memory.mem[0:32] = descriptor(IOVA + SRC, IOVA + DST, 4)
        memory.mem[SRC : SRC + 4] = b"back"
        await bar0.do_write(de.CONTROL, de.CONTROL_ENABLE.to_bytes(4, "little"))
        await trio.testing.wait_all_tasks_blocked()
        assert memory.mem[DST : DST + 4] == b"back" and engine.state.completed == 1
        nursery.cancel_scope.cancel()
    await _close_engine(engine, eventfd)


def test_dmaengine_state_load_refuses_what_the_engine_cannot_have_saved() -> None:
    good = DmaEngineState(3, 2, 0x1_2345_6780, 64, 5, 7, 100, 2, 4, 9)
    assert DmaEngineState.load(good.pack()) == good
    for bad in (
        good.pack()[:-1],
        DmaEngineState(control=1 << 5).pack(),
        DmaEngineState(status=1 << 4).pack(),
        DmaEngineState(ring_base=0x1010).pack(),
        DmaEngineState(ring_size=de.MAX_RING_SIZE + 1).pack(),
        DmaEngineState(ring_size=8, head=8).pack(),
        DmaEngineState(head=1).pack(),
        DmaEngineState(error_code=99).pack(),
        DmaEngineState(error_index=de.MAX_RING_SIZE).pack(),
    ):
        with pytest.raises(ValueError):
            DmaEngineState.load(bad)
