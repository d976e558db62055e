"""The framework's side of a :class:`~vfiouser_trio.server.Device`, fenced off its namespace.

A device author sees declarations, services and hooks on the ``Device`` subclass; what
only the server does with a device (freezing the declarations into config space and an
IRQ table, checking them as a whole, full reset, cleanup when a client goes, quiescing
interrupts for migration, MSI-X delivery, releasing memory) lives here, in one object
per device reached as ``device._vfu`` by the session, the server, migration and the
testing helpers, never by device code. Nothing here can collide with a subclass's names.

The declarations themselves are kept here too, so a subclass's own ``self._config`` or
``self.regions`` is its own attribute and the framework never reads it.
"""

from __future__ import annotations

import logging
import mmap
import os
import traceback
from typing import TYPE_CHECKING

import trio

from ..protocol.constants import PCI_NUM_IRQS, PCI_NUM_REGIONS, PciIrq, PciRegion
from .config_access import ConfigAccess
from .device_errors import DeviceErrors, region_name
from .dma import DmaTable
from .irqs import DEFAULT_IRQ_COUNTS, IrqIndex, IrqTable, install_state_hook
from .pci import BarSpec, ConfigRegisters, PciConfigSpace, PciIdentity
from .pci_caps import Capability, MsixCapability
from .regions import Overlay, Region

if TYPE_CHECKING:
    from .device import Device
    from .migration import DeviceMigration

log = logging.getLogger(__name__)


