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

What a subclass sees of the framework, and nothing else (40 names, 21 of them reserved):

- declarations (from ``__init__``): ``add_bar``, ``add_rom``, ``add_region``, ``add_irq``,
  ``add_intx``, ``add_msi``, ``add_msix``, ``add_capability``, ``add_config_registers``,
  ``add_vendor_capability``, ``add_doorbell``, ``enable_migration``;
- services for its callbacks and hooks: ``name``, ``identity``, ``dma``, ``config``,
  ``irqs``, ``region()``, ``trigger()``, ``active_irq_index()``, ``migration``;
- hooks it may override (19): ``reset``, ``attached``, ``detached``, ``run``, ``close``
  (extend it, calling ``super().close()``), ``dma_mapped``/``dma_unmapped``
  (``server/dma_hooks.py``), ``irq_state_changed`` (``server/irqs.py``) and the migration
  hooks (``server/migration.py``: ``save_state``, ``load_state``, ``save_chunks``,
  ``precopy_chunks``, ``load_chunk``, ``on_stop``, ``on_run``, ``on_begin_save``,
  ``on_end_save``, ``on_begin_resume``, ``on_end_resume``).

Why the author's API stays on the subclass rather than behind a composed ``self.vfu``:
"a device in about thirty lines" is ``self.add_bar(...)`` and ``self.trigger(0)``, and
every example and test is written so. What made the class easy to misuse was everything
else on it: the session's machinery (full reset, cleanup when a client goes, quiescing,
MSI-X delivery) and the framework's private state, which a subclass could shadow
without noticing. Those now live in one object the server reaches as
``device._vfu`` (``server/device_runtime.py``), and the names above are fenced, each
refusal naming the class, the name and the fix: a subclass defining a framework name
other than a hook is refused when the class is created; assigning a service
(``self.config = ...``) is refused at the assignment; a framework method replaced on the
instance (``self.trigger = ...``), or ``self.dma`` (a plain attribute: device code reaches
it on every DMA), when serving starts (no ``__setattr__``: assigning a
device's own attributes costs what it costs on any object); a hook overridden with the
wrong kind (a plain ``def reset``, an ``async def save_chunks``) when the class is
created. The declarations are checked as a whole when serving starts (or when device
code first reads ``config``/``irqs``/``region()``), with errors naming the device, the
region and the fix. The first read of ``config``/``irqs``/``region()`` freezes the
declarations (at the end of ``__init__`` that is fine: to connect config signals, say);
a declaration after it is refused naming the file and line of that read.
``close()`` is the owner's (not the session's): it releases the device's memory once
nothing serves it, and a device with resources of its own extends it.

A framework class that adds a plain (non-async) hook lists it in ``_vfu_hooks``; async
methods of the framework classes are hooks.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Never, overload

from ..protocol.constants import PciIrq, PciRegion
from .device_runtime import DeviceRuntime, assignment_refused, fix_for, overlaps, page_aligned
from .dma import DmaTable
from .dma_hooks import DmaHooks
from .doorbells import Doorbell
from .irqs import INTX_EDGE_FLAGS, IrqStateHooks, IrqTable
from .migration import MigrationHooks
from .pci import (
    BarSpec,
    ConfigRegisters,
    InterruptPin,
    PciConfigSpace,
    PciIdentity,
    config_registers_problem,
)
from .pci_caps import (
    CONFIG_SPACE_SIZE,
    EXPRESS_CONFIG_SPACE_SIZE,
    Capability,
    ExpressCapability,
    MsiCapability,
    MsixCapability,
    VendorCallbackCapability,
)
from .regions import (
    MemoryRegion,
    ReadHandler,
    Region,
    RegionMemory,
    RegionType,
    SparseArea,
    WriteHandler,
)


