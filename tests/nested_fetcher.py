"""A device that fetches from guest memory when asked, for the nested-device tests."""

from __future__ import annotations

import struct

from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity


class Fetcher(Device):
    """BAR0: writing an IOVA (u64) at 0x0 makes the device DMA 4 bytes from it into 0x8."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7103, class_code=0xFF0000))
        self.regs = bytearray(0x10)
        self.attaches = 0
        self.detaches = 0
        self.add_bar(0, 0x10, read=self.read0, write=self.write0)

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes(self.regs[offset : offset + size])

    async def write0(self, offset: int, data: bytes) -> None:
        self.regs[offset : offset + len(data)] = data
        if offset == 0:
            (iova,) = struct.unpack_from("<Q", self.regs, 0)
            self.regs[8:12] = await self.dma.read(iova, 4)

    async def attached(self) -> None:
        self.attaches += 1

    async def detached(self) -> None:
        self.detaches += 1
