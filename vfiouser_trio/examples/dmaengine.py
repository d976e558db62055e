"""A memory-to-memory copy engine: a descriptor ring in guest memory, a doorbell, MSI-X.

The driver fills descriptors in a ring in guest memory, hands each to the device by
setting its VALID flag, and rings the doorbell (TAIL). The device copies ``length``
bytes from ``src`` to ``dst`` for each valid descriptor from HEAD on, writes the
outcome back into the descriptor, advances HEAD, and raises MSI-X vector 0 once the
ring holds nothing more for it.

BAR0 registers (32-bit, little-endian; byte writes merge into a register, as byte
enables do; unlisted offsets read 0 and ignore writes)::

    0x00 ID           RO   0x45414d44 ("DMAE")
    0x04 VERSION      RO   0x00010000
    0x08 CONTROL      RW   bit 0 ENABLE: process the ring
                           bit 1 IRQ_ENABLE: raise MSI-X vector 0 when a batch completes
                           bit 31 RESET: write 1 to reset the engine (reads 0)
    0x0c STATUS       RW1C bit 0 ERROR: a descriptor or the ring failed (see ERROR_CODE)
                           bit 1 COMPLETION: a batch of descriptors completed
    0x10 RING_BASE    RW   64 bits (0x10 low, 0x14 high): ring IOVA, 32-byte aligned
    0x18 RING_SIZE    RW   descriptors in the ring, 0..4096 (larger values clamp)
    0x1c HEAD         RO   index of the next descriptor the device looks at
    0x20 TAIL         RW   doorbell: write (as a dword) after posting descriptors
    0x24 COMPLETED    RO   descriptors completed, with or without error (wraps at 2**32)
    0x28 ERRORS       RO   errors seen (failed descriptors and ring faults)
    0x2c ERROR_CODE   RO   cause of the last error, one of ERR_*
    0x30 ERROR_INDEX  RO   ring index of the last error

RING_BASE and RING_SIZE can only change while ENABLE is clear; writing either
resets HEAD and TAIL to 0. Ownership of a descriptor is its VALID flag, not TAIL:
when the client registers the doorbell as an ioeventfd, KVM consumes the TAIL write
and only the wake-up reaches the device. TAIL reads back the last value written
through the server and is otherwise bookkeeping for the driver.

Descriptor (32 bytes, little-endian)::

    0x00 src     u64  IOVA to read
    0x08 dst     u64  IOVA to write
    0x10 length  u32  bytes to copy, 1..MAX_TRANSFER
    0x14 flags   u32  bit 0 VALID: owned by the device (the driver sets it last)
    0x18 status  u32  written by the device: bit 0 DONE, bit 1 ERROR, bits 8-15 ERR_*
    0x1c         u32  reserved

Ownership is handed over with ordered accesses when the ring is in memory the device
maps (an fd-backed DMA map): the device reads the flags with an acquire load before the
rest of the descriptor (the driver sets VALID last, with a release store), and on
completion it clears VALID, then stores the status with a release store, so a driver that
loads DONE with acquire sees the cleared VALID and the copied data too. A ring reached
by DMA messages is read and written back in whole messages, in that order.

A bad source or destination (unmapped,
wrong permission, refused by the client) fails that descriptor with ERR_READ_FAULT or
ERR_WRITE_FAULT; the engine goes on with the next one. A ring it cannot read or write
back to is a ring fault: ERR_RING_FAULT, and the engine stops (ENABLE clears). With
bus mastering off in the command register, the device does no DMA (ERR_NO_BUS_MASTER).

Copies between fd-backed DMA maps use zero-copy views, piece by piece over the maps a
range crosses (``DmaTable.sgl``: a buffer may span adjacent maps); anything else goes
through DmaTable.read/write, i.e. DMA_READ/DMA_WRITE messages for maps without an fd.
``DmaEngine(messages=True)`` uses messages even where the client gave an fd (as
libvfio-user's sample server can), to exercise a client's DMA servicing.

The device keeps the client's DMA windows it was told of (``windows``, from its
``dma_mapped``/``dma_unmapped`` hooks). A window holding part of the ring going away
while the engine is enabled is a ring fault at once (ERR_RING_FAULT, ENABLE clears, the
interrupt if enabled): the driver pulled the ring from under a running engine.

The engine migrates (STOP_COPY; its state is a few registers, nothing to pre-copy).
Stopping it quiesces the ring: the descriptor being copied completes (and a batch that
completed anything raises its interrupt, as a batch does), then the engine parks with
HEAD at the next descriptor. `DmaEngineState` is what travels; the ring and the data
are guest memory, which the client moves. On the destination the engine continues
from the saved HEAD once it runs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import struct
from dataclasses import dataclass

import trio

from ..atomics import AtomicView, MemoryOrder
from ..protocol.constants import PciIrq
from ..protocol.errors import VfioUserError
from ..server.device import Device
from ..server.dma import DmaWindow
from ..server.pci import PciIdentity

log = logging.getLogger(__name__)

# 0x1234 is the vendor ID QEMU's test devices use; it is not assigned to us.
# Class 0x088000: base system peripheral, other.
IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x7101, class_code=0x088000, revision=1)

REGISTER_BAR = 0
REGISTER_BAR_SIZE = 0x1000
MSIX_BAR = 2
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800

# Registers.
ID = 0x00
VERSION = 0x04
CONTROL = 0x08
STATUS = 0x0C
RING_BASE_LO = 0x10
RING_BASE_HI = 0x14
RING_SIZE = 0x18
HEAD = 0x1C
TAIL = 0x20
COMPLETED = 0x24
ERRORS = 0x28
ERROR_CODE = 0x2C
ERROR_INDEX = 0x30

ENGINE_ID = int.from_bytes(b"DMAE", "little")
ENGINE_VERSION = 0x0001_0000

CONTROL_ENABLE = 1 << 0
CONTROL_IRQ_ENABLE = 1 << 1
CONTROL_RESET = 1 << 31
STATUS_ERROR = 1 << 0
STATUS_COMPLETION = 1 << 1

MAX_RING_SIZE = 4096
MAX_TRANSFER = 1 << 20
RING_ALIGN = 32

# Descriptors.
DESCRIPTOR = struct.Struct("<QQIII4x")
DESCRIPTOR_SIZE = DESCRIPTOR.size
FLAGS_OFFSET = 0x14
STATUS_OFFSET = 0x18
DESC_VALID = 1 << 0
DESC_DONE = 1 << 0
DESC_ERROR = 1 << 1

# Error codes (ERROR_CODE, and bits 8-15 of a descriptor's status).
ERR_NONE = 0
ERR_READ_FAULT = 1
ERR_WRITE_FAULT = 2
ERR_BAD_LENGTH = 3
ERR_RING_FAULT = 4
ERR_NO_BUS_MASTER = 5


@dataclass
class DmaEngineState:
    """All of the engine's state: what a reset clears and a migration would carry."""

    control: int = 0
    status: int = 0
    ring_base: int = 0
    ring_size: int = 0
    head: int = 0
    tail: int = 0
    completed: int = 0
    errors: int = 0
    error_code: int = ERR_NONE
    error_index: int = 0

    _FORMAT = struct.Struct("<IIQ7I")

    @classmethod
    def load(cls, data: bytes) -> DmaEngineState:
        """A saved state, checked: ValueError for bytes the engine could not have saved."""
        if len(data) != cls._FORMAT.size:
            raise ValueError(f"an engine state is {cls._FORMAT.size} bytes, not {len(data)}")
        s = cls.unpack(data)
        problems = [
            (s.control & ~(CONTROL_ENABLE | CONTROL_IRQ_ENABLE), "unknown CONTROL bits"),
            (s.status & ~(STATUS_ERROR | STATUS_COMPLETION), "unknown STATUS bits"),
            (s.ring_base % RING_ALIGN, "a misaligned ring"),
            (s.ring_size > MAX_RING_SIZE, "a ring above the maximum size"),
            (s.head >= max(s.ring_size, 1), "HEAD outside the ring"),
            (s.error_code > ERR_NO_BUS_MASTER, "an unknown error code"),
            (s.error_index >= MAX_RING_SIZE, "an error index outside any ring"),
        ]
        for bad, what in problems:
            if bad:
                raise ValueError(f"engine state with {what}")
        return s

    def pack(self) -> bytes:
        return self._FORMAT.pack(
            self.control,
            self.status,
            self.ring_base,
            self.ring_size,
            self.head,
            self.tail,
            self.completed,
            self.errors,
            self.error_code,
            self.error_index,
        )

    @classmethod
    def unpack(cls, data: bytes) -> DmaEngineState:
        return cls(*cls._FORMAT.unpack(data))