class DeviceRuntime:
    """One device's declarations, built state and session machinery.

    Built once (``build``), when serving starts or when device code first reads
    ``config``/``irqs``/``region()`` after ``__init__``; from then on the declarations
    are frozen.
    """

    def __init__(
        self,
        device: Device,
        identity: PciIdentity,
        *,
        name: str,
        express: bool,
        interrupt_pin: int,
        reset_supported: bool,
    ) -> None:
        self.device = device
        self.identity = identity
        self.name = name
        self.reset_supported = reset_supported
        self.dma = DmaTable(name=name)
        #: Set by ``Device.enable_migration``.
        self.migration: DeviceMigration | None = None
        # --- declarations
        self.regions: dict[int, Region] = {}
        self.bars: dict[int, BarSpec] = {}
        self.rom_size: int | None = None
        self.capabilities: list[Capability] = []
        self.config_registers: list[ConfigRegisters] = []
        self.irq_counts: dict[int, tuple[int, int | None]] = {}
        self.express = express
        self.interrupt_pin = int(interrupt_pin)
        if self.interrupt_pin:
            self.irq_counts[PciIrq.INTX] = (1, None)
        for index, count in DEFAULT_IRQ_COUNTS.items():  # ERR and REQ: see Device.add_irq
            self.irq_counts[index] = (count, None)
        # --- built state
        self._config: PciConfigSpace | None = None
        self._irqs: IrqTable | None = None
        #: From the client's first MSI-X table write on, it drives MSI-X through our table.
        self.msix_table_driven = False
        self._quiesced = False
        # Where the declarations were frozen (named by a late declaration's error).
        self._built_by: str | None = None
        #: Where the device's bugs go (a WARNING, then each listener).
        self.errors = DeviceErrors(name)

    # --- declarations ----------------------------------------------------------------------

    def declaring(self) -> None:
        """Refuse a declaration once the device is built, naming what built it."""
        if self._config is not None:
            raise RuntimeError(
                f"{self.name}: too late to declare: the declarations were frozen by "
                f"{self._built_by or 'serving the device'}. Declare every region, IRQ and "
                "capability first (config, irqs, region() and trigger() build the device "
                "from them)"
            )

    def refuse(self, where: str, problem: str, fix: str) -> ValueError:
        """A declaration error naming the device, what is declared, and the fix."""
        return ValueError(f"{self.name}: {where}: {problem}; {fix}")

    # --- building --------------------------------------------------------------------------

    @property
    def built(self) -> bool:
        return self._config is not None

    def build(self, cause: str = "serving the device") -> None:
        """Check the declarations as a whole and freeze them into config space and IRQs.

        ``cause`` names what built it, with the device code's file and line, in the
        error a later declaration gets: reading ``config`` at the end of ``__init__`` (to
        connect its signals, say) is fine, declaring after that read is not.
        """
        if self._config is not None:
            return
        caller = _caller()
        self._built_by = f"{cause} at {caller}" if caller else "serving the device"
        self.errors.device = self.name
        self._check_shadowing()
        self._check_areas()
        try:
            config = PciConfigSpace(
                self.identity,
                bars=self.bars,
                rom_size=self.rom_size,
                interrupt_pin=self.interrupt_pin,
                express=self.express,
                capabilities=self.capabilities,
                registers=self.config_registers,
            )
        except ValueError as exc:
            self._built_by = None
            raise ValueError(
                f"{self.name}: the declarations do not make a valid config space: {exc}; "
                "change the add_* calls that declare it"
            ) from None
        self._config = config

        served = ConfigAccess(config, self.errors)  # the header, capabilities and callbacks
        self.regions[PciRegion.CONFIG] = Region(
            PciRegion.CONFIG,
            config.size,
            read=served.read,
            write=served.write,
            errors=self.errors,
        )
        indexes = [
            IrqIndex(index, *self.irq_counts.get(index, (0, None)))
            for index in range(max(PCI_NUM_IRQS, max(self.irq_counts, default=0) + 1))
        ]
        self._irqs = IrqTable(indexes)
        for irq in indexes:
            irq.set_gate(self._irq_gate)
            irq.owner = self.name  # named in its log lines
        install_state_hook(self.device, self._irqs, config, self.errors)
        if config.msix is not None:
            self._attach_msix(config)

    def _check_shadowing(self) -> None:
        """A framework method the device replaced on itself (``self.trigger = ...``).

        Properties refuse such assignments at once; methods are checked here, when serving
        starts, so that attribute assignment on a device costs what it costs anywhere.
        """
        from .device import _framework_names  # noqa: PLC0415 - device.py imports this module

        reserved = _framework_names()[0]
        for attr, value in vars(self.device).items():
            if attr in reserved and attr != "_vfu" and not (attr == "dma" and value is self.dma):
                raise AttributeError(
                    f"{type(self.device).__name__}: self.{attr} = ... replaced the framework's "
                    f"{attr!r} (a method of every device); {fix_for(attr)}"
                )

    def _check_areas(self) -> None:
        """Doorbells where a write reaches them: not mmapped, not under MSI-X."""
        msix = [c for c in self.capabilities if isinstance(c, MsixCapability)]
        framework: list[tuple[str, int, int, int]] = []
        for cap in msix:
            table = ("MSI-X table", cap.table_bar, cap.table_offset, 16 * cap.table_size)
            framework.append(table)
            framework.append(("MSI-X PBA", cap.pba_bir, cap.pba_start, cap.pba_size))
        for index, region in sorted(self.regions.items()):
            for bell in region.doorbells:
                where = f"doorbell at {region_name(index)} {bell.offset:#x}+{bell.size:#x}"
                for area in region.sparse:
                    if overlaps(bell.offset, bell.size, area.offset, area.size):
                        raise self.refuse(
                            where,
                            f"inside the sparse mmap area {area.offset:#x}+{area.size:#x} (the "
                            "client writes there straight to memory: it would never ring)",
                            "move the doorbell out of the sparse areas",
                        )
                for what, bar, offset, size in framework:
                    if bar == index and overlaps(bell.offset, bell.size, offset, size):
                        raise self.refuse(
                            where,
                            f"under the {what} at {offset:#x}+{size:#x} (the framework serves "
                            "those bytes: it would never ring)",
                            "move the doorbell or the MSI-X structures (table_offset=)",
                        )

    def _attach_msix(self, config: PciConfigSpace) -> None:
        msix = config.msix
        placed = config.find_capability(MsixCapability)
        assert msix is not None and placed is not None
        cap = placed.capability
        assert isinstance(cap, MsixCapability)
        msix.deliver = self._deliver_msix

        def table_write(offset: int, data: bytes) -> None:
            self.msix_table_driven = True
            msix.table_write(offset, data)

        self.regions[cap.table_bar].overlays.append(
            Overlay(cap.table_offset, msix.table_size, msix.table_read, table_write)
        )
        self.regions[cap.pba_bir].overlays.append(
            Overlay(cap.pba_start, msix.pba_size, msix.pba_read, msix.pba_write)
        )

    def config(self, cause: str = "reading config") -> PciConfigSpace:
        self.build(cause)
        assert self._config is not None
        return self._config

    def irqs(self, cause: str = "reading irqs") -> IrqTable:
        self.build(cause)
        assert self._irqs is not None
        return self._irqs

    @property
    def num_regions(self) -> int:
        self.build()
        return max(PCI_NUM_REGIONS, max(self.regions) + 1)

    def region(self, index: int, cause: str = "serving the device") -> Region | None:
        self.build(cause)
        return self.regions.get(index)

    # --- interrupts ------------------------------------------------------------------------

    def _irq_gate(self, vector: int) -> bool:
        return not self._quiesced

    def _deliver_msix(self, vector: int) -> None:
        self.irqs()[PciIrq.MSIX].trigger(vector)

    def active_irq_index(self) -> int:
        """The interrupt mode the guest enabled: MSI-X, else MSI, else INTx."""
        config = self.config("calling active_irq_index()")
        if config.msix is not None and config.msix_enabled:
            return PciIrq.MSIX
        if config.msi is not None and config.msi_enabled:
            return PciIrq.MSI
        # Clients that emulate the capabilities themselves may only have assigned eventfds.
        irqs = self.irqs()
        for index in (PciIrq.MSIX, PciIrq.MSI):
            irq = irqs.get(index)
            if irq is not None and any(irq.has_eventfd(v) for v in range(irq.count)):
                return index
        return PciIrq.INTX

    def trigger(self, vector: int, index: int | None) -> bool:
        """See ``Device.trigger``."""
        config = self.config("calling trigger()")
        irqs = self.irqs()
        if index is None:
            index = self.active_irq_index()
            irq = irqs.get(index)
            if irq is None or not 0 <= vector < irq.count:
                return False
        if index == PciIrq.MSIX and config.msix is not None and self.msix_table_driven:
            if not config.msix.trigger(vector):
                return False
        elif index == PciIrq.MSI and config.msi is not None and config.msi_enabled:
            if not config.msi.trigger(vector):
                return False
        elif index == PciIrq.INTX and config.intx_disabled:
            return False
        return irqs[index].trigger(vector)

    def quiesce(self, quiesced: bool) -> None:
        """Hold (True) or release (False) every interrupt: a stopped device raises none."""
        self._quiesced = quiesced
        if not quiesced:
            for irq in self.irqs():
                irq.release_all()

    # --- the session's events --------------------------------------------------------------

    async def do_reset(self) -> None:
        """Full reset: config space to power-on, then the device's own ``reset``."""
        self.config().reset()
        self.msix_table_driven = False
        try:
            await self.device.reset()
        except Exception as exc:
            raise self.errors.bug("DEVICE_RESET", "in reset()", f"raised {exc!r}", exc) from exc

    async def client_gone(self) -> None:
        """Disconnect cleanup per the spec: unmap DMA, close IRQ fds, keep device state.

        Nothing of the client stays: its IRQ eventfds are closed first (so nothing is
        signalled to a dead client), its DMA_READ/WRITE path is cut, a device stopped
        for migration runs again (see ``DeviceMigration.client_gone``), and then its DMA
        maps are unmapped once the device's accesses to them finish. The next client
        finds the device in RUNNING with the rest of its state as it was (spec: Client
        Disconnection, https://www.qemu.org/docs/master/interop/vfio-user.html).
        """
        with trio.CancelScope(shield=True):
            irqs = self.irqs()
            irqs.disable_all()
            irqs.attach(None)
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
                await self.device.detached()
            except Exception as exc:
                self.errors.report("client gone", "in detached()", f"raised {exc!r}", exc)

    async def run(self, failed: trio.CancelScope | None = None) -> None:
        """The device's ``run()``; its failure is a device bug (logged, told to listeners).

        With ``failed`` (a per-connection device) the failure cancels that scope: the
        connection ends and nothing else does. Without it (a device shared by every
        connection) the :class:`DeviceCodeError` is raised: a device whose own task died
        is not served on.
        """
        try:
            await self.device.run()
        except Exception as exc:
            error = self.errors.report("serving", "in run()", f"raised {exc!r}", exc)
            if failed is None:
                raise error from exc
            failed.cancel()

    def close(self) -> None:
        """Release the device's memory and doorbells (after serving ends)."""
        for region in self.regions.values():
            region.close()


