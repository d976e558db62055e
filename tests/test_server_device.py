"""Device: declarations become config space, regions and IRQs; MSI-X overlays; doorbells."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from vfiouser_trio.protocol.constants import IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD, PciIrq
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.regions import SparseArea
from vfiouser_trio.testing import nested_device

ID = PciIdentity(vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000)


class Sample(Device):
    def __init__(self) -> None:
        super().__init__(ID)
        self.writes: list[tuple[int, bytes]] = []
        self.add_bar(0, 0x1000, read=self.read0, write=self.write0)
        self.add_bar(2, 0x4000, sparse=[SparseArea(0x1000, 0x1000)], write=self.write0)
        self.add_bar(4, 0x1000)
        self.add_msix(4, bar=4, table_offset=0, pba_offset=0x800)
        self.bell = self.add_doorbell(0, 0x100, datamatch=7)

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes([offset & 0xFF]) * size

    async def write0(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def eventfds(n: int) -> tuple[list[int], list[int]]:
    mine = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(n)]
    return [os.dup(fd) for fd in mine], mine


def pending(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


async def test_config_region_reflects_declarations() -> None:
    dev = Sample()
    config = dev.region(7)
    assert config is not None and config.size == 256
    assert await config.do_read(0, 4) == bytes.fromhex("34127856")
    # BAR sizing through the config region, as a client would do it.
    await config.do_write(0x18, b"\xff\xff\xff\xff")
    assert int.from_bytes(await config.do_read(0x18, 4), "little") == 0xFFFFC000
    assert dev._vfu.num_regions == 9
    assert dev.irqs.info(PciIrq.MSIX).count == 4
    dev.close()


async def test_sparse_areas_use_memory_and_the_rest_callbacks() -> None:
    dev = Sample()
    bar2 = dev.region(2)
    assert bar2 is not None and bar2.mmap and bar2.memory is not None
    await bar2.do_write(0x1004, b"abcd")
    assert bytes(bar2.memory.view[0x1004:0x1008]) == b"abcd"
    assert await bar2.do_read(0x1004, 4) == b"abcd"
    await bar2.do_write(0x10, b"zz")
    assert dev.writes == [(0x10, b"zz")]
    dev.close()


async def test_msix_table_masking_through_the_bar() -> None:
    dev = Sample()
    given, mine = eventfds(4)
    dev.irqs[PciIrq.MSIX].set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 4, b"", given)
    # Before the client programs our table, vfio-level eventfds alone decide (QEMU's way).
    assert dev.trigger(1, index=PciIrq.MSIX)
    assert pending(mine[1]) == 1
    bar4 = dev.region(4)
    config = dev.region(7)
    assert bar4 is not None and config is not None
    cap = dev.config.find_capability(type(dev.config.capabilities[0].capability))
    assert cap is not None
    # Enable MSI-X in config space and program vector 2 (left masked).
    await config.do_write(cap.offset + 2, (0x8000 | 3).to_bytes(2, "little"))
    await bar4.do_write(2 * 16, (0xFEE00000).to_bytes(4, "little"))
    assert dev.active_irq_index() == PciIrq.MSIX
    assert not dev.trigger(2)
    assert pending(mine[2]) == 0
    assert await bar4.do_read(0x800, 8) == (1 << 2).to_bytes(8, "little")  # PBA bit 2
    # Unmask vector 2: the held interrupt is delivered and the PBA bit clears.
    await bar4.do_write(2 * 16 + 12, b"\x00\x00\x00\x00")
    assert pending(mine[2]) == 1
    assert await bar4.do_read(0x800, 8) == bytes(8)
    dev.irqs.disable_all()
    for fd in mine:
        os.close(fd)
    dev.close()


async def test_quiesce_holds_interrupts() -> None:
    dev = Sample()
    given, mine = eventfds(4)
    dev.irqs[PciIrq.MSIX].set_irqs(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER, 0, 4, b"", given)
    dev._vfu.quiesce(True)
    assert not dev.trigger(0, index=PciIrq.MSIX)
    assert pending(mine[0]) == 0
    dev._vfu.quiesce(False)
    assert pending(mine[0]) == 1
    dev.irqs.disable_all()
    for fd in mine:
        os.close(fd)
    dev.close()


async def test_region_write_rings_matching_doorbell() -> None:
    dev = Sample()
    bar0 = dev.region(0)
    assert bar0 is not None
    rang = trio.Event()

    async def waiter() -> None:
        assert await dev.bell.wait() == 1
        rang.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await bar0.do_write(0x100, (6).to_bytes(4, "little"))  # wrong value: no ring
        await trio.testing.wait_all_tasks_blocked()
        assert not rang.is_set()
        await bar0.do_write(0x100, (7).to_bytes(4, "little"))
        with trio.fail_after(5):
            await rang.wait()
    dev.close()


def test_declaring_after_build_is_refused() -> None:
    dev = Sample()
    dev.config  # noqa: B018 - builds the device
    with pytest.raises(RuntimeError):
        dev.add_bar(5, 0x100)
    dev.close()


def test_trigger_before_any_interrupt_setup_goes_nowhere() -> None:
    class MsixOnly(Device):
        def __init__(self) -> None:
            super().__init__(ID)
            self.add_bar(0, 0x1000)
            self.add_msix(2, bar=0)

    dev = MsixOnly()
    # No mode enabled, no eventfds, no INTx pin: the default falls back to INTx, which the
    # device lacks, so nothing is delivered (and nothing raises).
    assert dev.trigger(0) is False
    with pytest.raises(ValueError):
        dev.trigger(5, index=PciIrq.MSIX)  # an explicit vector the device lacks is a bug
    dev.close()


# --------------------------------------------------------------------- declaration checks


class Registers(Device):
    """BAR0 served by callbacks; MSI-X placed by the test's arguments."""

    def __init__(self, **msix: int) -> None:
        super().__init__(ID, name="regs0")
        self.add_bar(0, 0x1000, read=self.read0, write=self.write0)
        self.add_bar(1, 0x2000, sparse=[SparseArea(0x1000, 0x1000)])
        self.add_bar(2, 0x1000)
        self.add_msix(2, **msix)

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def write0(self, offset: int, data: bytes) -> None:
        pass


