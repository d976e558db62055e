"""Type-0 header of PciConfigSpace: defaults, masks, RW1C, BAR sizing, errno answers, hooks."""

from __future__ import annotations

import errno
import struct

import pytest

from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.pci import (
    BarSpec,
    InterruptPin,
    PciConfigSpace,
    PciIdentity,
)
from vfiouser_trio.server.pci_caps import ExpressCapability, PowerManagementCapability

IDENTITY = PciIdentity(
    vendor_id=0x1AF4,
    device_id=0x1042,
    subsystem_vendor_id=0x1AF4,
    subsystem_id=0x1100,
    class_code=0x010802,
    revision=0x03,
)


def u8(space: PciConfigSpace, offset: int) -> int:
    return space.read(offset, 1)[0]


def u16(space: PciConfigSpace, offset: int) -> int:
    value: int = struct.unpack("<H", space.read(offset, 2))[0]
    return value


def u32(space: PciConfigSpace, offset: int) -> int:
    value: int = struct.unpack("<I", space.read(offset, 4))[0]
    return value


def w16(space: PciConfigSpace, offset: int, value: int) -> None:
    space.write(offset, struct.pack("<H", value))


def w32(space: PciConfigSpace, offset: int, value: int) -> None:
    space.write(offset, struct.pack("<I", value))


def make(**kwargs: object) -> PciConfigSpace:
    return PciConfigSpace(IDENTITY, **kwargs)  # type: ignore[arg-type]


# --- defaults -------------------------------------------------------------------------


def test_header_defaults() -> None:
    space = make(interrupt_pin=InterruptPin.INTB)
    assert space.size == 256
    assert u16(space, 0x00) == 0x1AF4
    assert u16(space, 0x02) == 0x1042
    assert u16(space, 0x04) == 0  # command: everything off after reset
    assert u16(space, 0x06) == 0  # status: no capabilities -> bit 4 clear
    assert u8(space, 0x08) == 0x03
    assert space.read(0x09, 3) == bytes([0x02, 0x08, 0x01])  # prog-if, subclass, base class
    assert u8(space, 0x0E) == 0  # header type 0, single function
    assert u16(space, 0x2C) == 0x1AF4
    assert u16(space, 0x2E) == 0x1100
    assert u8(space, 0x34) == 0  # no capabilities
    assert u8(space, 0x3D) == 2  # INTB
    assert space.read(0x10, 24) == bytes(24)  # no BARs
    assert u32(space, 0x30) == 0  # no ROM


def test_express_space_is_4096_bytes() -> None:
    assert make(express=True).size == 4096
    assert make(capabilities=[ExpressCapability()]).size == 4096
    assert make().read(0, 256) == make().read(0, 256)


def test_status_capability_bit_follows_capabilities() -> None:
    space = make(capabilities=[PowerManagementCapability()])
    assert u16(space, 0x06) & 0x0010
    assert u8(space, 0x34) == 0x40


def test_identity_validation() -> None:
    with pytest.raises(ValueError):
        PciIdentity(vendor_id=0xFFFF, device_id=1)
    with pytest.raises(ValueError):
        PciIdentity(vendor_id=1, device_id=1, class_code=1 << 24)
    with pytest.raises(ValueError):
        make(interrupt_pin=5)


# --- read-only fields and errno answers -----------------------------------------------


@pytest.mark.parametrize(("offset", "size"), [(0, 1), (0, 2), (0, 4), (1, 2), (2, 2), (3, 1)])
def test_vendor_device_id_writes_are_einval(offset: int, size: int) -> None:
    space = make()
    before = space.read(0, 256)
    with pytest.raises(VfioUserError) as info:
        space.write(offset, b"\xff" * size)
    assert info.value.errno == errno.EINVAL
    assert space.read(0, 256) == before