_FIXES = {
    "name": "pass name= to Device.__init__ instead",
    "identity": "pass the PciIdentity to Device.__init__ instead",
    "config": "rename your attribute, e.g. self.config_regs",
}


def fix_for(attr: str) -> str:
    """How a device author gets out of the way of the framework's name ``attr``."""
    return _FIXES.get(attr, f"rename your attribute, e.g. self.my_{attr.lstrip('_')}")


def assignment_refused(device: object, attr: str) -> AttributeError:
    """The error for ``self.<attr> = ...`` where ``attr`` is a service of every device."""
    return AttributeError(
        f"{type(device).__name__}: self.{attr} = ... would replace the framework's {attr!r} "
        f"(a property of every device); {fix_for(attr)}"
    )


def page_aligned(value: int) -> bool:
    """Whether ``value`` is a multiple of the page size (what a client can mmap)."""
    return value % mmap.PAGESIZE == 0


def overlaps(a: int, a_size: int, b: int, b_size: int) -> bool:
    """Whether byte ranges ``a``+``a_size`` and ``b``+``b_size`` share a byte."""
    return a < b + b_size and b < a + a_size


_SERVER = os.path.dirname(os.path.abspath(__file__))


def _caller() -> str | None:
    """``file.py:12 in __init__``: the first frame outside the device modules, unless it is
    the server's (then serving built the device, not the device's own code)."""
    own = {os.path.join(_SERVER, "device.py"), os.path.join(_SERVER, "device_runtime.py")}
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path not in own:
            if os.path.dirname(path) == _SERVER:
                return None
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return None
