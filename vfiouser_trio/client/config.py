"""PCI configuration space seen from the client: registers, header, BARs, capabilities.

Everything goes through ordinary region accesses on the config region (index 7), one
register at a time, the way an operating system probes a function:

* BARs are sized by the classic dance: memory and I/O decoding off, then for each BAR save it,
  write all ones, read back the size mask, restore it; decoding is restored at the end;
* the standard capability list is walked from the pointer at 0x34 (when the status register
  says there is one), the extended list from 0x100 (when the space is 4096 bytes). Both walks
  stop at a pointer that repeats or leaves the valid range, so a broken list cannot loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..protocol.constants import PciRegion

__all__ = [
    "CAPABILITY_NAMES",
    "EXTENDED_CAPABILITY_NAMES",
    "ConfigAccess",
    "PciBar",
    "PciCapabilityInfo",
    "PciConfig",
    "PciHeader",
]

# Header registers (PCI Local Bus spec, type-0 header).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
BRIDGE_ROM_ADDRESS = 0x38
CAPABILITY_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
STATUS_CAPABILITIES = 0x10
EXTENDED_START = 0x100
STANDARD_SIZE = 0x100

BAR_IO = 0x1
BAR_TYPE_64 = 0x4
BAR_PREFETCHABLE = 0x8
ROM_ADDRESS_MASK = 0xFFFFF800

#: Standard capability IDs (PCI Code and ID Assignment spec).
CAPABILITY_NAMES: dict[int, str] = {
    0x01: "Power Management",
    0x02: "AGP",
    0x03: "VPD",
    0x04: "Slot Identification",
    0x05: "MSI",
    0x06: "CompactPCI Hot Swap",
    0x07: "PCI-X",
    0x08: "HyperTransport",
    0x09: "Vendor Specific",
    0x0A: "Debug Port",
    0x0B: "CompactPCI Central Resource Control",
    0x0C: "PCI Hot-Plug",
    0x0D: "Bridge Subsystem Vendor ID",
    0x0E: "AGP 8x",
    0x0F: "Secure Device",
    0x10: "PCI Express",
    0x11: "MSI-X",
    0x12: "SATA Data/Index Configuration",
    0x13: "Advanced Features",
    0x14: "Enhanced Allocation",
    0x15: "Flattening Portal Bridge",
}

#: Extended capability IDs (PCI Code and ID Assignment spec).
EXTENDED_CAPABILITY_NAMES: dict[int, str] = {
    0x0001: "Advanced Error Reporting",
    0x0002: "Virtual Channel",
    0x0003: "Device Serial Number",
    0x0004: "Power Budgeting",
    0x0005: "Root Complex Link Declaration",
    0x0006: "Root Complex Internal Link Control",
    0x0007: "Root Complex Event Collector Endpoint Association",
    0x0008: "Multi-Function Virtual Channel",
    0x0009: "Virtual Channel (MFVC present)",
    0x000A: "Root Complex Register Block",
    0x000B: "Vendor Specific Extended",
    0x000D: "Access Control Services",
    0x000E: "Alternative Routing-ID Interpretation",
    0x000F: "Address Translation Services",
    0x0010: "Single Root I/O Virtualization",
    0x0011: "Multi-Root I/O Virtualization",
    0x0012: "Multicast",
    0x0013: "Page Request",
    0x0015: "Resizable BAR",
    0x0016: "Dynamic Power Allocation",
    0x0017: "TPH Requester",
    0x0018: "Latency Tolerance Reporting",
    0x0019: "Secondary PCI Express",
    0x001B: "Process Address Space ID",
    0x001D: "Downstream Port Containment",
    0x001E: "L1 PM Substates",
    0x001F: "Precision Time Measurement",
    0x0023: "Designated Vendor-Specific",
    0x0025: "Data Link Feature",
    0x0026: "Physical Layer 16.0 GT/s",
    0x0027: "Lane Margining at the Receiver",
}


class ConfigAccess(Protocol):
    """What PciConfig needs: region reads and writes (a Client provides them)."""

    async def read(self, region: int, offset: int, count: int) -> bytes: ...

    async def write(self, region: int, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class PciHeader:
    """The identifying and control registers of a configuration header."""

    vendor_id: int
    device_id: int
    command: int
    status: int
    revision: int
    #: 24 bits: base class << 16 | subclass << 8 | programming interface.
    class_code: int
    header_type: int
    subsystem_vendor_id: int
    subsystem_id: int
    capability_pointer: int
    interrupt_line: int
    interrupt_pin: int

    @property
    def layout(self) -> int:
        """Header layout: 0 (endpoint), 1 (PCI bridge), 2 (CardBus bridge)."""
        return self.header_type & 0x7F

    @property
    def multifunction(self) -> bool:
        return bool(self.header_type & 0x80)

    @property
    def has_capabilities(self) -> bool:
        return bool(self.status & STATUS_CAPABILITIES)


@dataclass(frozen=True, slots=True)
class PciBar:
    """An implemented BAR, as sizing found it (a 64-bit BAR is reported at its low index)."""

    index: int
    size: int
    address: int
    io: bool = False
    is_64bit: bool = False
    prefetchable: bool = False


@dataclass(frozen=True, slots=True)
class PciCapabilityInfo:
    """A capability found in one of the lists."""

    id: int
    offset: int
    extended: bool = False
    #: Extended capabilities carry a version in their header; standard ones 0.
    version: int = 0

    @property
    def name(self) -> str:
        names = EXTENDED_CAPABILITY_NAMES if self.extended else CAPABILITY_NAMES
        return names.get(self.id, f"Unknown ({self.id:#x})")


def _lowest_bit(value: int) -> int:
    return value & -value


class PciConfig:
    """Typed access to a function's configuration space through ``device`` (usually a Client).

    ``size`` is the config region's size (256, or 4096 for PCI Express).
    """

    def __init__(
        self, device: ConfigAccess, *, size: int = STANDARD_SIZE, region: int = PciRegion.CONFIG
    ) -> None:
        self.device = device
        self.size = size
        self.region = region

    # --- registers -------------------------------------------------------------------------

    async def read(self, offset: int, size: int = 4) -> int:
        """Read a little-endian register of ``size`` bytes (1, 2, 4 or 8)."""
        data = await self.device.read(self.region, offset, size)
        return int.from_bytes(data, "little")

    async def write(self, offset: int, value: int, size: int = 4) -> None:
        """Write a little-endian register of ``size`` bytes."""
        await self.device.write(self.region, offset, value.to_bytes(size, "little"))

    async def dump(self) -> bytes:
        """The whole space, read in one access (e.g. for ``lspci_format.format_lspci_hex``)."""
        return await self.device.read(self.region, 0, self.size)

    # --- header ----------------------------------------------------------------------------

    async def header(self) -> PciHeader:
        """Decode the header registers."""
        rev_class = await self.read(REVISION_ID, 4)
        return PciHeader(
            vendor_id=await self.read(VENDOR_ID, 2),
            device_id=await self.read(DEVICE_ID, 2),
            command=await self.read(COMMAND, 2),
            status=await self.read(STATUS, 2),
            revision=rev_class & 0xFF,
            class_code=rev_class >> 8,
            header_type=await self.read(HEADER_TYPE, 1),
            subsystem_vendor_id=await self.read(SUBSYSTEM_VENDOR_ID, 2),
            subsystem_id=await self.read(SUBSYSTEM_ID, 2),
            capability_pointer=await self.read(CAPABILITY_POINTER, 1),
            interrupt_line=await self.read(INTERRUPT_LINE, 1),
            interrupt_pin=await self.read(INTERRUPT_PIN, 1),
        )

    # --- BARs ------------------------------------------------------------------------------

    async def _probe(self, offset: int, ones: int) -> tuple[int, int]:
        """Save the register, write ``ones``, read the mask back, restore; (saved, mask)."""
        saved = await self.read(offset)
        await self.write(offset, ones)
        try:
            mask = await self.read(offset)
        finally:
            await self.write(offset, saved)
        return saved, mask

    async def bars(self) -> list[PciBar]:
        """Size every BAR of the header (decoding is disabled meanwhile, then restored).

        A register that sizes to 0 is no BAR and is left out, as Linux does ("can't size"):
        libvfio-user's unimplemented BAR registers read back the I/O bit alone.
        """
        layout = await self.read(HEADER_TYPE, 1) & 0x7F
        count = {0: 6, 1: 2}.get(layout, 0)
        command = await self.read(COMMAND, 2)
        if command & (COMMAND_IO | COMMAND_MEMORY):
            await self.write(COMMAND, command & ~(COMMAND_IO | COMMAND_MEMORY), 2)
        try:
            return await self._size_bars(count)
        finally:
            if command & (COMMAND_IO | COMMAND_MEMORY):
                await self.write(COMMAND, command, 2)

    async def _size_bars(self, count: int) -> list[PciBar]:
        found: list[PciBar] = []
        index = 0
        while index < count:
            offset = BAR0 + 4 * index
            saved, mask = await self._probe(offset, 0xFFFFFFFF)
            if mask == 0:
                index += 1
                continue
            if mask & BAR_IO:
                size = _lowest_bit(mask & ~0x3 & 0xFFFF)
                if size:
                    found.append(PciBar(index, size, saved & ~0x3, io=True))
                index += 1
                continue
            is_64 = mask & 0x6 == BAR_TYPE_64 and index + 1 < count
            address, full = saved & ~0xF, mask & ~0xF
            if is_64:
                high, high_mask = await self._probe(offset + 4, 0xFFFFFFFF)
                address |= high << 32
                full |= high_mask << 32
            if not _lowest_bit(full):
                index += 1  # sizes to 0: no BAR (Linux then probes the next register too)
                continue
            found.append(
                PciBar(
                    index,
                    _lowest_bit(full),
                    address,
                    is_64bit=is_64,
                    prefetchable=bool(mask & BAR_PREFETCHABLE),
                )
            )
            index += 2 if is_64 else 1
        return found

    async def rom_size(self) -> int:
        """Size the expansion ROM BAR (0 if there is none)."""
        layout = await self.read(HEADER_TYPE, 1) & 0x7F
        offset = BRIDGE_ROM_ADDRESS if layout == 1 else ROM_ADDRESS
        _saved, mask = await self._probe(offset, ROM_ADDRESS_MASK)
        return _lowest_bit(mask & ROM_ADDRESS_MASK)

    # --- capabilities ----------------------------------------------------------------------

    async def capabilities(self) -> list[PciCapabilityInfo]:
        """Walk the standard capability list."""
        if not await self.read(STATUS, 2) & STATUS_CAPABILITIES:
            return []
        found: list[PciCapabilityInfo] = []
        seen: set[int] = set()
        pointer = await self.read(CAPABILITY_POINTER, 1) & 0xFC
        while 0x40 <= pointer <= STANDARD_SIZE - 2 and pointer not in seen:
            seen.add(pointer)
            word = await self.read(pointer, 2)
            found.append(PciCapabilityInfo(word & 0xFF, pointer))
            pointer = (word >> 8) & 0xFC
        return found

    async def extended_capabilities(self) -> list[PciCapabilityInfo]:
        """Walk the extended capability list (empty unless the space is 4096 bytes)."""
        found: list[PciCapabilityInfo] = []
        seen: set[int] = set()
        offset = EXTENDED_START
        while EXTENDED_START <= offset <= self.size - 4 and offset not in seen:
            seen.add(offset)
            header = await self.read(offset, 4)
            if header in (0, 0xFFFFFFFF):
                break
            found.append(
                PciCapabilityInfo(
                    header & 0xFFFF, offset, extended=True, version=(header >> 16) & 0xF
                )
            )
            offset = (header >> 20) & 0xFFC
        return found

    async def find_capability(self, cap_id: int, *, extended: bool = False) -> int | None:
        """Offset of the first capability with ``cap_id``, or None."""
        caps = await (self.extended_capabilities() if extended else self.capabilities())
        return next((c.offset for c in caps if c.id == cap_id), None)
