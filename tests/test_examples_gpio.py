"""The PCI-IDIO-16 example: identity, BAR2 registers, change-of-state INTx, reset."""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fd_leaks import fd_count
from vfiouser_trio.examples import gpio
from vfiouser_trio.examples.gpio import GpioDevice, GpioState
from vfiouser_trio.protocol.constants import IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD, PciIrq
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.pci import COMMAND_INTX_DISABLE, STATUS_INTERRUPT
from vfiouser_trio.server.regions import Region


def pending(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.fixture
def dev() -> Iterator[GpioDevice]:
    before = fd_count()
    device = GpioDevice()
    yield device
    device.irqs.disable_all()
    device.close()
    assert fd_count() == before


def bar2(dev: GpioDevice) -> Region:
    region = dev.region(2)
    assert region is not None
    return region


def intx_eventfd(dev: GpioDevice) -> int:
    """Assign an INTx eventfd as a client would; returns our end (caller closes it)."""
    mine = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    dev.irqs[PciIrq.INTX].set_irqs(
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 1, b"", [os.dup(mine)]
    )
    return mine


async def read(dev: GpioDevice, offset: int, size: int = 1) -> int:
    return int.from_bytes(await bar2(dev).do_read(offset, size), "little")


async def write(dev: GpioDevice, offset: int, value: int, size: int = 1) -> None:
    await bar2(dev).do_write(offset, value.to_bytes(size, "little"))


async def test_identity_and_bar_as_the_libvfio_user_sample(dev: GpioDevice) -> None:
    config = dev.config
    assert config.read(0x00, 4) == bytes.fromhex("4f49c80d")  # 0x494f:0x0dc8
    assert config.read(0x09, 3) == bytes(3)  # no class code, as the sample
    assert config.read(0x2C, 4) == bytes(4)  # subsystem 0:0
    assert config.read(0x3D, 1) == b"\x01"  # INTA
    assert dev.irqs.info(PciIrq.INTX).count == 1
    assert dev.irqs.info(PciIrq.MSI).count == 0
    # BAR2 is a 256-byte I/O BAR; the other BARs are unimplemented.
    assert config.read(0x18, 4) == (1).to_bytes(4, "little")
    for bar in range(6):
        config.write(0x10 + 4 * bar, b"\xff\xff\xff\xff")
    sizes = [int.from_bytes(config.read(0x10 + 4 * bar, 4), "little") for bar in range(6)]
    assert sizes == [0, 0, 0xFFFFFF01, 0, 0, 0]
    assert bar2(dev).size == 0x100
    assert dev.region(0) is None


async def test_outputs_are_written_and_read_back(dev: GpioDevice) -> None:
    await write(dev, gpio.OUT_0_7, 0xA5)
    await write(dev, gpio.OUT_8_15, 0x3C)
    assert dev.outputs == 0x3CA5
    assert await read(dev, gpio.OUT_0_7) == 0xA5
    assert await read(dev, gpio.OUT_8_15) == 0x3C
    await write(dev, gpio.OUT_0_7, 0x00)
    assert dev.outputs == 0x3C00
    # Input ports are read-only: writing offset 5 changes nothing.
    dev.set_inputs(0x1200)
    await write(dev, gpio.IN_8_15, 0xFF)
    assert dev.inputs == 0x1200


async def test_inputs_read_as_wired(dev: GpioDevice) -> None:
    dev.set_inputs(0x8001)
    assert await read(dev, gpio.IN_0_7) == 0x01
    assert await read(dev, gpio.IN_8_15) == 0x80
    dev.set_input(0, False)
    dev.set_input(9, True)
    assert dev.inputs == 0x8200
    # A wider access acts as consecutive byte registers: outputs 0-7, inputs 0-7.
    await write(dev, gpio.OUT_0_7, 0x77)
    assert await read(dev, gpio.OUT_0_7, 2) == 0x0077
    assert await read(dev, gpio.OUT_8_15, 2) == 0x8200
    with pytest.raises(ValueError):
        dev.set_inputs(0x10000)
    with pytest.raises(ValueError):
        dev.set_input(16, True)


async def test_unused_offsets_read_zero_and_the_bar_ends_at_256(dev: GpioDevice) -> None:
    await write(dev, 0x80, 0xFFFFFFFF, 4)
    assert await read(dev, 0x80, 4) == 0
    assert await read(dev, 0xFF) == 0
    with pytest.raises(VfioUserError) as exc:
        bar2(dev).check_access(0xFF, 2, write=False)
    assert exc.value.errno == errno.EINVAL


async def test_change_of_state_latches_intx_until_cleared(dev: GpioDevice) -> None:
    fd = intx_eventfd(dev)
    try:
        # IRQ disabled (power-on): changes latch nothing.
        dev.set_input(3, True)
        assert await read(dev, gpio.IRQ_STATUS) == 0
        assert pending(fd) == 0
        # Reading offset 2 enables the IRQ; either edge of any input latches it.
        assert await read(dev, gpio.IRQ_CONTROL) == 0
        dev.set_input(3, False)
        assert pending(fd) == 1
        assert await read(dev, gpio.IRQ_STATUS) == gpio.IRQ_STATUS_PENDING | 0x01
        assert dev.config.status & STATUS_INTERRUPT
        # The line stays asserted: a further change adds its group, no second interrupt.
        dev.set_input(12, True)
        assert await read(dev, gpio.IRQ_STATUS) == gpio.IRQ_STATUS_PENDING | 0x03
        assert pending(fd) == 0
        # Writing offset 1 clears the latch; the client unmasks the automasked INTx.
        await write(dev, gpio.IN_0_7, 0)
        assert await read(dev, gpio.IRQ_STATUS) == 0
        assert not dev.config.status & STATUS_INTERRUPT
        dev.irqs[PciIrq.INTX].unmask(0)
        dev.set_inputs(dev.inputs)  # no change, no interrupt
        assert pending(fd) == 0
        dev.set_input(15, True)
        assert pending(fd) == 1
        assert await read(dev, gpio.IRQ_STATUS) == gpio.IRQ_STATUS_PENDING | 0x02
    finally:
        os.close(fd)


async def test_disabled_irq_and_intx_disable(dev: GpioDevice) -> None:
    fd = intx_eventfd(dev)
    try:
        await read(dev, gpio.IRQ_CONTROL)  # enable
        await write(dev, gpio.IRQ_CONTROL, 0)  # and disable again
        dev.set_inputs(0xFFFF)
        assert await read(dev, gpio.IRQ_STATUS) == 0
        assert pending(fd) == 0
        # With INTx disabled in the command register the card latches but nothing is sent.
        await read(dev, gpio.IRQ_CONTROL)
        dev.config.write(0x04, COMMAND_INTX_DISABLE.to_bytes(2, "little"))
        dev.set_inputs(0)
        assert await read(dev, gpio.IRQ_STATUS) & gpio.IRQ_STATUS_PENDING
        assert pending(fd) == 0
    finally:
        os.close(fd)


async def test_input_filter_registers(dev: GpioDevice) -> None:
    await write(dev, gpio.FILTER_0_7, 0x0F)
    assert await read(dev, gpio.FILTER_0_7) == 0x0F
    await read(dev, gpio.FILTER_CONTROL)  # activate all filters
    assert await read(dev, gpio.FILTER_0_7) == 0xFF
    await write(dev, gpio.FILTER_CONTROL, 0)  # deactivate them
    assert await read(dev, gpio.FILTER_0_7) == 0x0F


async def test_reset_keeps_the_wiring_and_clears_the_rest(dev: GpioDevice) -> None:
    await write(dev, gpio.OUT_0_7, 0xFF)
    await read(dev, gpio.IRQ_CONTROL)
    dev.set_inputs(0x0101)
    assert await read(dev, gpio.IRQ_STATUS)
    await dev._vfu.do_reset()
    assert dev.outputs == 0
    assert dev.inputs == 0x0101
    assert await read(dev, gpio.IRQ_STATUS) == 0
    assert not dev.config.status & STATUS_INTERRUPT
    dev.set_inputs(0)  # IRQ is disabled again after reset
    assert await read(dev, gpio.IRQ_STATUS) == 0


def test_state_round_trips_through_bytes() -> None:
    state = GpioState(
        outputs=0xBEEF, inputs=0x1234, irq_enabled=True, irq_status=5, filters_all=True, filters=9
    )
    assert GpioState.unpack(state.pack()) == state


def _register_byte(state: GpioState, offset: int) -> int:
    """One BAR2 byte read as the module doc's table says, with its effect on ``state``."""
    if offset == gpio.OUT_0_7:
        return state.outputs & 0xFF
    if offset == gpio.IN_0_7:
        return state.inputs & 0xFF
    if offset == gpio.IRQ_CONTROL:
        state.irq_enabled = True
    elif offset == gpio.FILTER_CONTROL:
        state.filters_all = True
    elif offset == gpio.OUT_8_15:
        return state.outputs >> 8
    elif offset == gpio.IN_8_15:
        return state.inputs >> 8
    elif offset == gpio.IRQ_STATUS:
        return state.irq_status
    elif offset == gpio.FILTER_0_7:
        return 0xFF if state.filters_all else state.filters
    return 0


@settings(max_examples=300, deadline=None)
@given(
    offset=st.integers(0, gpio.BAR_SIZE - 1),
    size=st.integers(1, 16),
    state=st.builds(
        GpioState,
        outputs=st.integers(0, 0xFFFF),
        inputs=st.integers(0, 0xFFFF),
        irq_enabled=st.booleans(),
        irq_status=st.integers(0, 7),
        filters_all=st.booleans(),
        filters=st.integers(0, 0xFF),
    ),
)
def test_a_wide_read_acts_as_its_byte_reads_in_order(
    offset: int, size: int, state: GpioState
) -> None:
    """read_bar2 reads all eight registers at once: the bytes and the effects (reading
    offsets 2 and 3) are those of reading byte after byte (3, all filters on, before 7)."""
    size = min(size, gpio.BAR_SIZE - offset)
    expected_state = dataclasses.replace(state)
    expected = bytes(_register_byte(expected_state, o) for o in range(offset, offset + size))
    device = GpioDevice()
    try:
        device.state = state
        assert device.read_bar2(offset, size) == expected
        assert device.state == expected_state
    finally:
        device.close()
