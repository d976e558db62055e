"""Ordered atomic access to u32/u64 words of a buffer, for memory shared with other processes.

Python's own reads and writes of a buffer are neither atomic nor ordered; these go
through GCC ``__atomic`` builtins in the native module. Offsets are in bytes and
checked here: an access outside the buffer, or not naturally aligned (the
address, not only the offset, must be a multiple of the width), raises
``ValueError`` instead of faulting.

``AtomicView(buffer)`` pins the buffer (a ``bytearray`` cannot be resized, a
``Mapping`` cannot be closed) until ``release()``; the module-level functions
pin it for one call.
"""

from __future__ import annotations

import enum
import mmap
from types import TracebackType
from typing import TYPE_CHECKING, Self

from ._native import ffi, lib

if TYPE_CHECKING:
    from ._native import CData

__all__ = [
    "AtomicView",
    "MemoryOrder",
    "compare_exchange_u32",
    "compare_exchange_u64",
    "exchange_u32",
    "exchange_u64",
    "fence",
    "fetch_add_u32",
    "fetch_add_u64",
    "fetch_and_u32",
    "fetch_and_u64",
    "fetch_or_u32",
    "fetch_or_u64",
    "fetch_sub_u32",
    "fetch_sub_u64",
    "fetch_xor_u32",
    "fetch_xor_u64",
    "load_u32",
    "load_u64",
    "store_u32",
    "store_u64",
]

#: Buffers an AtomicView accepts; stores need a writable one.
ReadableBuffer = bytes | bytearray | memoryview | mmap.mmap


class MemoryOrder(enum.IntEnum):
    """C11 memory orders (the values are GCC's ``__ATOMIC_*``)."""

    RELAXED = lib.VFU_ORDER_RELAXED
    ACQUIRE = lib.VFU_ORDER_ACQUIRE
    RELEASE = lib.VFU_ORDER_RELEASE
    ACQ_REL = lib.VFU_ORDER_ACQ_REL
    SEQ_CST = lib.VFU_ORDER_SEQ_CST


_LOAD_ORDERS = frozenset({MemoryOrder.RELAXED, MemoryOrder.ACQUIRE, MemoryOrder.SEQ_CST})
_STORE_ORDERS = frozenset({MemoryOrder.RELAXED, MemoryOrder.RELEASE, MemoryOrder.SEQ_CST})
# For compare-exchange, the order used when the comparison fails may not be a
# release order nor stronger than the success order; the first is the default.
_CAS_FAILURE_ORDERS: dict[MemoryOrder, tuple[MemoryOrder, ...]] = {
    MemoryOrder.RELAXED: (MemoryOrder.RELAXED,),
    MemoryOrder.ACQUIRE: (MemoryOrder.ACQUIRE, MemoryOrder.RELAXED),
    MemoryOrder.RELEASE: (MemoryOrder.RELAXED,),
    MemoryOrder.ACQ_REL: (MemoryOrder.ACQUIRE, MemoryOrder.RELAXED),
    MemoryOrder.SEQ_CST: (MemoryOrder.SEQ_CST, MemoryOrder.ACQUIRE, MemoryOrder.RELAXED),
}


class _Op(enum.IntEnum):
    ADD = lib.VFU_OP_ADD
    SUB = lib.VFU_OP_SUB
    AND = lib.VFU_OP_AND
    OR = lib.VFU_OP_OR
    XOR = lib.VFU_OP_XOR
    EXCHANGE = lib.VFU_OP_XCHG


def _check_order(order: MemoryOrder, allowed: frozenset[MemoryOrder], what: str) -> int:
    if order not in allowed:
        raise ValueError(f"memory order {order!r} is not valid for {what}")
    return int(order)


