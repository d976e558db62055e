"""Programming the dmaengine example's registers, for the tests that drive it."""

from __future__ import annotations

import struct

from vfiouser_trio.client import Client
from vfiouser_trio.examples import dmaengine as de
from vfiouser_trio.protocol.constants import PciRegion
from vfiouser_trio.server.pci import COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY


async def program_engine(client: Client, ring_iova: int, size: int) -> None:
    await client.config.write(COMMAND, COMMAND_MEMORY | COMMAND_BUS_MASTER, 2)
    await client.write(PciRegion.BAR0, de.RING_BASE_LO, struct.pack("<Q", ring_iova))
    await client.write(PciRegion.BAR0, de.RING_SIZE, struct.pack("<I", size))
    control = de.CONTROL_ENABLE | de.CONTROL_IRQ_ENABLE
    await client.write(PciRegion.BAR0, de.CONTROL, struct.pack("<I", control))
