"""The smallest device: one 256-byte BAR that reads as zeros and ignores writes, no interrupts."""

from __future__ import annotations

from ..server import Device, PciIdentity

# 0x1234 is the vendor ID QEMU's test devices use; it is not assigned to us.
IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x7100, class_code=0xFF0000)


class NullDevice(Device):
    """BAR0: 256 bytes of nothing."""

    def __init__(self) -> None:
        super().__init__(IDENTITY, name="null")
        self.add_bar(0, 0x100, read=self.read_bar0, write=self.write_bar0)

    async def read_bar0(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def write_bar0(self, offset: int, data: bytes) -> None:
        pass