def test_msix_hiding_the_devices_own_callbacks_is_refused_unless_placed() -> None:
    with pytest.raises(ValueError) as refused:
        Registers(bar=0)
    message = str(refused.value)
    assert message.startswith("regs0: MSI-X table at BAR 0 0x0+0x20: ")
    assert "hide BAR 0's own callbacks/memory" in message
    assert "add_msix(..., bar=N)" in message and "table_offset=" in message
    # Placed explicitly: the layout the author meant, served as before.
    Registers(bar=0, table_offset=0x800).close()
    Registers(bar=0, pba_offset=0x800).close()
    Registers(bar=2).close()  # a BAR of its own needs no placement


@pytest.mark.parametrize(
    ("msix", "problem"),
    [
        ({"bar": 2, "table_offset": 0xFF8}, "beyond the BAR's 0x1000 bytes"),
        ({"bar": 2, "pba_offset": 0x1000}, "MSI-X PBA at BAR 2 0x1000+0x8: beyond"),
        ({"bar": 1, "table_offset": 0x1000}, "overlaps the sparse mmap area 0x1000+0x1000"),
        ({"bar": 3}, "BAR 3 is not declared; call add_bar first"),
    ],
)
def test_msix_outside_its_bar_or_in_a_sparse_area_is_refused(
    msix: dict[str, int], problem: str
) -> None:
    with pytest.raises(ValueError, match=r"^regs0: MSI-X") as refused:
        Registers(**msix)
    assert problem in str(refused.value)


def test_declaring_after_reading_config_in_init_names_the_cause() -> None:
    class Early(Device):
        def __init__(self) -> None:
            super().__init__(ID, name="early0")
            self.add_bar(0, 0x100)
            self.vendor = self.config.read(0, 2)  # freezes the declarations
            self.add_bar(1, 0x100)

    with pytest.raises(RuntimeError) as refused:
        Early()
    message = str(refused.value)
    assert message.startswith("early0: too late to declare: the declarations were frozen by ")
    assert f"reading config at {__file__}:" in message and " in __init__." in message


def test_declaring_after_reading_config_names_the_cause() -> None:
    device = Registers(bar=2)
    vendor = device.config.read(0, 2)  # freezes the declarations
    assert vendor == ID.vendor_id.to_bytes(2, "little")
    with pytest.raises(RuntimeError) as refused:
        device.add_bar(3, 0x100)
    message = str(refused.value)
    assert message.startswith("regs0: too late to declare: the declarations were frozen by ")
    assert f"reading config at {__file__}:" in message
    device.close()


async def test_declaring_after_serving_says_serving_froze_it() -> None:
    device = Registers(bar=2)
    async with nested_device(device):
        pass
    with pytest.raises(RuntimeError, match=r"frozen by serving the device\. Declare"):
        device.add_bar(3, 0x100)
    device.close()
