"""Atomic operations on buffers: every operation and order, and the checks before them."""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable

import pytest

from vfiouser_trio import atomics
from vfiouser_trio.atomics import AtomicView, MemoryOrder
from vfiouser_trio.memory import create_memfd

ORDERS = list(MemoryOrder)
LOAD_ORDERS = [MemoryOrder.RELAXED, MemoryOrder.ACQUIRE, MemoryOrder.SEQ_CST]
STORE_ORDERS = [MemoryOrder.RELAXED, MemoryOrder.RELEASE, MemoryOrder.SEQ_CST]
CAS_PAIRS = [
    (MemoryOrder.RELAXED, MemoryOrder.RELAXED),
    (MemoryOrder.ACQUIRE, MemoryOrder.RELAXED),
    (MemoryOrder.ACQUIRE, MemoryOrder.ACQUIRE),
    (MemoryOrder.RELEASE, MemoryOrder.RELAXED),
    (MemoryOrder.ACQ_REL, MemoryOrder.RELAXED),
    (MemoryOrder.ACQ_REL, MemoryOrder.ACQUIRE),
    (MemoryOrder.SEQ_CST, MemoryOrder.RELAXED),
    (MemoryOrder.SEQ_CST, MemoryOrder.ACQUIRE),
    (MemoryOrder.SEQ_CST, MemoryOrder.SEQ_CST),
]
WIDTHS = [(4, "I"), (8, "Q")]


def _word(buffer: bytearray, offset: int, code: str) -> int:
    value: int = struct.unpack_from("=" + code, buffer, offset)[0]
    return value


@pytest.mark.parametrize(("width", "code"), WIDTHS)
@pytest.mark.parametrize("load_order", LOAD_ORDERS)
@pytest.mark.parametrize("store_order", STORE_ORDERS)
def test_load_and_store(
    width: int, code: str, load_order: MemoryOrder, store_order: MemoryOrder
) -> None:
    buffer = bytearray(32)
    value = (1 << (8 * width)) - 3
    with AtomicView(buffer) as view:
        store = view.store_u32 if width == 4 else view.store_u64
        load = view.load_u32 if width == 4 else view.load_u64
        store(16, value, store_order)
        assert _word(buffer, 16, code) == value  # native layout, in place
        assert buffer[:16] == bytes(16)
        assert buffer[16 + width :] == bytes(16 - width)
        struct.pack_into("=" + code, buffer, 16, 12345)
        assert load(16, load_order) == 12345


@pytest.mark.parametrize(("width", "code"), WIDTHS)
@pytest.mark.parametrize("order", ORDERS)
def test_read_modify_write(width: int, code: str, order: MemoryOrder) -> None:
    top = (1 << (8 * width)) - 1
    buffer = bytearray(16)
    suffix = f"u{8 * width}"
    with AtomicView(buffer) as view:

        def op(name: str, value: int) -> int:
            method = getattr(view, f"{name}_{suffix}")
            previous: int = method(8, value, order)
            return previous

        assert op("fetch_add", top) == 0
        assert op("fetch_add", 2) == top  # wraps
        assert _word(buffer, 8, code) == 1
        assert op("fetch_sub", 2) == 1
        assert _word(buffer, 8, code) == top  # wraps
        assert op("fetch_and", 0xF0) == top
        assert _word(buffer, 8, code) == 0xF0
        assert op("fetch_or", 0x0F) == 0xF0
        assert _word(buffer, 8, code) == 0xFF
        assert op("fetch_xor", 0x3C) == 0xFF
        assert _word(buffer, 8, code) == 0xC3
        assert op("exchange", 77) == 0xC3
        assert _word(buffer, 8, code) == 77
        assert buffer[:8] == bytes(8)


@pytest.mark.parametrize(("width", "code"), WIDTHS)
@pytest.mark.parametrize(("success", "failure"), CAS_PAIRS)
def test_compare_exchange(
    width: int, code: str, success: MemoryOrder, failure: MemoryOrder
) -> None:
    buffer = bytearray(8)
    with AtomicView(buffer) as view:
        cas = view.compare_exchange_u32 if width == 4 else view.compare_exchange_u64
        assert cas(0, 0, 5, success, failure=failure) == (True, 0)
        assert _word(buffer, 0, code) == 5
        assert cas(0, 4, 9, success, failure=failure) == (False, 5)
        assert _word(buffer, 0, code) == 5


@pytest.mark.parametrize("success", ORDERS)
def test_compare_exchange_default_failure_order(success: MemoryOrder) -> None:
    buffer = bytearray(8)
    assert atomics.compare_exchange_u64(buffer, 0, 0, 1, success) == (True, 0)
    assert atomics.compare_exchange_u64(buffer, 0, 0, 2, success) == (False, 1)


