"""Capabilities in PciConfigSpace: chains, layouts, write masks, EPERM answers and hooks."""

from __future__ import annotations

import errno
import itertools
import struct

import pytest

from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.msix import MsiState
from vfiouser_trio.server.pci import BarSpec, PciConfigSpace, PciIdentity
from vfiouser_trio.server.pci_caps import (
    ExpressCapability,
    ExpressDeviceType,
    MsiCapability,
    MsixCapability,
    PowerManagementCapability,
    SerialNumberCapability,
    VendorCapability,
    VendorExtendedCapability,
)

IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x11E8, class_code=0xFF0000)
BARS = {0: BarSpec(0x1000), 2: BarSpec(0x4000, is_64bit=True)}


def walk_standard(config: bytes) -> list[tuple[int, int]]:
    """(offset, ID) of each capability, following next pointers from 0x34."""
    found: list[tuple[int, int]] = []
    offset = config[0x34] & ~3
    while offset:
        assert 0x40 <= offset <= 0xFC and offset % 4 == 0
        assert len(found) < 48, "capability list loops"
        found.append((offset, config[offset]))
        offset = config[offset + 1] & ~3
    return found


def walk_extended(config: bytes) -> list[tuple[int, int, int]]:
    """(offset, ID, version) of each extended capability, from 0x100."""
    found: list[tuple[int, int, int]] = []
    offset = 0x100
    while offset:
        header = int.from_bytes(config[offset : offset + 4], "little")
        if header == 0:
            break
        assert len(found) < 960, "extended capability list loops"
        found.append((offset, header & 0xFFFF, header >> 16 & 0xF))
        offset = header >> 20
        assert offset == 0 or offset >= 0x100
    return found


def full_space() -> PciConfigSpace:
    return PciConfigSpace(
        IDENTITY,
        bars=BARS,
        capabilities=[
            PowerManagementCapability(pme_support=0x18),
            MsiCapability(vectors=8, address_64=True, per_vector_masking=True),
            MsixCapability(table_size=8, table_bar=2, table_offset=0, pba_offset=0x2000),
            ExpressCapability(flr=True),
            VendorCapability(b"hello"),
            SerialNumberCapability(0x0011223344556677),
            VendorExtendedCapability(0xABCD, 2, b"\x01" * 12),
        ],
    )


def find(space: PciConfigSpace, cap_id: int) -> int:
    for offset, found in walk_standard(space.read(0, space.size)):
        if found == cap_id:
            return offset
    raise AssertionError(f"capability {cap_id:#x} not found")


def u16(space: PciConfigSpace, offset: int) -> int:
    value: int = struct.unpack("<H", space.read(offset, 2))[0]
    return value


def u32(space: PciConfigSpace, offset: int) -> int:
    value: int = struct.unpack("<I", space.read(offset, 4))[0]
    return value


def expect_errno(code: int, space: PciConfigSpace, offset: int, data: bytes) -> None:
    before = space.read(0, space.size)
    with pytest.raises(VfioUserError) as info:
        space.write(offset, data)
    assert info.value.errno == code
    assert space.read(0, space.size) == before


# --- chains ---------------------------------------------------------------------------


def test_standard_chain_is_walkable_and_dword_aligned() -> None:
    space = full_space()
    config = space.read(0, space.size)
    chain = walk_standard(config)
    assert [cap_id for _, cap_id in chain] == [0x01, 0x05, 0x11, 0x10, 0x09]
    assert chain[0][0] == 0x40
    assert config[0x06] & 0x10
    sizes = {0x01: 8, 0x05: 0x18, 0x11: 12, 0x10: 0x3C, 0x09: 8}
    for (offset, cap_id), (next_offset, _) in itertools.pairwise(chain):
        assert next_offset >= offset + sizes[cap_id]  # no overlap


def test_extended_chain_is_walkable() -> None:
    space = full_space()
    chain = walk_extended(space.read(0, 4096))
    assert [(cap_id, version) for _, cap_id, version in chain] == [(0x0003, 1), (0x000B, 1)]
    assert chain[0][0] == 0x100
    dsn, vsec = chain[0][0], chain[1][0]
    assert space.read(dsn + 4, 8) == (0x0011223344556677).to_bytes(8, "little")
    vsec_header = u32(space, vsec + 4)
    assert vsec_header & 0xFFFF == 0xABCD
    assert vsec_header >> 16 & 0xF == 2
    assert vsec_header >> 20 == 8 + 12
    assert space.read(vsec + 8, 12) == b"\x01" * 12


