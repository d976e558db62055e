"""Device-specific config space: registers and a vendor capability served by callbacks,
reached by a client over a real socket; declarations that would collide are refused."""

from __future__ import annotations

import errno

import pytest
import trio

from vfiouser_trio.client import VfioUserError
from vfiouser_trio.protocol import PciRegion
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.device_errors import DeviceCodeError
from vfiouser_trio.server.pci import ConfigRegisters, PciConfigSpace, PciIdentity
from vfiouser_trio.server.pci_caps import (
    CAP_ID_MSIX,
    CAP_ID_VENDOR,
    MsiCapability,
    VendorCallbackCapability,
)
from vfiouser_trio.testing import nested_device

pytestmark = pytest.mark.usefixtures("no_fd_leak")

ID = PciIdentity(vendor_id=0x1234, device_id=0x7120)
CONFIG = PciRegion.CONFIG


class Regs(Device):
    """Registers at 0x40+8 (plain read, async write) that the MSI-X capability must go
    around; a vendor capability of 5 data bytes (async read, plain write); read-only
    registers at 0xf0+4; a register at 0xe0 whose read raises, one at 0xe8 returning 1 byte."""

    def __init__(self) -> None:
        super().__init__(ID, name="regs0")
        self.regs = bytearray(range(0x10, 0x18))
        self.vendor = bytearray(b"\xa0\xa1\xa2\xa3\xa4")
        self.calls: list[tuple[str, int, int | bytes]] = []
        self.add_config_registers(0x40, 8, read=self.read_regs, write=self.write_regs)
        self.add_bar(1, 0x1000)
        self.add_msix(2, bar=1)
        self.add_vendor_capability(5, read=self.read_vendor, write=self.write_vendor)
        self.add_config_registers(0xF0, 4, read=lambda offset, size: b"\x5a" * size)
        self.add_config_registers(0xE0, 4, read=self.read_broken)
        self.add_config_registers(0xE8, 4, read=lambda offset, size: b"\x01")

    def read_regs(self, offset: int, size: int) -> bytes:
        self.calls.append(("read_regs", offset, size))
        return bytes(self.regs[offset : offset + size])

    async def write_regs(self, offset: int, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append(("write_regs", offset, data))
        self.regs[offset : offset + len(data)] = data

    async def read_vendor(self, offset: int, size: int) -> bytes:
        self.calls.append(("read_vendor", offset, size))
        return bytes(self.vendor[offset - 3 : offset - 3 + size])

    def write_vendor(self, offset: int, data: bytes) -> None:
        self.calls.append(("write_vendor", offset, data))
        self.vendor[offset - 3 : offset - 3 + len(data)] = data

    def read_broken(self, offset: int, size: int) -> bytes:
        raise LookupError("no such register")


async def test_registers_are_served_by_their_callbacks_with_offsets_from_their_start() -> None:
    device = Regs()
    with trio.fail_after(10):
        async with nested_device(device) as pair:
            client = pair.client
            assert await client.read(CONFIG, 0x40, 4) == bytes(range(0x10, 0x14))
            assert await client.read(CONFIG, 0x46, 2) == b"\x16\x17"
            await client.write(CONFIG, 0x44, b"\xee\xff")
            assert device.regs[4:6] == b"\xee\xff"
            # One access over framework bytes and registers: each part from its owner.
            whole = await client.read(CONFIG, 0x3C, 0x10)
            assert whole[4:12] == bytes(device.regs)
            assert whole[:4] == await client.read(CONFIG, 0x3C, 4)  # interrupt line..max lat
    assert ("read_regs", 0, 4) in device.calls and ("read_regs", 6, 2) in device.calls
    assert ("write_regs", 4, b"\xee\xff") in device.calls


async def test_the_vendor_capability_is_in_the_chain_and_served_by_callbacks() -> None:
    device = Regs()
    with trio.fail_after(10):
        async with nested_device(device) as pair:
            client = pair.client
            caps = {cap.id: cap.offset for cap in await client.config.capabilities()}
            assert set(caps) == {CAP_ID_MSIX, CAP_ID_VENDOR}
            assert caps[CAP_ID_MSIX] >= 0x48  # placed around the registers at 0x40
            vendor = caps[CAP_ID_VENDOR]
            header = await client.read(CONFIG, vendor, 3)
            assert header[0] == CAP_ID_VENDOR and header[2] == 3 + 5  # ID, next, length
            assert await client.read(CONFIG, vendor + 3, 5) == b"\xa0\xa1\xa2\xa3\xa4"
            await client.write(CONFIG, vendor + 4, b"\x55")
            assert await client.read(CONFIG, vendor + 4, 1) == b"\x55"
            # The framework keeps the header: a write to it is refused, nothing called.
            with pytest.raises(VfioUserError) as refused:
                await client.write(CONFIG, vendor, b"\0\0\0\0")
            assert refused.value.errno == errno.EPERM
    assert ("read_vendor", 3, 5) in device.calls  # offsets from the capability's start
    assert [c for c in device.calls if c[0] == "write_vendor"] == [("write_vendor", 4, b"\x55")]


async def test_registers_without_a_write_callback_refuse_writes_with_eperm() -> None:
    device = Regs()
    with trio.fail_after(10):
        async with nested_device(device) as pair:
            assert await pair.client.read(CONFIG, 0xF0, 4) == b"\x5a" * 4
            with pytest.raises(VfioUserError) as refused:
                await pair.client.write(CONFIG, 0xF2, b"\1")
            assert refused.value.errno == errno.EPERM


async def test_a_raising_register_callback_is_eio_and_a_device_error_naming_the_offset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with trio.fail_after(10), pytest.raises(DeviceCodeError) as raised:
        async with nested_device(Regs()) as pair:
            with pytest.raises(VfioUserError) as failed:
                await pair.client.read(CONFIG, 0xE0, 4)
            assert failed.value.errno == errno.EIO
            assert await pair.client.read(CONFIG, 0x40, 1) == b"\x10"  # still served
    assert raised.value.where == "CONFIG at 0xe0+0x4"
    assert isinstance(raised.value.__cause__, LookupError)
    assert "regs0: REGION_READ CONFIG at 0xe0+0x4" in caplog.text


async def test_a_register_read_of_the_wrong_length_is_a_device_error() -> None:
    with trio.fail_after(10), pytest.raises(DeviceCodeError) as raised:
        async with nested_device(Regs()) as pair:
            with pytest.raises(VfioUserError) as failed:
                await pair.client.read(CONFIG, 0xE8, 4)
            assert failed.value.errno == errno.EIO
    assert "returned 1 bytes, not the 4 bytes asked for" in raised.value.reason


def _read(offset: int, size: int) -> bytes:
    return bytes(size)


@pytest.mark.parametrize(
    ("offset", "size", "express", "problem"),
    [
        (0x3C, 8, False, "the standard header (0x00..0x3f) is the framework's"),
        (0xFC, 8, False, "beyond the 256-byte config space (express=True gives 4096)"),
        (0xF8, 0x10, True, "0x100..0x103 is the head of the extended capability list"),
        (0x80, 0, False, "size 0"),
        (0x44, 4, False, "they overlap the config registers at 0x40+0x8"),
    ],
)
def test_registers_that_collide_are_refused_at_declaration(
    offset: int, size: int, express: bool, problem: str
) -> None:
    class Bad(Device):
        def __init__(self) -> None:
            super().__init__(ID, name="bad0", express=express)
            self.add_config_registers(0x40, 8, read=_read)
            self.add_config_registers(offset, size, read=_read)

    with pytest.raises(ValueError, match=r"bad0: config registers at .*") as refused:
        Bad()
    assert problem in str(refused.value)


def test_a_non_callable_register_callback_is_refused_at_declaration() -> None:
    class Bad(Device):
        def __init__(self) -> None:
            super().__init__(ID, name="bad1")
            self.add_config_registers(0x40, 4, read=b"\0\0\0\0")  # type: ignore[arg-type]

    with pytest.raises(ValueError, match=r"bad1: config registers at 0x40\+0x4: read=.* is not"):
        Bad()


def test_a_capability_placed_over_registers_is_refused_and_one_placed_for_us_goes_around() -> None:
    registers = [ConfigRegisters(0x40, 0x10, _read)]
    space = PciConfigSpace(ID, registers=registers, capabilities=[MsiCapability()])
    [msi] = space.capabilities
    assert msi.offset == 0x50
    with pytest.raises(ValueError, match="overlaps the device's config registers at 0x40"):
        space.add_capability(VendorCallbackCapability(4, _read), offset=0x40)
    with pytest.raises(ValueError, match="body of 0 bytes"):
        VendorCallbackCapability(0, _read)