def test_write_spanning_id_and_command_is_rejected_whole() -> None:
    space = make()
    with pytest.raises(VfioUserError) as info:
        space.write(0x02, b"\x00\x00\x07\x00")  # device ID + command
    assert info.value.errno == errno.EINVAL
    assert u16(space, 0x04) == 0  # the command part was not applied either


@pytest.mark.parametrize(
    ("offset", "size"),
    [(-1, 1), (256, 1), (255, 2), (0, 257), (0x100, 4)],
)
def test_out_of_range_is_einval(offset: int, size: int) -> None:
    space = make()
    for attempt in (lambda: space.read(offset, size), lambda: space.write(offset, bytes(size))):
        with pytest.raises(VfioUserError) as info:
            attempt()
        assert info.value.errno == errno.EINVAL


def test_zero_length_access_succeeds() -> None:
    space = make()
    assert space.read(0x40, 0) == b""
    space.write(0x00, b"")  # touches nothing, not even the IDs
    space.write(256, b"")


def test_read_only_header_registers_are_masked_silently() -> None:
    space = make(interrupt_pin=InterruptPin.INTA, rom_size=None)
    before = space.read(0, 256)
    w32(space, 0x08, 0xFFFFFFFF)  # revision + class
    w32(space, 0x2C, 0xFFFFFFFF)  # subsystem IDs
    w32(space, 0x34, 0xFFFFFFFF)  # capability pointer + reserved
    w32(space, 0x28, 0xFFFFFFFF)  # CardBus CIS
    space.write(0x0E, b"\xff\xff")  # header type + BIST
    space.write(0x3D, b"\x03\xff\xff")  # interrupt pin, min_gnt, max_lat
    assert space.read(0, 256) == before


def test_cache_line_latency_interrupt_line_are_rw() -> None:
    space = make(interrupt_pin=InterruptPin.INTA)
    w32(space, 0x0C, 0xFFFF2010)  # cache line 0x10, latency 0x20, header type/BIST ignored
    assert space.read(0x0C, 4) == bytes([0x10, 0x20, 0x00, 0x00])
    w32(space, 0x3C, 0xFFFFFF0B)  # interrupt line 11; pin and the rest read-only
    assert space.read(0x3C, 4) == bytes([0x0B, 0x01, 0x00, 0x00])
    assert space.interrupt_line == 0x0B


# --- command and status ---------------------------------------------------------------


def test_command_writable_bits() -> None:
    space = make()
    w16(space, 0x04, 0xFFFF)
    assert u16(space, 0x04) == 0x0547  # IO, MEM, BM, parity, SERR#, INTx disable
    assert space.io_enabled and space.memory_enabled and space.bus_master_enabled
    assert space.intx_disabled
    w16(space, 0x04, 0x0002)
    assert u16(space, 0x04) == 0x0002
    assert not space.intx_disabled


def test_status_rw1c_bits() -> None:
    space = make(capabilities=[PowerManagementCapability()])
    space.set_status_errors(0xF900)
    assert u16(space, 0x06) == 0xF910
    w16(space, 0x06, 0x0000)  # writing 0 leaves them
    assert u16(space, 0x06) == 0xF910
    w16(space, 0x06, 0x0900)  # clears exactly the ones written as 1
    assert u16(space, 0x06) == 0xF010
    w16(space, 0x06, 0xFFFF)  # read-only bits (capabilities list) survive
    assert u16(space, 0x06) == 0x0010
    with pytest.raises(ValueError):
        space.set_status_errors(0x0010)


def test_interrupt_status_bit_is_device_driven() -> None:
    space = make(interrupt_pin=InterruptPin.INTA)
    space.set_interrupt_status(True)
    assert u16(space, 0x06) & 0x0008
    w16(space, 0x06, 0xFFFF)  # the client cannot clear it
    assert u16(space, 0x06) & 0x0008
    space.set_interrupt_status(False)
    assert not u16(space, 0x06) & 0x0008