def test_empty_extended_space_has_zero_header() -> None:
    space = PciConfigSpace(IDENTITY, capabilities=[ExpressCapability()])
    assert space.read(0x100, 4) == bytes(4)
    assert walk_extended(space.read(0, 4096)) == []


def test_extended_capabilities_need_express_space() -> None:
    space = PciConfigSpace(IDENTITY)
    with pytest.raises(ValueError, match="4096"):
        space.add_capability(SerialNumberCapability(1))
    with pytest.raises(ValueError, match="4096"):
        space.add_capability(ExpressCapability())


def test_explicit_offsets_and_placement_errors() -> None:
    space = PciConfigSpace(IDENTITY, express=True, bars=BARS)
    assert space.add_capability(PowerManagementCapability(), offset=0x80) == 0x80
    assert space.add_capability(VendorCapability(b"x"), offset=0x50) == 0x50
    assert walk_standard(space.read(0, 256)) == [(0x80, 0x01), (0x50, 0x09)]
    assert space.add_capability(MsiCapability()) == 0x88  # after the highest one
    with pytest.raises(ValueError, match="overlaps"):
        space.add_capability(VendorCapability(b"y"), offset=0x84)
    with pytest.raises(ValueError):
        space.add_capability(VendorCapability(b"y"), offset=0x42)  # unaligned
    with pytest.raises(ValueError):
        space.add_capability(VendorCapability(b"y"), offset=0x3C)  # in the header
    with pytest.raises(ValueError, match="only one"):
        space.add_capability(MsiCapability())
    with pytest.raises(ValueError, match="0x100"):
        space.add_capability(SerialNumberCapability(1), offset=0x200)
    with pytest.raises(ValueError, match="no room"):
        space.add_capability(VendorCapability(bytes(0xB0)))


def test_msix_capability_validates_its_bar() -> None:
    with pytest.raises(ValueError, match="memory BAR"):
        PciConfigSpace(IDENTITY, capabilities=[MsixCapability(4, table_bar=1)], bars=BARS)
    with pytest.raises(ValueError, match="does not fit"):
        PciConfigSpace(IDENTITY, capabilities=[MsixCapability(512)], bars=BARS)
    with pytest.raises(ValueError, match="overlap"):
        MsixCapability(4, pba_offset=0x20)
    with pytest.raises(ValueError):
        MsixCapability(0)


# --- errno answers --------------------------------------------------------------------


def test_capability_header_writes_are_eperm() -> None:
    space = full_space()
    for offset, _ in walk_standard(space.read(0, 256)):
        expect_errno(errno.EPERM, space, offset, b"\x00")
        expect_errno(errno.EPERM, space, offset + 1, b"\x00")
        expect_errno(errno.EPERM, space, offset, b"\x00\x00\x00\x00")  # ID+next+control
    for offset, _, _ in walk_extended(space.read(0, 4096)):
        for byte in range(4):
            expect_errno(errno.EPERM, space, offset + byte, b"\x00")


def test_read_only_capability_registers_are_eperm() -> None:
    space = full_space()
    msix, express, vendor = find(space, 0x11), find(space, 0x10), find(space, 0x09)
    msi, pm = find(space, 0x05), find(space, 0x01)
    dsn, vsec = (offset for offset, _, _ in walk_extended(space.read(0, 4096)))
    cases = [
        (msix + 4, 4),  # table offset / BIR
        (msix + 8, 4),  # PBA offset / BIR
        (express + 2, 2),  # PCIe capabilities register
        (express + 4, 4),  # device capabilities
        (express + 0x0C, 4),  # link capabilities
        (express + 0x12, 2),  # link status
        (vendor + 2, 1),  # vendor length
        (vendor + 3, 5),  # vendor payload
        (msi + 0x14, 4),  # MSI pending bits
        (pm + 2, 2),  # PMC
        (dsn + 4, 8),  # serial number
        (vsec + 4, 4),  # VSEC header
        (vsec + 8, 12),  # VSEC payload
    ]
    for offset, size in cases:
        expect_errno(errno.EPERM, space, offset, b"\xff" * size)


def test_write_covering_writable_and_read_only_cap_registers_is_masked() -> None:
    space = full_space()
    express = find(space, 0x10)
    link_status = u16(space, express + 0x12)
    space.write(express + 0x10, b"\xff\xff\xff\xff")  # link control + link status
    assert u16(space, express + 0x10) == 0x00CB
    assert u16(space, express + 0x12) == link_status


def test_unclaimed_space_ignores_writes() -> None:
    space = full_space()
    last_standard = walk_standard(space.read(0, 256))[-1][0]
    space.write(0xF0, b"\xff" * 16)  # beyond the last capability
    assert space.read(0xF0, 16) == bytes(16)
    assert last_standard < 0xF0
    space.write(0x800, b"\xff" * 4)  # unused extended space
    assert space.read(0x800, 4) == bytes(4)


