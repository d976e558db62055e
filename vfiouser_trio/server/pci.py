"""PCI configuration space of an emulated device: type-0 header, BARs and capabilities.

Pure and synchronous: the device framework answers REGION_READ/WRITE on the config region
with `PciConfigSpace.read` / `PciConfigSpace.write` and subscribes to its hooks.

How writes are answered (errors leave the space unchanged):

* Touching the vendor or device ID (bytes 0x00-0x03) fails with EINVAL, as libvfio-user
  answers: those registers identify the device and no client has a reason to write them.
* Touching a capability's ID / next-pointer bytes (an extended capability's whole header
  dword) fails with EPERM. So does a write whose capability bytes all belong to read-only
  capability registers (MSI-X table/PBA location, PCIe device/link capabilities, serial
  number, vendor payloads ...).
* A write that reaches at least one writable capability register is applied with the
  read-only bits of everything it covers masked, so a dword write spanning a writable and a
  read-only register (PCIe link control + link status, MSI data + extended data) works.
* Any other write into the standard header (0x04-0x3F) goes through the write masks:
  read-only bits and whole read-only registers (status bits other than RW1C, revision, class
  code, header type, BIST, subsystem IDs, capability pointer, interrupt pin, reserved bytes)
  keep their value silently. Guests and QEMU write whole dwords (command+status at 0x04,
  cache line..BIST at 0x0C, interrupt line..max latency at 0x3C) and config-restore paths
  rewrite the header; hardware accepts these and drops the read-only parts, so we do too.
* Bytes no register claims (gaps between capabilities, unused extended space) read as zero
  and ignore writes, as reserved registers do.
* Bytes the device serves itself (`ConfigRegisters`, a `VendorCallbackCapability`'s data)
  read as zero *here* and ignore writes: ``server/config_access.py`` answers the client
  there from the device's callbacks (see `PciConfigSpace.served`).
* An offset or size outside the space fails with EINVAL.
"""

from __future__ import annotations

import contextlib
import enum
import errno
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Generic, ParamSpec

from vfiouser_trio.protocol.constants import PciIrq
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.msix import MsiState, MsixState
from vfiouser_trio.server.pci_caps import (
    CONFIG_SPACE_SIZE,
    EXPRESS_CONFIG_SPACE_SIZE,
    EXPRESS_DEVCTL_INITIATE_FLR,
    MSIX_CONTROL_ENABLE,
    MSIX_CONTROL_FUNCTION_MASK,
    PMCSR_POWER_STATE,
    STANDARD_HEADER_SIZE,
    ByteKind,
    Capability,
    ExpressCapability,
    MsiCapability,
    MsixCapability,
    PlacedCapability,
    PowerManagementCapability,
    RegisterImage,
    VendorCallbackCapability,
    place_capability,
)

if TYPE_CHECKING:
    from vfiouser_trio.server.regions import ReadHandler, WriteHandler

# Header register offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
CARDBUS_CIS = 0x28
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F

BAR_COUNT = 6
ROM_INDEX = 6  # the expansion ROM's index among the BARs (VFIO_PCI_ROM_REGION_INDEX)

# Command register bits.
COMMAND_IO = 0x0001
COMMAND_MEMORY = 0x0002
COMMAND_BUS_MASTER = 0x0004
COMMAND_PARITY_ERROR_RESPONSE = 0x0040
COMMAND_SERR = 0x0100
COMMAND_INTX_DISABLE = 0x0400
COMMAND_WRITABLE = (
    COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE
)

# Status register bits.
STATUS_INTERRUPT = 0x0008
STATUS_CAPABILITIES = 0x0010
STATUS_MASTER_DATA_PARITY_ERROR = 0x0100
STATUS_SIGNALED_TARGET_ABORT = 0x0800
STATUS_RECEIVED_TARGET_ABORT = 0x1000
STATUS_RECEIVED_MASTER_ABORT = 0x2000
STATUS_SIGNALED_SYSTEM_ERROR = 0x4000
STATUS_DETECTED_PARITY_ERROR = 0x8000
STATUS_ERRORS = (  # RW1C
    STATUS_MASTER_DATA_PARITY_ERROR
    | STATUS_SIGNALED_TARGET_ABORT
    | STATUS_RECEIVED_TARGET_ABORT
    | STATUS_RECEIVED_MASTER_ABORT
    | STATUS_SIGNALED_SYSTEM_ERROR
    | STATUS_DETECTED_PARITY_ERROR
)

