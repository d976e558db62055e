"""Property tests: random client writes keep read-only state intact; RW registers never fail;
MSI-X never loses nor duplicates an interrupt."""

from __future__ import annotations

import errno

from hypothesis import given, settings
from hypothesis import strategies as st

from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.msix import MsixState
from vfiouser_trio.server.pci import BarSpec, InterruptPin, PciConfigSpace, PciIdentity
from vfiouser_trio.server.pci_caps import (
    ExpressCapability,
    MsiCapability,
    MsixCapability,
    PowerManagementCapability,
    SerialNumberCapability,
    VendorCapability,
    VendorExtendedCapability,
)


def make_space() -> PciConfigSpace:
    return PciConfigSpace(
        PciIdentity(0x1234, 0xABCD, 0x1AF4, 0x0001, class_code=0x058000, revision=7),
        bars={
            0: BarSpec(0x1000),
            1: BarSpec(0x40, io=True),
            2: BarSpec(0x10000, is_64bit=True, prefetchable=True),
        },
        rom_size=0x8000,
        interrupt_pin=InterruptPin.INTA,
        capabilities=[
            PowerManagementCapability(pme_support=0x08),
            MsiCapability(vectors=8, per_vector_masking=True),
            MsixCapability(table_size=8, table_bar=0),
            ExpressCapability(),
            VendorCapability(b"vendor"),
            SerialNumberCapability(0xFEEDFACE),
            VendorExtendedCapability(0x42, 1, b"0123"),
        ],
    )


def cap_offsets(config: bytes) -> dict[int, int]:
    """Capability ID -> offset, walking the list from 0x34 (independent of the library)."""
    found: dict[int, int] = {}
    offset = config[0x34]
    while offset:
        found[config[offset]] = offset
        offset = config[offset + 1]
    return found


SPACE = make_space()
POWER_ON = SPACE.read(0, SPACE.size)
CAPS = cap_offsets(POWER_ON)
PM, MSI, MSIX, EXP, VND = (CAPS[i] for i in (0x01, 0x05, 0x11, 0x10, 0x09))

# Registers without a single writable bit, from the PCI / PCIe specs: (offset, size).
READ_ONLY = [
    (0x00, 4),  # vendor, device
    (0x08, 4),  # revision, class
    (0x0E, 2),  # header type, BIST
    (0x24, 12),  # BAR5 (unimplemented), CardBus CIS, subsystem IDs
    (0x34, 8),  # capability pointer, reserved
    (0x3D, 3),  # interrupt pin, min grant, max latency
    *((offset, 2) for offset in CAPS.values()),  # ID + next of every capability
    (PM + 2, 2),  # PMC
    (PM + 6, 2),  # PMCSR_BSE, data
    (MSI + 3, 1),  # MSI control high byte: per-vector mask capable etc.
    (MSI + 0x0E, 2),  # extended message data
    (MSI + 0x14, 4),  # pending bits (nothing triggers in this test)
    (MSIX + 4, 8),  # table and PBA location
    (EXP + 2, 6),  # PCIe capabilities, device capabilities
    (EXP + 0x0C, 4),  # link capabilities
    (EXP + 0x12, 2),  # link status
    (EXP + 0x14, 0x10),  # slot and root registers
    (EXP + 0x24, 4),  # device capabilities 2
    (EXP + 0x2C, 4),  # link capabilities 2
    (EXP + 0x32, 0x0A),  # link status 2 .. slot status 2
    (VND + 2, 7),  # vendor length + payload
    (0x100, 12),  # serial number capability
    (0x10C, 12),  # vendor-specific extended capability
]

# Registers with writable bits: any write inside one must succeed.
WRITABLE = [
    (0x04, 4),  # command + status
    (0x0C, 4),  # cache line .. BIST
    (0x10, 0x14),  # BARs 0..4 (BAR2+3: 64-bit)
    (0x30, 4),  # ROM
    (0x3C, 4),  # interrupt line .. max latency
    (PM + 4, 2),  # PMCSR
    (MSI + 2, 2),  # message control
    (MSI + 4, 0x0A),  # address, upper address, data
    (MSI + 0x10, 4),  # mask bits
    (MSIX + 2, 2),  # message control
    (EXP + 8, 4),  # device control + status
    (EXP + 0x10, 2),  # link control
    (EXP + 0x28, 2),  # device control 2
    (EXP + 0x30, 2),  # link control 2
]


