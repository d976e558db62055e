"""MSI-X table/PBA emulation and MSI per-vector masking: masking, pending bits, delivery."""

from __future__ import annotations

import errno
import struct

import pytest

from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.msix import MsiState, MsixState
from vfiouser_trio.server.pci import BarSpec, PciConfigSpace, PciIdentity
from vfiouser_trio.server.pci_caps import MsiCapability, MsixCapability

IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x5678)


def entry(address: int, data: int, masked: bool) -> bytes:
    return struct.pack("<QII", address, data, int(masked))


def enabled_state(vectors: int = 4) -> tuple[MsixState, list[int]]:
    delivered: list[int] = []
    state = MsixState(vectors, deliver=delivered.append)
    state.set_control(enabled=True, function_masked=False)
    return state, delivered


# --- table and PBA as bytes -----------------------------------------------------------


def test_power_on_table_is_masked_and_pba_clear() -> None:
    state = MsixState(3)
    assert state.table_size == 48
    assert state.pba_size == 8
    assert state.table_read(0, 48) == entry(0, 0, True) * 3
    assert state.pba_read(0, 8) == bytes(8)
    assert MsixState(65).pba_size == 16


def test_table_entry_fields_and_write_masks() -> None:
    state = MsixState(2)
    state.table_write(16, b"\xff" * 16)
    # Address bits 1:0 and vector control bits 31:1 are read-only zero.
    assert state.table_read(16, 16) == entry(0xFFFF_FFFF_FFFF_FFFC, 0xFFFF_FFFF, True)
    state.table_write(16, entry(0xFEE0_0000, 0x41, False))
    assert state.message(1) == (0xFEE0_0000, 0x41)
    assert not state.masked(1)
    state.table_write(16 + 4, b"\x01\x00\x00\x00")  # dword write to the upper address
    assert state.message(1) == (0x1_FEE0_0000, 0x41)
    state.table_write(16 + 12, b"\x01")  # byte write of the mask bit
    assert state.masked(1)
    assert state.table_read(0, 16) == entry(0, 0, True)  # the other entry is untouched


def test_table_and_pba_ranges_are_checked() -> None:
    state = MsixState(2)
    for attempt in (
        lambda: state.table_read(30, 4),
        lambda: state.table_write(32, b"\x00"),
        lambda: state.table_read(-1, 1),
        lambda: state.pba_read(4, 8),
        lambda: state.pba_write(8, b"\x00"),
    ):
        with pytest.raises(VfioUserError) as info:
            attempt()
        assert info.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        state.trigger(2)
    with pytest.raises(ValueError):
        MsixState(0)


def test_pba_is_read_only_to_the_client() -> None:
    state, _ = enabled_state()
    assert not state.trigger(2)  # masked at power-on: pending
    state.pba_write(0, b"\x00" * 8)
    assert state.pba_read(0, 8) == (1 << 2).to_bytes(8, "little")


# --- trigger / pending / unmask delivery ----------------------------------------------


def test_trigger_unmasked_vector_delivers_now() -> None:
    state, delivered = enabled_state()
    state.table_write(0, entry(0xFEE0_0000, 1, False))
    assert state.trigger(0)
    assert not state.pending(0)
    assert delivered == []  # trigger's answer is the delivery; deliver() is for releases


def test_masked_vector_pends_and_unmask_delivers_once() -> None:
    state, delivered = enabled_state()
    assert not state.trigger(1)
    assert not state.trigger(1)  # still one pending bit
    assert state.pending(1)
    assert state.pba_read(0, 1) == b"\x02"
    released = state.table_write(16, entry(0xFEE0_0000, 7, False))
    assert released == [1]
    assert delivered == [1]
    assert not state.pending(1)
    assert state.table_write(16, entry(0xFEE0_0000, 8, False)) == []  # nothing left
    assert delivered == [1]


def test_function_mask_pends_and_clearing_it_delivers() -> None:
    state, delivered = enabled_state()
    for vector in (0, 1, 2):
        state.table_write(16 * vector, entry(0xFEE0_0000, vector, vector == 2))
    state.set_control(enabled=True, function_masked=True)
    assert not state.trigger(0)
    assert not state.trigger(2)
    assert state.pba_read(0, 1) == b"\x05"
    assert state.set_control(enabled=True, function_masked=False) == [0]
    assert delivered == [0]
    assert state.pending(2)  # its own mask still holds it
    state.table_write(16 * 2 + 12, b"\x00")
    assert delivered == [0, 2]


def test_disabled_msix_drops_interrupts() -> None:
    delivered: list[int] = []
    state = MsixState(2, deliver=delivered.append)
    state.table_write(0, entry(0xFEE0_0000, 0, False))
    assert not state.trigger(0)
    assert not state.pending(0)  # documented choice: dropped, not pending
    assert state.set_control(enabled=True, function_masked=False) == []
    assert delivered == []


