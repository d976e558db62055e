"""The NVMe controller: BAR0 registers, doorbells, a trio task per submission queue.

BAR0 (64-bit, 16 KiB) holds the controller registers (CAP, VS, INTMS/INTMC, CC, CSTS,
AQA, ASQ, ACQ; NVMe 1.4 section 3.1) and, from 0x1000, the doorbells with a stride of
4 bytes (CAP.DSTRD 0). MSI-X (a vector per queue pair) lives in BAR4; MSI and INTx
are the fallbacks, masked per vector by INTMS/INTMC; interrupt coalescing may hold an
I/O vector back (`coalescing`). Doorbells are served as region writes: the value
written (a new SQ tail or CQ head) is what the controller needs, and an ioeventfd
carries none (QEMU's ``vfio-user-pci`` does not ask for GET_REGION_IO_FDS). Shadow
doorbells (Doorbell Buffer Config) let the host skip most of those writes for its I/O
queues. Held Asynchronous Event Requests complete with Error events (bad doorbells) and
SMART / Health events (a temperature threshold crossed); the Keep Alive Timer
(`keepalive`) stops a controller the host stopped keeping alive.

The guest is untrusted: every register value, queue entry and PRP is checked, a bad
command completes with its status, a bad doorbell write is ignored with a WARNING, and
a queue the controller cannot read or write to sets CSTS.CFS (Controller Fatal Status)
and stops the controller until the host resets it. Nothing the guest does raises out of
the device.
"""

from __future__ import annotations

import logging
import secrets
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial

import trio

from ...protocol.constants import PciIrq
from ...protocol.errors import VfioUserError
from ...server.device import Device
from ...server.pci import PciIdentity
from . import admin, migration, nvm
from .backing import Backing, MemoryBacking
from .coalescing import Coalescing
from .command import Command, Handler, Outcome
from .events import MaskedEvent
from .identify import ControllerInfo
from .keepalive import KeepAlive
from .prp import check_transfer, prp_segments
from .queues import CompletionQueue, SubmissionQueue
from .spec import (
    ACQ,
    AEI_INVALID_DOORBELL,
    AEI_INVALID_VALUE,
    AEI_NAMESPACE_CHANGED,
    AEI_TEMPERATURE,
    AER_ERROR,
    AER_NOTICE,
    AER_SMART,
    AQA,
    ASQ,
    CAP,
    CC,
    CC_AMS_MASK,
    CC_AMS_SHIFT,
    CC_CSS_MASK,
    CC_CSS_SHIFT,
    CC_EN,
    CC_MPS_MASK,
    CC_MPS_SHIFT,
    CC_SHN_MASK,
    CC_SHN_SHIFT,
    CRITICAL_TEMPERATURE,
    CSTS,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_SHIFT,
    DATA_TRANSFER_ERROR,
    DOORBELLS,
    INTERNAL_ERROR,
    INTMC,
    INTMS,
    INVALID_FIELD,
    INVALID_OPCODE,
    NAMESPACE_ATTRIBUTE_NOTICES,
    SHST_COMPLETE,
    SHST_OCCURRING,
    SQE_SIZE,
    SUCCESS,
    VERSION_1_4,
    VS,
    Feature,
    LogPage,
    NvmeError,
    async_event,
)

log = logging.getLogger(__name__)

# 0x1234 is the vendor ID QEMU's test devices use; it is not assigned to us.
# Class 0x010802: mass storage, non-volatile memory, NVM Express I/O controller.
IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x7102, class_code=0x010802, revision=1)

REGISTER_BAR = 0
REGISTER_BAR_SIZE = 0x4000
MSIX_BAR = 4
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800

PAGE_SIZE = 4096  # CAP.MPSMIN = CAP.MPSMAX = 0
#: CAP.MQES + 1: the most entries a queue may have.
MAX_QUEUE_ENTRIES = 1024
#: CAP.TO, in 500 ms units: how long the host waits for CSTS.RDY to follow CC.EN.
READY_TIMEOUT = 30
#: LBA data size (LBADS): 512-byte blocks.
LBA_SHIFT = 9
DEFAULT_SIZE = 64 << 20
DEFAULT_IO_QUEUES = 4