def bytes_of(regions: list[tuple[int, int]]) -> list[int]:
    return [offset for start, size in regions for offset in range(start, start + size)]


READ_ONLY_BYTES = bytes_of(READ_ONLY)
TYPE_BITS = {0x10: 0x0F, 0x14: 0x03, 0x18: 0x0F}  # BAR low bits fixed by the BAR's type


def check_invariants(config: bytes, previous: bytes) -> None:
    for offset in READ_ONLY_BYTES:
        assert config[offset] == POWER_ON[offset], f"read-only byte {offset:#x} changed"
    for offset, mask in TYPE_BITS.items():
        assert config[offset] & mask == POWER_ON[offset] & mask
    command = int.from_bytes(config[4:6], "little")
    assert command & ~0x0547 == 0
    status, old_status = (int.from_bytes(c[6:8], "little") for c in (config, previous))
    assert status & ~old_status == 0, "a write set a status bit"
    assert status & 0x0010  # capabilities list
    assert config[MSI + 2] & 0x8E == POWER_ON[MSI + 2] & 0x8E  # MMC, 64-bit: RO
    assert cap_offsets(config) == CAPS


# Mostly the header and capabilities, sometimes anywhere in the 4 KiB.
offsets = st.one_of(st.integers(0, 0x11F), st.integers(0, 4095))
payloads = st.binary(min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(offsets, payloads), min_size=1, max_size=20))
def test_random_writes_never_change_read_only_bytes(writes: list[tuple[int, bytes]]) -> None:
    space = make_space()
    for offset, data in writes:
        previous = space.read(0, space.size)
        try:
            space.write(offset, data)
        except VfioUserError as error:
            assert error.errno in (errno.EINVAL, errno.EPERM)
            assert space.read(0, space.size) == previous, "a rejected write changed state"
            continue
        check_invariants(space.read(0, space.size), previous)


@st.composite
def writes_inside_writable_registers(draw: st.DrawFn) -> tuple[int, bytes]:
    start, size = draw(st.sampled_from(WRITABLE))
    offset = draw(st.integers(min_value=start, max_value=start + size - 1))
    length = draw(st.integers(min_value=1, max_value=start + size - offset))
    return offset, draw(st.binary(min_size=length, max_size=length))


@settings(max_examples=200, deadline=None)
@given(st.lists(writes_inside_writable_registers(), min_size=1, max_size=20))
def test_writes_to_writable_registers_never_raise(writes: list[tuple[int, bytes]]) -> None:
    space = make_space()
    for offset, data in writes:
        previous = space.read(0, space.size)
        space.write(offset, data)
        check_invariants(space.read(0, space.size), previous)


# --- MSI-X: no interrupt lost or duplicated -------------------------------------------

VECTORS = 4
msix_ops = st.one_of(
    st.tuples(st.just("trigger"), st.integers(0, VECTORS - 1)),
    st.tuples(st.just("mask"), st.integers(0, VECTORS - 1), st.booleans()),
    st.tuples(st.just("control"), st.booleans(), st.booleans()),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(msix_ops, max_size=40))
def test_msix_interrupts_are_neither_lost_nor_duplicated(ops: list[tuple[object, ...]]) -> None:
    delivered: list[int] = []
    state = MsixState(VECTORS, deliver=delivered.append)
    # Reference model, straight from the PCIe spec's rules.
    enabled, function_masked = False, False
    masked = [True] * VECTORS
    pending: set[int] = set()
    expected: list[int] = []
    for op in ops:
        if op[0] == "trigger":
            vector = int(op[1])  # type: ignore[call-overload]
            sent = state.trigger(vector)
            if enabled and not function_masked and not masked[vector]:
                assert sent
            else:
                assert not sent
                if enabled:
                    pending.add(vector)
        elif op[0] == "mask":
            vector, value = int(op[1]), bool(op[2])  # type: ignore[call-overload]
            state.table_write(16 * vector + 12, bytes([int(value)]))
            masked[vector] = value
        else:
            enabled, function_masked = bool(op[1]), bool(op[2])
            state.set_control(enabled=enabled, function_masked=function_masked)
        if enabled and not function_masked:
            ready = sorted(v for v in pending if not masked[v])
            expected.extend(ready)
            pending.difference_update(ready)
        assert delivered == expected
        for vector in range(VECTORS):
            assert state.pending(vector) == (vector in pending)