# --- per-capability write masks -------------------------------------------------------


def test_power_management_registers() -> None:
    space = PciConfigSpace(
        IDENTITY, capabilities=[PowerManagementCapability(d1=False, d2=True, pme_support=0x1F)]
    )
    pm = find(space, 0x01)
    assert u16(space, pm + 2) & 0x7 == 3  # version 3
    assert u16(space, pm + 2) >> 11 == 0x1F
    assert u16(space, pm + 4) == 0x0008  # D0, no soft reset
    space.write(pm + 4, struct.pack("<H", 0x7FFF))
    assert u16(space, pm + 4) == 0x0008 | 0x0003 | 0x0100  # D3hot, PME enable
    assert space.power_state == 3
    space.write(pm + 4, struct.pack("<H", 0x0001))  # D1 unsupported: state kept
    assert space.power_state == 3
    space.write(pm + 4, struct.pack("<H", 0x0002))  # D2 supported
    assert space.power_state == 2
    # PME status is RW1C: the device latches it, writing 0 keeps it, writing 1 clears it.
    space.device_write(pm + 5, bytes([space.read(pm + 5, 1)[0] | 0x80]))
    space.write(pm + 4, struct.pack("<H", 0x0102))
    assert u16(space, pm + 4) == 0x8000 | 0x0100 | 0x0008 | 0x0002
    space.write(pm + 4, struct.pack("<H", 0x8102))
    assert u16(space, pm + 4) == 0x0100 | 0x0008 | 0x0002


def test_power_management_pme_enable_needs_pme_support() -> None:
    space = PciConfigSpace(IDENTITY, capabilities=[PowerManagementCapability()])
    pm = find(space, 0x01)
    space.write(pm + 4, struct.pack("<H", 0xFFFF))
    assert u16(space, pm + 4) == 0x0008 | 0x0003


def test_pmcsr_dword_write_covers_bse_and_data() -> None:
    space = PciConfigSpace(IDENTITY, capabilities=[PowerManagementCapability()])
    pm = find(space, 0x01)
    space.write(pm + 4, b"\x03\x00\xff\xff")
    assert space.read(pm + 4, 4) == b"\x0b\x00\x00\x00"


@pytest.mark.parametrize("address_64", [False, True])
@pytest.mark.parametrize("masking", [False, True])
def test_msi_layout_and_masks(address_64: bool, masking: bool) -> None:
    space = PciConfigSpace(
        IDENTITY,
        capabilities=[MsiCapability(vectors=4, address_64=address_64, per_vector_masking=masking)],
    )
    msi = find(space, 0x05)
    control = u16(space, msi + 2)
    assert control & 0x0E == 2 << 1  # 4 vectors capable
    assert bool(control & 0x80) == address_64
    assert bool(control & 0x100) == masking
    space.write(msi + 2, struct.pack("<H", 0xFFFF))
    control = u16(space, msi + 2)
    assert control & 0x01  # enable
    assert control >> 4 & 0x7 == 2  # MME clamped to the 4 vectors capable
    space.write(msi + 4, struct.pack("<I", 0xFEE0_0003))
    assert u32(space, msi + 4) == 0xFEE0_0000  # dword aligned
    data_offset = msi + (0x0C if address_64 else 0x08)
    if address_64:
        space.write(msi + 8, struct.pack("<I", 0x1))
        assert u32(space, msi + 8) == 1
    space.write(data_offset, struct.pack("<I", 0xFFFF_4321))  # data + extended data
    assert u32(space, data_offset) == 0x4321
    if masking:
        space.write(data_offset + 4, struct.pack("<I", 0xFFFFFFFF))
        assert u32(space, data_offset + 4) == 0xF  # only 4 vectors' mask bits


def test_msix_control_masks() -> None:
    space = PciConfigSpace(IDENTITY, bars=BARS, capabilities=[MsixCapability(16, table_bar=2)])
    msix = find(space, 0x11)
    assert u16(space, msix + 2) == 15
    assert u32(space, msix + 4) == 2  # offset 0, BIR 2
    assert u32(space, msix + 8) == 0x100 | 2  # PBA right after the table
    space.write(msix + 2, struct.pack("<H", 0xFFFF))
    assert u16(space, msix + 2) == 0xC000 | 15
    assert space.msix_enabled and space.msix_function_masked
    space.write(msix + 3, b"\x80")  # byte write: enable, unmask
    assert space.msix_enabled and not space.msix_function_masked