def test_module_functions() -> None:
    buffer = bytearray(16)
    atomics.store_u32(buffer, 4, 10)
    assert atomics.load_u32(buffer, 4) == 10
    assert atomics.fetch_add_u32(buffer, 4, 5) == 10
    assert atomics.fetch_sub_u32(buffer, 4, 1) == 15
    assert atomics.fetch_or_u32(buffer, 4, 0x100) == 14
    assert atomics.fetch_and_u32(buffer, 4, 0x10F) == 0x10E
    assert atomics.fetch_xor_u32(buffer, 4, 0x1) == 0x10E
    assert atomics.exchange_u32(buffer, 4, 3) == 0x10F
    assert atomics.compare_exchange_u32(buffer, 4, 3, 4) == (True, 3)
    atomics.store_u64(buffer, 8, 1 << 40)
    assert atomics.load_u64(buffer, 8) == 1 << 40
    assert atomics.fetch_add_u64(buffer, 8, 1) == 1 << 40
    assert atomics.fetch_sub_u64(buffer, 8, 1) == (1 << 40) + 1
    assert atomics.fetch_or_u64(buffer, 8, 2) == 1 << 40
    assert atomics.fetch_and_u64(buffer, 8, 2) == (1 << 40) | 2
    assert atomics.fetch_xor_u64(buffer, 8, 3) == 2
    assert atomics.exchange_u64(buffer, 8, 9) == 1
    assert atomics.compare_exchange_u64(buffer, 8, 9, 8) == (True, 9)
    assert struct.unpack("=IIQ", buffer) == (0, 4, 8)
    # The one-shot functions leave the buffer unpinned.
    buffer.extend(b"\0" * 8)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda v: v.load_u32(-4), "outside"),
        (lambda v: v.load_u32(14), "outside"),
        (lambda v: v.load_u64(16), "outside"),
        (lambda v: v.store_u32(2, 0), "aligned"),
        (lambda v: v.load_u64(4), "aligned"),
        (lambda v: v.fetch_add_u64(4, 1), "aligned"),
        (lambda v: v.store_u32(0, 1 << 32), "fit"),
        (lambda v: v.store_u64(0, -1), "fit"),
        (lambda v: v.fetch_or_u32(0, -1), "fit"),
        (lambda v: v.compare_exchange_u32(0, 1 << 32, 0), "fit"),
        (lambda v: v.load_u32(0, MemoryOrder.RELEASE), "not valid"),
        (lambda v: v.load_u64(0, MemoryOrder.ACQ_REL), "not valid"),
        (lambda v: v.store_u32(0, 0, MemoryOrder.ACQUIRE), "not valid"),
        (lambda v: v.store_u64(0, 0, MemoryOrder.ACQ_REL), "not valid"),
        (lambda v: v.fetch_add_u32(0, 1, 1), "not a valid MemoryOrder"),
        (
            lambda v: v.compare_exchange_u32(
                0, 0, 1, MemoryOrder.SEQ_CST, failure=MemoryOrder.RELEASE
            ),
            "not valid",
        ),
        (
            lambda v: v.compare_exchange_u64(
                0, 0, 1, MemoryOrder.RELAXED, failure=MemoryOrder.ACQUIRE
            ),
            "not valid",
        ),
    ],
)
def test_bad_accesses_raise_value_error(call: Callable[[AtomicView], object], message: str) -> None:
    buffer = bytearray(16)
    with AtomicView(buffer) as view, pytest.raises(ValueError, match=message):
        call(view)
    assert buffer == bytearray(16)


def test_alignment_is_of_the_address_not_the_offset() -> None:
    buffer = bytearray(32)
    with AtomicView(memoryview(buffer)[1:]) as shifted:
        with pytest.raises(ValueError, match="aligned"):
            shifted.load_u32(0)
        shifted.store_u32(3, 0xAABBCCDD)  # address = buffer + 4
        assert shifted.address % 4 == 1
    assert _word(buffer, 4, "I") == 0xAABBCCDD


def test_read_only_buffers_allow_loads_only() -> None:
    data = struct.pack("=Q", 99)
    with AtomicView(data) as view:
        assert not view.writable
        assert view.load_u64(0) == 99
        with pytest.raises(TypeError, match="read-only"):
            view.store_u64(0, 1)
        with pytest.raises(TypeError, match="read-only"):
            view.fetch_add_u64(0, 1)


def test_view_pins_its_buffer_until_released() -> None:
    buffer = bytearray(8)
    view = AtomicView(buffer)
    assert view.nbytes == 8
    with pytest.raises(BufferError):
        buffer.extend(b"x")
    view.release()
    view.release()  # idempotent
    buffer.extend(b"x")
    with pytest.raises(ValueError, match="released"):
        view.load_u32(0)
    with pytest.raises(ValueError, match="contiguous"):
        AtomicView(memoryview(bytearray(16))[::2])


def test_fence() -> None:
    for order in ORDERS:
        atomics.fence(order)
    with pytest.raises(ValueError):
        atomics.fence(7)  # type: ignore[arg-type]


def test_concurrent_increments_from_threads_are_not_lost() -> None:
    # cffi releases the GIL around each call, so the threads really race in C.
    buffer = bytearray(16)
    per_thread, n_threads = 20_000, 4
    with AtomicView(buffer) as view:

        def work() -> None:
            for _ in range(per_thread):
                view.fetch_add_u64(0, 1, MemoryOrder.RELAXED)
                view.fetch_add_u32(8, 1)

        threads = [threading.Thread(target=work) for _ in range(n_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert view.load_u64(0) == per_thread * n_threads
        assert view.load_u32(8) == per_thread * n_threads


def test_atomics_on_two_mappings_of_one_memfd() -> None:
    with create_memfd("atomics", 4096) as memfd, memfd.map() as one, memfd.map() as two:
        with AtomicView(one.view) as a, AtomicView(two.view) as b:
            a.store_u64(64, 0xDEAD_BEEF_0000_0001, MemoryOrder.RELEASE)
            assert b.load_u64(64, MemoryOrder.ACQUIRE) == 0xDEAD_BEEF_0000_0001
            assert b.compare_exchange_u64(64, 0xDEAD_BEEF_0000_0001, 2) == (
                True,
                0xDEADBEEF00000001,
            )
            assert a.load_u64(64) == 2
        # Released views unpin the mappings.
        assert not one.has_views
        assert not two.has_views