CAP_CQR = 1 << 16
CAP_CSS_NVM = 1 << 37
#: The composite temperature the controller reports (SMART log), in kelvins.
TEMPERATURE = 313


@dataclass
class Stats:
    """What the SMART log counts."""

    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0

    def read(self, count: int) -> None:
        self.bytes_read += count
        self.reads += 1

    def wrote(self, count: int) -> None:
        self.bytes_written += count
        self.writes += 1


class NvmeController(Device):
    """An NVMe 1.4 controller with one namespace of ``backing.size`` bytes.

    ``backing`` defaults to 64 MiB of memory (`MemoryBacking`); `FileBacking` keeps
    the blocks in a file. ``io_queues`` bounds the I/O queue pairs (and MSI-X vectors,
    one more for the admin queue); queues have up to `MAX_QUEUE_ENTRIES` entries and a
    command moves up to 2**MDTS pages (``ControllerInfo.mdts``).
    """

    def __init__(
        self,
        backing: Backing | None = None,
        *,
        io_queues: int = DEFAULT_IO_QUEUES,
        info: ControllerInfo | None = None,
        name: str = "nvme",
    ) -> None:
        super().__init__(IDENTITY, name=name)
        self.backing: Backing = backing if backing is not None else MemoryBacking(DEFAULT_SIZE)
        if self.backing.size <= 0 or self.backing.size % (1 << LBA_SHIFT):
            raise ValueError(f"a namespace is a whole number of {1 << LBA_SHIFT}-byte blocks")
        if not 1 <= io_queues <= 64:
            raise ValueError("io_queues is 1..64")
        self.info = info or ControllerInfo(serial=secrets.token_hex(10))
        self.max_io_queues = io_queues
        self.interrupt_vectors = io_queues + 1
        self.max_queue_entries = MAX_QUEUE_ENTRIES
        self.page_size = PAGE_SIZE
        self.lba_shift = LBA_SHIFT
        self.blocks = self.backing.size >> LBA_SHIFT
        self.max_transfer = PAGE_SIZE << self.info.mdts
        self.stats = Stats()
        self.sqs: dict[int, SubmissionQueue] = {}
        self._nursery: trio.Nursery | None = None
        # Migration quiesce: set while queues may fetch; commands executing hold _idle clear.
        self._unparked = trio.Event()
        self._unparked.set()
        self._busy = 0
        self._idle = trio.Event()
        self._idle.set()
        self.keep_alive = KeepAlive(self._keep_alive_expired, self._spawn)
        self.coalescing = Coalescing(self._raise_vector, self._spawn)
        self._clear()
        self.add_bar(
            REGISTER_BAR, REGISTER_BAR_SIZE, read=self.read_bar0, write=self.write_bar0,
            is_64bit=True,
        )  # fmt: skip
        self.add_bar(MSIX_BAR, MSIX_BAR_SIZE, read=self._read_zeros, write=self._ignore)
        self.add_msix(self.interrupt_vectors, bar=MSIX_BAR, pba_offset=MSIX_PBA_OFFSET)
        # MSI for a driver that leaves MSI-X off: a power of two of vectors, at most 32;
        # a CQ vector beyond them lands where MSI's message data puts it (modulo).
        self.msi_vectors = min(32, 1 << (self.interrupt_vectors - 1).bit_length())
        self.add_msi(self.msi_vectors)
        self.add_intx()
        self.enable_migration()

    def _clear(self) -> None:
        """Power-on state of every register and queue."""
        self.cc = 0
        self.csts = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.intms = 0
        self._clear_queues()

    def _clear_queues(self) -> None:
        """What a controller reset (CC.EN 1 to 0) clears: queues, AERs, features."""
        for sq in self.sqs.values():
            sq.cancel_scope.cancel()
        self.sqs = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.async_events: list[int] = []
        self.features = dict(admin.DEFAULT_FEATURES)
        self.io_sqs_allocated = self.max_io_queues
        self.io_cqs_allocated = self.max_io_queues
        self.intx_held = False
        #: MSI vectors masked by INTMS when they fired: raised when INTMC unmasks them.
        self.msi_held = 0
        #: An error event was reported: no other until the host reads the error log.
        self.error_events_masked = False
        #: SMART / Health (temperature) and Notice (namespace attribute changed) events.
        self.smart = MaskedEvent(async_event(AER_SMART, AEI_TEMPERATURE, LogPage.SMART))
        self.notice = MaskedEvent(
            async_event(AER_NOTICE, AEI_NAMESPACE_CHANGED, LogPage.CHANGED_NAMESPACES)
        )
        self.keep_alive.stop()
        self.coalescing.reset()
        #: Doorbell Buffer Config: (shadow doorbells, event indexes) for the I/O queues.
        self.shadow: tuple[int, int] | None = None

    @property
    def cap(self) -> int:
        return (
            (self.max_queue_entries - 1) | CAP_CQR | READY_TIMEOUT << 24 | CAP_CSS_NVM
        )  # DSTRD, MPSMIN and MPSMAX 0

    # --- registers -----------------------------------------------------------------------

    async def read_bar0(self, offset: int, size: int) -> bytes:
        first = offset & ~3
        words = b"".join(
            self._read_dword(reg).to_bytes(4, "little") for reg in range(first, offset + size, 4)
        )
        return words[offset - first : offset - first + size]

    def _read_dword(self, reg: int) -> int:
        values = {
            CAP: self.cap & 0xFFFF_FFFF,
            CAP + 4: self.cap >> 32,
            VS: VERSION_1_4,
            INTMS: self.intms,
            INTMC: self.intms,
            CC: self.cc,
            CSTS: self.csts,
            AQA: self.aqa,
            ASQ: self.asq & 0xFFFF_FFFF,
            ASQ + 4: self.asq >> 32,
            ACQ: self.acq & 0xFFFF_FFFF,
            ACQ + 4: self.acq >> 32,
        }
        return values.get(reg, 0)  # doorbells and reserved registers read 0

    async def write_bar0(self, offset: int, data: bytes) -> None:
        if offset >= DOORBELLS:
            self._doorbell(offset, data)
            return
        end = offset + len(data)
        for reg in range(offset & ~3, end, 4):
            lo, hi = max(offset, reg), min(end, reg + 4)
            shift = 8 * (lo - reg)
            value = int.from_bytes(data[lo - offset : hi - offset], "little") << shift
            mask = ((1 << 8 * (hi - lo)) - 1) << shift
            await self._write_dword(reg, value, mask)

    async def _write_dword(self, reg: int, value: int, mask: int) -> None:
        def merged(old: int) -> int:
            return (old & ~mask) | (value & mask)

        if reg == CC:
            await self._write_cc(merged(self.cc))
        elif reg == INTMS:
            self.intms |= value & mask
        elif reg == INTMC:
            self.intms &= ~(value & mask)
            if self.intx_held and not self.intms & 1:
                self.intx_held = False
                self.trigger(0, index=PciIrq.INTX)
            released, self.msi_held = self.msi_held & ~self.intms, self.msi_held & self.intms
            for vector in range(self.msi_vectors):
                if released >> vector & 1:
                    self.trigger(vector, index=PciIrq.MSI)
        elif reg == AQA:
            self.aqa = merged(self.aqa) & 0x0FFF_0FFF
        elif reg in (ASQ, ASQ + 4):
            self.asq = _merge64(self.asq, reg - ASQ, merged)
        elif reg in (ACQ, ACQ + 4):
            self.acq = _merge64(self.acq, reg - ACQ, merged)
        # CAP, VS, CSTS are read-only; NSSR is not supported (CAP.NSSRS 0).

    async def _write_cc(self, new: int) -> None:
        old, self.cc = self.cc, new
        if old & CC_EN and not new & CC_EN:
            self._clear_queues()
            self.csts = 0
        elif new & CC_EN and not old & CC_EN:
            self._enable()
        shn = (new >> CC_SHN_SHIFT) & CC_SHN_MASK
        if shn and not (old >> CC_SHN_SHIFT) & CC_SHN_MASK:
            self._set_shst(SHST_OCCURRING)
            self._spawn(self._shut_down)

    def _set_shst(self, shst: int) -> None:
        self.csts = (self.csts & ~(0x3 << CSTS_SHST_SHIFT)) | shst << CSTS_SHST_SHIFT

    async def _shut_down(self) -> None:
        """Shutdown notification: what the cache holds reaches the backing, then SHST."""
        try:
            await self.backing.flush()
        except OSError as error:
            log.warning("%s: flush at shutdown failed: %s", self.name, error)
        if (self.cc >> CC_SHN_SHIFT) & CC_SHN_MASK:
            self._set_shst(SHST_COMPLETE)

    def _enable(self) -> None:
        """CC.EN 0 to 1: check the configuration, set up the admin queues, CSTS.RDY."""
        cc = self.cc
        asqs, acqs = (self.aqa & 0xFFF) + 1, (self.aqa >> 16) + 1
        problems = [
            ((cc >> CC_CSS_SHIFT) & CC_CSS_MASK != 0, "CC.CSS is not the NVM command set"),
            ((cc >> CC_MPS_SHIFT) & CC_MPS_MASK != 0, "CC.MPS is not 4 KiB"),
            ((cc >> CC_AMS_SHIFT) & CC_AMS_MASK != 0, "CC.AMS is not round robin"),
            (asqs < 2 or acqs < 2, "an admin queue of one entry (AQA)"),
            (bool(self.asq % PAGE_SIZE or self.acq % PAGE_SIZE), "ASQ/ACQ not page aligned"),
        ]
        for bad, reason in problems:
            if bad:
                self._fatal(f"cannot enable: {reason}")
                return
        self.csts = 0
        cq = CompletionQueue(0, self.acq, acqs, 0, True)
        self.cqs[0] = cq
        self.start_queue(SubmissionQueue(0, self.asq, asqs, cq))
        self.csts = CSTS_RDY

    def _fatal(self, reason: str) -> None:
        """Controller Fatal Status: stop every queue until the host resets us."""
        log.warning("%s: controller fatal status: %s", self.name, reason)
        self.csts |= CSTS_CFS
        for sq in self.sqs.values():
            sq.cancel_scope.cancel()

    def _doorbell(self, offset: int, data: bytes) -> None:
        index, misaligned = divmod(offset - DOORBELLS, 4)
        if misaligned or len(data) != 4:
            log.warning("%s: doorbell write of %d bytes at %#x ignored", self.name, len(data),
                        offset)  # fmt: skip
            return
        qid, is_cq = divmod(index, 2)
        value = int.from_bytes(data, "little")
        queue: SubmissionQueue | CompletionQueue | None = (self.cqs if is_cq else self.sqs).get(qid)
        kind = "CQ head" if is_cq else "SQ tail"
        if not self.csts & CSTS_RDY:
            log.warning("%s: %s doorbell of queue %d written while the controller is not "
                        "ready: ignored", self.name, kind, qid)  # fmt: skip
            return
        if queue is None:
            self._invalid_doorbell(AEI_INVALID_DOORBELL, f"{kind} doorbell of no queue {qid}")
            return
        # A CQ head may move up to the tail, not past it (that would free slots we never
        # filled); an SQ tail is any slot of the queue.
        if value >= queue.size or (
            isinstance(queue, CompletionQueue)
            and (value - queue.head) % queue.size > (queue.tail - queue.head) % queue.size
        ):
            self._invalid_doorbell(AEI_INVALID_VALUE, f"{kind} doorbell of queue {qid} "
                                   f"written {value}")  # fmt: skip
            return
        if isinstance(queue, CompletionQueue):
            queue.set_head(value)
            if queue.pending:
                self._spawn(partial(self._post, queue))
        else:
            queue.set_tail(value)

    def _invalid_doorbell(self, info: int, reason: str) -> None:
        """Ignore the write; tell the host with an error event if it asked for events."""
        log.warning("%s: %s: ignored", self.name, reason)
        if self.error_events_masked or not self.async_events:
            return  # one error event until the host reads the error log; dropped meanwhile
        self.error_events_masked = True
        self._complete_aer(async_event(AER_ERROR, info, LogPage.ERROR))

    def _complete_aer(self, result: int) -> None:
        """Complete the oldest held Asynchronous Event Request with event ``result``."""
        cid = self.async_events.pop(0)
        admin_cq = self.cqs[0]
        admin_cq.pending.append((result, self.sqs[0].head, 0, cid, SUCCESS))
        self._spawn(partial(self._post, admin_cq))

    # --- SMART / Health events and Keep Alive --------------------------------------------

    def temperature_warning(self) -> bool:
        """SMART Critical Warning bit 1: the temperature is at or past a threshold."""
        thresholds = self.features[Feature.TEMPERATURE_THRESHOLD]
        over, under = thresholds & 0xFFFF, thresholds >> 16
        return over <= TEMPERATURE or under >= TEMPERATURE

    def smart_event(self) -> None:
        """The temperature warning arose: an event, if Async Event Configuration asks."""
        self._raise_event(self.smart, CRITICAL_TEMPERATURE)

    def _raise_event(self, event: MaskedEvent, enabled_by: int) -> None:
        if self.features[Feature.ASYNC_EVENT_CONFIGURATION] & enabled_by:
            event.pending = True
            self.deliver_events()

    def deliver_events(self) -> None:
        """Waiting events complete held AERs, each unless its kind is masked."""
        for event in (self.smart, self.notice):
            if not self.async_events:
                return
            result = event.take()
            if result is not None:
                self._complete_aer(result)

    async def grow(self, size: int) -> None:
        """The namespace grows to ``size`` bytes (whole blocks, at least its size now):
        Identify Namespace reports it, and a Namespace Attribute Changed notice goes to
        the host if Async Event Configuration asks (log page 04h lists namespace 1)."""
        if size < self.backing.size or size % (1 << self.lba_shift):
            raise ValueError(f"{self.name}: cannot grow {self.backing.size} bytes to {size}")
        await self.backing.grow(size)
        self.blocks = size >> self.lba_shift
        self._raise_event(self.notice, NAMESPACE_ATTRIBUTE_NOTICES)

    def _keep_alive_expired(self) -> None:
        self._fatal(f"keep alive timer expired: no Keep Alive within "
                    f"{self.features[Feature.KEEP_ALIVE_TIMER]} ms")  # fmt: skip

    async def _read_zeros(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def _ignore(self, offset: int, data: bytes) -> None:
        pass

    # --- queues --------------------------------------------------------------------------

    def _spawn(self, task: Callable[[], Awaitable[object]]) -> None:
        if self._nursery is None:
            raise RuntimeError(f"{self.name}: the controller is not running (serve it)")
        self._nursery.start_soon(task)

    def start_queue(self, sq: SubmissionQueue) -> None:
        """Serve ``sq`` in its own task."""
        self.sqs[sq.qid] = sq
        sq.cq.sqs.add(sq.qid)
        self._spawn(partial(self._serve, sq))

    def stop_queue(self, sq: SubmissionQueue) -> None:
        """Delete ``sq``: its task stops, commands it has not completed are dropped."""
        sq.cancel_scope.cancel()
        del self.sqs[sq.qid]
        sq.cq.sqs.discard(sq.qid)

    async def _serve(self, sq: SubmissionQueue) -> None:
        handlers = admin.HANDLERS if sq.qid == 0 else nvm.HANDLERS
        with sq.cancel_scope:
            try:
                await self._serve_queue(sq, handlers)
            except VfioUserError as error:  # shadow doorbells out of reach
                self._fatal(f"SQ {sq.qid} doorbell buffer unreachable: {error}")
            except Exception:
                # A bug of ours must not take the device (or the process) down with it.
                log.exception("%s: SQ %d failed", self.name, sq.qid)
                self._fatal(f"SQ {sq.qid} stopped by an internal error")

    async def _serve_queue(self, sq: SubmissionQueue, handlers: Mapping[int, Handler]) -> None:
        while True:
            await self._wait_for_entries(sq)
            while sq.cq.backlogged:
                await sq.cq.wait_for_room()
            await self._unparked.wait()  # stopped for a migration: fetch nothing
            if not self._busy:
                self._idle = trio.Event()
            self._busy += 1
            try:
                await self._fetch_and_execute(sq, handlers)
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()
            await self._post(sq.cq)

    async def _wait_for_entries(self, sq: SubmissionQueue) -> None:
        """Until ``sq`` holds entries: from its doorbell, or its shadow doorbell.

        With shadow doorbells the host rings only when the tail passes the event index,
        so the controller reads the shadow tail after each command, and before it
        sleeps sets the event index to where it stopped and looks once more (the host
        may have written the shadow meanwhile).
        """
        while True:
            if self.shadow is not None and sq.qid:
                await self._shadow_tail(sq)
                if sq.empty:
                    await self._shadow_write(self.shadow[1], 2 * sq.qid, sq.tail)
                    await self._shadow_tail(sq)
            if not sq.empty:
                return
            await sq.wait_rung()

    async def _shadow_tail(self, sq: SubmissionQueue) -> None:
        assert self.shadow is not None
        value = await self._shadow_read(self.shadow[0], 2 * sq.qid)
        if value < sq.size:
            sq.tail = value
        elif not sq.bad_shadow:
            sq.bad_shadow = True  # once per queue: the guest may leave it so for long
            log.warning("%s: shadow SQ tail of queue %d is %d, beyond its %d entries: "
                        "ignored", self.name, sq.qid, value, sq.size)  # fmt: skip

    async def _shadow_head(self, cq: CompletionQueue) -> None:
        assert self.shadow is not None
        value = await self._shadow_read(self.shadow[0], 2 * cq.qid + 1)
        if value < cq.size:
            cq.head = value

    async def _shadow_read(self, base: int, index: int) -> int:
        raw = await self.dma.read(base + 4 * index, 4)
        return int.from_bytes(raw, "little")

    async def _shadow_write(self, base: int, index: int, value: int) -> None:
        await self.dma.write(base + 4 * index, value.to_bytes(4, "little"))

    async def _fetch_and_execute(
        self, sq: SubmissionQueue, handlers: Mapping[int, Handler]
    ) -> None:
        address = sq.take()
        try:
            raw = await self.dma.read(address, SQE_SIZE)
        except VfioUserError as error:
            self._fatal(f"SQ {sq.qid} entry at {address:#x} unreadable: {error}")
            return
        cmd = Command.parse(raw)
        outcome = await self._execute(sq, cmd, handlers)
        if outcome is not None:
            sq.cq.pending.append((outcome[1], sq.head, sq.qid, cmd.cid, outcome[0]))

    async def _execute(
        self, sq: SubmissionQueue, cmd: Command, handlers: Mapping[int, Handler]
    ) -> Outcome:
        handler = handlers.get(cmd.opcode)
        if handler is None:
            return INVALID_OPCODE, 0
        if cmd.fuse or cmd.psdt:
            return INVALID_FIELD, 0  # no fused commands, no SGLs
        try:
            return await handler(self, cmd)
        except NvmeError as error:
            log.debug("%s: SQ %d command %#x (cid %d): %s", self.name, sq.qid, cmd.opcode,
                      cmd.cid, error.reason)  # fmt: skip
            return error.status, 0
        except OSError as error:
            log.warning("%s: SQ %d command %#x: backing failed: %s", self.name, sq.qid,
                        cmd.opcode, error)  # fmt: skip
            return INTERNAL_ERROR, 0
        except Exception:
            log.exception("%s: SQ %d command %#x failed", self.name, sq.qid, cmd.opcode)
            return INTERNAL_ERROR, 0

    async def _post(self, cq: CompletionQueue) -> None:
        """Post the completions waiting for ``cq`` while it has room; then interrupt."""
        posted = 0
        async with cq.lock:
            if cq.pending and cq.full and self.shadow is not None and cq.qid:
                await self._room_from_shadow(cq)
            while cq.pending and not cq.full:
                result, sq_head, sqid, cid, status = cq.pending[0]
                try:
                    await self.dma.write(
                        cq.slot(cq.tail), cq.entry(result, sq_head, sqid, cid, status)
                    )
                except VfioUserError as error:
                    self._fatal(f"CQ {cq.qid} slot {cq.tail} unwritable: {error}")
                    return
                cq.pending.popleft()
                cq.advance()
                posted += 1
        if posted:
            cq.notify()
            self._interrupt(cq, posted)

    async def _room_from_shadow(self, cq: CompletionQueue) -> None:
        """A full CQ under shadow doorbells: the host's head is in memory; if it has not
        moved, ask for a ring when it does (event index) and look once more."""
        assert self.shadow is not None
        try:
            await self._shadow_head(cq)
            if cq.full:
                await self._shadow_write(self.shadow[1], 2 * cq.qid + 1, cq.head)
                await self._shadow_head(cq)
        except VfioUserError as error:
            self._fatal(f"shadow doorbells of CQ {cq.qid} unreachable: {error}")

    def _interrupt(self, cq: CompletionQueue, entries: int) -> None:
        """``entries`` were posted to ``cq``: its vector's interrupt, now or coalesced."""
        if not cq.interrupts:
            return
        disabled = self.features[Feature.INTERRUPT_VECTOR_CONFIGURATION]
        applies = cq.vector != 0 and not disabled >> cq.vector & 1
        setting = self.features[Feature.INTERRUPT_COALESCING]
        self.coalescing.posted(cq.vector, entries, setting, applies)

    def _raise_vector(self, vector: int) -> None:
        """MSI-X; else MSI or INTx, where INTMS masks (NVMe 1.4, 3.1.3 and 3.1.4)."""
        index = self.active_irq_index()
        if index == PciIrq.MSIX:
            self.trigger(vector, index=PciIrq.MSIX)
        elif index == PciIrq.MSI:
            vector %= self.msi_vectors
            if self.intms >> vector & 1:
                self.msi_held |= 1 << vector
            else:
                self.trigger(vector, index=PciIrq.MSI)
        elif self.intms & 1:
            self.intx_held = True  # masked by INTMS: raised when INTMC clears it
        else:
            self.trigger(0)

    # --- data ----------------------------------------------------------------------------

    def check_transfer(self, length: int) -> None:
        check_transfer(length, self.max_transfer)

    async def to_host(self, cmd: Command, data: bytes) -> None:
        """Write ``data`` where the command's PRPs point."""
        done = 0
        for address, size in await self._segments(cmd, len(data)):
            try:
                await self.dma.write(address, data[done : done + size])
            except VfioUserError as error:
                raise NvmeError(DATA_TRANSFER_ERROR, f"write to {address:#x}: {error}") from None
            done += size

    async def from_host(self, cmd: Command, length: int) -> bytes:
        """The ``length`` bytes the command's PRPs point at."""
        pieces = []
        for address, size in await self._segments(cmd, length):
            try:
                pieces.append(await self.dma.read(address, size))
            except VfioUserError as error:
                raise NvmeError(DATA_TRANSFER_ERROR, f"read of {address:#x}: {error}") from None
        return b"".join(pieces)

    async def _segments(self, cmd: Command, length: int) -> list[tuple[int, int]]:
        return await prp_segments(cmd.prp1, cmd.prp2, length, self.page_size, self.dma.read)

    def smart_log(self) -> bytes:
        """SMART / Health Information (log page 02h): healthy, cool, with I/O counts."""
        log_page = bytearray(512)
        warning = CRITICAL_TEMPERATURE if self.temperature_warning() else 0
        struct.pack_into("<BHBB", log_page, 0, warning, TEMPERATURE, 100, 10)  # spare 100%
        units = [-(-n // 512_000) for n in (self.stats.bytes_read, self.stats.bytes_written)]
        for i, value in enumerate([*units, self.stats.reads, self.stats.writes]):
            log_page[32 + 16 * i : 48 + 16 * i] = value.to_bytes(16, "little")
        return bytes(log_page)

    # --- hooks ---------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def reset(self) -> None:
        """DEVICE_RESET (and a bus reset): every register and queue to power-on."""
        self._clear()
        self._unparked.set()  # also the way out of a failed migration (ERROR)

    # --- migration -----------------------------------------------------------------------

    async def on_stop(self) -> None:
        """Quiesce: commands being executed finish, then no queue fetches more.

        Their completions, and any the host had no room for, travel with the state and
        are posted by the destination once it runs. Interrupts held back by coalescing are
        raised now (what a stopped device raises waits for it to run); the Keep Alive Timer
        rests until the controller runs again.
        """
        if self._unparked.is_set():
            self._unparked = trio.Event()
        await self._idle.wait()
        self.coalescing.flush()
        self.keep_alive.stop()

    async def on_run(self) -> None:
        self._unparked.set()
        if self.csts & CSTS_RDY:
            self.keep_alive.start(self.features[Feature.KEEP_ALIVE_TIMER])
        for cq in self.cqs.values():
            if cq.pending:
                self._spawn(partial(self._post, cq))

    async def save_chunks(self) -> AsyncIterator[bytes]:
        async for chunk in migration.save_chunks(self):
            yield chunk

    async def load_state(self, data: bytes) -> None:
        await migration.restore(self, data)

    def restore_state(
        self,
        *,
        registers: tuple[int, int, int, int, int, int],
        allocated: tuple[int, int],
        features: dict[int, int],
        async_events: list[int],
        intx_held: bool,
        stats: list[int],
        cqs: dict[int, CompletionQueue],
        sqs: dict[int, SubmissionQueue],
        shadow: tuple[int, int] | None,
        error_events_masked: bool,
        smart_events: tuple[bool, bool] = (False, False),
        notice_events: tuple[bool, bool] = (False, False),
        msi_held: int = 0,
    ) -> None:
        """Take a checked migration state (`migration.restore`); queues start parked."""
        self._clear()
        if self._unparked.is_set():
            self._unparked = trio.Event()
        self.cc, self.csts, self.aqa, self.asq, self.acq, self.intms = registers
        self.io_sqs_allocated, self.io_cqs_allocated = allocated
        self.features = features
        self.async_events = async_events
        self.intx_held = intx_held
        self.msi_held = msi_held
        self.stats = Stats(*stats)
        self.cqs = cqs
        self.shadow = shadow
        self.error_events_masked = error_events_masked
        self.smart.pending, self.smart.masked = smart_events
        self.notice.pending, self.notice.masked = notice_events
        for sq in sqs.values():
            self.start_queue(sq)

    async def detached(self) -> None:
        """The client went with its guest memory: nothing the queues point at stays."""
        self._clear()

    def close(self) -> None:
        super().close()
        self.backing.close()


def _merge64(old: int, half: int, merged: Callable[[int], int]) -> int:
    """A 64-bit register with one 32-bit half (``half`` 0 or 4) rewritten by ``merged``."""
    shift = 8 * half
    word = merged((old >> shift) & 0xFFFF_FFFF)
    return (old & ~(0xFFFF_FFFF << shift)) | (word << shift)