class Device(DmaHooks, IrqStateHooks, MigrationHooks):
    """An emulated PCI function. Subclass it; declare regions and IRQs in ``__init__``.

    Live migration: call ``enable_migration()`` and override the hooks of
    :class:`~vfiouser_trio.server.migration.MigrationHooks` (``save_state``/``load_state``...).
    """

    #: Plain (non-async) hooks of the framework classes; async methods are hooks anyway.
    _vfu_hooks: ClassVar[frozenset[str]] = frozenset({"close"})

    def __init__(
        self,
        identity: PciIdentity,
        *,
        express: bool = False,
        interrupt_pin: int = InterruptPin.NONE,
        name: str | None = None,
        reset_supported: bool = True,
    ) -> None:
        runtime = DeviceRuntime(
            self,
            identity,
            name=name or type(self).__name__,
            express=express,
            interrupt_pin=interrupt_pin,
            reset_supported=reset_supported,
        )
        self._vfu = runtime
        #: The client's DMA maps: ``read``/``write``/``view``/``pin`` guest memory (``dma.py``).
        #: A plain attribute, not a property: device code reaches it on every DMA.
        #: Replacing it is refused when serving starts.
        self.dma: DmaTable = runtime.dma

    # --- the fence -----------------------------------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        reserved, hooks = _framework_names()
        for attr, value in vars(cls).items():
            if attr in reserved:
                raise TypeError(
                    f"{cls.__name__} defines {attr!r}, a name of the Device framework "
                    f"({_what(attr)}); {fix_for(attr)}"
                )
            if attr in hooks:
                _check_hook(cls, attr, value, hooks[attr])

    # --- services --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The device's name in log lines and errors (``name=`` of ``Device.__init__``)."""
        return self._vfu.name

    @name.setter
    def name(self, value: Never) -> None:
        raise assignment_refused(self, "name")

    @property
    def identity(self) -> PciIdentity:
        """The PCI identity given to ``Device.__init__``."""
        return self._vfu.identity

    @identity.setter
    def identity(self, value: Never) -> None:
        raise assignment_refused(self, "identity")

    @property
    def config(self) -> PciConfigSpace:
        """The device's PCI configuration space (built from the declarations on first use)."""
        return self._vfu.config()

    @config.setter
    def config(self, value: Never) -> None:
        raise assignment_refused(self, "config")

    @property
    def irqs(self) -> IrqTable:
        """The device's IRQ indexes (built from the declarations on first use)."""
        return self._vfu.irqs()

    @irqs.setter
    def irqs(self, value: Never) -> None:
        raise assignment_refused(self, "irqs")

    def region(self, index: int) -> Region | None:
        """Region ``index`` as declared (``PciRegion.CONFIG`` once built), or None."""
        return self._vfu.region(index, "calling region()")

    def active_irq_index(self) -> int:
        """The interrupt mode the guest enabled: MSI-X, else MSI, else INTx."""
        return self._vfu.active_irq_index()

    def trigger(self, vector: int = 0, *, index: int | None = None) -> bool:
        """Raise interrupt ``vector``; True if it was delivered now.

        ``index`` defaults to the mode the guest enabled (see ``active_irq_index``);
        when no enabled mode has ``vector`` (the driver has not set interrupts up
        yet) the interrupt goes nowhere, as on hardware, and False is returned. An
        explicit ``index`` without that vector is a device bug: ValueError.
        Masked vectors (vfio-level, or in our MSI/MSI-X structures when the client
        programs them through us) and a quiesced device hold the interrupt pending.
        """
        return self._vfu.trigger(vector, index)

    # --- declaration (call from __init__) ------------------------------------------------

    def _check_handlers(self, where: str, **handlers: object) -> None:
        for kind, handler in handlers.items():
            if handler is not None and not callable(handler):
                raise self._vfu.refuse(
                    where,
                    f"{kind}={handler!r} is not callable",
                    f"pass a method such as {kind}=self.{kind}_handler (async def or plain def)",
                )

    @overload
    def add_bar(
        self,
        bar: int,
        size: int,
        *,
        read: ReadHandler | None = None,
        write: WriteHandler | None = None,
        memory: Literal[True],
        mmap: bool = False,
        sparse: Sequence[SparseArea] = (),
        io: bool = False,
        is_64bit: bool = False,
        prefetchable: bool = False,
    ) -> MemoryRegion: ...

    @overload
    def add_bar(
        self,
        bar: int,
        size: int,
        *,
        read: ReadHandler | None = None,
        write: WriteHandler | None = None,
        memory: bool = False,
        mmap: Literal[True],
        sparse: Sequence[SparseArea] = (),
        io: bool = False,
        is_64bit: bool = False,
        prefetchable: bool = False,
    ) -> MemoryRegion: ...

    @overload
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
    ) -> Region: ...

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
        With ``memory=True`` or ``mmap=True`` the returned region's ``memory`` is there
        for the type checker too (a :class:`MemoryRegion`). Sparse areas are page-aligned.
        """
        self._vfu.declaring()
        if not 0 <= bar <= PciRegion.BAR5:
            raise ValueError(f"{self.name}: BAR {bar}: BARs are numbered 0..5")
        try:
            spec = BarSpec(size, io=io, is_64bit=is_64bit, prefetchable=prefetchable)
        except ValueError as exc:
            raise ValueError(f"{self.name}: BAR {bar}: {exc}") from None
        self._vfu.bars[bar] = spec
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
        self._vfu.declaring()
        self._vfu.rom_size = size
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

    @overload
    def add_region(
        self,
        index: int,
        size: int,
        *,
        read: ReadHandler | None = None,
        write: WriteHandler | None = None,
        memory: Literal[True],
        mmap: bool = False,
        sparse: Sequence[SparseArea] = (),
        region_type: RegionType | None = None,
    ) -> MemoryRegion: ...

    @overload
    def add_region(
        self,
        index: int,
        size: int,
        *,
        read: ReadHandler | None = None,
        write: WriteHandler | None = None,
        memory: bool = False,
        mmap: Literal[True],
        sparse: Sequence[SparseArea] = (),
        region_type: RegionType | None = None,
    ) -> MemoryRegion: ...

    @overload
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
    ) -> Region: ...

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
        """Declare the VGA region (8) or a device-specific region (9 up to
        ``MAX_REGION_INDEX``, with a type)."""
        self._vfu.declaring()
        where = f"region {index}"
        if not PciRegion.VGA <= index <= MAX_REGION_INDEX:
            raise self._vfu.refuse(
                where,
                f"add_region declares regions {int(PciRegion.VGA)}..{MAX_REGION_INDEX}",
                "use add_bar / add_rom for regions 0-6 (region 7 is config space)",
            )
        if index > PciRegion.VGA and region_type is None:
            raise self._vfu.refuse(
                where, "a device-specific region needs a type", "pass region_type=RegionType(...)"
            )
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
        vfu = self._vfu
        if index in vfu.regions:
            raise ValueError(f"{self.name}: region {index} is declared twice")
        self._check_handlers(f"region {index}", read=read, write=write)
        for area in sparse:
            if not (page_aligned(area.offset) and page_aligned(area.size)):
                raise vfu.refuse(
                    f"region {index} sparse area {area.offset:#x}+{area.size:#x}",
                    "not page-aligned (a client maps whole pages)",
                    "give sparse areas page-aligned offsets and sizes (mmap.PAGESIZE)",
                )
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
            errors=vfu.errors,
        )
        vfu.regions[index] = region
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
        self._vfu.declaring()
        if not 0 <= index <= MAX_IRQ_INDEX or count < 0:
            raise self._vfu.refuse(
                f"IRQ index {index}",
                f"{count} vectors at index {index}",
                f"IRQ indexes are 0..{MAX_IRQ_INDEX} (PciIrq) with 0 or more vectors",
            )
        self._vfu.irq_counts[index] = (count, flags)

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
        self._vfu.declaring()
        self._vfu.interrupt_pin = int(pin)
        self._vfu.irq_counts[PciIrq.INTX] = (1, None if automask else INTX_EDGE_FLAGS)

    def add_msi(self, vectors: int = 1, *, per_vector_masking: bool = False) -> None:
        """Add an MSI capability with ``vectors`` (1..32, a power of two)."""
        self._vfu.declaring()
        self._vfu.capabilities.append(MsiCapability(vectors, per_vector_masking=per_vector_masking))
        self._vfu.irq_counts[PciIrq.MSI] = (vectors, None)

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
        self._vfu.declaring()
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
        self._vfu.capabilities.append(cap)
        self._vfu.irq_counts[PciIrq.MSIX] = (vectors, None)

    def _check_msix_area(self, what: str, bar: int, offset: int, size: int, placed: bool) -> None:
        where = f"MSI-X {what} at BAR {bar} {offset:#x}+{size:#x}"
        region = self._vfu.regions.get(bar)
        if region is None or bar > PciRegion.BAR5:
            raise self._vfu.refuse(where, f"BAR {bar} is not declared", "call add_bar first")
        if offset + size > region.size:
            raise self._vfu.refuse(
                where, f"beyond the BAR's {region.size:#x} bytes", "make the BAR larger"
            )
        for area in region.sparse:
            if overlaps(offset, size, area.offset, area.size):
                raise self._vfu.refuse(
                    where,
                    f"overlaps the sparse mmap area {area.offset:#x}+{area.size:#x} (the client "
                    "would map it and bypass the framework)",
                    "move the table/PBA out of the sparse areas",
                )
        if not placed and (region.read or region.write or region.memory):
            raise self._vfu.refuse(
                where,
                f"the framework would serve these bytes and hide BAR {bar}'s own "
                "callbacks/memory there",
                "give MSI-X a BAR of its own (add_bar(N, 0x1000); add_msix(..., bar=N)), or "
                "place it explicitly with table_offset=/pba_offset= if that is the layout meant",
            )

    def add_capability(self, capability: Capability) -> None:
        """Add any other capability (power management, PCI Express, vendor-specific, ...)."""
        self._vfu.declaring()
        self._vfu.capabilities.append(capability)

    def add_config_registers(
        self, offset: int, size: int, *, read: ReadHandler, write: WriteHandler | None = None
    ) -> None:
        """Serve config-space bytes ``offset`` .. ``offset + size`` (device-specific registers)
        by callbacks; bytes nothing declares read as zero.

        ``read(offset, count)`` / ``write(offset, data)`` see offsets from ``offset``, as BAR
        callbacks do (``async def`` or plain; errors as for BARs). Without ``write`` the
        registers are read-only: a client write touching them fails with EPERM. The bytes
        lie in 0x40 .. the end of the space (256 bytes; 4096 with ``express=True``), leave
        out 0x100..0x103 (the extended capability list's head) and do not overlap each
        other; capabilities the framework places go around them.
        """
        vfu = self._vfu
        vfu.declaring()
        where = f"config registers at {offset:#x}+{size:#x}"
        self._check_handlers(where, read=read, write=write)
        express = vfu.express or any(isinstance(c, ExpressCapability) for c in vfu.capabilities)
        space = EXPRESS_CONFIG_SPACE_SIZE if express else CONFIG_SPACE_SIZE
        taken = [(block.offset, block.size) for block in vfu.config_registers]
        problem = config_registers_problem(offset, size, space, taken)
        if problem is not None:
            raise vfu.refuse(where, problem, "move or resize the registers")
        vfu.config_registers.append(ConfigRegisters(offset, size, read, write))

    def add_vendor_capability(
        self, size: int, *, read: ReadHandler, write: WriteHandler | None = None
    ) -> None:
        """Add a vendor-specific capability (ID 0x09) with ``size`` data bytes served by
        callbacks, linked in the capability list like the others.

        The framework keeps ID, next pointer and length (``3 + size``); the callbacks see
        offsets from the capability's start, so the first data byte is offset 3 (as the
        PCI spec numbers vendor-specific registers). Without ``write`` the data bytes are
        read-only (EPERM). Its place: ``config.find_capability(VendorCallbackCapability)``.
        """
        self._vfu.declaring()
        self._check_handlers("vendor capability", read=read, write=write)
        try:
            capability = VendorCallbackCapability(size, read, write)
        except ValueError as exc:
            raise self._vfu.refuse("vendor capability", str(exc), "give it fewer bytes") from None
        self._vfu.capabilities.append(capability)

    def add_doorbell(
        self, region: int, offset: int, *, size: int = 4, datamatch: int | None = None
    ) -> Doorbell:
        """Declare a doorbell: an ioeventfd the client may wire up (GET_REGION_IO_FDS).

        Await ``doorbell.wait()`` in the device; a plain REGION_WRITE there rings it too.
        """
        vfu = self._vfu
        vfu.declaring()
        target = vfu.regions.get(region)
        where = f"doorbell at region {region} {offset:#x}+{size:#x}"
        if target is None:
            raise vfu.refuse(where, f"region {region} is not declared", "call add_bar first")
        if offset < 0 or offset + size > target.size:
            raise vfu.refuse(
                where, f"beyond the region's {target.size:#x} bytes", "move it inside the region"
            )
        bell = Doorbell(offset, size, datamatch)
        target.doorbells.append(bell)
        return bell

    # --- hooks for subclasses ----------------------------------------------------------

    async def reset(self) -> None:
        """Reset the device's own state (DEVICE_RESET, function-level reset)."""

    async def attached(self) -> None:
        """A client finished negotiating and is now driving the device."""

    async def detached(self) -> None:
        """The client went away; its DMA maps and IRQ fds are already gone."""

    async def run(self) -> None:
        """Background work for as long as the device is served (e.g. a doorbell loop)."""

    def close(self) -> None:
        """Release the device's memory and doorbells once nothing serves it any more.

        ``serve`` does it for the devices a factory made; the owner of a device instance
        calls it. A device with resources of its own extends it (``super().close()``).
        """
        self._vfu.close()


