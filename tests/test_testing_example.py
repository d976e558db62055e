"""The example of docs/testing.md, executed as written (a test below keeps the two identical)."""

import trio
import trio.testing

from vfiouser_trio.protocol import Command, PciRegion, RegionWriteRequest
from vfiouser_trio.server import Device, PciIdentity
from vfiouser_trio.testing import Direction, Drop, NestedDeviceFactory


class Counter(Device):
    """BAR0 offset 0 reads how many writes BAR0 has received."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x0001, class_code=0xFF0000))
        self.count = 0
        self.add_bar(0, 0x1000, read=self.read_bar0, write=self.write_bar0)

    async def read_bar0(self, offset: int, size: int) -> bytes:
        return self.count.to_bytes(4, "little")[:size]

    async def write_bar0(self, offset: int, data: bytes) -> None:
        self.count += 1


async def test_counter_counts_writes(vfio_pair: NestedDeviceFactory) -> None:
    pair = await vfio_pair(Counter())
    await pair.client.write(PciRegion.BAR0, 0, b"\x01")
    await pair.client.write(PciRegion.BAR0, 4, b"\x02")
    assert await pair.client.read(PciRegion.BAR0, 0, 4) == b"\x02\0\0\0"
    assert pair.device.count == 2  # the device object itself
    writes = pair.tracer.commands(Command.REGION_WRITE)
    assert [w.decode() for w in writes] == [
        RegionWriteRequest(PciRegion.BAR0, 0, b"\x01"),
        RegionWriteRequest(PciRegion.BAR0, 4, b"\x02"),
    ]


async def test_a_lost_write_never_reaches_the_device(
    vfio_pair: NestedDeviceFactory, autojump_clock: trio.testing.MockClock
) -> None:
    lost = Drop(1, direction=Direction.SENT, command=Command.REGION_WRITE)
    pair = await vfio_pair(Counter(), faults=lost)
    with trio.move_on_after(10):  # virtual seconds: the autojump clock skips the wait
        await pair.client.write(PciRegion.BAR0, 0, b"\x01")
    assert pair.device.count == 0
    await pair.client.write(PciRegion.BAR0, 0, b"\x01")  # the next one gets through
    assert pair.device.count == 1


# --- not part of the example ---------------------------------------------------------------


def test_the_docs_show_this_example() -> None:
    from pathlib import Path  # noqa: PLC0415 (the module top belongs to the example)

    docs = (Path(__file__).parent.parent / "docs" / "testing.md").read_text()
    example = docs.split("```python\n", 1)[1].split("```", 1)[0]
    source = Path(__file__).read_text()
    assert example in source
    assert source.index(example) < source.index("# --- not part of the example")


# Once vfiouser_trio is installed its pytest plugin provides the fixtures; this makes them
# available to a source tree run without installing (PYTHONPATH=.).
from vfiouser_trio.testing.fixtures import *  # noqa: E402, F403
