"""Dirty bitmaps: hand-computed bits, regranulation, sharing, and a model-based check."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiouser_trio import bitmap
from vfiouser_trio.bitmap import DirtyBitmap, bitmap_nbytes
from vfiouser_trio.memory import create_memfd

pytestmark = pytest.mark.usefixtures("no_fd_leak")

PAGE = 4096


def _words(data: bytes | bytearray | memoryview) -> list[int]:
    raw = bytes(data)
    return [int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8)]


def _bits(*indices: int, n_words: int) -> list[int]:
    words = [0] * n_words
    for i in indices:
        words[i // 64] |= 1 << (i % 64)
    return words


def test_nbytes_rounds_up_to_words() -> None:
    assert [bitmap_nbytes(n) for n in (0, 1, 64, 65, 128, 129)] == [0, 8, 8, 16, 16, 24]
    assert DirtyBitmap(130, PAGE).nbytes == 24


def test_mark_sets_every_page_the_range_touches() -> None:
    with DirtyBitmap(130, PAGE) as dirty:
        dirty.mark(0, 1)
        assert _words(dirty.buffer) == _bits(0, n_words=3)
        dirty.mark(PAGE - 1, 2)  # straddles pages 0 and 1
        dirty.mark(64 * PAGE - 1, PAGE + 2)  # pages 63, 64, 65: across a word boundary
        dirty.mark(129 * PAGE, PAGE)  # exactly the last page
        dirty.mark(5 * PAGE, 0)  # empty: nothing
        assert _words(dirty.buffer) == _bits(0, 1, 63, 64, 65, 129, n_words=3)
        assert dirty.count() == 6
        assert dirty.count(60, 10) == 3
        assert [dirty.test(p) for p in (0, 1, 2, 63, 64, 65, 66, 129)] == [
            True,
            True,
            False,
            True,
            True,
            True,
            False,
            True,
        ]
        assert list(dirty.runs()) == [(0, 2), (63, 3), (129, 1)]
        assert list(dirty.runs(64, 66)) == [(64, 2), (129, 1)]
        assert list(dirty.runs(64, 65)) == [(64, 2)]
        assert dirty.next_dirty(2) == 63
        assert dirty.next_dirty(130) is None
        with pytest.raises(ValueError, match="outside"):
            dirty.mark(129 * PAGE, PAGE + 1)
        with pytest.raises(ValueError, match="outside"):
            dirty.mark(-1, 2)


def test_take_regranulates_to_a_larger_page_and_clears() -> None:
    with DirtyBitmap(130, PAGE) as dirty:
        for page in (1, 5, 6, 64, 129):
            dirty.mark_pages(page)
        # 4-page groups: (0-3) has 1, (4-7) has 5 and 6, (64-67) has 64, (128-129) has 129.
        report = dirty.take(0, 130, 4 * PAGE)
        assert len(report) == 8  # 33 bits: one word
        assert _words(report) == _bits(0, 1, 16, 32, n_words=1)
        assert dirty.count() == 0


def test_take_from_an_unaligned_start_groups_from_that_start() -> None:
    with DirtyBitmap(200, PAGE) as dirty:
        dirty.mark_pages(5)
        dirty.mark_pages(8)
        dirty.mark_pages(70, 3)
        # Groups of two from page 5: (5,6) (7,8) (9,10) ... (69,70) (71,72).
        report = dirty.take(5, 68, 2 * PAGE)
        assert _words(report) == _bits(0, 1, 32, 33, n_words=1)
        assert dirty.count() == 0  # the range [5, 73) held every marked page
        dirty.mark_pages(73)  # just past the range
        dirty.mark_pages(4)  # just before it
        assert dirty.take(5, 68, 2 * PAGE) == bytes(8)
        assert list(dirty.runs()) == [(4, 1), (73, 1)]


def test_take_clears_only_the_requested_range() -> None:
    with DirtyBitmap(128, PAGE) as dirty:
        dirty.mark_pages(0, 128)
        report = dirty.take(60, 10)
        assert _words(report) == [(1 << 10) - 1]
        assert dirty.count() == 118
        assert list(dirty.runs()) == [(0, 60), (70, 58)]


def test_take_without_clear_only_reads() -> None:
    with DirtyBitmap(64, PAGE) as dirty:
        dirty.mark_pages(3)
        assert dirty.take(clear=False) == dirty.take(clear=False) == (1 << 3).to_bytes(8, "little")
        assert dirty.take() == (1 << 3).to_bytes(8, "little")
        assert dirty.take() == bytes(8)


def test_take_to_a_smaller_page_replicates_bits() -> None:
    with DirtyBitmap(40, 4 * PAGE) as dirty:
        dirty.mark_pages(1)
        dirty.mark_pages(31)
        report = dirty.take(0, 40, PAGE)  # 160 bits, 3 words
        assert len(report) == 24
        assert _words(report) == _bits(4, 5, 6, 7, 124, 125, 126, 127, n_words=3)


def test_take_output_size_and_zero_padding() -> None:
    with DirtyBitmap(1000, PAGE) as dirty:
        dirty.mark_pages(0, 1000)
        report = dirty.take(0, 1000, 8 * PAGE)  # 125 bits: two words, the last 3 bits zero
        assert len(report) == 16
        assert _words(report) == [(1 << 64) - 1, (1 << 61) - 1]
        assert dirty.take(0, 0) == b""


def test_argument_checks() -> None:
    with pytest.raises(ValueError, match="power of two"):
        DirtyBitmap(8, 3000)
    with pytest.raises(ValueError, match="power of two"):
        DirtyBitmap(8, 1 << 64)
    with DirtyBitmap(8, 1) as tiny:  # the extreme ratios stay defined
        tiny.mark_pages(7)
        assert tiny.take(0, 8, 1 << 63, clear=False) == (1).to_bytes(8, "little")
    with DirtyBitmap(1, 1 << 63) as huge:
        huge.mark_pages(0)
        assert huge.take(0, 1, 1 << 57) == bytes([0xFF] * 8)
    with pytest.raises(ValueError, match="negative"):
        DirtyBitmap(-1, PAGE)
    with DirtyBitmap(100, PAGE) as dirty:
        with pytest.raises(ValueError, match="power of two"):
            dirty.take(0, 10, 3 * PAGE)
        for call in (
            lambda: dirty.take(90, 11),
            lambda: dirty.take(-1, 2),
            lambda: dirty.test(100),
            lambda: dirty.mark_pages(99, 2),
            lambda: dirty.clear(0, 101),
            lambda: dirty.count(50, 51),
            lambda: dirty.next_dirty(101),
        ):
            with pytest.raises(ValueError, match="outside"):
                call()
    dirty.release()
    dirty.release()
    with pytest.raises(ValueError, match="released"):
        dirty.count()


def test_clear() -> None:
    with DirtyBitmap(100, PAGE) as dirty:
        dirty.mark_pages(0, 100)
        dirty.clear(10, 80)
        assert list(dirty.runs()) == [(0, 10), (90, 10)]
        dirty.clear()
        assert dirty.count() == 0


def test_bitmap_in_shared_memory_is_seen_through_another_mapping() -> None:
    n_pages = 1000
    size = bitmap_nbytes(n_pages)
    with create_memfd("bitmap", size) as memfd, memfd.map() as one, memfd.map() as two:
        with (
            DirtyBitmap(n_pages, PAGE, buffer=one.view) as marker,
            DirtyBitmap(n_pages, PAGE, buffer=two.view) as taker,
        ):
            marker.mark(10 * PAGE, 3 * PAGE)
            assert list(taker.runs()) == [(10, 3)]
            assert _words(taker.take(0, 64)) == _bits(10, 11, 12, n_words=1)
            assert marker.count() == 0
            assert one.has_views
        assert not one.has_views
        assert not two.has_views


def test_wrapped_buffer_checks() -> None:
    with pytest.raises(ValueError, match="smaller"):
        DirtyBitmap(65, PAGE, buffer=bytearray(8))
    with pytest.raises(TypeError, match="writable"):
        DirtyBitmap(8, PAGE, buffer=memoryview(bytes(8)))
    storage = bytearray(24)
    with pytest.raises(ValueError, match="aligned"):
        DirtyBitmap(64, PAGE, buffer=memoryview(storage)[4:])
    dirty = DirtyBitmap(64, PAGE, buffer=storage)
    with pytest.raises(BufferError):
        storage.extend(b"x")  # pinned
    dirty.mark_pages(1)
    assert storage[0] == 2
    dirty.release()
    storage.extend(b"x")


def test_empty_bitmap() -> None:
    with DirtyBitmap(0, PAGE) as dirty:
        assert dirty.count() == 0
        assert dirty.take() == b""
        assert list(dirty.runs()) == []


def test_concurrent_marks_are_never_lost_to_take() -> None:
    # Each page is marked exactly once while another thread keeps taking; every page must
    # be reported exactly once. cffi drops the GIL in the C calls, so they really overlap.
    n_pages = 4096
    with DirtyBitmap(n_pages, PAGE) as dirty:
        done = threading.Event()

        def marker() -> None:
            for page in range(n_pages):
                dirty.mark(page * PAGE + 7, 1)
            done.set()

        seen = [0] * n_pages
        thread = threading.Thread(target=marker)
        thread.start()
        while True:
            finished = done.is_set()
            report = int.from_bytes(dirty.take(), "little")
            while report:
                low = report & -report
                seen[low.bit_length() - 1] += 1
                report ^= low
            if finished:
                break
        thread.join()
        assert seen == [1] * n_pages


# --- thin functions -------------------------------------------------------------


def test_thin_functions_on_a_bytearray() -> None:
    words = bytearray(24)
    bitmap.set_bits(words, 62, 70)  # bits 62..131
    assert bitmap.count_bits(words) == 70
    assert bitmap.count_bits(words, 128) == 4
    assert bitmap.bit_is_set(words, 62)
    assert not bitmap.bit_is_set(words, 61)
    assert bitmap.next_set_bit(words) == 62
    assert bitmap.next_clear_bit(words, 62) == 132
    assert bitmap.next_set_bit(words, 132) is None
    assert bitmap.next_clear_bit(words, 62, 100) is None
    bitmap.clear_bits(words, 64, 64)
    assert _words(words) == [0b11 << 62, 0, 0b1111]
    bitmap.mark_range(words, 3 * 512, 512, 512)
    assert bitmap.bit_is_set(words, 3)
    assert list(bitmap.regranulate(words, 192, 512, 2048)) == list(
        ((1 << 0) | (1 << 15) | (1 << 32)).to_bytes(8, "little")
    )
    assert _words(words) == [(0b11 << 62) | 0b1000, 0, 0b1111]  # regranulate only reads
    taken = bitmap.extract_bits(words, 62, 70, page_size=1, out_page_size=1, clear=True)
    assert _words(taken) == [0b11, 0b1111 << 2]  # bits 0, 1 and 66..69
    assert _words(words) == [0b1000, 0, 0]
    with pytest.raises(ValueError, match="outside"):
        bitmap.set_bits(words, 190, 3)
    with pytest.raises(ValueError, match="outside"):
        bitmap.mark_range(words, 192 * 512, 1, 512)
    with pytest.raises(ValueError, match="aligned"):
        bitmap.set_bits(memoryview(words)[1:17], 0)
    with pytest.raises(TypeError, match="writable"):
        bitmap.count_bits(memoryview(bytes(8)))
    words.extend(b"\0" * 8)  # the functions do not keep it pinned


# --- model-based check ------------------------------------------------------------

operations = st.one_of(
    st.tuples(st.just("mark"), st.integers(0, 10_000), st.integers(0, 2_000)),
    st.tuples(st.just("mark_pages"), st.integers(0, 300), st.integers(0, 80)),
    st.tuples(st.just("clear"), st.integers(0, 300), st.integers(0, 80)),
    st.tuples(
        st.just("take"), st.integers(0, 300), st.integers(0, 300), st.integers(-2, 4), st.booleans()
    ),
    st.tuples(st.just("count"), st.integers(0, 300), st.integers(0, 300)),
    st.tuples(st.just("next"), st.integers(0, 300)),
)


def _model_take(model: list[bool], start: int, count: int, shift: int) -> list[bool]:
    pages = model[start : start + count]
    if shift >= 0:
        group = 1 << shift
        return [any(pages[j : j + group]) for j in range(0, count, group)]
    return [bit for bit in pages for _ in range(1 << -shift)]


def _as_bits(report: bytes) -> list[bool]:
    value = int.from_bytes(report, "little")
    return [bool(value >> i & 1) for i in range(len(report) * 8)]


@settings(max_examples=150, deadline=None)
@given(
    n_pages=st.integers(1, 300),
    page_shift=st.integers(6, 12),
    ops=st.lists(operations, max_size=30),
)
def test_matches_a_pure_python_model(
    n_pages: int, page_shift: int, ops: list[tuple[object, ...]]
) -> None:
    page_size = 1 << page_shift
    model = [False] * n_pages
    with DirtyBitmap(n_pages, page_size) as dirty:
        for op in ops:
            name, *args = op
            ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
            if name == "mark":
                offset, length = ints[0] * 7, ints[1] * 3
                if offset + length > n_pages * page_size:
                    with pytest.raises(ValueError):
                        dirty.mark(offset, length)
                    continue
                dirty.mark(offset, length)
                if length:
                    for page in range(offset // page_size, (offset + length - 1) // page_size + 1):
                        model[page] = True
            elif name in ("mark_pages", "clear"):
                first, count = ints
                if first + count > n_pages:
                    with pytest.raises(ValueError):
                        getattr(dirty, name)(first, count)
                    continue
                getattr(dirty, name)(first, count)
                model[first : first + count] = [name == "mark_pages"] * count
            elif name == "take":
                first, count, shift = ints
                clear = bool(args[-1])
                if first + count > n_pages:
                    with pytest.raises(ValueError):
                        dirty.take(first, count)
                    continue
                out_page = page_size << shift if shift >= 0 else page_size >> -shift
                report = dirty.take(first, count, out_page, clear=clear)
                expected = _model_take(model, first, count, shift)
                assert len(report) == bitmap_nbytes(len(expected))
                bits = _as_bits(report)
                assert bits[: len(expected)] == expected
                assert not any(bits[len(expected) :])
                if clear:
                    model[first : first + count] = [False] * count
            elif name == "count":
                first, count = ints
                if first + count > n_pages:
                    continue
                assert dirty.count(first, count) == sum(model[first : first + count])
            else:
                (start,) = ints
                if start > n_pages:
                    continue
                expected_next = next((p for p in range(start, n_pages) if model[p]), None)
                assert dirty.next_dirty(start) == expected_next
        assert [dirty.test(p) for p in range(n_pages)] == model
        runs = [(f, n) for f, n in dirty.runs()]
        assert [p for f, n in runs for p in range(f, f + n)] == [
            p for p in range(n_pages) if model[p]
        ]
        assert all(f + n == n_pages or not model[f + n] for f, n in runs)


# --- SparseDirtyBitmap: chunks on demand, a budget, overflow -------------------------------

sparse_operations = st.one_of(
    st.tuples(st.just("mark"), st.integers(0, 10_000), st.integers(0, 2_000)),
    st.tuples(st.just("mark_pages"), st.integers(0, 300), st.integers(0, 200)),
    st.tuples(st.just("clear"), st.integers(0, 300), st.integers(0, 200)),
    st.tuples(st.just("count"), st.integers(0, 300), st.integers(0, 300)),
    st.tuples(st.just("runs"), st.integers(0, 300), st.integers(0, 300)),
)


@settings(max_examples=150, deadline=None)
@given(
    n_pages=st.integers(1, 300),
    page_shift=st.integers(6, 12),
    chunk_bits=st.sampled_from([64, 128, 1 << 15]),
    ops=st.lists(sparse_operations, max_size=30),
)
def test_sparse_matches_a_pure_python_model(
    n_pages: int, page_shift: int, chunk_bits: int, ops: list[tuple[str, int, int]]
) -> None:
    page_size = 1 << page_shift
    model = [False] * n_pages
    budget = bitmap.BitmapBudget(1 << 20)
    dirty = bitmap.SparseDirtyBitmap(n_pages, page_size, budget, chunk_bits=chunk_bits)
    for name, a, b in ops:
        if name == "mark":
            offset, length = a * 7, b * 3
            if offset + length > n_pages * page_size:
                with pytest.raises(ValueError):
                    dirty.mark(offset, length)
                continue
            dirty.mark(offset, length)
            if length:
                for page in range(offset // page_size, (offset + length - 1) // page_size + 1):
                    model[page] = True
        elif a + b > n_pages:
            with pytest.raises(ValueError):
                result = getattr(dirty, name)(a, b)
                if name == "runs":
                    list(result)  # a generator checks when it starts
        elif name in ("mark_pages", "clear"):
            getattr(dirty, name)(a, b)
            model[a : a + b] = [name == "mark_pages"] * b
        elif name == "count":
            assert dirty.count(a, b) == sum(model[a : a + b])
        else:
            runs = list(dirty.runs(a, b))
            assert [p for f, n in runs for p in range(f, f + n)] == [
                p for p in range(a, a + b) if model[p]
            ]
            assert all(f + n == a + b or not model[f + n] for f, n in runs)  # maximal
        # Memory follows the marks: exactly the chunks holding a dirty page are held.
        held = {p // chunk_bits for p in range(n_pages) if model[p]}
        assert dirty.allocated == budget.used == len(held) * chunk_bits // 8
    assert [dirty.test(p) for p in range(n_pages)] == model
    assert not dirty.overflowed
    dirty.release()
    assert budget.used == 0


def test_sparse_bitmap_of_2_40_pages_holds_only_what_is_marked() -> None:
    budget = bitmap.BitmapBudget(1 << 20)
    n_pages = 1 << 40  # 2**52 bytes at 4 KiB pages: a 128 GiB dense bitmap
    with bitmap.SparseDirtyBitmap(n_pages, PAGE, budget) as dirty:
        for page in (0, 1 << 39, n_pages - 1):
            dirty.mark_pages(page)
        assert budget.used == 3 * bitmap.CHUNK_BITS // 8
        assert list(dirty.runs()) == [(0, 1), (1 << 39, 1), (n_pages - 1, 1)]
        assert dirty.count() == 3
        dirty.clear()
        assert budget.used == 0 and list(dirty.runs()) == []
    # A mark over the whole range allocates until the budget runs out, then overflows.
    with bitmap.SparseDirtyBitmap(n_pages, PAGE, budget) as dirty:
        dirty.mark(0, n_pages * PAGE)
        assert dirty.overflowed and budget.used == 0


def test_sparse_overflow_reports_everything_dirty_until_released() -> None:
    budget = bitmap.BitmapBudget(16)  # two 64-page chunks shared by both bitmaps
    first = bitmap.SparseDirtyBitmap(256, PAGE, budget, chunk_bits=64)
    second = bitmap.SparseDirtyBitmap(256, PAGE, budget, chunk_bits=64)
    first.mark_pages(3)
    second.mark_pages(70)
    assert budget.used == 16
    first.mark_pages(200)  # a third chunk: over the budget
    assert first.overflowed and not second.overflowed
    assert budget.used == 8  # the overflowed bitmap gave its chunk back
    assert list(first.runs(10, 20)) == [(10, 20)]
    assert first.count() == 256 and first.test(255)
    first.clear()  # cannot know what was written since: stays dirty
    assert first.count(0, 5) == 5
    second.mark_pages(0)  # the freed budget serves the other bitmap
    assert list(second.runs()) == [(0, 1), (70, 1)]
    first.release()
    assert not first.overflowed and first.count() == 0
    second.release()
    second.release()  # idempotent
    assert budget.used == 0


def test_sparse_argument_checks() -> None:
    budget = bitmap.BitmapBudget(4096)
    with pytest.raises(ValueError, match="negative"):
        bitmap.BitmapBudget(-1)
    with pytest.raises(ValueError, match="negative"):
        bitmap.SparseDirtyBitmap(-1, PAGE, budget)
    with pytest.raises(ValueError, match="power of two"):
        bitmap.SparseDirtyBitmap(8, 3000, budget)
    with pytest.raises(ValueError, match="chunk"):
        bitmap.SparseDirtyBitmap(8, PAGE, budget, chunk_bits=96)
    dirty = bitmap.SparseDirtyBitmap(8, PAGE, budget)
    for call in (
        lambda: dirty.mark(8 * PAGE - 1, 2),
        lambda: dirty.mark(-1, 1),
        lambda: dirty.mark_pages(8),
        lambda: dirty.test(8),
        lambda: dirty.count(0, 9),
        lambda: list(dirty.runs(9)),
        lambda: dirty.clear(-1, 1),
    ):
        with pytest.raises(ValueError):
            call()
    dirty.mark_pages(5, 0)  # nothing to mark: nothing allocated
    dirty.mark(3, 0)
    assert repr(dirty) == "<SparseDirtyBitmap 8 pages of 0x1000 bytes, 0 chunks>"
    assert budget.used == 0


@settings(max_examples=100, deadline=None)
@given(
    n_pages=st.integers(1, 400),
    dirty=st.lists(st.tuples(st.integers(0, 399), st.integers(1, 40)), max_size=12),
    first=st.integers(0, 399),
    count=st.integers(0, 400),
    at=st.integers(0, 200),
    limit=st.integers(0, 5),
)
def test_sparse_or_into_and_limited_runs(
    n_pages: int,
    dirty: list[tuple[int, int]],
    first: int,
    count: int,
    at: int,
    limit: int,
) -> None:
    budget = bitmap.BitmapBudget(1 << 20)
    sparse = bitmap.SparseDirtyBitmap(n_pages, PAGE, budget, chunk_bits=64)
    model = [False] * n_pages
    for page, length in dirty:
        n = min(length, n_pages - page)
        if n > 0:
            sparse.mark_pages(page, n)
            model[page : page + n] = [True] * n
    first, count = min(first, n_pages), min(count, n_pages - min(first, n_pages))
    out = bytearray(bitmap_nbytes(at + count + 70))
    bitmap.set_bits(out, 3)  # bits already set stay set
    sparse.or_into(out, first, count, at)
    expected = {3} | {at + i for i in range(count) if model[first + i]}
    assert {b for b in range(len(out) * 8) if bitmap.bit_is_set(out, b)} == expected
    with pytest.raises(ValueError):
        sparse.or_into(out, first, count, len(out) * 8 - count + 1)
    # Limited runs: the first `limit` exact, the rest cover at least every dirty page.
    exact = list(sparse.runs(first, count))
    limited = list(sparse.runs(first, count, limit=limit))
    assert limited[:limit] == exact[:limit]
    covered = {p for f, n in limited for p in range(f, f + n)}
    assert covered >= {p for f, n in exact for p in range(f, f + n)}
    assert all(first <= f and f + n <= first + count for f, n in limited)
    sparse.release()


def test_sparse_or_into_an_overflowed_bitmap_sets_every_bit() -> None:
    budget = bitmap.BitmapBudget(0)
    with bitmap.SparseDirtyBitmap(100, PAGE, budget) as sparse:
        sparse.mark_pages(7)
        assert sparse.overflowed
        out = bytearray(16)
        sparse.or_into(out, 10, 20, 5)
        assert _words(out) == [((1 << 20) - 1) << 5, 0]