#: The highest region index ``add_region`` declares (device-specific regions from 9).
MAX_REGION_INDEX = 63
#: The highest IRQ index ``add_irq`` declares (ERR is 3, REQ 4; beyond are device-specific).
MAX_IRQ_INDEX = 31

# --- the fence: which names are the framework's -------------------------------------------

_NAMES: tuple[frozenset[str], dict[str, str]] | None = None


def _framework_names() -> tuple[frozenset[str], dict[str, str]]:
    """(reserved names, {hook name: "async" | "asyncgen" | "any"}) of Device and its bases."""
    global _NAMES  # noqa: PLW0603 - computed once, after every framework class exists
    if _NAMES is None:
        reserved: set[str] = {"_vfu", "dma"}  # dma: an instance attribute
        hooks: dict[str, str] = {}
        for klass in Device.__mro__[:-1]:  # not object
            plain_hooks = vars(klass).get("_vfu_hooks", frozenset())
            for attr, value in vars(klass).items():
                if attr.startswith("_") or attr in hooks or attr in reserved:
                    continue
                if inspect.isasyncgenfunction(value):
                    hooks[attr] = "asyncgen"
                elif inspect.iscoroutinefunction(value):
                    hooks[attr] = "async"
                elif attr in plain_hooks:
                    hooks[attr] = "any"
                else:
                    reserved.add(attr)
        _NAMES = frozenset(reserved), hooks
    return _NAMES


