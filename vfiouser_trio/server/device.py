"""The base class of an emulated PCI device served over vfio-user.

A device declares what it is in ``__init__`` (identity, BARs and other regions,
interrupts, capabilities, doorbells) and implements async hooks (region callbacks,
``reset``, ``attached``/``detached``, ``run``). It knows nothing about sockets: the
server session turns client commands into calls on it.

    class Counter(Device):
        def __init__(self) -> None:
            super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x0001))
            self.count = 0
            self.add_bar(0, 0x1000, read=self.read_bar0, write=self.write_bar0)
            self.add_msix(1, bar=1)

        async def read_bar0(self, offset: int, size: int) -> bytes:
            return self.count.to_bytes(8, "little")[:size]

        async def write_bar0(self, offset: int, data: bytes) -> None:
            self.count += 1
            self.trigger(0)
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Sequence

import trio

from ..protocol.constants import PCI_NUM_IRQS, PCI_NUM_REGIONS, PciIrq, PciRegion
from .device_errors import DeviceErrors
from .dma import DmaTable
from .dma_hooks import DmaHooks
from .doorbells import Doorbell
from .irqs import DEFAULT_IRQ_COUNTS, INTX_EDGE_FLAGS, IrqIndex, IrqTable
from .migration import MigrationHooks
from .pci import BarSpec, InterruptPin, PciConfigSpace, PciIdentity
from .pci_caps import Capability, MsiCapability, MsixCapability
from .regions import (
    Overlay,
    ReadHandler,
    Region,
    RegionMemory,
    RegionType,
    SparseArea,
    WriteHandler,
)

log = logging.getLogger(__name__)


class Device(DmaHooks, MigrationHooks):
    """An emulated PCI function. Subclass it; declare regions and IRQs in ``__init__``.

    Live migration: call ``enable_migration()`` and override the hooks of
    :class:`~vfiouser_trio.server.migration.MigrationHooks` (``save_state``/``load_state``...).
    """

    def __init__(
        self,
        identity: PciIdentity,
        *,
        express: bool = False,
        interrupt_pin: int = InterruptPin.NONE,
        name: str | None = None,
        reset_supported: bool = True,
    ) -> None:
        self.identity = identity
        self.name = name or type(self).__name__
        self.reset_supported = reset_supported
        self.regions: dict[int, Region] = {}
        self.dma = DmaTable(name=self.name)
        self._express = express
        self._interrupt_pin = int(interrupt_pin)
        self._bars: dict[int, BarSpec] = {}
        self._rom_size: int | None = None
        self._capabilities: list[Capability] = []
        self._irq_counts: dict[int, tuple[int, int | None]] = {}
        self._config: PciConfigSpace | None = None
        self._irqs: IrqTable | None = None
        self._msix_table_driven = False
        self._quiesced = False
        # Where the declarations were frozen (see _declaring), and where device bugs go.
        self._built_by: str | None = None
        self._errors = DeviceErrors(self.name)
        if self._interrupt_pin:
            self._irq_counts[PciIrq.INTX] = (1, None)
        for index, count in DEFAULT_IRQ_COUNTS.items():  # ERR and REQ: see add_irq
            self._irq_counts[index] = (count, None)

    # --- declaration (call from __init__) ------------------------------------------------

    def _declaring(self) -> None:
        if self._config is not None:
            raise RuntimeError(
                f"{self.name}: too late to declare: the declarations were frozen by "
                f"{self._built_by or 'serving the device'}. Declare every region, IRQ and "
                "capability first (config, irqs, region(), num_regions, trigger() and "
                "active_irq_index() build the device from them)"
            )

    def _refuse(self, where: str, problem: str, fix: str) -> ValueError:
        """A declaration error naming the device, what is declared, and the fix."""
        return ValueError(f"{self.name}: {where}: {problem}; {fix}")

    def _check_handlers(self, where: str, **handlers: object) -> None:
        for kind, handler in handlers.items():
            if handler is not None and not callable(handler):
                raise self._refuse(
                    where,
                    f"{kind}={handler!r} is not callable",
                    f"pass a method such as {kind}=self.{kind}_handler (async def or plain def)",
                )

    def add_bar(
        self,
        bar: int,
        size: int,
        *,
        read: ReadHandler | None = None,
        write: WriteHandler | None = None,
        memory: bool = False,
        mmap: bool = False,
        sparse: Sequence[SparseArea] = (),
        io: bool = False,
        is_64bit: bool = False,
        prefetchable: bool = False,
    ) -> Region:
        """Declare BAR ``bar`` (0-5) of ``size`` bytes (a power of two).

        Served by ``read``/``write`` callbacks, by ``memory`` (a memfd the device
        reaches as ``region.memory.view``; ``mmap`` lets the client map it, only the
        ``sparse`` areas when given), or both. A callback is an ``async def`` or a plain
        function (called on the event loop: it must not block). A callback that raises,
        or a read returning other than the bytes asked for, answers the client EIO and is
        logged at WARNING with its traceback (see ``server/device_errors.py``).
        """
        self._declaring()
        if not 0 <= bar <= PciRegion.BAR5:
            raise ValueError(f"{self.name}: BAR {bar}: BARs are numbered 0..5")
        try:
            spec = BarSpec(size, io=io, is_64bit=is_64bit, prefetchable=prefetchable)
        except ValueError as exc:
            raise ValueError(f"{self.name}: BAR {bar}: {exc}") from None
        self._bars[bar] = spec
        return self._add(
            bar,
            size,
            read=read,
            write=write,
            memory=memory,
            mmap=mmap,
            sparse=sparse,
            region_type=None,
        )

    def add_rom(self, size: int, *, read: ReadHandler | None = None, data: bytes = b"") -> Region:
        """Declare an expansion ROM (read-only); ``data`` fills its memory when no callback."""
        self._declaring()
        self._rom_size = size
        region = self._add(
            PciRegion.ROM,
            size,
            read=read,
            write=None,
            memory=read is None,
            mmap=False,
            sparse=(),
            region_type=None,
        )
        region.writable = False
        if data and region.memory is not None:
            region.memory.view[: len(data)] = data
        return region

    def add_region(
        self,
        index: int,
        size: int,
        *,
        read: ReadHandler | None = None,
        write: WriteHandler | None = None,
        memory: bool = False,
        mmap: bool = False,
        sparse: Sequence[SparseArea] = (),
        region_type: RegionType | None = None,
    ) -> Region:
        """Declare the VGA region (8) or a device-specific region (9 and up, with a type)."""
        self._declaring()
        if index < PciRegion.VGA:
            raise ValueError("use add_bar / add_rom for regions 0-6; region 7 is config space")
        if index > PciRegion.VGA and region_type is None:
            raise ValueError("device-specific regions need a region_type")
        return self._add(
            index,
            size,
            read=read,
            write=write,
            memory=memory,
            mmap=mmap,
            sparse=sparse,
            region_type=region_type,
        )

    def _add(
        self,
        index: int,
        size: int,
        *,
        read: ReadHandler | None,
        write: WriteHandler | None,
        memory: bool,
        mmap: bool,
        sparse: Sequence[SparseArea],
        region_type: RegionType | None,
    ) -> Region:
        if index in self.regions:
            raise ValueError(f"{self.name}: region {index} is declared twice")
        self._check_handlers(f"region {index}", read=read, write=write)
        if mmap or sparse:
            memory = True
        backing = RegionMemory(f"{self.name}-region{index}", size) if memory else None
        region = Region(
            index,
            size,
            read=read,
            write=write,
            memory=backing,
            mmap=mmap or bool(sparse),
            sparse=tuple(sparse),
            region_type=region_type,
            errors=self._errors,
        )
        self.regions[index] = region
        return region

    def add_irq(self, index: int, count: int, *, flags: int | None = None) -> None:
        """Declare IRQ ``index`` (INTx, MSI, MSI-X, ERR, REQ, ...) with ``count`` vectors.

        Every device declares ERR and REQ with one vector each (``DEFAULT_IRQ_COUNTS`` in
        ``server/irqs.py``), as QEMU expects of a device with error recovery: the client
        gives each an eventfd, ``trigger(0, index=PciIrq.ERR)`` reports an unrecoverable
        error (QEMU stops the guest) and ``trigger(0, index=PciIrq.REQ)`` asks the client
        to release the device (QEMU's vfio-pci unplugs it). ``add_irq(PciIrq.ERR, 0)``
        opts out.
        """
        self._declaring()
        self._irq_counts[index] = (count, flags)

    def add_intx(self, pin: int = InterruptPin.INTA, *, automask: bool = True) -> None:
        """Use a legacy INTx pin (INTA by default).

        ``automask=True`` (the default) is Linux vfio-pci's level-style INTx, reported as
        MASKABLE|AUTOMASKED: each delivered interrupt masks INTx until the client unmasks
        it (SET_IRQS UNMASK; QEMU sends it after each guest EOI), and triggers meanwhile
        are held pending. ``automask=False`` (MASKABLE only) delivers every trigger unless
        the client masked INTx itself: for clients that never unmask, such as
        libvfio-user's samples/client. Either way a client that enables INTx (gives it an
        eventfd) finds it unmasked, also on a migration destination (see
        ``vfiouser_trio.server.irqs``).
        """
        self._declaring()
        self._interrupt_pin = int(pin)
        self._irq_counts[PciIrq.INTX] = (1, None if automask else INTX_EDGE_FLAGS)

    def add_msi(self, vectors: int = 1, *, per_vector_masking: bool = False) -> None:
        """Add an MSI capability with ``vectors`` (1..32, a power of two)."""
        self._declaring()
        self._capabilities.append(MsiCapability(vectors, per_vector_masking=per_vector_masking))
        self._irq_counts[PciIrq.MSI] = (vectors, None)

    def add_msix(
        self,
        vectors: int,
        *,
        bar: int,
        table_offset: int | None = None,
        pba_bar: int | None = None,
        pba_offset: int | None = None,
    ) -> None:
        """Add MSI-X with its table (and PBA) in a memory BAR declared with ``add_bar``.

        The framework serves the table (at ``table_offset``, 0 by default) and the PBA
        (right after the table unless ``pba_bar``/``pba_offset`` say otherwise); the rest
        of the BAR stays the device's. Both must fit in their BAR and stay out of its
        sparse mmap areas. In a BAR the device serves itself (callbacks or memory), the
        framework's bytes would hide the device's there: place the structures explicitly
        (``table_offset`` or ``pba_offset``) to say that is the layout meant.
        """
        self._declaring()
        try:
            cap = MsixCapability(
                vectors,
                table_bar=bar,
                table_offset=table_offset or 0,
                pba_bar=pba_bar,
                pba_offset=pba_offset,
            )
        except ValueError as exc:
            raise ValueError(f"{self.name}: MSI-X: {exc}") from None
        placed = table_offset is not None or pba_offset is not None
        self._check_msix_area("table", cap.table_bar, cap.table_offset, 16 * vectors, placed)
        self._check_msix_area("PBA", cap.pba_bir, cap.pba_start, cap.pba_size, placed)
        self._capabilities.append(cap)
        self._irq_counts[PciIrq.MSIX] = (vectors, None)

    def _check_msix_area(self, what: str, bar: int, offset: int, size: int, placed: bool) -> None:
        where = f"MSI-X {what} at BAR {bar} {offset:#x}+{size:#x}"
        region = self.regions.get(bar)
        if region is None or bar > PciRegion.BAR5:
            raise self._refuse(where, f"BAR {bar} is not declared", "call add_bar first")
        if offset + size > region.size:
            raise self._refuse(
                where, f"beyond the BAR's {region.size:#x} bytes", "make the BAR larger"
            )
        for area in region.sparse:
            if offset < area.offset + area.size and area.offset < offset + size:
                raise self._refuse(
                    where,
                    f"overlaps the sparse mmap area {area.offset:#x}+{area.size:#x} (the client "
                    "would map it and bypass the framework)",
                    "move the table/PBA out of the sparse areas",
                )
        if not placed and (region.read or region.write or region.memory):
            raise self._refuse(
                where,
                f"the framework would serve these bytes and hide BAR {bar}'s own "
                "callbacks/memory there",
                "give MSI-X a BAR of its own (add_bar(N, 0x1000); add_msix(..., bar=N)), or "
                "place it explicitly with table_offset=/pba_offset= if that is the layout meant",
            )

    def add_capability(self, capability: Capability) -> None:
        """Add any other capability (power management, PCI Express, vendor-specific, ...)."""
        self._declaring()
        self._capabilities.append(capability)

    def add_doorbell(
        self, region: int, offset: int, *, size: int = 4, datamatch: int | None = None
    ) -> Doorbell:
        """Declare a doorbell: an ioeventfd the client may wire up (GET_REGION_IO_FDS).

        Await ``doorbell.wait()`` in the device; a plain REGION_WRITE there rings it too.
        """
        self._declaring()
        target = self.regions[region]
        if offset < 0 or offset + size > target.size:
            raise ValueError("doorbell beyond its region")
        bell = Doorbell(offset, size, datamatch)
        target.doorbells.append(bell)
        return bell

    # --- built state ---------------------------------------------------------------------

    def _build(self, cause: str = "serving the device") -> None:
        """Freeze the declarations into config space, the config region and the IRQ table."""
        if self._config is not None:
            return
        caller = _caller()
        self._built_by = f"{cause} at {caller}" if caller else "serving the device"
        self._errors.device = self.name
        config = PciConfigSpace(
            self.identity,
            bars=self._bars,
            rom_size=self._rom_size,
            interrupt_pin=self._interrupt_pin,
            express=self._express,
            capabilities=self._capabilities,
        )
        self._config = config

        async def read_config(offset: int, size: int) -> bytes:
            return config.read(offset, size)

        async def write_config(offset: int, data: bytes) -> None:
            config.write(offset, data)

        self.regions[PciRegion.CONFIG] = Region(
            PciRegion.CONFIG,
            config.size,
            read=read_config,
            write=write_config,
            errors=self._errors,
        )
        indexes = [
            IrqIndex(index, *self._irq_counts.get(index, (0, None)))
            for index in range(max(PCI_NUM_IRQS, max(self._irq_counts, default=0) + 1))
        ]
        self._irqs = IrqTable(indexes)
        for irq in indexes:
            irq.set_gate(self._irq_gate)
            irq.owner = self.name  # named in its log lines
        if config.msix is not None:
            self._attach_msix(config)

    def _attach_msix(self, config: PciConfigSpace) -> None:
        msix = config.msix
        placed = config.find_capability(MsixCapability)
        assert msix is not None and placed is not None
        cap = placed.capability
        assert isinstance(cap, MsixCapability)
        msix.deliver = self._deliver_msix

        def table_write(offset: int, data: bytes) -> None:
            # From the first table write on, the client drives MSI-X through our table.
            self._msix_table_driven = True
            msix.table_write(offset, data)

        self.regions[cap.table_bar].overlays.append(
            Overlay(cap.table_offset, msix.table_size, msix.table_read, table_write)
        )
        self.regions[cap.pba_bir].overlays.append(
            Overlay(cap.pba_start, msix.pba_size, msix.pba_read, msix.pba_write)
        )

    @property
    def config(self) -> PciConfigSpace:
        """The device's PCI configuration space (built on first use)."""
        self._build("reading config")
        assert self._config is not None
        return self._config

    @property
    def irqs(self) -> IrqTable:
        """The device's IRQ indexes (built on first use)."""
        self._build("reading irqs")
        assert self._irqs is not None
        return self._irqs

    @property
    def num_regions(self) -> int:
        self._build("reading num_regions")
        return max(PCI_NUM_REGIONS, max(self.regions) + 1)

    def region(self, index: int) -> Region | None:
        self._build("calling region()")
        return self.regions.get(index)

    # --- interrupts ------------------------------------------------------------------------

    def _irq_gate(self, vector: int) -> bool:
        return not self._quiesced

    def _deliver_msix(self, vector: int) -> None:
        self.irqs[PciIrq.MSIX].trigger(vector)

    def active_irq_index(self) -> int:
        """The interrupt mode the guest enabled: MSI-X, else MSI, else INTx."""
        config = self.config
        if config.msix is not None and config.msix_enabled:
            return PciIrq.MSIX
        if config.msi is not None and config.msi_enabled:
            return PciIrq.MSI
        # Clients that emulate the capabilities themselves may only have assigned eventfds.
        for index in (PciIrq.MSIX, PciIrq.MSI):
            irq = self.irqs.get(index)
            if irq is not None and any(irq.has_eventfd(v) for v in range(irq.count)):
                return index
        return PciIrq.INTX

    def trigger(self, vector: int = 0, *, index: int | None = None) -> bool:
        """Raise interrupt ``vector``; True if it was delivered now.

        ``index`` defaults to the mode the guest enabled (see ``active_irq_index``);
        when no enabled mode has ``vector`` (the driver has not set interrupts up
        yet) the interrupt goes nowhere, as on hardware, and False is returned. An
        explicit ``index`` without that vector is a device bug: ValueError.
        Masked vectors (vfio-level, or in our MSI/MSI-X structures when the client
        programs them through us) and a quiesced device hold the interrupt pending.
        """
        if index is None:
            index = self.active_irq_index()
            irq = self.irqs.get(index)
            if irq is None or not 0 <= vector < irq.count:
                return False
        config = self.config
        if index == PciIrq.MSIX and config.msix is not None and self._msix_table_driven:
            if not config.msix.trigger(vector):
                return False
        elif index == PciIrq.MSI and config.msi is not None and config.msi_enabled:
            if not config.msi.trigger(vector):
                return False
        elif index == PciIrq.INTX and config.intx_disabled:
            return False
        return self.irqs[index].trigger(vector)

    def quiesce(self, quiesced: bool) -> None:
        """Hold (True) or release (False) every interrupt: a stopped device raises none."""
        self._quiesced = quiesced
        if not quiesced:
            for irq in self.irqs:
                irq.release_all()

    # --- hooks for subclasses ----------------------------------------------------------

    async def reset(self) -> None:
        """Reset the device's own state (DEVICE_RESET, function-level reset)."""

    async def attached(self) -> None:
        """A client finished negotiating and is now driving the device."""

    async def detached(self) -> None:
        """The client went away; its DMA maps and IRQ fds are already gone."""

    async def run(self) -> None:
        """Background work for as long as the device is served (e.g. a doorbell loop)."""

    # --- used by the server session --------------------------------------------------

    async def do_reset(self) -> None:
        """Full reset: config space to power-on, then the device's own ``reset``."""
        self.config.reset()
        self._msix_table_driven = False
        try:
            await self.reset()
        except Exception as exc:
            raise self._errors.bug("DEVICE_RESET", "in reset()", f"raised {exc!r}", exc) from exc

    async def client_gone(self) -> None:
        """Disconnect cleanup per the spec: unmap DMA, close IRQ fds, keep device state.

        Nothing of the client stays: its IRQ eventfds are closed first (so nothing is
        signalled to a dead client), its DMA_READ/WRITE path is cut, a device stopped
        for migration runs again (see ``DeviceMigration.client_gone``), and then its DMA
        maps are unmapped once the device's accesses to them finish. The next client
        finds the device in RUNNING with the rest of its state as it was.
        """
        with trio.CancelScope(shield=True):
            self.irqs.disable_all()
            self.irqs.attach(None)
            for region in self.regions.values():
                for bell in region.doorbells:
                    bell.renew()  # the client keeps its copy: it must ring nothing now
            self.dma.messenger = None
            if self.migration is not None:
                # Before unmapping: a device task held at the DMA gate may have pinned a
                # map, and the unmap waits for it.
                await self.migration.client_gone()
            await self.dma.unmap_all()
            try:
                await self.detached()
            except Exception:
                log.exception("%s: detached() failed", self.name)

    def close(self) -> None:
        """Release the device's memory and doorbells (after serving ends)."""
        for region in self.regions.values():
            region.close()


_SERVER = os.path.dirname(os.path.abspath(__file__))


def _caller() -> str | None:
    """``file.py:12 in __init__``: the first frame outside this module, unless it is the
    server's (then serving built the device, not the device's own code)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename != __file__:
            if os.path.dirname(os.path.abspath(frame.filename)) == _SERVER:
                return None
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return None
