"""The example devices served on a real UNIX socket and driven by our client."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.dmaengine_program import program_engine
from vfiouser_trio.cli import load_device_factory
from vfiouser_trio.client import Client, GuestMemory, connect
from vfiouser_trio.examples import EXAMPLES, DmaEngine, GpioDevice, NullDevice, gpio
from vfiouser_trio.examples import dmaengine as de
from vfiouser_trio.examples.dmaengine import descriptor
from vfiouser_trio.protocol.constants import PciIrq, PciRegion
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import STATUS_INTERRUPT
from vfiouser_trio.server.serve import DeviceSource, serve

pytestmark = pytest.mark.usefixtures("no_fd_leak")

TIMEOUT = 10
PAGE = os.sysconf("SC_PAGE_SIZE")


@asynccontextmanager
async def served(source: DeviceSource, path: Path) -> AsyncIterator[Client]:
    """Serve ``source`` at ``path`` (its run() task included) and connect a client."""
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, source, path)
                async with connect(path) as client:
                    yield client
                nursery.cancel_scope.cancel()
    finally:
        if isinstance(source, Device):
            source.close()


def test_cli_specs_name_the_examples() -> None:
    assert load_device_factory("vfiouser_trio.examples.gpio:GpioDevice") is GpioDevice
    assert load_device_factory("vfiouser_trio.examples.null:NullDevice") is NullDevice
    assert load_device_factory("vfiouser_trio.examples.dmaengine:DmaEngine") is DmaEngine
    for name, factory in EXAMPLES.items():
        assert load_device_factory(name) is factory


async def test_null_device_fresh_per_connection(tmp_path: Path) -> None:
    async with served(EXAMPLES["null"], tmp_path / "null.sock") as client:
        header = await client.config.header()
        assert (header.vendor_id, header.device_id, header.class_code) == (0x1234, 0x7100, 0xFF0000)
        [bar] = await client.config.bars()
        assert (bar.index, bar.io, bar.size) == (0, False, 0x100)
        await client.write(PciRegion.BAR0, 0, b"\xff" * 16)
        assert await client.read(PciRegion.BAR0, 0, 16) == bytes(16)
        # No interrupt of its own: only every device's ERR and REQ.
        assert {i: info.count for i, info in client.irq_info.items() if info.count} == {3: 1, 4: 1}
        assert await client.config.capabilities() == []


async def test_gpio_card_over_the_socket(tmp_path: Path) -> None:
    device = GpioDevice()
    async with served(device, tmp_path / "gpio.sock") as client:
        header = await client.config.header()
        assert (header.vendor_id, header.device_id) == (0x494F, 0x0DC8)
        assert (header.subsystem_vendor_id, header.subsystem_id) == (0, 0)
        assert header.interrupt_pin == 1
        [bar] = await client.config.bars()
        assert (bar.index, bar.io, bar.size) == (2, True, 0x100)
        # Outputs.
        await client.write(gpio.BAR, gpio.OUT_0_7, b"\x5a")
        await client.write(gpio.BAR, gpio.OUT_8_15, b"\x01")
        assert device.outputs == 0x015A
        assert await client.read(gpio.BAR, gpio.OUT_0_7, 1) == b"\x5a"
        # Inputs and the change-of-state interrupt.
        [irq] = await client.enable_irqs(PciIrq.INTX)
        await client.read(gpio.BAR, gpio.IRQ_CONTROL, 1)
        device.set_inputs(0x0300)
        assert await irq.wait() == 1
        assert await client.read(gpio.BAR, gpio.IN_8_15, 1) == b"\x03"
        assert await client.read(gpio.BAR, gpio.IRQ_STATUS, 1) == b"\x06"
        assert await client.config.read(0x06, 2) & STATUS_INTERRUPT
        await client.write(gpio.BAR, gpio.IN_0_7, b"\x00")  # clear the latch
        await client.unmask_irqs(PciIrq.INTX)
        assert await client.read(gpio.BAR, gpio.IRQ_STATUS, 1) == b"\x00"
        device.set_input(0, True)
        assert await irq.wait() == 1
        # DEVICE_RESET clears the card but not the field wiring.
        await client.reset()
        assert await client.read(gpio.BAR, gpio.OUT_0_7, 2) == b"\x00\x01"  # outputs 0, inputs
        assert device.inputs == 0x0301


def status_of(memory: GuestMemory, offset: int) -> tuple[int, int]:
    return de.descriptor_status(memory.read(offset, de.DESCRIPTOR_SIZE))


async def test_dma_engine_over_the_socket(tmp_path: Path) -> None:
    device = DmaEngine()
    ring, data = 0x10_0000, 0x20_0000
    async with served(device, tmp_path / "dma.sock") as client:
        header = await client.config.header()
        assert (header.vendor_id, header.device_id) == (0x1234, 0x7101)
        assert client.irq_info[PciIrq.MSIX].count == 1
        assert await client.read(PciRegion.BAR0, de.ID, 4) == b"DMAE"
        with GuestMemory(2 * PAGE) as shared, GuestMemory(PAGE) as private:
            # Ring and source in memory the server maps; the destination only by messages.
            await client.dma_map(shared, ring, size=PAGE)
            await client.dma_map(shared, data, offset=PAGE, size=PAGE)
            await client.dma_map(private, 0x30_0000, share_fd=False)
            [irq] = await client.enable_irqs(PciIrq.MSIX)
            await program_engine(client, ring, 16)
            payload = os.urandom(3000)
            shared.write(PAGE, payload)
            shared.write(0, descriptor(data, 0x30_0000, 3000))
            shared.write(32, descriptor(data, 0x40_0000, 8))  # unmapped destination
            await client.write(PciRegion.BAR0, de.TAIL, struct.pack("<I", 2))
            assert await irq.wait() == 1
            assert private.read(0, 3000) == payload
            assert status_of(shared, 0) == (0, de.DESC_DONE)
            error = de.DESC_DONE | de.DESC_ERROR | de.ERR_WRITE_FAULT << 8
            assert status_of(shared, 32) == (0, error)
            registers = await client.read(PciRegion.BAR0, de.HEAD, 0x14)
            head, tail, completed, errors, code = struct.unpack("<5I", registers)
            assert (head, tail, completed, errors, code) == (2, 2, 2, 1, de.ERR_WRITE_FAULT)
            # The doorbell as an ioeventfd: the wake-up arrives, the TAIL value does not.
            subs = await client.region_io_fds(PciRegion.BAR0)
            [bell] = [s for s in subs if s.offset == de.TAIL]
            assert bell.is_ioeventfd and bell.size == 4
            shared.write(64, descriptor(data + 100, data + 2000, 50))
            bell.ring()
            assert await irq.wait() == 1
            assert shared.read(PAGE + 2000, 50) == payload[100:150]
            assert status_of(shared, 64) == (0, de.DESC_DONE)
            assert await client.read(PciRegion.BAR0, de.TAIL, 4) == struct.pack("<I", 2)
            # W1C status, then DEVICE_RESET clears the engine.
            await client.write(PciRegion.BAR0, de.STATUS, struct.pack("<I", de.STATUS_ERROR))
            status = await client.read(PciRegion.BAR0, de.STATUS, 4)
            assert status == struct.pack("<I", de.STATUS_COMPLETION)
            await client.reset()
            assert await client.read(PciRegion.BAR0, de.HEAD, 0x14) == bytes(0x14)
            await client.dma_unmap_all()