def _what(attr: str) -> str:
    value = inspect.getattr_static(Device, attr, None)
    if isinstance(value, property):
        return "a property of every device"
    return "a method of every device" if callable(value) else "the framework's own state"


def _check_hook(cls: type, attr: str, value: object, kind: str) -> None:
    """Refuse an override of hook ``attr`` the framework could not call as it does."""
    func = value.__func__ if isinstance(value, staticmethod | classmethod) else value
    where = f"{cls.__name__}.{attr}"
    if not callable(func):
        raise TypeError(f"{where} must be a method (the framework calls this hook)")
    # Only plain functions are judged: a callable object or a decorator's wrapper may
    # well return what the framework expects.
    if not isinstance(func, types.FunctionType) or hasattr(func, "__wrapped__"):
        return
    if attr == "close" and inspect.iscoroutinefunction(func):
        raise TypeError(f"{where} must be a plain 'def' (close() is called, not awaited)")
    if attr == "close" and "super" not in func.__code__.co_names:
        raise TypeError(
            f"{where} must call super().close(): the framework's memory and doorbells are "
            "released there"
        )
    if kind == "async" and not inspect.iscoroutinefunction(func):
        raise TypeError(
            f"{where} must be 'async def' (the framework awaits this hook); "
            f"write: async def {attr}(self, ...)"
        )
    if kind == "asyncgen" and inspect.iscoroutinefunction(func):
        raise TypeError(
            f"{where} is an 'async def' returning a value, but the framework iterates this "
            "hook; make it an async generator (yield each chunk)"
        )