def test_dword_write_spanning_command_and_status() -> None:
    # QEMU writes the command register as part of the dword at offset 4.
    space = make()
    space.set_status_errors(0x2000 | 0x0100)
    w32(space, 0x04, 0x0100_0006)  # MEM + BM; clear master data parity error only
    assert u16(space, 0x04) == 0x0006
    assert u16(space, 0x06) == 0x2000
    w32(space, 0x04, 0xFFFF_FFFF)
    assert u16(space, 0x04) == 0x0547
    assert u16(space, 0x06) == 0


def test_byte_write_to_command_high_byte() -> None:
    space = make()
    space.write(0x05, b"\x04")  # INTx disable lives in the high byte
    assert space.intx_disabled
    assert u16(space, 0x04) == 0x0400


# --- BARs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "io", "is_64bit", "prefetchable"),
    [
        (8, False, False, False),  # memory < 16
        (0x3000, False, False, False),  # not a power of two
        (2, True, False, False),  # I/O < 4
        (16, True, True, False),
        (16, True, False, True),
        (1 << 32, False, False, False),  # too big for a 32-bit BAR
    ],
)
def test_bad_bar_specs(size: int, io: bool, is_64bit: bool, prefetchable: bool) -> None:
    with pytest.raises(ValueError):
        BarSpec(size, io=io, is_64bit=is_64bit, prefetchable=prefetchable)


def test_bar_slots_validation() -> None:
    BarSpec(1 << 32, is_64bit=True)
    with pytest.raises(ValueError):
        make(bars={5: BarSpec(16, is_64bit=True)})  # no slot for the upper half
    with pytest.raises(ValueError):
        make(bars={0: BarSpec(16, is_64bit=True), 1: BarSpec(16)})
    with pytest.raises(ValueError):
        make(bars={6: BarSpec(16)})


def test_bar_type_bits_at_power_on() -> None:
    space = make(
        bars={
            0: BarSpec(0x1000),
            1: BarSpec(0x100, io=True),
            2: BarSpec(0x4000, is_64bit=True, prefetchable=True),
            4: BarSpec(0x10, prefetchable=True),
        }
    )
    assert u32(space, 0x10) == 0x0
    assert u32(space, 0x14) == 0x1
    assert u32(space, 0x18) == 0xC
    assert u32(space, 0x1C) == 0x0
    assert u32(space, 0x20) == 0x8
    assert u32(space, 0x24) == 0x0  # unimplemented


def test_32bit_memory_bar_sizing() -> None:
    space = make(bars={0: BarSpec(0x1000)})
    w32(space, 0x10, 0xFFFFFFFF)
    assert u32(space, 0x10) == 0xFFFFF000
    size = (~(u32(space, 0x10) & 0xFFFFFFF0) & 0xFFFFFFFF) + 1
    assert size == 0x1000
    w32(space, 0x10, 0xFEBC1234)  # low address bits below the size are dropped
    assert u32(space, 0x10) == 0xFEBC1000
    assert space.bar_address(0) == 0xFEBC1000


def test_prefetchable_bar_sizing_keeps_type_bits() -> None:
    space = make(bars={3: BarSpec(0x100000, prefetchable=True)})
    w32(space, 0x1C, 0xFFFFFFFF)
    assert u32(space, 0x1C) == 0xFFF00008


def test_io_bar_sizing() -> None:
    space = make(bars={2: BarSpec(0x20, io=True)})
    w32(space, 0x18, 0xFFFFFFFF)
    assert u32(space, 0x18) == 0xFFFFFFE1
    w32(space, 0x18, 0xC040)
    assert u32(space, 0x18) == 0xC041
    assert space.bar_address(2) == 0xC040