def descriptor(src: int, dst: int, length: int, *, valid: bool = True) -> bytes:
    """A descriptor as a driver posts it (status 0)."""
    return DESCRIPTOR.pack(src, dst, length, DESC_VALID if valid else 0, 0)


def descriptor_status(raw: bytes) -> tuple[int, int]:
    """(flags, status) of a descriptor read back from guest memory."""
    _, _, _, flags, status = DESCRIPTOR.unpack(raw)
    return flags, status


class DmaEngine(Device):
    """The copy engine: registers in BAR0, MSI-X (one vector) in BAR2, doorbell on TAIL."""

    def __init__(self, *, messages: bool = False) -> None:
        super().__init__(IDENTITY, name="dmaengine")
        self.dma.prefer_messages = messages
        self.state = DmaEngineState()
        #: The client's DMA windows, by IOVA (kept by the DMA hooks).
        self.windows: dict[int, DmaWindow] = {}
        self._work: trio.CancelScope | None = None
        # Migration quiesce: set while the engine may work; a batch in flight holds
        # _idle clear.
        self._unparked = trio.Event()
        self._unparked.set()
        self._idle = trio.Event()
        self._idle.set()
        self.add_bar(REGISTER_BAR, REGISTER_BAR_SIZE, read=self.read_bar0, write=self.write_bar0)
        self.add_bar(MSIX_BAR, MSIX_BAR_SIZE, read=self._read_zeros, write=self._ignore)
        self.add_msix(1, bar=MSIX_BAR, table_offset=0, pba_offset=MSIX_PBA_OFFSET)
        self.doorbell = self.add_doorbell(REGISTER_BAR, TAIL, size=4)
        self.enable_migration()

    # --- registers -----------------------------------------------------------------------

    async def read_bar0(self, offset: int, size: int) -> bytes:
        first = offset & ~3
        words = b"".join(
            self._read_register(reg).to_bytes(4, "little") for reg in range(first, offset + size, 4)
        )
        return words[offset - first : offset - first + size]

    async def write_bar0(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        for reg in range(offset & ~3, end, 4):
            lo, hi = max(offset, reg), min(end, reg + 4)
            shift = 8 * (lo - reg)
            value = int.from_bytes(data[lo - offset : hi - offset], "little") << shift
            mask = ((1 << 8 * (hi - lo)) - 1) << shift
            await self._write_register(reg, value, mask)

    def _read_register(self, reg: int) -> int:
        s = self.state
        values = {
            ID: ENGINE_ID,
            VERSION: ENGINE_VERSION,
            CONTROL: s.control,
            STATUS: s.status,
            RING_BASE_LO: s.ring_base & 0xFFFF_FFFF,
            RING_BASE_HI: s.ring_base >> 32,
            RING_SIZE: s.ring_size,
            HEAD: s.head,
            TAIL: s.tail,
            COMPLETED: s.completed,
            ERRORS: s.errors,
            ERROR_CODE: s.error_code,
            ERROR_INDEX: s.error_index,
        }
        return values.get(reg, 0)

    async def _write_register(self, reg: int, value: int, mask: int) -> None:
        s = self.state

        def merged(old: int) -> int:
            return (old & ~mask) | (value & mask)

        if reg == CONTROL:
            if value & mask & CONTROL_RESET:
                await self.reset()
                return
            was_enabled = s.control & CONTROL_ENABLE
            s.control = merged(s.control) & (CONTROL_ENABLE | CONTROL_IRQ_ENABLE)
            if s.control & CONTROL_ENABLE and not was_enabled:
                self.doorbell.ring()  # look at the ring now: descriptors may be waiting
        elif reg == STATUS:
            s.status &= ~(value & mask)
        elif reg in (RING_BASE_LO, RING_BASE_HI, RING_SIZE):
            if s.control & CONTROL_ENABLE:
                return  # the ring stays put while the engine runs
            if reg == RING_BASE_LO:
                low = merged(s.ring_base & 0xFFFF_FFFF) & ~(RING_ALIGN - 1)
                s.ring_base = (s.ring_base & ~0xFFFF_FFFF) | low
            elif reg == RING_BASE_HI:
                s.ring_base = (s.ring_base & 0xFFFF_FFFF) | merged(s.ring_base >> 32) << 32
            else:
                s.ring_size = min(merged(s.ring_size), MAX_RING_SIZE)
            s.head = s.tail = 0
        elif reg == TAIL:
            s.tail = merged(s.tail)

    async def _read_zeros(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def _ignore(self, offset: int, data: bytes) -> None:
        pass

    # --- the engine ----------------------------------------------------------------------

    async def run(self) -> None:
        """Wait for the doorbell (ioeventfd or TAIL write), then work through the ring."""
        while True:
            await self.doorbell.wait()
            # Parked for a migration (or held after a reset while stopped): wait to run.
            while self._parked or self.dma.stopped:
                await self._unparked.wait()
                await self.dma.wait_running()
            self._idle = trio.Event()
            try:
                with trio.CancelScope() as self._work:
                    await self.process_ring()
            finally:
                self._work = None
                self._idle.set()

    @property
    def _parked(self) -> bool:
        return not self._unparked.is_set()

    async def process_ring(self) -> int:
        """Process valid descriptors from HEAD on, at most one lap; returns how many completed."""
        s = self.state
        done = 0
        faulted = False
        while s.control & CONTROL_ENABLE and s.ring_size:
            if self._parked:
                # Stopping for a migration: the rest waits for the engine to run again.
                self.doorbell.ring()
                break
            if done == s.ring_size:
                # One lap per batch, so the driver hears from us; come back for the rest.
                self.doorbell.ring()
                break
            if not self.config.bus_master_enabled:
                self._record_error(s, ERR_NO_BUS_MASTER, s.head)
                return done
            index = s.head
            address = s.ring_base + index * DESCRIPTOR_SIZE
            try:
                src, dst, length, flags = await self._fetch(address)
            except VfioUserError:
                self._ring_fault(s, index)
                faulted = True
                break
            if s is not self.state:
                return done  # reset while we waited: this work is void
            if not flags & DESC_VALID:
                break
            code = await self._copy(src, dst, length)
            if s is not self.state:
                return done
            status = DESC_DONE
            if code != ERR_NONE:
                status |= DESC_ERROR | code << 8
                self._record_error(s, code, index)
            try:
                await self._complete(address, status)
            except VfioUserError:
                self._ring_fault(s, index)
                faulted = True
                break
            if s is not self.state:
                return done
            s.head = (index + 1) % s.ring_size
            s.completed = (s.completed + 1) & 0xFFFF_FFFF
            done += 1
            # Let other tasks in between descriptors, and let a reset cancel us.
            await trio.lowlevel.checkpoint()
        if s is not self.state:
            return done  # a reset: no completion to report
        if done:
            s.status |= STATUS_COMPLETION
        if (done or faulted) and s.control & CONTROL_IRQ_ENABLE:
            self.trigger(0, index=PciIrq.MSIX)
        return done

    async def _fetch(self, address: int) -> tuple[int, int, int, int]:
        """(src, dst, length, flags) of the descriptor at ``address``."""
        # Not in memory we map (or not aligned there), or messages asked for: one DMA_READ.
        with contextlib.suppress(VfioUserError, ValueError):
            if not self.dma.prefer_messages:
                with self.dma.view(address, DESCRIPTOR_SIZE) as raw, AtomicView(raw) as words:
                    # The driver sets VALID last: load it with acquire, then read the rest.
                    flags = words.load_u32(FLAGS_OFFSET, MemoryOrder.ACQUIRE)
                    src, dst, length, _, _ = DESCRIPTOR.unpack(raw)
                    return src, dst, length, flags
        src, dst, length, flags, _ = DESCRIPTOR.unpack(
            await self.dma.read(address, DESCRIPTOR_SIZE)
        )
        return src, dst, length, flags

    async def _complete(self, address: int, status: int) -> None:
        """Hand the descriptor back: VALID cleared, then the status (release)."""
        view = None
        if not self.dma.prefer_messages:
            with contextlib.suppress(VfioUserError):
                view = self.dma.view(address, DESCRIPTOR_SIZE, writable=True)
        if view is not None:
            with view as raw, AtomicView(raw) as words:
                words.store_u32(FLAGS_OFFSET, 0, MemoryOrder.RELAXED)
                # Release: a driver that sees DONE sees the cleared VALID and the data.
                words.store_u32(STATUS_OFFSET, status, MemoryOrder.RELEASE)
                return
        await self.dma.write(address + FLAGS_OFFSET, struct.pack("<II", 0, status))

    async def _copy(self, src: int, dst: int, length: int) -> int:
        """Copy guest memory; returns an ERR_* code."""
        if not 0 < length <= MAX_TRANSFER:
            return ERR_BAD_LENGTH
        await self.dma.wait_running()  # a view cannot wait out a migration stop; we can
        if self._copy_direct(src, dst, length):
            return ERR_NONE
        # Not all in fd-backed maps (or a fault, which this path names): through the table.
        try:
            data = await self.dma.read(src, length)
        except VfioUserError:
            return ERR_READ_FAULT
        try:
            await self.dma.write(dst, data)
        except VfioUserError:
            return ERR_WRITE_FAULT
        return ERR_NONE

    def _copy_direct(self, src: int, dst: int, length: int) -> bool:
        """Copy between views, one piece per pair of maps the two ranges cross; False,
        with nothing copied, unless every piece gives both views (fd-backed maps the
        client cannot shrink, or a table that trusts its memory)."""
        if self.dma.prefer_messages:
            return False
        try:
            sources = self.dma.sgl(src, length)
            dests = self.dma.sgl(dst, length, write=True)
        except VfioUserError:
            return False
        # Cut where either side passes from one map to the next: each piece lies in one map
        # on both sides, as a view must.
        cuts = {0} | {seg.iova + seg.length - src for seg in sources}
        cuts |= {seg.iova + seg.length - dst for seg in dests}
        pieces = [(start, end - start) for start, end in itertools.pairwise(sorted(cuts))]
        # All checked before any is copied: a fallback after a partial copy would read a
        # source the copy had already overwritten where the two ranges overlap.
        view_ok = self.dma.can_view
        if not all(
            view_ok(src + start, n) and view_ok(dst + start, n, writable=True)
            for start, n in pieces
        ):
            return False
        for start, n in pieces:
            with (
                self.dma.view(src + start, n) as source,
                self.dma.view(dst + start, n, writable=True) as dest,
            ):
                dest[:] = source
        return True

    def _record_error(self, s: DmaEngineState, code: int, index: int) -> None:
        s.errors = (s.errors + 1) & 0xFFFF_FFFF
        s.error_code = code
        s.error_index = index
        s.status |= STATUS_ERROR

    def _ring_fault(self, s: DmaEngineState, index: int) -> None:
        # A ring we cannot read or write back to: stop rather than guess.
        self._record_error(s, ERR_RING_FAULT, index)
        s.control &= ~CONTROL_ENABLE

    # --- hooks ---------------------------------------------------------------------------

    async def dma_mapped(self, window: DmaWindow) -> None:
        self.windows[window.iova] = window
        log.debug("%s: DMA window %#x+%#x mapped", self.name, window.iova, window.size)

    async def dma_unmapped(self, window: DmaWindow) -> None:
        self.windows.pop(window.iova, None)
        log.debug("%s: DMA window %#x+%#x unmapped", self.name, window.iova, window.size)
        s = self.state
        ring_end = s.ring_base + s.ring_size * DESCRIPTOR_SIZE
        if s.control & CONTROL_ENABLE and s.ring_base < window.end and window.iova < ring_end:
            # The ring goes from under a running engine: stop now, as a fault, rather
            # than at the next doorbell.
            self._ring_fault(s, s.head)
            if s.control & CONTROL_IRQ_ENABLE:
                self.trigger(0, index=PciIrq.MSIX)

    async def reset(self) -> None:
        if self._work is not None:
            self._work.cancel()
        self.state = DmaEngineState()
        # Also the way out of a failed migration (ERROR -> DEVICE_RESET -> RUNNING); the
        # run loop still waits for DMA to be allowed.
        self._unparked.set()

    # --- migration -----------------------------------------------------------------------

    async def on_stop(self) -> None:
        """Quiesce: the descriptor being copied completes, then the engine parks."""
        if not self._parked:
            self._unparked = trio.Event()
        await self._idle.wait()

    async def on_run(self) -> None:
        """Unpark, and look at the ring: work may be waiting (always, on a destination)."""
        self._unparked.set()
        if self.state.control & CONTROL_ENABLE:
            self.doorbell.ring()

    async def save_state(self) -> bytes:
        return self.state.pack()

    async def load_state(self, data: bytes) -> None:
        self.state = DmaEngineState.load(data)