class AtomicView:
    """Atomic u32/u64 operations on a C-contiguous buffer; usable as a context manager.

    Every operation defaults to ``SEQ_CST``; read-modify-write operations return the
    previous value, wrapping modulo 2**32 / 2**64.
    """

    __slots__ = ("_address", "_base", "_length", "_writable")

    def __init__(self, buffer: ReadableBuffer) -> None:
        with memoryview(buffer) as described:
            if not described.c_contiguous:
                raise ValueError("atomic access needs a C-contiguous buffer")
            self._length = described.nbytes
            self._writable = not described.readonly
        self._base: CData | None = ffi.from_buffer(buffer, require_writable=self._writable)
        self._address = int(ffi.cast("uintptr_t", self._base))

    @property
    def nbytes(self) -> int:
        return self._length

    @property
    def address(self) -> int:
        """Address of the first byte of the buffer."""
        return self._address

    @property
    def writable(self) -> bool:
        return self._writable

    def release(self) -> None:
        """Unpin the buffer (idempotent); the view is unusable afterwards."""
        if self._base is not None:
            base, self._base = self._base, None
            ffi.release(base)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _at(self, offset: int, width: int, *, write: bool) -> CData:
        base = self._base
        if base is None:
            raise ValueError("AtomicView is released")
        if write and not self._writable:
            raise TypeError("atomic write to a read-only buffer")
        if offset < 0 or offset + width > self._length:
            raise ValueError(
                f"{width}-byte access at offset {offset} is outside a {self._length}-byte buffer"
            )
        if (self._address + offset) % width:
            raise ValueError(
                f"{width}-byte access at offset {offset} (address "
                f"{self._address + offset:#x}) is not {width}-byte aligned"
            )
        return base

    @staticmethod
    def _value(value: int, width: int) -> int:
        if not 0 <= value < 1 << (8 * width):
            raise ValueError(f"{value} does not fit an unsigned {8 * width}-bit word")
        return value

    # --- u32 ---------------------------------------------------------------

    def load_u32(self, offset: int, order: MemoryOrder = MemoryOrder.SEQ_CST) -> int:
        base = self._at(offset, 4, write=False)
        return lib.vfu_load_u32(base, offset, _check_order(order, _LOAD_ORDERS, "a load"))

    def store_u32(self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST) -> None:
        base = self._at(offset, 4, write=True)
        value = self._value(value, 4)
        lib.vfu_store_u32(base, offset, value, _check_order(order, _STORE_ORDERS, "a store"))

    def _rmw_u32(self, offset: int, op: _Op, value: int, order: MemoryOrder) -> int:
        base = self._at(offset, 4, write=True)
        return lib.vfu_rmw_u32(base, offset, op, self._value(value, 4), MemoryOrder(order))

    def fetch_add_u32(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u32(offset, _Op.ADD, value, order)

    def fetch_sub_u32(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u32(offset, _Op.SUB, value, order)

    def fetch_and_u32(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u32(offset, _Op.AND, value, order)

    def fetch_or_u32(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u32(offset, _Op.OR, value, order)

    def fetch_xor_u32(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u32(offset, _Op.XOR, value, order)

    def exchange_u32(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u32(offset, _Op.EXCHANGE, value, order)

    def compare_exchange_u32(
        self,
        offset: int,
        expected: int,
        desired: int,
        success: MemoryOrder = MemoryOrder.SEQ_CST,
        *,
        failure: MemoryOrder | None = None,
    ) -> tuple[bool, int]:
        """Store ``desired`` if the word equals ``expected``: ``(stored, previous value)``."""
        base = self._at(offset, 4, write=True)
        expected, desired = self._value(expected, 4), self._value(desired, 4)
        s, f = _cas_orders(success, failure)
        previous = lib.vfu_cas_u32(base, offset, expected, desired, s, f)
        return previous == expected, previous

    # --- u64 ---------------------------------------------------------------

    def load_u64(self, offset: int, order: MemoryOrder = MemoryOrder.SEQ_CST) -> int:
        base = self._at(offset, 8, write=False)
        return lib.vfu_load_u64(base, offset, _check_order(order, _LOAD_ORDERS, "a load"))

    def store_u64(self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST) -> None:
        base = self._at(offset, 8, write=True)
        value = self._value(value, 8)
        lib.vfu_store_u64(base, offset, value, _check_order(order, _STORE_ORDERS, "a store"))

    def _rmw_u64(self, offset: int, op: _Op, value: int, order: MemoryOrder) -> int:
        base = self._at(offset, 8, write=True)
        return lib.vfu_rmw_u64(base, offset, op, self._value(value, 8), MemoryOrder(order))

    def fetch_add_u64(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u64(offset, _Op.ADD, value, order)

    def fetch_sub_u64(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u64(offset, _Op.SUB, value, order)

    def fetch_and_u64(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u64(offset, _Op.AND, value, order)

    def fetch_or_u64(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u64(offset, _Op.OR, value, order)

    def fetch_xor_u64(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u64(offset, _Op.XOR, value, order)

    def exchange_u64(
        self, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
    ) -> int:
        return self._rmw_u64(offset, _Op.EXCHANGE, value, order)

    def compare_exchange_u64(
        self,
        offset: int,
        expected: int,
        desired: int,
        success: MemoryOrder = MemoryOrder.SEQ_CST,
        *,
        failure: MemoryOrder | None = None,
    ) -> tuple[bool, int]:
        """Store ``desired`` if the word equals ``expected``: ``(stored, previous value)``."""
        base = self._at(offset, 8, write=True)
        expected, desired = self._value(expected, 8), self._value(desired, 8)
        s, f = _cas_orders(success, failure)
        previous = lib.vfu_cas_u64(base, offset, expected, desired, s, f)
        return previous == expected, previous


def _cas_orders(success: MemoryOrder, failure: MemoryOrder | None) -> tuple[int, int]:
    success = MemoryOrder(success)
    allowed = _CAS_FAILURE_ORDERS[success]
    if failure is None:
        failure = allowed[0]
    elif failure not in allowed:
        raise ValueError(f"failure order {failure!r} is not valid with success order {success!r}")
    return int(success), int(failure)


def fence(order: MemoryOrder = MemoryOrder.SEQ_CST) -> None:
    """A thread fence (``atomic_thread_fence``) of the given order."""
    lib.vfu_fence(MemoryOrder(order))


# --- one-shot functions: pin the buffer for a single operation -----------------


def load_u32(buffer: ReadableBuffer, offset: int, order: MemoryOrder = MemoryOrder.SEQ_CST) -> int:
    with AtomicView(buffer) as view:
        return view.load_u32(offset, order)


def load_u64(buffer: ReadableBuffer, offset: int, order: MemoryOrder = MemoryOrder.SEQ_CST) -> int:
    with AtomicView(buffer) as view:
        return view.load_u64(offset, order)


def store_u32(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> None:
    with AtomicView(buffer) as view:
        view.store_u32(offset, value, order)


def store_u64(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> None:
    with AtomicView(buffer) as view:
        view.store_u64(offset, value, order)


def fetch_add_u32(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.fetch_add_u32(offset, value, order)


def fetch_add_u64(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.fetch_add_u64(offset, value, order)


def fetch_sub_u32(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.fetch_sub_u32(offset, value, order)


def fetch_sub_u64(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.fetch_sub_u64(offset, value, order)


def fetch_and_u32(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.fetch_and_u32(offset, value, order)


def fetch_and_u64(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.fetch_and_u64(offset, value, order)


def fetch_or_u32(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.fetch_or_u32(offset, value, order)


def fetch_or_u64(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.fetch_or_u64(offset, value, order)


def fetch_xor_u32(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.fetch_xor_u32(offset, value, order)


def fetch_xor_u64(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.fetch_xor_u64(offset, value, order)


def exchange_u32(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.exchange_u32(offset, value, order)


def exchange_u64(
    buffer: ReadableBuffer, offset: int, value: int, order: MemoryOrder = MemoryOrder.SEQ_CST
) -> int:
    with AtomicView(buffer) as view:
        return view.exchange_u64(offset, value, order)


def compare_exchange_u32(
    buffer: ReadableBuffer,
    offset: int,
    expected: int,
    desired: int,
    success: MemoryOrder = MemoryOrder.SEQ_CST,
    *,
    failure: MemoryOrder | None = None,
) -> tuple[bool, int]:
    with AtomicView(buffer) as view:
        return view.compare_exchange_u32(offset, expected, desired, success, failure=failure)


def compare_exchange_u64(
    buffer: ReadableBuffer,
    offset: int,
    expected: int,
    desired: int,
    success: MemoryOrder = MemoryOrder.SEQ_CST,
    *,
    failure: MemoryOrder | None = None,
) -> tuple[bool, int]:
    with AtomicView(buffer) as view:
        return view.compare_exchange_u64(offset, expected, desired, success, failure=failure)
