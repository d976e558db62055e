"""Device-specific expectations of the examples, as a device author declares them."""

from __future__ import annotations

import struct

from vfiouser_trio.examples import dmaengine as engine
from vfiouser_trio.testing.conformance import DmaWindow, Expectations

_U32 = struct.Struct("<I")
#: Checks that do not apply to a device, by what it lacks (the expected SKIPs of a run).
NO_EXTENDED_CONFIG = frozenset({"cfg-03"})  # a 256-byte config space
NO_DMA_TRIGGER = frozenset({"dma-07", "dma-08"})  # only dmaengine lets the checker start DMA
NO_MIGRATION = frozenset({"mig-02", "mig-03", "mig-04", "mig-05", "mig-07", "mig-08", "mig-09"})

COMMAND_REGISTER = 0x04
BUS_MASTER = 1 << 2
CONFIG = 7
#: Register reads a trigger makes at most while the engine works.
POLLS = 1000


async def dmaengine_copy(window: DmaWindow) -> None:
    """One descriptor copying 256 bytes inside the window; the engine is reset afterwards."""
    ring, src, dst = window.address, window.address + 0x1000, window.address + 0x2000
    pattern = bytes(range(256))
    window.memory[0x1000:0x1100] = pattern
    window.memory[0:32] = engine.DESCRIPTOR.pack(src, dst, len(pattern), engine.DESC_VALID, 0)
    command = await window.region_read(CONFIG, COMMAND_REGISTER, 2)
    value = int.from_bytes(command, "little") | BUS_MASTER
    await window.region_write(CONFIG, COMMAND_REGISTER, value.to_bytes(2, "little"))
    bar = engine.REGISTER_BAR
    try:
        before = _U32.unpack(await window.region_read(bar, engine.COMPLETED, 4))[0]
        await window.region_write(bar, engine.RING_BASE_LO, _U32.pack(ring & 0xFFFF_FFFF))
        await window.region_write(bar, engine.RING_BASE_HI, _U32.pack(ring >> 32))
        await window.region_write(bar, engine.RING_SIZE, _U32.pack(1))
        await window.region_write(bar, engine.CONTROL, _U32.pack(engine.CONTROL_ENABLE))
        await window.region_write(bar, engine.TAIL, _U32.pack(1))
        # Each read is a round trip the engine's DMA messages are served in between; a
        # ring fault (a DMA refused) stops the engine with STATUS.ERROR set.
        for _ in range(POLLS):
            if _U32.unpack(await window.region_read(bar, engine.COMPLETED, 4))[0] != before:
                break
            if (
                _U32.unpack(await window.region_read(bar, engine.STATUS, 4))[0]
                & engine.STATUS_ERROR
            ):
                raise AssertionError("the engine stopped on an error")
        else:
            raise AssertionError(f"the engine did not complete within {POLLS} polls")
    finally:
        await window.region_write(bar, engine.CONTROL, _U32.pack(engine.CONTROL_RESET))
        await window.region_write(CONFIG, COMMAND_REGISTER, command)
    assert window.memory[0x2000:0x2100] == pattern, "the engine did not copy"


#: Example name -> what its author declares.
EXPECTATIONS = {
    "gpio": Expectations(num_irqs=5),
    "null": Expectations(num_irqs=5),
    "dmaengine": Expectations(num_irqs=5, dma_trigger=dmaengine_copy),
    "nvme": Expectations(num_irqs=5),
    "vendorcap": Expectations(num_irqs=5),
}