def test_express_registers() -> None:
    space = PciConfigSpace(
        IDENTITY,
        capabilities=[ExpressCapability(max_payload=256, link_speed=2, link_width=8)],
    )
    express = find(space, 0x10)
    assert u16(space, express + 2) == 0x0002  # version 2, endpoint
    devcap = u32(space, express + 4)
    assert devcap & 0x7 == 1  # 256 bytes
    assert not devcap & 1 << 28  # no FLR
    linkcap = u32(space, express + 0x0C)
    assert linkcap & 0xF == 2 and linkcap >> 4 & 0x3F == 8
    assert u16(space, express + 8) == 0x2810  # RO + NS on, 512-byte read requests
    space.write(express + 8, struct.pack("<H", 0xFFFF))
    assert u16(space, express + 8) == 0x78FF  # no ext tag, phantom, aux power, FLR
    space.write(express + 8, struct.pack("<I", 0x000F_0000))  # dword: control + status
    assert u16(space, express + 8) == 0
    assert u16(space, express + 0x0A) == 0  # RW1C bits only cleared


def test_express_device_status_rw1c() -> None:
    space = PciConfigSpace(IDENTITY, capabilities=[ExpressCapability()])
    express = find(space, 0x10)
    space.write(express + 0x0A, b"\x0f\x00")
    assert u16(space, express + 0x0A) == 0  # writing 1 to clear bits that are clear
    with pytest.raises(ValueError):
        ExpressCapability(max_payload=64)


def test_integrated_endpoint_has_no_link() -> None:
    space = PciConfigSpace(
        IDENTITY,
        capabilities=[ExpressCapability(device_type=ExpressDeviceType.INTEGRATED_ENDPOINT)],
    )
    express = find(space, 0x10)
    assert u16(space, express + 2) == 0x0092
    assert u32(space, express + 0x0C) == 0
    expect_errno(errno.EPERM, space, express + 0x10, b"\x03\x00")


def test_vendor_capability_layout() -> None:
    space = PciConfigSpace(IDENTITY, capabilities=[VendorCapability(b"\xaa\xbb")])
    vendor = find(space, 0x09)
    assert space.read(vendor + 2, 3) == b"\x05\xaa\xbb"


# --- hooks ----------------------------------------------------------------------------


def test_msi_hook_and_accessors() -> None:
    space = PciConfigSpace(IDENTITY, capabilities=[MsiCapability(vectors=4)])
    msi = find(space, 0x05)
    seen: list[tuple[bool, int]] = []

    def on_msi(state: MsiState) -> None:
        seen.append((state.enabled, state.vectors_enabled))

    space.msi_changed.connect(on_msi)
    space.write(msi + 4, struct.pack("<II", 0xFEE0_1000, 0))
    space.write(msi + 0x0C, struct.pack("<H", 0x4020))
    space.write(msi + 2, struct.pack("<H", 0x0021))  # enable, 4 vectors
    assert space.msi_enabled
    assert space.msi_message(3) == (0xFEE0_1000, 0x4023)
    assert seen == [(False, 1), (False, 1), (True, 4)]
    space.write(msi + 2, struct.pack("<H", 0x0021))  # no change, no event
    assert len(seen) == 3


def test_msix_hook_and_reset() -> None:
    space = PciConfigSpace(IDENTITY, bars=BARS, capabilities=[MsixCapability(4)])
    msix = find(space, 0x11)
    seen: list[tuple[bool, bool]] = []
    space.msix_changed.connect(lambda enabled, masked: seen.append((enabled, masked)))
    space.write(msix + 2, struct.pack("<H", 0xC000))
    space.write(msix + 2, struct.pack("<H", 0x8000))
    assert space.msix is not None and space.msix.enabled
    space.reset()
    assert seen == [(True, True), (True, False), (False, False)]
    assert not space.msix.enabled


def test_flr_hook() -> None:
    space = PciConfigSpace(IDENTITY, capabilities=[ExpressCapability(flr=True)])
    express = find(space, 0x10)
    requests: list[None] = []
    space.flr_requested.connect(lambda: requests.append(None))
    control = u16(space, express + 8)
    space.write(express + 8, struct.pack("<H", control | 0x8000))
    assert requests == [None]
    assert u16(space, express + 8) == control  # reads back 0
    space.write(express + 8, struct.pack("<H", control))
    assert len(requests) == 1


def test_flr_ignored_without_capability_bit() -> None:
    space = PciConfigSpace(IDENTITY, capabilities=[ExpressCapability(flr=False)])
    express = find(space, 0x10)
    requests: list[None] = []
    space.flr_requested.connect(lambda: requests.append(None))
    space.write(express + 9, b"\x80")
    assert requests == []
