"""PCI capabilities: their registers, write masks, and placement in config space.

A capability lists its registers as `Field`s (power-on value, read-write bits, write-1-to-clear
bits). `place_capability` writes those into a `RegisterImage` at a dword-aligned offset and links
the capability into its list: the standard list starts at the pointer at 0x34 and lives in
0x40..0xFF; the extended list (PCI Express only) starts at 0x100.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .regions import ReadHandler, WriteHandler

CAPABILITY_POINTER = 0x34
STANDARD_HEADER_SIZE = 0x40
CONFIG_SPACE_SIZE = 0x100
EXPRESS_CONFIG_SPACE_SIZE = 0x1000
EXTENDED_CAPABILITIES_START = 0x100

CAP_ID_POWER_MANAGEMENT = 0x01
CAP_ID_MSI = 0x05
CAP_ID_VENDOR = 0x09
CAP_ID_EXPRESS = 0x10
CAP_ID_MSIX = 0x11
EXT_CAP_ID_SERIAL_NUMBER = 0x0003
EXT_CAP_ID_VENDOR = 0x000B

# Power Management Control/Status (PMCSR) bits.
PMCSR_POWER_STATE = 0x0003
PMCSR_NO_SOFT_RESET = 0x0008
PMCSR_PME_ENABLE = 0x0100
PMCSR_PME_STATUS = 0x8000

# MSI Message Control bits.
MSI_CONTROL_ENABLE = 0x0001
MSI_CONTROL_MULTIPLE_CAPABLE = 0x000E
MSI_CONTROL_MULTIPLE_ENABLE = 0x0070
MSI_CONTROL_64BIT = 0x0080
MSI_CONTROL_PER_VECTOR_MASK = 0x0100

# MSI-X Message Control bits.
MSIX_CONTROL_TABLE_SIZE = 0x07FF
MSIX_CONTROL_FUNCTION_MASK = 0x4000
MSIX_CONTROL_ENABLE = 0x8000

# PCI Express Device Control: "Initiate Function Level Reset" (always reads 0).
EXPRESS_DEVCTL_INITIATE_FLR = 0x8000


class ByteKind(enum.IntEnum):
    """What a config-space byte belongs to: decides how a write that touches it is answered."""

    UNCLAIMED = 0  # reserved space: reads as zero, writes are ignored
    HEADER = 1  # type-0 header register: read-only bits are masked silently
    IDENTITY = 2  # vendor / device ID: a write touching it fails with EINVAL
    CAP_HEADER = 3  # capability ID and next pointer (extended: the header dword): EPERM
    CAP_READONLY = 4  # capability register without a writable bit
    CAP_WRITABLE = 5  # capability register with at least one writable bit
    DEVICE = 6  # served by the device's callbacks (config registers, a callback capability)


class RegisterImage:
    """The bytes of a config space with per-byte write masks and ownership.

    On a write, ``rw`` bits take the written value, ``rw1c`` bits are cleared where a 1 is
    written, and every other bit keeps its value.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.rw = bytearray(size)
        self.rw1c = bytearray(size)
        self.kind = bytearray(size)

    def define(
        self,
        offset: int,
        size: int,
        value: int = 0,
        *,
        rw: int = 0,
        rw1c: int = 0,
        kind: ByteKind,
    ) -> None:
        """Declare the register at ``offset``: its power-on value, masks and owner."""
        end = offset + size
        self.data[offset:end] = value.to_bytes(size, "little")
        self.rw[offset:end] = rw.to_bytes(size, "little")
        self.rw1c[offset:end] = rw1c.to_bytes(size, "little")
        self.kind[offset:end] = bytes([kind]) * size

    def get(self, offset: int, size: int) -> int:
        """The little-endian value of ``size`` bytes at ``offset``."""
        return int.from_bytes(self.data[offset : offset + size], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        """Store a value ignoring the masks (the device's side of a register)."""
        self.data[offset : offset + size] = value.to_bytes(size, "little")


@dataclass(frozen=True)
class Field:
    """One register of a capability, at ``offset`` bytes from the capability's start."""

    offset: int
    size: int
    value: int = 0
    rw: int = 0
    rw1c: int = 0
    #: The device's callbacks serve these bytes (``value`` and the masks are unused).
    device: bool = False


class Capability(ABC):
    """A standard (or, with ``extended``, PCI Express extended) capability."""

    cap_id: ClassVar[int]
    name: ClassVar[str]
    extended: ClassVar[bool] = False
    version: ClassVar[int] = 0  # extended capabilities carry a version in their header

    @property
    def header_size(self) -> int:
        """ID + next pointer: 2 bytes, or the 4-byte header dword of an extended capability."""
        return 4 if self.extended else 2

    @abstractmethod
    def fields(self) -> tuple[Field, ...]:
        """The registers after the header."""

    @property
    def size(self) -> int:
        """Bytes the capability occupies, rounded up to a dword."""
        end = max((f.offset + f.size for f in self.fields()), default=self.header_size)
        return (end + 3) & ~3

    def constrain(self, old: bytes, new: bytearray) -> None:  # noqa: B027 - optional hook
        """Adjust the capability's bytes after a masked write (``old``: before it).

        For values a register must refuse although its bits are writable.
        """


def _log2(value: int) -> int:
    return value.bit_length() - 1


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class PowerManagementCapability(Capability):
    """Power Management (ID 0x01), version 3.

    PMCSR: power state RW (writes of an unsupported D1/D2 are discarded, as the spec requires),
    PME enable RW when ``pme_support`` is non-zero, PME status RW1C. ``pme_support`` is the PMC
    bit field 15:11 (bit 0 = PME from D0 ... bit 4 = from D3cold).
    """

    d1: bool = False
    d2: bool = False
    pme_support: int = 0
    no_soft_reset: bool = True

    cap_id: ClassVar[int] = CAP_ID_POWER_MANAGEMENT
    name: ClassVar[str] = "Power Management"

    def __post_init__(self) -> None:
        if not 0 <= self.pme_support <= 0x1F:
            raise ValueError("pme_support is a 5-bit field")

    def fields(self) -> tuple[Field, ...]:
        pmc = 3 | int(self.d1) << 9 | int(self.d2) << 10 | self.pme_support << 11
        pmcsr = PMCSR_NO_SOFT_RESET if self.no_soft_reset else 0
        pmcsr_rw = PMCSR_POWER_STATE | (PMCSR_PME_ENABLE if self.pme_support else 0)
        return (
            Field(0x02, 2, pmc),
            Field(0x04, 2, pmcsr, rw=pmcsr_rw, rw1c=PMCSR_PME_STATUS),
            Field(0x06, 1),  # PMCSR_BSE: bridges only
            Field(0x07, 1),  # Data: not implemented
        )

    def constrain(self, old: bytes, new: bytearray) -> None:
        state = new[4] & PMCSR_POWER_STATE
        if (state == 1 and not self.d1) or (state == 2 and not self.d2):
            new[4] = (new[4] & ~PMCSR_POWER_STATE) | (old[4] & PMCSR_POWER_STATE)


@dataclass(frozen=True)
class MsiCapability(Capability):
    """MSI (ID 0x05): ``vectors`` (1..32, a power of two), optional 64-bit address and
    per-vector masking (mask bits RW, pending bits read-only and set by the device).

    Message control: enable and multiple-message-enable RW (clamped to the vectors
    capable), the rest RO. Address bits 1:0 read as zero.
    """

    vectors: int = 1
    address_64: bool = True
    per_vector_masking: bool = False

    cap_id: ClassVar[int] = CAP_ID_MSI
    name: ClassVar[str] = "MSI"

    CONTROL: ClassVar[int] = 0x02
    ADDRESS: ClassVar[int] = 0x04
    UPPER_ADDRESS: ClassVar[int] = 0x08

    def __post_init__(self) -> None:
        if not (_is_power_of_two(self.vectors) and self.vectors <= 32):
            raise ValueError("MSI vectors must be a power of two from 1 to 32")

    @property
    def data_offset(self) -> int:
        return 0x0C if self.address_64 else 0x08

    @property
    def mask_offset(self) -> int:
        return self.data_offset + 4

    @property
    def pending_offset(self) -> int:
        return self.data_offset + 8

    def fields(self) -> tuple[Field, ...]:
        control = _log2(self.vectors) << 1
        if self.address_64:
            control |= MSI_CONTROL_64BIT
        if self.per_vector_masking:
            control |= MSI_CONTROL_PER_VECTOR_MASK
        fields = [
            Field(self.CONTROL, 2, control, rw=MSI_CONTROL_ENABLE | MSI_CONTROL_MULTIPLE_ENABLE),
            Field(self.ADDRESS, 4, rw=0xFFFFFFFC),
        ]
        if self.address_64:
            fields.append(Field(self.UPPER_ADDRESS, 4, rw=0xFFFFFFFF))
        fields.append(Field(self.data_offset, 2, rw=0xFFFF))
        fields.append(Field(self.data_offset + 2, 2))  # extended message data: unsupported
        if self.per_vector_masking:
            fields.append(Field(self.mask_offset, 4, rw=(1 << self.vectors) - 1))
            fields.append(Field(self.pending_offset, 4))
        return tuple(fields)

    def constrain(self, old: bytes, new: bytearray) -> None:
        # Software must not enable more vectors than capable; keep the register sane if it does.
        capable = (new[self.CONTROL] & MSI_CONTROL_MULTIPLE_CAPABLE) >> 1
        enabled = (new[self.CONTROL] & MSI_CONTROL_MULTIPLE_ENABLE) >> 4
        if enabled > capable:
            new[self.CONTROL] = (new[self.CONTROL] & ~MSI_CONTROL_MULTIPLE_ENABLE) | capable << 4


@dataclass(frozen=True)
class MsixCapability(Capability):
    """MSI-X (ID 0x11): table of ``table_size`` entries and PBA, each in a BAR at an offset.

    Message control: enable and function mask RW, table size RO. Table and PBA locations
    are RO. The PBA defaults to the table's BAR (``pba_bar``), right after the table
    (``pba_offset``); `pba_bir` and `pba_start` give the resolved location.
    """

    table_size: int
    table_bar: int = 0
    table_offset: int = 0
    pba_bar: int | None = None
    pba_offset: int | None = None

    cap_id: ClassVar[int] = CAP_ID_MSIX
    name: ClassVar[str] = "MSI-X"

    CONTROL: ClassVar[int] = 0x02
    TABLE: ClassVar[int] = 0x04
    PBA: ClassVar[int] = 0x08

    def __post_init__(self) -> None:
        if not 1 <= self.table_size <= 2048:
            raise ValueError("MSI-X table size must be 1..2048")
        for bar, offset in ((self.table_bar, self.table_offset), (self.pba_bir, self.pba_start)):
            if not 0 <= bar <= 5:
                raise ValueError("MSI-X structures live in BAR 0..5")
            if offset % 8 or not 0 <= offset < 1 << 32:
                raise ValueError("MSI-X table/PBA offsets are 8-byte aligned 32-bit values")
        if self.table_bar == self.pba_bir:
            table_end = self.table_offset + 16 * self.table_size
            pba_end = self.pba_start + self.pba_size
            if self.table_offset < pba_end and self.pba_start < table_end:
                raise ValueError("MSI-X table and PBA overlap")

    @property
    def pba_bir(self) -> int:
        """The BAR holding the PBA."""
        return self.table_bar if self.pba_bar is None else self.pba_bar

    @property
    def pba_start(self) -> int:
        """The PBA's offset in its BAR."""
        if self.pba_offset is None:
            return self.table_offset + 16 * self.table_size
        return self.pba_offset

    @property
    def pba_size(self) -> int:
        """PBA bytes: one bit per vector, in whole qwords."""
        return (self.table_size + 63) // 64 * 8

    def fields(self) -> tuple[Field, ...]:
        control_rw = MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK
        return (
            Field(self.CONTROL, 2, self.table_size - 1, rw=control_rw),
            Field(self.TABLE, 4, self.table_offset | self.table_bar),
            Field(self.PBA, 4, self.pba_start | self.pba_bir),
        )


class ExpressDeviceType(enum.IntEnum):
    """Device/port type field of the PCI Express Capabilities register (endpoints only)."""

    ENDPOINT = 0
    LEGACY_ENDPOINT = 1
    INTEGRATED_ENDPOINT = 9  # root complex integrated endpoint: no link registers


@dataclass(frozen=True)
class ExpressCapability(Capability):
    """PCI Express (ID 0x10), capability version 2, for an endpoint (60 bytes).

    Device/link/slot capabilities RO. Device control RW subset: error reporting enables,
    relaxed ordering, max payload size, extended tag (if supported), no snoop, max read
    request size; "initiate FLR" reads 0 and is reported to the config space's FLR hook.
    Device status error bits RW1C. Link control: ASPM control, RCB, common clock, extended
    synch RW. Link control 2 target speed RW. Device control 2 completion timeout disable RW.
    """

    device_type: ExpressDeviceType = ExpressDeviceType.ENDPOINT
    max_payload: int = 128
    link_speed: int = 1  # 1 = 2.5 GT/s, 2 = 5, 3 = 8, 4 = 16, 5 = 32, 6 = 64
    link_width: int = 1
    flr: bool = False
    extended_tag: bool = False
    interrupt_message_number: int = 0

    cap_id: ClassVar[int] = CAP_ID_EXPRESS
    name: ClassVar[str] = "PCI Express"

    DEVICE_CONTROL: ClassVar[int] = 0x08
    DEVICE_STATUS: ClassVar[int] = 0x0A
    LINK_CONTROL: ClassVar[int] = 0x10

    def __post_init__(self) -> None:
        if not (_is_power_of_two(self.max_payload) and 128 <= self.max_payload <= 4096):
            raise ValueError("max_payload must be a power of two from 128 to 4096")
        if not 1 <= self.link_speed <= 6:
            raise ValueError("link_speed is 1 (2.5 GT/s) .. 6 (64 GT/s)")
        if self.link_width not in (1, 2, 4, 8, 12, 16, 32):
            raise ValueError("link_width must be x1, x2, x4, x8, x12, x16 or x32")
        if not 0 <= self.interrupt_message_number < 32:
            raise ValueError("interrupt_message_number is a 5-bit field")

    def fields(self) -> tuple[Field, ...]:
        express_caps = 2 | self.device_type << 4 | self.interrupt_message_number << 9
        device_caps = (
            (_log2(self.max_payload) - 7)
            | int(self.extended_tag) << 5
            | 7 << 6  # L0s acceptable latency: no limit
            | 7 << 9  # L1 acceptable latency: no limit
            | 1 << 15  # role-based error reporting (required since PCIe 1.1)
            | int(self.flr) << 28
        )
        # Defaults: relaxed ordering and no snoop enabled, 128-byte payload, 512-byte reads.
        device_control = 0x0010 | 0x0800 | 2 << 12
        device_control_rw = 0x001F | 0x00E0 | 0x0800 | 0x7000
        if self.extended_tag:
            device_control_rw |= 0x0100
        has_link = self.device_type != ExpressDeviceType.INTEGRATED_ENDPOINT
        if has_link:
            link_caps = self.link_speed | self.link_width << 4 | 1 << 22  # ASPM optionality
            link_control_rw = 0x00CB
            link_status = self.link_speed | self.link_width << 4 | 1 << 12  # slot clock
            link_caps2 = ((1 << self.link_speed) - 1) << 1  # supported speeds vector
            link_control2, link_control2_rw = self.link_speed, 0x000F
        else:
            link_caps = link_control_rw = link_status = link_caps2 = 0
            link_control2 = link_control2_rw = 0
        return (
            Field(0x02, 2, express_caps),
            Field(0x04, 4, device_caps),
            Field(self.DEVICE_CONTROL, 2, device_control, rw=device_control_rw),
            Field(self.DEVICE_STATUS, 2, rw1c=0x000F),
            Field(0x0C, 4, link_caps),
            Field(self.LINK_CONTROL, 2, rw=link_control_rw),
            Field(0x12, 2, link_status),
            Field(0x14, 4),  # slot capabilities: no slot
            Field(0x18, 2),  # slot control
            Field(0x1A, 2),  # slot status
            Field(0x1C, 2),  # root control: root ports only
            Field(0x1E, 2),  # root capabilities
            Field(0x20, 4),  # root status
            Field(0x24, 4, 1 << 4),  # device capabilities 2: completion timeout disable
            Field(0x28, 2, rw=1 << 4),  # device control 2
            Field(0x2A, 2),  # device status 2
            Field(0x2C, 4, link_caps2),
            Field(0x30, 2, link_control2, rw=link_control2_rw),
            Field(0x32, 2),  # link status 2
            Field(0x34, 4),  # slot capabilities 2
            Field(0x38, 2),  # slot control 2
            Field(0x3A, 2),  # slot status 2
        )


@dataclass(frozen=True)
class VendorCapability(Capability):
    """Vendor-specific (ID 0x09): a length byte and an arbitrary read-only payload."""

    payload: bytes = b""

    cap_id: ClassVar[int] = CAP_ID_VENDOR
    name: ClassVar[str] = "Vendor Specific"

    def __post_init__(self) -> None:
        if 3 + len(self.payload) > CONFIG_SPACE_SIZE - STANDARD_HEADER_SIZE:
            raise ValueError("vendor capability payload too large for config space")

    def fields(self) -> tuple[Field, ...]:
        fields = [Field(0x02, 1, 3 + len(self.payload))]
        if self.payload:
            fields.append(Field(0x03, len(self.payload), int.from_bytes(self.payload, "little")))
        return tuple(fields)


@dataclass(frozen=True)
class VendorCallbackCapability(Capability):
    """Vendor-specific (ID 0x09) whose ``body_size`` data bytes the device serves by callbacks.

    ID, next pointer and the length byte (``3 + body_size``) are the framework's; a client
    access to the data bytes (offsets 3 .. 3 + body_size - 1 of the capability) calls
    ``read(offset, count)`` / ``write(offset, data)`` with ``offset`` counted from the
    capability's start, so the first data byte is offset 3, as the PCI spec numbers
    vendor-specific registers. Callbacks are ``async def`` or plain functions, as for BARs.
    Without ``write`` the data bytes are read-only (a write touching them fails with EPERM).
    libvfio-user calls this a capability with ``VFU_CAP_FLAG_CALLBACK``.
    """

    body_size: int
    read: ReadHandler
    write: WriteHandler | None = None

    cap_id: ClassVar[int] = CAP_ID_VENDOR
    name: ClassVar[str] = "Vendor Specific"

    #: The first data byte, from the capability's start (after ID, next and length).
    BODY: ClassVar[int] = 0x03

    def __post_init__(self) -> None:
        if not 1 <= self.body_size <= CONFIG_SPACE_SIZE - STANDARD_HEADER_SIZE - self.BODY:
            raise ValueError(
                f"vendor capability body of {self.body_size} bytes: it takes 1 .. "
                f"{CONFIG_SPACE_SIZE - STANDARD_HEADER_SIZE - self.BODY} (the length is one byte "
                "and the capability lives in 0x40..0xff)"
            )

    def fields(self) -> tuple[Field, ...]:
        return (
            Field(0x02, 1, self.BODY + self.body_size),
            Field(self.BODY, self.body_size, device=True),
        )


@dataclass(frozen=True)
class SerialNumberCapability(Capability):
    """Device Serial Number extended capability (ID 0x0003, version 1): a 64-bit serial, RO."""

    serial: int

    cap_id: ClassVar[int] = EXT_CAP_ID_SERIAL_NUMBER
    name: ClassVar[str] = "Device Serial Number"
    extended: ClassVar[bool] = True
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if not 0 <= self.serial < 1 << 64:
            raise ValueError("serial number is a 64-bit value")

    def fields(self) -> tuple[Field, ...]:
        return (Field(0x04, 8, self.serial),)


@dataclass(frozen=True)
class VendorExtendedCapability(Capability):
    """Vendor-specific extended capability (ID 0x000B, version 1): VSEC ID, revision,
    length and an arbitrary payload, all read-only."""

    vsec_id: int
    vsec_revision: int = 0
    payload: bytes = b""

    cap_id: ClassVar[int] = EXT_CAP_ID_VENDOR
    name: ClassVar[str] = "Vendor Specific Extended"
    extended: ClassVar[bool] = True
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if not 0 <= self.vsec_id <= 0xFFFF or not 0 <= self.vsec_revision <= 0xF:
            raise ValueError("VSEC ID is 16 bits, VSEC revision 4 bits")
        if 8 + len(self.payload) > 0xFFF:
            raise ValueError("VSEC length is a 12-bit field")

    def fields(self) -> tuple[Field, ...]:
        length = 8 + len(self.payload)
        fields = [Field(0x04, 4, self.vsec_id | self.vsec_revision << 16 | length << 20)]
        if self.payload:
            fields.append(Field(0x08, len(self.payload), int.from_bytes(self.payload, "little")))
        return tuple(fields)


@dataclass(frozen=True)
class PlacedCapability:
    """A capability at its offset in config space."""

    capability: Capability
    offset: int

    @property
    def end(self) -> int:
        return self.offset + self.capability.size


def place_capability(
    image: RegisterImage,
    chain: list[PlacedCapability],
    capability: Capability,
    offset: int | None = None,
) -> PlacedCapability:
    """Write ``capability`` into ``image`` and link it at the end of ``chain``.

    ``chain`` is the list (standard or extended, matching the capability) already placed, in
    link order; it is extended in place. Without ``offset`` the capability goes right after
    the highest one placed. Raises ValueError when it does not fit or overlaps.
    """
    if capability.extended:
        if image.size < EXPRESS_CONFIG_SPACE_SIZE:
            raise ValueError(f"{capability.name}: extended capabilities need 4096-byte space")
        start, limit = EXTENDED_CAPABILITIES_START, image.size
    else:
        start, limit = STANDARD_HEADER_SIZE, CONFIG_SPACE_SIZE
    if offset is None:
        offset = max([start, *(placed.end for placed in chain)])
        if chain or not capability.extended:  # the first extended one stays at 0x100
            offset = _first_free(image, offset, capability)
    elif offset % 4 or offset < start:
        raise ValueError(f"{capability.name}: offset {offset:#x} unaligned or below {start:#x}")
    elif capability.extended and not chain and offset != EXTENDED_CAPABILITIES_START:
        raise ValueError("the first extended capability must be at 0x100")
    end = offset + capability.size
    if end > limit:
        raise ValueError(f"{capability.name}: no room at {offset:#x} ({capability.size} bytes)")
    for placed in chain:
        if offset < placed.end and placed.offset < end:
            raise ValueError(f"{capability.name} overlaps {placed.capability.name}")
    claimed = next((o for o in range(offset, end) if image.kind[o] == ByteKind.DEVICE), None)
    if claimed is not None:
        raise ValueError(
            f"{capability.name} at {offset:#x}+{capability.size:#x} overlaps the device's "
            f"config registers at {claimed:#x}; place it elsewhere or let it be placed"
        )

    image.define(offset, capability.size, kind=ByteKind.CAP_READONLY)  # padding included
    if capability.extended:
        header = capability.cap_id | capability.version << 16
        image.define(offset, 4, header, kind=ByteKind.CAP_HEADER)
    else:
        image.define(offset, 2, capability.cap_id, kind=ByteKind.CAP_HEADER)
    for field in capability.fields():
        writable = field.rw | field.rw1c
        kind = ByteKind.CAP_WRITABLE if writable else ByteKind.CAP_READONLY
        if field.device:
            kind = ByteKind.DEVICE
        image.define(
            offset + field.offset,
            field.size,
            field.value,
            rw=field.rw,
            rw1c=field.rw1c,
            kind=kind,
        )

    if chain:
        previous = chain[-1].offset
        if capability.extended:
            header = image.get(previous, 4) & 0x000FFFFF
            image.put(previous, 4, header | offset << 20)
        else:
            image.data[previous + 1] = offset
    elif not capability.extended:
        image.data[CAPABILITY_POINTER] = offset
    placed = PlacedCapability(capability, offset)
    chain.append(placed)
    return placed


def _first_free(image: RegisterImage, offset: int, capability: Capability) -> int:
    """The first dword from ``offset`` where ``capability`` fits without covering bytes the
    device serves itself (config registers declared before capabilities are placed)."""
    size = capability.size
    while offset + size <= image.size and any(
        image.kind[o] == ByteKind.DEVICE for o in range(offset, offset + size)
    ):
        offset += 4
    return offset
