"""Message-signalled interrupt state: the MSI-X table and PBA, and MSI per-vector masking.

Both follow one rule. ``trigger(vector)`` answers whether the device should send the
interrupt now. While MSI(-X) is disabled the interrupt is dropped (no pending bit): the
function is not allowed to send messages then, and a stale pending bit would fire a spurious
interrupt at whatever handler the guest installs when it enables MSI(-X) later. While the
vector (or, for MSI-X, the whole function) is masked the pending bit is set instead. When a
mask is cleared, every pending vector that became deliverable has its pending bit cleared and
is reported: returned, and passed to ``deliver`` if one is registered. Changes made through
config-space writes have no return path, so register ``deliver`` to act on them.

MSI-X also tells ``mask_changed(start, count, masked)`` when the client changes a table
entry's mask bit (one call per vector that changed) or the function mask (start 0, count
every vector): the device's interrupt state hook listens there (``Device.irq_state_changed``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.pci_caps import (
    MSI_CONTROL_ENABLE,
    MSI_CONTROL_MULTIPLE_ENABLE,
    MsiCapability,
)

MSIX_ENTRY_SIZE = 16
MSIX_VECTOR_MASKED = 0x1  # vector control bit 0

# Writable bits of one table entry: address (dword aligned), upper address, data, mask bit.
_ENTRY_WRITE_MASK = (
    (0xFFFFFFFC).to_bytes(4, "little")
    + (0xFFFFFFFF).to_bytes(4, "little")
    + (0xFFFFFFFF).to_bytes(4, "little")
    + MSIX_VECTOR_MASKED.to_bytes(4, "little")
)

Deliver = Callable[[int], None]
#: ``(start, count, masked)``: the client masked or unmasked vectors start .. start + count - 1.
MaskChanged = Callable[[int, int, bool], None]


def _set_bits(value: int) -> list[int]:
    """Indexes of the bits set in ``value``, lowest first."""
    bits = []
    while value:
        low = value & -value
        bits.append(low.bit_length() - 1)
        value ^= low
    return bits


def _check_access(offset: int, size: int, limit: int, what: str) -> None:
    if offset < 0 or size < 0 or offset + size > limit:
        raise VfioUserError(
            errno.EINVAL, f"{what} access {offset:#x}+{size:#x} beyond {limit:#x} bytes"
        )


class MsixState:
    """The MSI-X table and Pending Bit Array of ``vectors`` vectors, byte addressable.

    Table entries (16 bytes: message address, upper address, data, vector control) start
    masked, as after reset. The PBA is read-only to the client. ``enabled`` and
    ``function_masked`` mirror the capability's message control (see `set_control`).
    """

    def __init__(self, vectors: int, *, deliver: Deliver | None = None) -> None:
        if not 1 <= vectors <= 2048:
            raise ValueError("MSI-X supports 1..2048 vectors")
        self.vectors = vectors
        self.deliver = deliver
        self.mask_changed: MaskChanged | None = None
        self._write_mask = _ENTRY_WRITE_MASK * vectors
        self._table = bytearray(self.table_size)
        self._pending = 0
        self._enabled = False
        self._function_masked = False
        self.reset()

    @property
    def table_size(self) -> int:
        """Bytes of the table."""
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        """Bytes of the PBA: one bit per vector, in whole qwords."""
        return (self.vectors + 63) // 64 * 8

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def function_masked(self) -> bool:
        return self._function_masked

    def reset(self) -> None:
        """Back to power-on: every vector masked, nothing pending, MSI-X disabled."""
        entry = bytes(12) + MSIX_VECTOR_MASKED.to_bytes(4, "little")
        self._table[:] = entry * self.vectors
        self._pending = 0
        self._enabled = False
        self._function_masked = False

    def _check_vector(self, vector: int) -> None:
        if not 0 <= vector < self.vectors:
            raise ValueError(f"MSI-X vector {vector} out of range 0..{self.vectors - 1}")

    def message(self, vector: int) -> tuple[int, int]:
        """The (address, data) the guest programmed for ``vector``."""
        self._check_vector(vector)
        base = vector * MSIX_ENTRY_SIZE
        address = int.from_bytes(self._table[base : base + 8], "little")
        data = int.from_bytes(self._table[base + 8 : base + 12], "little")
        return address, data

    def masked(self, vector: int) -> bool:
        """Whether the vector's own mask bit is set (the function mask aside)."""
        self._check_vector(vector)
        return bool(self._table[vector * MSIX_ENTRY_SIZE + 12] & MSIX_VECTOR_MASKED)

    def pending(self, vector: int) -> bool:
        self._check_vector(vector)
        return bool(self._pending >> vector & 1)

    def _deliverable(self, vector: int) -> bool:
        return self._enabled and not self._function_masked and not self.masked(vector)

    def trigger(self, vector: int) -> bool:
        """The device raises ``vector``: True means send it now.

        Otherwise it is dropped when MSI-X is disabled, or left pending when masked.
        """
        self._check_vector(vector)
        if not self._enabled:
            return False
        if self._deliverable(vector):
            return True
        self._pending |= 1 << vector
        return False

    def _release(self) -> list[int]:
        ready = [v for v in _set_bits(self._pending) if self._deliverable(v)]
        for vector in ready:
            self._pending &= ~(1 << vector)
        if self.deliver is not None:
            for vector in ready:
                self.deliver(vector)
        return ready

    def set_control(self, *, enabled: bool, function_masked: bool) -> list[int]:
        """Apply the capability's enable / function-mask bits; returns vectors released."""
        changed = function_masked != self._function_masked
        self._enabled = enabled
        self._function_masked = function_masked
        if changed and self.mask_changed is not None:
            self.mask_changed(0, self.vectors, function_masked)
        return self._release()

    def table_read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` from the table's start."""
        _check_access(offset, size, self.table_size, "MSI-X table")
        return bytes(self._table[offset : offset + size])

    def table_write(self, offset: int, data: bytes) -> list[int]:
        """Write table bytes; returns the vectors an unmask released (see module doc)."""
        _check_access(offset, len(data), self.table_size, "MSI-X table")
        touched = range(offset // MSIX_ENTRY_SIZE, (offset + len(data) - 1) // MSIX_ENTRY_SIZE + 1)
        before = [self.masked(v) for v in touched] if self.mask_changed and data else []
        for i, value in enumerate(data, offset):
            mask = self._write_mask[i]
            self._table[i] = (self._table[i] & ~mask) | (value & mask)
        if before and self.mask_changed is not None:
            for vector, was in zip(touched, before, strict=True):
                if self.masked(vector) != was:
                    self.mask_changed(vector, 1, not was)
        return self._release()

    def pba_read(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes at ``offset`` from the PBA's start."""
        _check_access(offset, size, self.pba_size, "MSI-X PBA")
        pba = self._pending.to_bytes(self.pba_size, "little")
        return pba[offset : offset + size]

    def pba_write(self, offset: int, data: bytes) -> None:
        """The PBA is read-only: in-range writes are ignored, as hardware does."""
        _check_access(offset, len(data), self.pba_size, "MSI-X PBA")

    # --- migration ----------------------------------------------------------------------

    def save_state(self) -> tuple[bytes, bytes]:
        """(table, PBA) as they read now; enable / function mask live in config space."""
        return bytes(self._table), self._pending.to_bytes(self.pba_size, "little")

    def check_state(self, table: bytes, pba: bytes) -> None:
        """ValueError unless ``table`` and ``pba`` could be this table's saved state."""
        if len(table) != self.table_size or len(pba) != self.pba_size:
            raise ValueError(
                f"MSI-X state of {len(table)}+{len(pba)} bytes for {self.vectors} vectors"
            )
        if int.from_bytes(pba, "little") >> self.vectors:
            raise ValueError("MSI-X pending bits beyond the last vector")

    def restore_state(
        self, table: bytes, pba: bytes, *, enabled: bool, function_masked: bool
    ) -> None:
        """Load a saved table and PBA with the capability's control bits (migration).

        Nothing is delivered: held vectors stay pending until a mask is cleared. Bits a
        client cannot write (reserved vector control bits ...) are dropped from the table.
        """
        self.check_state(table, pba)
        self._table[:] = bytes(b & m for b, m in zip(table, self._write_mask, strict=True))
        self._pending = int.from_bytes(pba, "little")
        self._enabled = enabled
        self._function_masked = function_masked


class MsiState:
    """MSI delivery state, read from the MSI capability's registers in config space.

    ``config`` is the config-space bytearray (shared, not copied) and ``offset`` where the
    capability sits. Pending bits (with per-vector masking) are kept in the capability's
    pending register, where the client reads them.
    """

    def __init__(
        self,
        config: bytearray,
        offset: int,
        capability: MsiCapability,
        *,
        deliver: Deliver | None = None,
    ) -> None:
        self._config = config
        self._offset = offset
        self.capability = capability
        self.deliver = deliver

    def _reg(self, offset: int, size: int) -> int:
        start = self._offset + offset
        return int.from_bytes(self._config[start : start + size], "little")

    @property
    def _control(self) -> int:
        return self._reg(MsiCapability.CONTROL, 2)

    @property
    def enabled(self) -> bool:
        return bool(self._control & MSI_CONTROL_ENABLE)

    @property
    def vectors_enabled(self) -> int:
        """Vectors the guest allocated (multiple message enable)."""
        return 1 << ((self._control & MSI_CONTROL_MULTIPLE_ENABLE) >> 4)

    @property
    def address(self) -> int:
        address = self._reg(MsiCapability.ADDRESS, 4)
        if self.capability.address_64:
            address |= self._reg(MsiCapability.UPPER_ADDRESS, 4) << 32
        return address

    @property
    def data(self) -> int:
        return self._reg(self.capability.data_offset, 2)

    def _check_vector(self, vector: int) -> None:
        if not 0 <= vector < self.capability.vectors:
            raise ValueError(f"MSI vector {vector} out of range 0..{self.capability.vectors - 1}")

    def message(self, vector: int) -> tuple[int, int]:
        """(address, data) for ``vector``: the vector number goes in the low data bits."""
        self._check_vector(vector)
        low_bits = self.vectors_enabled - 1
        return self.address, (self.data & ~low_bits) | (vector & low_bits)

    def masked(self, vector: int) -> bool:
        self._check_vector(vector)
        if not self.capability.per_vector_masking:
            return False
        return bool(self._reg(self.capability.mask_offset, 4) >> vector & 1)

    def pending(self, vector: int) -> bool:
        self._check_vector(vector)
        if not self.capability.per_vector_masking:
            return False
        return bool(self._reg(self.capability.pending_offset, 4) >> vector & 1)

    def _set_pending(self, bits: int) -> None:
        start = self._offset + self.capability.pending_offset
        self._config[start : start + 4] = bits.to_bytes(4, "little")

    def trigger(self, vector: int) -> bool:
        """The device raises ``vector``: True means send it now.

        Dropped while MSI is disabled or the vector is beyond those the guest enabled; left
        pending while the vector is masked.
        """
        self._check_vector(vector)
        if not self.enabled or vector >= self.vectors_enabled:
            return False
        if not self.masked(vector):
            return True
        self._set_pending(self._reg(self.capability.pending_offset, 4) | 1 << vector)
        return False

    def release(self) -> list[int]:
        """Report (and clear) pending vectors that are now deliverable; called after writes."""
        if not self.capability.per_vector_masking or not self.enabled:
            return []
        pending = self._reg(self.capability.pending_offset, 4)
        mask = self._reg(self.capability.mask_offset, 4)
        ready = [v for v in _set_bits(pending & ~mask) if v < self.vectors_enabled]
        for vector in ready:
            pending &= ~(1 << vector)
        self._set_pending(pending)
        if self.deliver is not None:
            for vector in ready:
                self.deliver(vector)
        return ready