def test_64bit_bar_sizing_both_halves() -> None:
    space = make(bars={0: BarSpec(0x4000, is_64bit=True, prefetchable=True)})
    w32(space, 0x10, 0xFFFFFFFF)
    w32(space, 0x14, 0xFFFFFFFF)
    assert u32(space, 0x10) == 0xFFFFC00C
    assert u32(space, 0x14) == 0xFFFFFFFF
    w32(space, 0x10, 0xFE000000)
    w32(space, 0x14, 0x00000008)
    assert space.bar_address(0) == 0x8_FE000000
    assert space.bar_address(1) is None  # the upper half is not a BAR of its own


def test_64bit_bar_larger_than_4g_sizes_upper_half() -> None:
    space = make(bars={2: BarSpec(1 << 34, is_64bit=True)})
    space.write(0x18, b"\xff" * 8)  # one qword write over both halves
    assert u32(space, 0x18) == 0x00000004  # no writable address bits in the low half
    assert u32(space, 0x1C) == 0xFFFFFFFC
    bar = u32(space, 0x1C) << 32 | u32(space, 0x18)
    size = (~(bar & ~0xF) & (1 << 64) - 1) + 1
    assert size == 1 << 34


def test_unimplemented_bars_read_zero_and_ignore_writes() -> None:
    space = make(bars={0: BarSpec(0x1000)})
    for offset in range(0x14, 0x28, 4):
        w32(space, offset, 0xFFFFFFFF)
        assert u32(space, offset) == 0
    assert space.bar_address(1) is None


def test_expansion_rom_sizing_and_enable() -> None:
    space = make(rom_size=0x10000)
    w32(space, 0x30, 0xFFFFFFFE)  # QEMU sizes the ROM without setting the enable bit
    assert u32(space, 0x30) == 0xFFFF0000
    w32(space, 0x30, 0xFEB00001)
    assert u32(space, 0x30) == 0xFEB00001
    assert space.rom_enabled
    assert space.bar_address(6) == 0xFEB00000
    w32(space, 0x30, 0)
    assert not space.rom_enabled


def test_no_rom_ignores_writes() -> None:
    space = make()
    w32(space, 0x30, 0xFFFFFFFF)
    assert u32(space, 0x30) == 0
    assert space.bar_address(6) is None
    with pytest.raises(ValueError):
        make(rom_size=1024)


# --- hooks and reset ------------------------------------------------------------------


def test_command_and_bar_hooks() -> None:
    space = make(bars={0: BarSpec(0x1000), 2: BarSpec(0x100, is_64bit=True)}, rom_size=0x800)
    commands: list[tuple[int, int]] = []
    bars: list[tuple[int, int]] = []
    space.command_changed.connect(lambda old, new: commands.append((old, new)))
    disconnect = space.bar_changed.connect(lambda index, address: bars.append((index, address)))
    w32(space, 0x04, 0x0000_0002)
    w32(space, 0x04, 0x0000_0002)  # unchanged: no event
    assert commands == [(0, 2)]
    w32(space, 0x10, 0xFEB00000)
    w32(space, 0x1C, 0x1)
    w32(space, 0x14, 0xFFFFFFFF)  # unimplemented BAR 1: no event
    w32(space, 0x30, 0xFFFFFFFE)
    assert bars == [(0, 0xFEB00000), (2, 0x1_00000000), (6, 0xFFFFF800)]
    disconnect()
    w32(space, 0x10, 0)
    assert len(bars) == 3


def test_reset_restores_power_on_and_notifies() -> None:
    space = make(bars={0: BarSpec(0x1000)})
    w32(space, 0x04, 0x0000_0006)
    w32(space, 0x10, 0xFEB00000)
    space.write(0x3C, b"\x0a")
    events: list[str] = []
    space.command_changed.connect(lambda old, new: events.append(f"cmd {old:#x}->{new:#x}"))
    space.bar_changed.connect(lambda index, address: events.append(f"bar{index} {address:#x}"))
    space.reset()
    assert space.read(0, 256) == make(bars={0: BarSpec(0x1000)}).read(0, 256)
    assert events == ["cmd 0x6->0x0", "bar0 0x0"]
