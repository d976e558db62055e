"""ACCES PCI-IDIO-16: 16 optically isolated inputs, 16 FET outputs, a change-of-state IRQ.

libvfio-user's first sample (samples/gpio-pci-idio-16.c) identifies as this card:
vendor 0x494f, device 0x0dc8, subsystem IDs 0/0, no class code, a 0x100-byte BAR2
served by a callback, one INTx interrupt. The sample's callback is a stand-in: it
ignores writes and answers a read of offset 0 with a counter that steps every
third read. We keep the sample's identity and BAR and implement the card's
register file instead, as the ACCES manual and Linux's gpio-pci-idio-16 driver
describe it. BAR2 is an I/O BAR, as on the card (Linux maps it as port I/O) and
as libvfio-user declares a BAR without its MEM flag.

BAR2 registers (8 bits each; a wider access acts as consecutive byte accesses)::

    offset  read                                write
    0x0     FET outputs 0-7 (read back)         FET outputs 0-7
    0x1     isolated inputs 0-7                 clear interrupt
    0x2     enable IRQ (reads 0)                disable IRQ
    0x3     activate input filters 0-15 (0)     deactivate input filters 0-15
    0x4     FET outputs 8-15 (read back)        FET outputs 8-15
    0x5     isolated inputs 8-15                unused
    0x6     interrupt status                    unused
    0x7     input filter status 0-7             control input filters 0-7
    0x8-    reads 0                             ignored

An input bit reads 1 while that input is energized. While the IRQ is enabled, any
change of an input (either edge) latches the interrupt: interrupt status bit 2 is
set and INTA is asserted until the driver writes offset 1. Linux's current driver
tests only bit 2; its older driver also wanted bit 0 or 1 set, which the manual
we could read does not define: we set bit 0 for a change on inputs 0-7 and bit 1
for inputs 8-15 so that both driver generations claim the interrupt. The 5 ms
input filters are register state only: inputs here change when `set_inputs` says.

The inputs are wired to the outside world, so `set_inputs` / `set_input` change
them (a demo, a test) and a reset leaves them as they are.

The card migrates (STOP_COPY): its `GpioState` is the device's part of the stream,
outputs, inputs, IRQ enable, the latched interrupt and the filters. The framework moves
the rest: the status register's interrupt bit, and INTx's masked / pending bits, so an
interrupt latched (or raised while stopped) on the source is still owed on the
destination.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# What a device author imports (vfiouser_trio.server outside this package).
from ..server import Device, InterruptPin, PciIdentity, PciIrq

VENDOR_ID = 0x494F  # ACCES I/O Products
DEVICE_ID = 0x0DC8  # PCI-IDIO-16
BAR = 2
BAR_SIZE = 0x100

# Register offsets in BAR2.
OUT_0_7 = 0x0
IN_0_7 = 0x1  # write: clear interrupt
IRQ_CONTROL = 0x2  # read: enable IRQ, write: disable IRQ
FILTER_CONTROL = 0x3  # read: activate all filters, write: deactivate them
OUT_8_15 = 0x4
IN_8_15 = 0x5
IRQ_STATUS = 0x6
FILTER_0_7 = 0x7

# Interrupt status bits.
IRQ_STATUS_INPUTS_0_7 = 0x01
IRQ_STATUS_INPUTS_8_15 = 0x02
IRQ_STATUS_PENDING = 0x04


@dataclass
class GpioState:
    """Everything the card remembers (what a migration would carry)."""

    outputs: int = 0  # FET outputs 0-15
    inputs: int = 0  # isolated inputs 0-15, as wired
    irq_enabled: bool = False
    irq_status: int = 0  # IRQ_STATUS_* bits; nonzero while the interrupt is latched
    filters_all: bool = False  # "activate input filters 0-15" given
    filters: int = 0  # individual filters 0-7

    _FORMAT = struct.Struct("<HH?B?B")

    def pack(self) -> bytes:
        return self._FORMAT.pack(
            self.outputs,
            self.inputs,
            self.irq_enabled,
            self.irq_status,
            self.filters_all,
            self.filters,
        )

    @classmethod
    def unpack(cls, data: bytes) -> GpioState:
        return cls(*cls._FORMAT.unpack(data))

    @classmethod
    def load(cls, data: bytes) -> GpioState:
        """A saved state, checked: ValueError for bytes the card could not have saved."""
        if len(data) != cls._FORMAT.size:
            raise ValueError(f"a gpio state is {cls._FORMAT.size} bytes, not {len(data)}")
        state = cls.unpack(data)
        known = IRQ_STATUS_INPUTS_0_7 | IRQ_STATUS_INPUTS_8_15 | IRQ_STATUS_PENDING
        if state.irq_status & ~known:
            raise ValueError(f"unknown interrupt status bits {state.irq_status:#x}")
        if state.irq_status and not state.irq_status & IRQ_STATUS_PENDING:
            raise ValueError(f"interrupt status {state.irq_status:#x} without its pending bit")
        return state


class GpioDevice(Device):
    """The PCI-IDIO-16, with the identity libvfio-user's gpio sample uses."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=VENDOR_ID, device_id=DEVICE_ID), name="gpio")
        self.state = GpioState()
        self.add_bar(BAR, BAR_SIZE, read=self.read_bar2, write=self.write_bar2, io=True)
        self.add_intx(InterruptPin.INTA)
        self.enable_migration()

    # --- the outside world ---------------------------------------------------------------

    @property
    def outputs(self) -> int:
        """The 16 FET outputs as the driver last wrote them (bit n: output n)."""
        return self.state.outputs

    @property
    def inputs(self) -> int:
        return self.state.inputs

    def set_inputs(self, mask: int) -> None:
        """Drive the 16 isolated inputs (bit n: input n energized)."""
        if not 0 <= mask <= 0xFFFF:
            raise ValueError("the card has 16 inputs: mask is 0..0xffff")
        changed = self.state.inputs ^ mask
        self.state.inputs = mask
        if changed and self.state.irq_enabled:
            groups = (IRQ_STATUS_INPUTS_0_7 if changed & 0xFF else 0) | (
                IRQ_STATUS_INPUTS_8_15 if changed & 0xFF00 else 0
            )
            self._latch(groups)

    def set_input(self, pin: int, energized: bool) -> None:
        """Drive one isolated input (0-15)."""
        if not 0 <= pin < 16:
            raise ValueError("inputs are numbered 0..15")
        bit = 1 << pin
        self.set_inputs(self.state.inputs | bit if energized else self.state.inputs & ~bit)

    # --- interrupt latch -----------------------------------------------------------------

    def _latch(self, groups: int) -> None:
        rising = not self.state.irq_status
        self.state.irq_status |= groups | IRQ_STATUS_PENDING
        if rising:
            # INTx is level-triggered: one assertion until the driver clears the latch.
            self.config.set_interrupt_status(True)
            self.trigger(0, index=PciIrq.INTX)

    def _clear_latch(self) -> None:
        self.state.irq_status = 0
        self.config.set_interrupt_status(False)

    # --- BAR2 ----------------------------------------------------------------------------

    # Plain functions, not async def: register accesses never wait, and a callback that
    # answers at once lets the framework reply without running a coroutine.
    def read_bar2(self, offset: int, size: int) -> bytes:
        # The eight registers at once, not one call per byte: this runs once per REGION_READ
        # (the benchmarks' hot path). Reading offsets 2 and 3 has effects; what they change
        # (IRQ enable, all filters on) shows at offset 7 in the same access, as it would
        # byte by byte, since 3 comes before 7.
        end = offset + size
        s = self.state
        if offset <= IRQ_CONTROL < end:
            s.irq_enabled = True
        if offset <= FILTER_CONTROL < end:
            s.filters_all = True
        if offset >= FILTER_0_7 + 1:
            return bytes(size)  # 0x8 and up read 0
        outputs, inputs = s.outputs, s.inputs
        registers = bytes(
            (
                outputs & 0xFF,
                inputs & 0xFF,
                0,  # IRQ_CONTROL
                0,  # FILTER_CONTROL
                outputs >> 8,
                inputs >> 8,
                s.irq_status,
                0xFF if s.filters_all else s.filters,
            )
        )
        if end <= FILTER_0_7 + 1:
            return registers[offset:end]
        return registers[offset:] + bytes(end - FILTER_0_7 - 1)

    def write_bar2(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            self._write_register(offset + i, value)

    def _write_register(self, offset: int, value: int) -> None:
        s = self.state
        if offset == OUT_0_7:
            s.outputs = s.outputs & 0xFF00 | value
        elif offset == IN_0_7:
            self._clear_latch()
        elif offset == IRQ_CONTROL:
            s.irq_enabled = False
        elif offset == FILTER_CONTROL:
            s.filters_all = False
        elif offset == OUT_8_15:
            s.outputs = s.outputs & 0x00FF | value << 8
        elif offset == FILTER_0_7:
            s.filters = value

    # --- hooks ---------------------------------------------------------------------------

    async def reset(self) -> None:
        # The inputs are whatever the field wiring says; everything else powers up clear.
        self.state = GpioState(inputs=self.state.inputs)
        self.config.set_interrupt_status(False)

    # --- migration -----------------------------------------------------------------------

    async def save_state(self) -> bytes:
        return self.state.pack()

    async def load_state(self, data: bytes) -> None:
        self.state = GpioState.load(data)