def test_pending_survives_disable_and_delivers_on_enable() -> None:
    state, delivered = enabled_state()
    assert not state.trigger(3)
    state.set_control(enabled=False, function_masked=False)
    state.table_write(16 * 3, entry(0xFEE0_0000, 3, False))
    assert delivered == []  # disabled: nothing goes out
    state.set_control(enabled=True, function_masked=False)
    assert delivered == [3]


def test_release_without_deliver_callback_returns_vectors() -> None:
    state = MsixState(2)
    state.set_control(enabled=True, function_masked=False)
    assert not state.trigger(0)
    assert state.table_write(12, b"\x00\x00\x00\x00") == [0]
    assert not state.pending(0)


def test_reset_masks_everything_again() -> None:
    state, _ = enabled_state()
    state.table_write(0, entry(0xFEE0_0000, 5, False))
    state.trigger(1)
    state.reset()
    assert not state.enabled
    assert state.table_read(0, 16) == entry(0, 0, True)
    assert not state.pending(1)


# --- through the config space ---------------------------------------------------------


def test_config_space_function_mask_write_releases_through_deliver() -> None:
    space = PciConfigSpace(
        IDENTITY, bars={0: BarSpec(0x1000)}, capabilities=[MsixCapability(4, table_bar=0)]
    )
    assert space.msix is not None
    delivered: list[int] = []
    space.msix.deliver = delivered.append
    control = 0x40 + 2  # MSI-X is the first capability
    space.write(control, struct.pack("<H", 0xC003))  # enable + function mask
    space.msix.table_write(0, entry(0xFEE0_0000, 9, False))
    assert not space.msix.trigger(0)
    space.write(control, struct.pack("<H", 0x8003))  # clear the function mask
    assert delivered == [0]
    assert space.msix_enabled and not space.msix_function_masked


# --- MSI ------------------------------------------------------------------------------


def msi_space(vectors: int = 4, masking: bool = True) -> tuple[PciConfigSpace, MsiState, int]:
    space = PciConfigSpace(
        IDENTITY,
        capabilities=[MsiCapability(vectors=vectors, per_vector_masking=masking)],
    )
    assert space.msi is not None
    return space, space.msi, 0x40


def test_msi_disabled_drops() -> None:
    _, msi, _ = msi_space()
    assert not msi.trigger(0)
    assert not msi.pending(0)


def test_msi_unmasked_vector_delivers_now() -> None:
    space, msi, cap = msi_space()
    space.write(cap + 2, struct.pack("<H", 0x0021))  # enable, 4 vectors
    assert msi.trigger(3)
    space.write(cap + 2, struct.pack("<H", 0x0001))  # enable, 1 vector
    assert not msi.trigger(3)  # beyond what the guest allocated: dropped
    assert not msi.pending(3)


def test_msi_masked_vector_pends_in_config_and_unmask_delivers() -> None:
    space, msi, cap = msi_space()
    delivered: list[int] = []
    msi.deliver = delivered.append
    space.write(cap + 2, struct.pack("<H", 0x0021))
    space.write(cap + 0x10, struct.pack("<I", 0b0110))  # mask vectors 1 and 2
    assert not msi.trigger(1)
    assert not msi.trigger(2)
    assert msi.trigger(0)
    pending = struct.unpack("<I", space.read(cap + 0x14, 4))[0]
    assert pending == 0b0110  # visible to the client in the pending register
    space.write(cap + 0x10, struct.pack("<I", 0b0100))  # unmask vector 1
    assert delivered == [1]
    assert struct.unpack("<I", space.read(cap + 0x14, 4))[0] == 0b0100
    space.write(cap + 0x10, struct.pack("<I", 0))
    assert delivered == [1, 2]
    assert not msi.pending(2)


def test_msi_without_masking_never_pends() -> None:
    space, msi, cap = msi_space(vectors=1, masking=False)
    space.write(cap + 2, struct.pack("<H", 0x0001))
    assert msi.trigger(0)
    assert not msi.masked(0)
    assert msi.release() == []
    with pytest.raises(ValueError):
        msi.trigger(1)


def test_msi_message_per_vector() -> None:
    space, msi, cap = msi_space(vectors=8)
    space.write(cap + 4, struct.pack("<IIH", 0xFEE0_0000, 0x1, 0x4057))
    space.write(cap + 2, struct.pack("<H", 0x0031))  # 8 vectors
    assert msi.address == 0x1_FEE0_0000
    assert msi.message(0) == (0x1_FEE0_0000, 0x4050)
    assert msi.message(5) == (0x1_FEE0_0000, 0x4055)