# BAR type bits.
BAR_IO = 0x1
BAR_MEM_64 = 0x4
BAR_PREFETCHABLE = 0x8
ROM_ENABLE = 0x1
ROM_ADDRESS_MASK = 0xFFFFF800

P = ParamSpec("P")


class Hook(Generic[P]):
    """Synchronous observers of one event; callbacks run in connection order."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[P, None]] = []

    def connect(self, callback: Callable[P, None]) -> Callable[[], None]:
        """Subscribe ``callback``; returns a function that unsubscribes it."""
        self._callbacks.append(callback)

        def disconnect() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return disconnect

    def emit(self, *args: P.args, **kwargs: P.kwargs) -> None:
        for callback in list(self._callbacks):
            callback(*args, **kwargs)


class InterruptPin(enum.IntEnum):
    """The interrupt pin register: which INTx the function uses, if any."""

    NONE = 0
    INTA = 1
    INTB = 2
    INTC = 3
    INTD = 4


@dataclass(frozen=True)
class PciIdentity:
    """Read-only identity registers of a type-0 (header type 0) function.

    ``class_code`` is 24 bits: base class << 16 | subclass << 8 | programming interface.
    """

    vendor_id: int
    device_id: int
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    class_code: int = 0
    revision: int = 0

    def __post_init__(self) -> None:
        for name in ("vendor_id", "device_id", "subsystem_vendor_id", "subsystem_id"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise ValueError(f"{name} is a 16-bit value")
        if self.vendor_id == 0xFFFF:
            raise ValueError("vendor ID 0xffff means 'no device'")
        if not 0 <= self.class_code <= 0xFFFFFF:
            raise ValueError("class_code is a 24-bit value")
        if not 0 <= self.revision <= 0xFF:
            raise ValueError("revision is an 8-bit value")


@dataclass(frozen=True)
class BarSpec:
    """One implemented BAR: a power-of-two ``size`` (memory >= 16, I/O 4..64 KiB).

    A 64-bit memory BAR also takes the next BAR slot for its upper address half.
    """

    size: int
    io: bool = False
    is_64bit: bool = False
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size & (self.size - 1):
            raise ValueError(f"BAR size {self.size:#x} is not a power of two")
        if self.io:
            if self.is_64bit or self.prefetchable:
                raise ValueError("I/O BARs are neither 64-bit nor prefetchable")
            if not 4 <= self.size <= 1 << 16:
                raise ValueError("I/O BAR size must be 4 bytes .. 64 KiB")
        elif not 16 <= self.size <= (1 << 63 if self.is_64bit else 1 << 31):
            raise ValueError("memory BAR size must be >= 16 and fit its address width")

    @property
    def type_bits(self) -> int:
        """The read-only low bits: I/O space, or memory type and prefetchable."""
        if self.io:
            return BAR_IO
        return (BAR_MEM_64 if self.is_64bit else 0) | (BAR_PREFETCHABLE if self.prefetchable else 0)

    @property
    def address_mask(self) -> int:
        """Writable address bits (64 of them for a 64-bit BAR)."""
        width = 64 if self.is_64bit else 32
        low_bits = 0x3 if self.io else 0xF
        return ~(self.size - 1) & ((1 << width) - 1) & ~low_bits


@dataclass(frozen=True)
class ConfigRegisters:
    """Device-specific config-space bytes ``offset`` .. ``offset + size`` served by callbacks.

    ``read(offset, count)`` / ``write(offset, data)`` see offsets from ``offset`` (the
    first register is 0), ``async def`` or plain functions as for BARs; without ``write``
    the registers are read-only (a write touching them fails with EPERM). The bytes must
    lie in 0x40 .. the end of the space (256 bytes, 4096 for PCI Express), outside the
    extended capability list's head (0x100..0x103) and away from capabilities placed at an
    explicit offset; capabilities placed by the framework go around them.
    """

    offset: int
    size: int
    read: ReadHandler
    write: WriteHandler | None = None


def config_registers_problem(
    offset: int, size: int, space: int, taken: Iterable[tuple[int, int]] = ()
) -> str | None:
    """What is wrong with device registers at ``offset``+``size`` in a ``space``-byte config
    space beside the ``taken`` (offset, size) ones, or None: the one rule `PciConfigSpace`
    and ``Device.add_config_registers`` check."""
    end = offset + size
    if size <= 0:
        return f"size {size}: give at least one byte"
    if offset < STANDARD_HEADER_SIZE:
        return "the standard header (0x00..0x3f) is the framework's: start at 0x40 or later"
    if end > space:
        more = "" if space == EXPRESS_CONFIG_SPACE_SIZE else " (express=True gives 4096)"
        return f"beyond the {space}-byte config space{more}"
    if offset < EXTENDED_LIST_HEAD_END and end > CONFIG_SPACE_SIZE:
        return "0x100..0x103 is the head of the extended capability list: leave it out"
    for other, other_size in taken:
        if other < end and offset < other + other_size:
            return f"they overlap the config registers at {other:#x}+{other_size:#x}"
    return None


@dataclass(frozen=True)
class ServedRange:
    """Config bytes ``start`` .. ``start + size`` the device serves: its callbacks see
    offsets from ``base``; ``name`` says what they are in errors and logs."""

    start: int
    size: int
    base: int
    read: ReadHandler
    write: WriteHandler | None
    name: str

    @property
    def end(self) -> int:
        return self.start + self.size


EXTENDED_LIST_HEAD_END = 0x104


def _check_bars(bars: Mapping[int, BarSpec]) -> dict[int, BarSpec]:
    taken: set[int] = set()
    for index, spec in sorted(bars.items()):
        slots = {index, index + 1} if spec.is_64bit else {index}
        if not 0 <= index < BAR_COUNT or max(slots) >= BAR_COUNT:
            raise ValueError(f"BAR {index} does not fit in BAR slots 0..5")
        if slots & taken:
            raise ValueError(f"BAR {index} overlaps the upper half of a 64-bit BAR")
        taken |= slots
    return dict(bars)


class PciConfigSpace:
    """A function's configuration space: 256 bytes, or 4096 for PCI Express.

    The space is 4096 bytes when ``express`` is set or ``capabilities`` holds an
    `ExpressCapability`. Add capabilities before serving the device: the power-on image
    used by `reset` is taken after each addition.

    ``registers`` are device-specific bytes served by callbacks (`ConfigRegisters`); they
    are claimed before the capabilities are placed. `served` lists every range the device
    serves itself (those and each `VendorCallbackCapability`'s data bytes).

    Hooks (synchronous, called after a write has been fully applied):
    ``command_changed(old, new)``, ``bar_changed(index, address)`` (index 6 is the ROM),
    ``msi_changed(msi_state)``, ``msix_changed(enabled, function_masked)``,
    ``irq_mask_changed(index, start, count, masked)`` (the client changed an MSI per-vector
    mask bit, an MSI-X table entry's mask bit, or the MSI-X function mask: then ``start``
    0 and ``count`` every vector) and ``flr_requested()``. BAR sizing makes the address
    read back as the size mask for a moment; consumers should act on addresses only while
    decoding is enabled.
    """

    def __init__(
        self,
        identity: PciIdentity,
        *,
        bars: Mapping[int, BarSpec] | None = None,
        rom_size: int | None = None,
        interrupt_pin: int = InterruptPin.NONE,
        express: bool = False,
        capabilities: Iterable[Capability] = (),
        registers: Iterable[ConfigRegisters] = (),
    ) -> None:
        capabilities = list(capabilities)
        if any(isinstance(cap, ExpressCapability) for cap in capabilities):
            express = True
        if rom_size is not None and not (
            rom_size & (rom_size - 1) == 0 and 2048 <= rom_size <= 1 << 31
        ):
            raise ValueError("ROM size must be a power of two from 2 KiB to 2 GiB")
        if interrupt_pin not in tuple(InterruptPin):
            raise ValueError("interrupt pin is 0 (none) or 1..4 (INTA..INTD)")
        self.identity = identity
        self.size = EXPRESS_CONFIG_SPACE_SIZE if express else CONFIG_SPACE_SIZE
        self.bars = _check_bars(bars or {})
        self.rom_size = rom_size
        self.msi: MsiState | None = None
        self.msix: MsixState | None = None
        self.command_changed: Hook[[int, int]] = Hook()
        self.bar_changed: Hook[[int, int]] = Hook()
        self.msi_changed: Hook[[MsiState]] = Hook()
        self.msix_changed: Hook[[bool, bool]] = Hook()
        self.flr_requested: Hook[[]] = Hook()
        self.irq_mask_changed: Hook[[int, int, int, bool]] = Hook()
        self._image = RegisterImage(self.size)
        self._standard: list[PlacedCapability] = []
        self._extended: list[PlacedCapability] = []
        self._served: list[ServedRange] = []
        self._define_header(InterruptPin(interrupt_pin))
        for block in registers:
            self._claim_registers(block)
        for capability in capabilities:
            self.add_capability(capability)
        self._power_on = bytes(self._image.data)

    def _define_header(self, interrupt_pin: InterruptPin) -> None:
        ident, image, header = self.identity, self._image, ByteKind.HEADER
        image.define(VENDOR_ID, 2, ident.vendor_id, kind=ByteKind.IDENTITY)
        image.define(DEVICE_ID, 2, ident.device_id, kind=ByteKind.IDENTITY)
        image.define(COMMAND, 2, rw=COMMAND_WRITABLE, kind=header)
        image.define(STATUS, 2, rw1c=STATUS_ERRORS, kind=header)
        image.define(REVISION_ID, 4, ident.revision | ident.class_code << 8, kind=header)
        image.define(CACHE_LINE_SIZE, 1, rw=0xFF, kind=header)
        image.define(LATENCY_TIMER, 1, rw=0xFF, kind=header)
        image.define(HEADER_TYPE, 1, 0, kind=header)
        image.define(BIST, 1, kind=header)
        image.define(BAR0, 4 * BAR_COUNT, kind=header)  # unimplemented BARs: RO zero
        for index, spec in self.bars.items():
            mask = spec.address_mask
            image.define(BAR0 + 4 * index, 4, spec.type_bits, rw=mask & 0xFFFFFFFF, kind=header)
            if spec.is_64bit:
                image.define(BAR0 + 4 * index + 4, 4, rw=mask >> 32, kind=header)
        image.define(CARDBUS_CIS, 4, kind=header)
        subsystem = ident.subsystem_vendor_id | ident.subsystem_id << 16
        image.define(SUBSYSTEM_VENDOR_ID, 4, subsystem, kind=header)
        rom_rw = 0
        if self.rom_size is not None:
            rom_rw = (~(self.rom_size - 1) & ROM_ADDRESS_MASK) | ROM_ENABLE
        image.define(ROM_ADDRESS, 4, rw=rom_rw, kind=header)
        image.define(CAPABILITY_POINTER, 8, kind=header)  # pointer + reserved bytes
        image.define(INTERRUPT_LINE, 1, rw=0xFF, kind=header)
        image.define(INTERRUPT_PIN, 1, interrupt_pin, kind=header)
        image.define(MIN_GNT, 2, kind=header)  # min grant, max latency: 0 (no requirement)

    def _claim_registers(self, block: ConfigRegisters) -> None:
        where = f"config registers {block.offset:#x}+{block.size:#x}"
        taken = [(served.start, served.size) for served in self._served]
        problem = config_registers_problem(block.offset, block.size, self.size, taken)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        self._image.define(block.offset, block.size, kind=ByteKind.DEVICE)
        self._served.append(
            ServedRange(block.offset, block.size, block.offset, block.read, block.write, where)
        )

    @property
    def served(self) -> tuple[ServedRange, ...]:
        """The bytes the device serves by its callbacks, in declaration order."""
        return tuple(self._served)

    # --- capabilities -----------------------------------------------------------------

    def add_capability(self, capability: Capability, offset: int | None = None) -> int:
        """Place ``capability`` (at ``offset`` or the next free dword) and link it.

        Returns its offset. Raises ValueError when it does not fit, overlaps, needs the
        4096-byte space, duplicates a unique capability, or points at a missing BAR.
        """
        if isinstance(capability, ExpressCapability) and self.size < EXPRESS_CONFIG_SPACE_SIZE:
            raise ValueError("a PCI Express capability needs the 4096-byte space (express=True)")
        unique = (PowerManagementCapability, MsiCapability, MsixCapability, ExpressCapability)
        if isinstance(capability, unique) and self.find_capability(type(capability)):
            raise ValueError(f"only one {capability.name} capability is allowed")
        if isinstance(capability, MsixCapability):
            self._check_msix_bars(capability)
        chain = self._extended if capability.extended else self._standard
        placed = place_capability(self._image, chain, capability, offset)
        if not capability.extended:
            self._image.data[STATUS] |= STATUS_CAPABILITIES
        if isinstance(capability, MsiCapability):
            self.msi = MsiState(self._image.data, placed.offset, capability)
        elif isinstance(capability, MsixCapability):
            self.msix = MsixState(capability.table_size)
            self.msix.mask_changed = partial(self.irq_mask_changed.emit, PciIrq.MSIX)
        elif isinstance(capability, VendorCallbackCapability):
            start = placed.offset + capability.BODY
            name = f"vendor capability at {placed.offset:#x}"
            self._served.append(
                ServedRange(
                    start,
                    capability.body_size,
                    placed.offset,
                    capability.read,
                    capability.write,
                    name,
                )
            )
        self._power_on = bytes(self._image.data)
        return placed.offset

    def _check_msix_bars(self, cap: MsixCapability) -> None:
        for what, bar, start, size in (
            ("table", cap.table_bar, cap.table_offset, 16 * cap.table_size),
            ("PBA", cap.pba_bir, cap.pba_start, cap.pba_size),
        ):
            spec = self.bars.get(bar)
            if spec is None or spec.io:
                raise ValueError(f"MSI-X {what} needs memory BAR {bar}")
            if start + size > spec.size:
                raise ValueError(f"MSI-X {what} does not fit in BAR {bar}")

    @property
    def capabilities(self) -> tuple[PlacedCapability, ...]:
        """Standard then extended capabilities, each list in link order."""
        return (*self._standard, *self._extended)

    def find_capability(self, kind: type[Capability]) -> PlacedCapability | None:
        """The first placed capability of type ``kind``, if any."""
        for placed in self.capabilities:
            if isinstance(placed.capability, kind):
                return placed
        return None

    # --- client access ----------------------------------------------------------------

    def _check_range(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise VfioUserError(
                errno.EINVAL,
                f"config space access {offset:#x}+{size:#x} beyond {self.size:#x} bytes",
            )

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``; EINVAL outside the space."""
        self._check_range(offset, size)
        return bytes(self._image.data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a client write through the write masks (errors: see the module doc)."""
        size = len(data)
        self._check_range(offset, size)
        if size == 0:
            return
        self._check_writable(offset, size)
        image, end = self._image, offset + size
        before = self._observed()
        previous = bytes(image.data)
        value = int.from_bytes(data, "little")
        old = int.from_bytes(previous[offset:end], "little")
        rw = int.from_bytes(image.rw[offset:end], "little")
        rw1c = int.from_bytes(image.rw1c[offset:end], "little")
        new = ((old & ~rw) | (value & rw)) & ~(value & rw1c)
        image.data[offset:end] = new.to_bytes(size, "little")
        for placed in self.capabilities:
            if placed.offset < end and offset < placed.end:
                cap_bytes = image.data[placed.offset : placed.end]
                placed.capability.constrain(previous[placed.offset : placed.end], cap_bytes)
                image.data[placed.offset : placed.end] = cap_bytes
        flr = self._flr_written(offset, data)
        self._notify(before)
        if flr:
            self.flr_requested.emit()

    def _check_writable(self, offset: int, size: int) -> None:
        kinds = set(self._image.kind[offset : offset + size])
        where = f"config write {offset:#x}+{size:#x}"
        if ByteKind.IDENTITY in kinds:
            raise VfioUserError(errno.EINVAL, f"{where}: vendor/device ID are read-only")
        if ByteKind.CAP_HEADER in kinds:
            raise VfioUserError(errno.EPERM, f"{where}: capability header is read-only")
        # Device-served bytes reaching here are writable ones (config_access.py refuses the rest).
        writable = {ByteKind.CAP_WRITABLE, ByteKind.DEVICE}
        if ByteKind.CAP_READONLY in kinds and not kinds & writable:
            raise VfioUserError(errno.EPERM, f"{where}: capability register is read-only")

    def _flr_written(self, offset: int, data: bytes) -> bool:
        placed = self.find_capability(ExpressCapability)
        if placed is None or not isinstance(placed.capability, ExpressCapability):
            return False
        # The "initiate FLR" bit is write-only (reads 0), so look at the written byte.
        flr_byte = placed.offset + ExpressCapability.DEVICE_CONTROL + 1
        if not (placed.capability.flr and offset <= flr_byte < offset + len(data)):
            return False
        return bool(data[flr_byte - offset] & EXPRESS_DEVCTL_INITIATE_FLR >> 8)

    # --- change notification ----------------------------------------------------------

    def _observed(self) -> tuple[int, tuple[int | None, ...], bytes, int]:
        msi_registers = b""
        if self.msi is not None:
            placed = self.find_capability(MsiCapability)
            assert placed is not None
            # Control .. mask bits: everything the guest writes (pending bits are the device's).
            end = placed.offset + self.msi.capability.pending_offset
            msi_registers = bytes(self._image.data[placed.offset : end])
        return (self.command, self._bar_tuple(), msi_registers, self._msix_control())

    def _msix_control(self) -> int:
        placed = self.find_capability(MsixCapability)
        if placed is None:
            return 0
        control = self._image.get(placed.offset + MsixCapability.CONTROL, 2)
        return control & (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)

    def _notify(
        self, before: tuple[int, tuple[int | None, ...], bytes, int], *, by_client: bool = True
    ) -> None:
        command, bars, msi_registers, msix_control = before
        after = self._observed()
        if after[0] != command:
            self.command_changed.emit(command, after[0])
        for index, (old, new) in enumerate(zip(bars, after[1], strict=True)):
            if new is not None and new != old:
                self.bar_changed.emit(index, new)
        if self.msi is not None and after[2] != msi_registers:
            self.msi.release()
            self.msi_changed.emit(self.msi)
            if by_client:  # a reset's masks are the power-on ones, not the client's doing
                self._msi_masks_changed(msi_registers, after[2])
        if self.msix is not None and after[3] != msix_control:
            enabled, masked = self.msix_enabled, self.msix_function_masked
            self.msix.set_control(enabled=enabled, function_masked=masked)
            self.msix_changed.emit(enabled, masked)

    def _msi_masks_changed(self, before: bytes, after: bytes) -> None:
        """Emit ``irq_mask_changed`` for each MSI vector whose mask bit the client changed."""
        assert self.msi is not None
        capability = self.msi.capability
        if not capability.per_vector_masking:
            return
        where = slice(capability.mask_offset, capability.mask_offset + 4)
        old = int.from_bytes(before[where], "little")
        new = int.from_bytes(after[where], "little")
        for vector in range(capability.vectors):
            if (old ^ new) >> vector & 1:
                self.irq_mask_changed.emit(PciIrq.MSI, vector, 1, bool(new >> vector & 1))

    # --- device side ------------------------------------------------------------------

    def reset(self) -> None:
        """Return to the power-on state (device reset / FLR), notifying the hooks."""
        before = self._observed()
        self._image.data[:] = self._power_on
        if self.msix is not None:
            self.msix.reset()
        self._notify(before, by_client=False)

    def device_write(self, offset: int, data: bytes) -> None:
        """Store bytes as the device, ignoring write masks: latch PME status, PCIe error
        status, link state ... No hooks run; EINVAL outside the space."""
        self._check_range(offset, len(data))
        self._image.data[offset : offset + len(data)] = data

    def set_interrupt_status(self, asserted: bool) -> None:
        """Drive the status register's interrupt status bit (INTx asserted)."""
        if asserted:
            self._image.data[STATUS] |= STATUS_INTERRUPT
        else:
            self._image.data[STATUS] &= ~STATUS_INTERRUPT & 0xFF

    def set_status_errors(self, bits: int) -> None:
        """Latch error bits in the status register (the client clears them by writing 1)."""
        if bits & ~STATUS_ERRORS:
            raise ValueError(f"{bits:#x} has bits that are not status error bits")
        self._image.put(STATUS, 2, self.status | bits)

    # --- migration --------------------------------------------------------------------

    def save_image(self) -> bytes:
        """The whole space as it reads now (MSI-X table and PBA: ``msix.save_state()``)."""
        return bytes(self._image.data)

    def check_image(self, image: bytes) -> None:
        """ValueError unless ``image`` is a space of this function's size and layout.

        Identity registers, the capability pointer and every capability header must be
        the same bytes as ours: a saved space from another device or another capability
        layout is refused.
        """
        if len(image) != self.size:
            raise ValueError(f"a {len(image)}-byte config space, not {self.size}")
        kinds = self._image.kind
        fixed = (ByteKind.IDENTITY, ByteKind.CAP_HEADER)
        for offset, (mine, theirs) in enumerate(zip(self._image.data, image, strict=True)):
            if (kinds[offset] in fixed or offset == CAPABILITY_POINTER) and mine != theirs:
                raise ValueError(f"config space differs at {offset:#x}: another device or layout")

    def restore_image(self, image: bytes, *, msix_table: bytes = b"", msix_pba: bytes = b"") -> int:
        """Replace the whole space with a saved one (migration); returns the old command.

        No write masks and no hooks: MSI reads its state from the image, MSI-X takes the
        saved table and PBA and re-derives enable / function mask from its control
        register, and nothing is delivered. Call `announce_restored` once the device's
        own state is in place too. ValueError (nothing changed) for an image or MSI-X
        state that does not fit this function.
        """
        self.check_image(image)
        if self.msix is not None:
            self.msix.check_state(msix_table, msix_pba)
        elif msix_table or msix_pba:
            raise ValueError("MSI-X state for a function without MSI-X")
        previous = self.command
        self._image.data[:] = image
        if self.msix is not None:
            self.msix.restore_state(
                msix_table,
                msix_pba,
                enabled=self.msix_enabled,
                function_masked=self.msix_function_masked,
            )
        return previous

    def announce_restored(self, previous_command: int) -> None:
        """Fire each hook once after `restore_image`, so observers see the restored state.

        ``command_changed(previous_command, command)``, ``bar_changed`` for every
        implemented BAR (and the ROM), ``msi_changed`` and ``msix_changed`` when present,
        whether or not the values differ from before.
        """
        self.command_changed.emit(previous_command, self.command)
        for index, address in self.bar_addresses().items():
            self.bar_changed.emit(index, address)
        if self.msi is not None:
            self.msi_changed.emit(self.msi)
        if self.msix is not None:
            self.msix_changed.emit(self.msix_enabled, self.msix_function_masked)

    # --- accessors --------------------------------------------------------------------

    @property
    def command(self) -> int:
        return self._image.get(COMMAND, 2)

    @property
    def status(self) -> int:
        return self._image.get(STATUS, 2)

    @property
    def io_enabled(self) -> bool:
        return bool(self.command & COMMAND_IO)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & COMMAND_MEMORY)

    @property
    def bus_master_enabled(self) -> bool:
        return bool(self.command & COMMAND_BUS_MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & COMMAND_INTX_DISABLE)

    @property
    def interrupt_line(self) -> int:
        return self._image.data[INTERRUPT_LINE]

    def bar_address(self, index: int) -> int | None:
        """The address programmed in BAR ``index`` (6: the ROM), or None if unimplemented."""
        if index == ROM_INDEX:
            if self.rom_size is None:
                return None
            return self._image.get(ROM_ADDRESS, 4) & ROM_ADDRESS_MASK
        spec = self.bars.get(index)
        if spec is None:
            return None
        register = BAR0 + 4 * index
        low = self._image.get(register, 4) & ~(0x3 if spec.io else 0xF)
        if spec.is_64bit:
            return low | self._image.get(register + 4, 4) << 32
        return low

    def bar_addresses(self) -> dict[int, int]:
        """Addresses of the implemented BARs (and the ROM, as index 6)."""
        return {i: a for i, a in enumerate(self._bar_tuple()) if a is not None}

    def _bar_tuple(self) -> tuple[int | None, ...]:
        return tuple(self.bar_address(index) for index in range(ROM_INDEX + 1))

    @property
    def rom_enabled(self) -> bool:
        return bool(self._image.get(ROM_ADDRESS, 4) & ROM_ENABLE)

    @property
    def power_state(self) -> int:
        """PMCSR power state (0 = D0 .. 3 = D3hot); D0 without a PM capability."""
        placed = self.find_capability(PowerManagementCapability)
        if placed is None:
            return 0
        return self._image.data[placed.offset + 4] & PMCSR_POWER_STATE

    @property
    def msi_enabled(self) -> bool:
        return self.msi is not None and self.msi.enabled

    def msi_message(self, vector: int) -> tuple[int, int]:
        """(address, data) MSI ``vector`` is sent with; ValueError without MSI."""
        if self.msi is None:
            raise ValueError("no MSI capability")
        return self.msi.message(vector)

    @property
    def msix_enabled(self) -> bool:
        return bool(self._msix_control() & MSIX_CONTROL_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        return bool(self._msix_control() & MSIX_CONTROL_FUNCTION_MASK)
