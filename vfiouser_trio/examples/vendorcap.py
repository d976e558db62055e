"""A device whose config space is partly its own: registers and a vendor capability.

Config space, besides the framework's header and MSI-X capability::

    offset           register                      served by
    0x4c             vendor capability, 12 bytes   read_vendor / write_vendor
                     (placed by the framework, after MSI-X at 0x40)
      +3             revision (RO, 1)
      +4..+7         features (RO, FEATURES)
      +8..+11        control (RW): bit 0 DOORBELL rings MSI-X vector 0 (reads 0),
                     bit 1 LOUD (read back)
    0x80             SCRATCH (RW dword)            read_registers / write_registers
    0x84             SCRATCH_WRITES (RO): writes to SCRATCH so far

BAR0 holds only the MSI-X table and PBA. `irq_state_changed` keeps the mask the client
last set per (index, vector) in ``masks``: SET_IRQS MASK/UNMASK, the MSI-X table's mask
bits and the function mask (which reports every vector).
"""

from __future__ import annotations

from ..server.device import Device
from ..server.pci import PciIdentity

# 0x1234 is the vendor ID QEMU's test devices use; it is not assigned to us.
IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x7102, class_code=0xFF0000)

REGISTERS = 0x80  # SCRATCH, then SCRATCH_WRITES
REVISION = 1
FEATURES = 0x0000_0003
VENDOR_DATA = 9  # revision, features, control
CONTROL_DOORBELL = 0x1
CONTROL_LOUD = 0x2


class VendorCapDevice(Device):
    """Config registers at 0x80 and a vendor capability, both served by callbacks."""

    def __init__(self) -> None:
        super().__init__(IDENTITY, name="vendorcap")
        self.scratch = 0
        self.scratch_writes = 0
        self.control = 0
        self.masks: dict[tuple[int, int], bool] = {}
        self.add_bar(0, 0x1000)  # the MSI-X table and PBA only
        self.add_msix(1, bar=0)
        self.add_vendor_capability(VENDOR_DATA, read=self.read_vendor, write=self.write_vendor)
        self.add_config_registers(
            REGISTERS, 8, read=self.read_registers, write=self.write_registers
        )

    # Offsets count from the capability's start: its data begins at 3.
    async def read_vendor(self, offset: int, size: int) -> bytes:
        control = self.control.to_bytes(4, "little")
        data = bytes([REVISION]) + FEATURES.to_bytes(4, "little") + control
        return data[offset - 3 : offset - 3 + size]

    async def write_vendor(self, offset: int, data: bytes) -> None:
        control = bytearray(self.control.to_bytes(4, "little"))
        for at, value in enumerate(data, offset):
            if 8 <= at < 12:  # revision and features are read-only: ignored
                control[at - 8] = value
        written = int.from_bytes(control, "little")
        self.control = written & CONTROL_LOUD
        if written & CONTROL_DOORBELL:
            self.trigger(0)

    # Offsets count from REGISTERS. Plain functions: nothing here waits.
    def read_registers(self, offset: int, size: int) -> bytes:
        data = self.scratch.to_bytes(4, "little") + self.scratch_writes.to_bytes(4, "little")
        return data[offset : offset + size]

    def write_registers(self, offset: int, data: bytes) -> None:
        scratch = bytearray(self.scratch.to_bytes(4, "little"))
        for at, value in enumerate(data, offset):
            if at < 4:  # SCRATCH_WRITES is read-only: ignored
                scratch[at] = value
        if offset < 4:
            self.scratch = int.from_bytes(scratch, "little")
            self.scratch_writes += 1

    def irq_state_changed(self, index: int, start: int, count: int, masked: bool) -> None:
        for vector in range(start, start + count):
            self.masks[(index, vector)] = masked
