"""Dirty-page bitmaps: one bit per page, in u64 words.

Bit ``i`` (page ``i``) is bit ``i % 64`` of word ``i // 64``.
This is the layout of the vfio-user ``DMA_LOGGING_REPORT`` bitmap. The work is done in
the native module; everything is bounds-checked here first. Bits are set and cleared
with one atomic operation per word, so a bitmap may live in memory shared with a
process that marks pages while this one takes them: no mark is lost.

Words are kept in native byte order; ``DirtyBitmap.take`` returns the wire format
(little-endian words).

A :class:`SparseDirtyBitmap` tracks pages the same way for memory whose bitmap would be too
large to allocate whole (a client may map up to 2**64 bytes): it holds chunks of bits only
where pages were marked, charged to a :class:`BitmapBudget`.
"""

from __future__ import annotations

import array
import mmap
import sys
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Self

from ._native import ffi, lib

if TYPE_CHECKING:
    from ._native import CData

__all__ = [
    "CHUNK_BITS",
    "BitmapBudget",
    "DirtyBitmap",
    "SparseDirtyBitmap",
    "bit_is_set",
    "bitmap_nbytes",
    "clear_bits",
    "count_bits",
    "extract_bits",
    "mark_range",
    "next_clear_bit",
    "next_set_bit",
    "regranulate",
    "set_bits",
]

#: Buffers a bitmap can live in (writable, C-contiguous, 8-byte aligned).
WritableBuffer = bytearray | memoryview | mmap.mmap


def bitmap_nbytes(n_bits: int) -> int:
    """Bytes needed for ``n_bits`` bits, rounded up to whole u64 words."""
    return (n_bits + 63) // 64 * 8


def _page_shift(page_size: int, what: str = "page size") -> int:
    # At most 2**63, so that every shift the C code does stays below 64 bits.
    if page_size <= 0 or page_size & (page_size - 1) or page_size > 1 << 63:
        raise ValueError(f"{what} {page_size} is not a power of two up to 2**63")
    return page_size.bit_length() - 1


class _Words:
    """A writable buffer pinned and viewed as an array of u64 words."""

    __slots__ = ("_view", "cdata", "n_bits")

    def __init__(self, buffer: WritableBuffer, nbytes: int | None = None) -> None:
        with memoryview(buffer) as described:
            if described.readonly:
                raise TypeError("a bitmap needs a writable buffer")
            if not described.c_contiguous:
                raise ValueError("a bitmap needs a C-contiguous buffer")
            available = described.nbytes
        if nbytes is None:
            nbytes = available // 8 * 8
        elif nbytes > available:
            raise ValueError(f"buffer of {available} bytes is smaller than {nbytes}")
        self._view = memoryview(buffer).cast("B")[:nbytes]
        self.cdata: CData = ffi.from_buffer("uint64_t[]", self._view, require_writable=True)
        # An empty bytearray points at a shared static byte: alignment is moot there.
        if nbytes and int(ffi.cast("uintptr_t", self.cdata)) % 8:
            self.release()
            raise ValueError("a bitmap buffer must be 8-byte aligned")
        self.n_bits = nbytes * 8

    def check(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.n_bits:
            raise ValueError(f"bits [{first}, {first + count}) are outside a {self.n_bits}-bit map")

    def release(self) -> None:
        ffi.release(self.cdata)
        self._view.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _extract(words: _Words, first: int, count: int, shift: int, *, clear: bool) -> bytearray:
    out_bits = -(-count >> shift) if shift >= 0 else count << -shift
    out = bytearray(bitmap_nbytes(out_bits))
    if count:
        with _Words(out) as target:
            lib.vfu_bits_extract(words.cdata, first, count, target.cdata, shift, int(clear))
    return out


# --- thin functions over caller-owned bitmaps (positions in bits) ---------------


def set_bits(bitmap: WritableBuffer, first: int, count: int = 1) -> None:
    """Set bits ``[first, first + count)``."""
    with _Words(bitmap) as words:
        words.check(first, count)
        lib.vfu_bits_set(words.cdata, first, count)


def clear_bits(bitmap: WritableBuffer, first: int, count: int = 1) -> None:
    """Clear bits ``[first, first + count)``."""
    with _Words(bitmap) as words:
        words.check(first, count)
        lib.vfu_bits_clear(words.cdata, first, count)


def bit_is_set(bitmap: WritableBuffer, bit: int) -> bool:
    """Whether ``bit`` is set."""
    with _Words(bitmap) as words:
        words.check(bit, 1)
        return bool(lib.vfu_bits_test(words.cdata, bit))


def count_bits(bitmap: WritableBuffer, first: int = 0, count: int | None = None) -> int:
    """Number of set bits in ``[first, first + count)`` (default: to the end)."""
    with _Words(bitmap) as words:
        if count is None:
            count = words.n_bits - first
        words.check(first, count)
        return lib.vfu_bits_count(words.cdata, first, count)


def _next(bitmap: WritableBuffer, start: int, end: int | None, value: int) -> int | None:
    with _Words(bitmap) as words:
        if end is None:
            end = words.n_bits
        words.check(start, end - start)
        found = lib.vfu_bits_next(words.cdata, start, end, value)
        return None if found < 0 else found


def next_set_bit(bitmap: WritableBuffer, start: int = 0, end: int | None = None) -> int | None:
    """The first set bit in ``[start, end)``, or ``None``."""
    return _next(bitmap, start, end, 1)


def next_clear_bit(bitmap: WritableBuffer, start: int = 0, end: int | None = None) -> int | None:
    """The first clear bit in ``[start, end)``, or ``None``."""
    return _next(bitmap, start, end, 0)


def mark_range(bitmap: WritableBuffer, offset: int, length: int, page_size: int) -> None:
    """Set the bits of every page touched by bytes ``[offset, offset + length)``.

    ``offset`` is relative to the address that bit 0 stands for.
    """
    shift = _page_shift(page_size)
    with _Words(bitmap) as words:
        if offset < 0 or length < 0 or offset + length > words.n_bits << shift:
            raise ValueError(f"range ({offset:#x}, {length:#x}) is outside the bitmap")
        if length:
            lib.vfu_bits_mark(words.cdata, offset, length, shift)


def extract_bits(
    bitmap: WritableBuffer,
    first: int,
    count: int,
    *,
    page_size: int,
    out_page_size: int,
    clear: bool = False,
) -> bytearray:
    """Bits ``[first, first + count)`` re-granulated from ``page_size`` to ``out_page_size``.

    A coarser output bit is the OR of the bits it covers (counted from ``first``); a
    finer one repeats its source bit. The result holds whole u64 words in native
    order, zero past the last bit. With ``clear``, the source bits are cleared with
    one atomic fetch-and-clear per word.
    """
    shift = _page_shift(out_page_size, "output page size") - _page_shift(page_size)
    with _Words(bitmap) as words:
        words.check(first, count)
        return _extract(words, first, count, shift, clear=clear)


def regranulate(
    bitmap: WritableBuffer, n_bits: int, page_size: int, out_page_size: int
) -> bytearray:
    """The first ``n_bits`` bits re-granulated to ``out_page_size``; the source is unchanged."""
    return extract_bits(
        bitmap, 0, n_bits, page_size=page_size, out_page_size=out_page_size, clear=False
    )


def _to_wire(words: bytearray) -> bytes:
    if sys.byteorder == "little":
        return bytes(words)
    swapped = array.array("Q", words)
    swapped.byteswap()
    return swapped.tobytes()


class DirtyBitmap:
    """Dirty tracking for ``n_pages`` pages of ``page_size`` bytes.

    Owns a zeroed bytearray, or lives in ``buffer`` (at least ``bitmap_nbytes(n_pages)``
    bytes, e.g. a view of shared memory; its contents are used as they are). The
    buffer stays pinned until ``release()``. Offsets are relative to the address of
    page 0.
    """

    __slots__ = ("_shift", "_words", "n_pages", "page_size")

    def __init__(
        self, n_pages: int, page_size: int, *, buffer: WritableBuffer | None = None
    ) -> None:
        if n_pages < 0:
            raise ValueError(f"negative page count {n_pages}")
        self._shift = _page_shift(page_size)
        self.n_pages = n_pages
        self.page_size = page_size
        nbytes = bitmap_nbytes(n_pages)
        storage = bytearray(nbytes) if buffer is None else buffer
        self._words: _Words | None = _Words(storage, nbytes)

    @property
    def nbytes(self) -> int:
        """Size of the bitmap in bytes (whole u64 words)."""
        return bitmap_nbytes(self.n_pages)

    @property
    def buffer(self) -> memoryview:
        """The bitmap's bytes (native-order words), shared, not copied."""
        return self._live()._view[:]

    def _live(self) -> _Words:
        if self._words is None:
            raise ValueError("DirtyBitmap is released")
        return self._words

    def _pages(self, first: int, count: int | None) -> tuple[_Words, int]:
        words = self._live()
        if count is None:
            count = self.n_pages - first
        if first < 0 or count < 0 or first + count > self.n_pages:
            raise ValueError(f"pages [{first}, {first + count}) are outside {self.n_pages} pages")
        return words, count

    def mark(self, offset: int, length: int) -> None:
        """Mark the pages touched by bytes ``[offset, offset + length)`` dirty."""
        words = self._live()
        if offset < 0 or length < 0 or offset + length > self.n_pages << self._shift:
            raise ValueError(f"range ({offset:#x}, {length:#x}) is outside the tracked memory")
        if length:
            lib.vfu_bits_mark(words.cdata, offset, length, self._shift)

    def mark_pages(self, first: int, count: int = 1) -> None:
        """Mark pages ``[first, first + count)`` dirty."""
        words, count = self._pages(first, count)
        lib.vfu_bits_set(words.cdata, first, count)

    def test(self, page: int) -> bool:
        """Whether ``page`` is dirty."""
        words, _ = self._pages(page, 1)
        return bool(lib.vfu_bits_test(words.cdata, page))

    def count(self, first: int = 0, n_pages: int | None = None) -> int:
        """Number of dirty pages in ``[first, first + n_pages)`` (default: all)."""
        words, n_pages = self._pages(first, n_pages)
        return lib.vfu_bits_count(words.cdata, first, n_pages)

    def next_dirty(self, start: int = 0) -> int | None:
        """The first dirty page at or after ``start``, or ``None``."""
        words, _ = self._pages(start, None)
        found = lib.vfu_bits_next(words.cdata, start, self.n_pages, 1)
        return None if found < 0 else found

    def runs(self, first: int = 0, n_pages: int | None = None) -> Iterator[tuple[int, int]]:
        """Maximal runs of dirty pages in the range, as ``(first_page, n_pages)``."""
        words, n_pages = self._pages(first, n_pages)
        end = first + n_pages
        page = first
        while page < end:
            start = lib.vfu_bits_next(words.cdata, page, end, 1)
            if start < 0:
                return
            stop = lib.vfu_bits_next(words.cdata, start, end, 0)
            if stop < 0:
                stop = end
            yield start, stop - start
            page = stop

    def take(
        self,
        start_page: int = 0,
        n_pages: int | None = None,
        out_page_size: int | None = None,
        *,
        clear: bool = True,
    ) -> bytes:
        """Fetch-and-clear pages ``[start_page, start_page + n_pages)`` as a wire bitmap.

        Output bit ``j`` covers ``out_page_size`` bytes from the address of
        ``start_page``: the OR of the pages it spans when ``out_page_size`` is larger
        than ``page_size`` (the usual ``DMA_LOGGING_REPORT`` case), a copy of the
        page's bit when it is smaller. The result is whole little-endian u64 words,
        zero past the last bit. ``clear=False`` only reads.
        """
        words, n_pages = self._pages(start_page, n_pages)
        out_shift = self._shift if out_page_size is None else _page_shift(out_page_size)
        return _to_wire(_extract(words, start_page, n_pages, out_shift - self._shift, clear=clear))

    def clear(self, first: int = 0, n_pages: int | None = None) -> None:
        """Mark pages clean (default: all)."""
        words, n_pages = self._pages(first, n_pages)
        lib.vfu_bits_clear(words.cdata, first, n_pages)

    def release(self) -> None:
        """Unpin the buffer (idempotent); the bitmap is unusable afterwards."""
        if self._words is not None:
            words, self._words = self._words, None
            words.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<DirtyBitmap {self.n_pages} pages of {self.page_size:#x} bytes>"


#: Pages per chunk of a SparseDirtyBitmap: 4 KiB of bits, 128 MiB of memory at 4 KiB pages.
CHUNK_BITS = 1 << 15


class BitmapBudget:
    """Bytes of bitmap chunks that the SparseDirtyBitmaps sharing it may hold in all."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"negative bitmap budget {limit}")
        self.limit = limit
        #: Bytes currently held.
        self.used = 0

    def take(self, nbytes: int) -> bool:
        """Charge ``nbytes``; False (nothing charged) when that would pass the limit."""
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        """Return ``nbytes`` taken earlier."""
        self.used -= nbytes


class SparseDirtyBitmap:
    """Dirty tracking for ``n_pages`` pages whose memory follows the pages marked.

    Bits live in zeroed chunks of ``chunk_bits`` pages, allocated when a page of the
    chunk is first marked and freed when a clear leaves the chunk empty; each chunk is
    charged to ``budget``. When the budget cannot pay for a new chunk the bitmap
    *overflows*: it frees its chunks and from then on every page reads as dirty, and
    ``clear`` leaves them so, until ``release()``. That over-reports, which is safe for
    migration (a page is sent again); dropping the mark would not be.

    Offsets are relative to the address of page 0. Unlike DirtyBitmap this is private
    memory of one thread: chunks are allocated from Python, never shared.
    """

    __slots__ = (
        "_budget",
        "_chunk_bytes",
        "_chunk_shift",
        "_chunks",
        "_shift",
        "n_pages",
        "overflowed",
        "page_size",
    )

    def __init__(
        self, n_pages: int, page_size: int, budget: BitmapBudget, *, chunk_bits: int = CHUNK_BITS
    ) -> None:
        if n_pages < 0:
            raise ValueError(f"negative page count {n_pages}")
        if chunk_bits < 64 or chunk_bits & (chunk_bits - 1):
            raise ValueError(f"chunk size {chunk_bits} is not a power of two of at least 64 bits")
        self._shift = _page_shift(page_size)
        self._chunk_shift = chunk_bits.bit_length() - 1
        self._chunk_bytes = chunk_bits // 8
        self._budget = budget
        self._chunks: dict[int, _Words] = {}
        self.n_pages = n_pages
        self.page_size = page_size
        #: Set once a chunk could not be paid for: every page is dirty from then on.
        self.overflowed = False

    @property
    def allocated(self) -> int:
        """Bytes of chunks held now."""
        return len(self._chunks) * self._chunk_bytes

    def _pages(self, first: int, count: int | None) -> int:
        if count is None:
            count = self.n_pages - first
        if first < 0 or count < 0 or first + count > self.n_pages:
            raise ValueError(f"pages [{first}, {first + count}) are outside {self.n_pages} pages")
        return count

    def _pieces(self, first: int, count: int) -> Iterator[tuple[int, int, int]]:
        """(chunk index, first bit in it, bits) of each chunk held under the pages."""
        if not count:
            return
        shift = self._chunk_shift
        lo, hi = first >> shift, (first + count - 1) >> shift
        # The chunks held, not the range: the range may span 2**40 chunks.
        for index in sorted(i for i in self._chunks if lo <= i <= hi):
            base = index << shift
            start = max(first, base)
            yield index, start - base, min(first + count, base + (1 << shift)) - start

    def _chunk(self, index: int) -> _Words | None:
        """The chunk, allocated if need be; None once the bitmap has overflowed."""
        words = self._chunks.get(index)
        if words is None and not self.overflowed:
            if self._budget.take(self._chunk_bytes):
                words = self._chunks[index] = _Words(bytearray(self._chunk_bytes))
            else:
                self._drop_chunks()
                self.overflowed = True
        return words

    def _drop_chunks(self) -> None:
        for words in self._chunks.values():
            words.release()
        self._budget.give(self.allocated)
        self._chunks.clear()

    def mark(self, offset: int, length: int) -> None:
        """Mark the pages touched by bytes ``[offset, offset + length)`` dirty."""
        if offset < 0 or length < 0 or offset + length > self.n_pages << self._shift:
            raise ValueError(f"range ({offset:#x}, {length:#x}) is outside the tracked memory")
        if length:
            first = offset >> self._shift
            self._set(first, ((offset + length - 1) >> self._shift) - first + 1)

    def mark_pages(self, first: int, count: int = 1) -> None:
        """Mark pages ``[first, first + count)`` dirty."""
        self._set(first, self._pages(first, count))

    def _set(self, first: int, count: int) -> None:
        if not count:
            return
        shift = self._chunk_shift
        index = first >> shift
        if (first + count - 1) >> shift == index:  # the usual case: within one chunk
            words = self._chunks.get(index) or self._chunk(index)
            if words is not None:
                lib.vfu_bits_set(words.cdata, first - (index << shift), count)
            return
        page, end = first, first + count
        while page < end:  # at most budget / chunk size rounds before overflowing
            index = page >> shift
            stop = min(end, (index + 1) << shift)
            words = self._chunk(index)
            if words is None:
                return
            lib.vfu_bits_set(words.cdata, page - (index << shift), stop - page)
            page = stop

    def test(self, page: int) -> bool:
        """Whether ``page`` is dirty."""
        self._pages(page, 1)
        if self.overflowed:
            return True
        words = self._chunks.get(page >> self._chunk_shift)
        mask = (1 << self._chunk_shift) - 1
        return words is not None and bool(lib.vfu_bits_test(words.cdata, page & mask))

    def count(self, first: int = 0, n_pages: int | None = None) -> int:
        """Number of dirty pages in ``[first, first + n_pages)`` (default: all)."""
        n_pages = self._pages(first, n_pages)
        if self.overflowed:
            return n_pages
        return sum(
            lib.vfu_bits_count(self._chunks[index].cdata, start, n)
            for index, start, n in self._pieces(first, n_pages)
        )

    def runs(
        self, first: int = 0, n_pages: int | None = None, *, limit: int | None = None
    ) -> Iterator[tuple[int, int]]:
        """Maximal runs of dirty pages in the range, as ``(first_page, n_pages)``.

        With ``limit``, only the first ``limit`` runs are exact: after them, each chunk's
        remaining part counts as one run from its next dirty page to its end (clean pages
        included), so that the work is bounded by the chunks held, not by their dirty pages.
        """
        n_pages = self._pages(first, n_pages)
        if self.overflowed:
            if n_pages:
                yield first, n_pages
            return
        run_start = run_end = -1  # the run being built, which may go on in the next chunk
        exact = -1 if limit is None else limit
        for index, start, n in list(self._pieces(first, n_pages)):
            cdata, base = self._chunks[index].cdata, index << self._chunk_shift
            bit, end = start, start + n
            while bit < end:
                found = lib.vfu_bits_next(cdata, bit, end, 1)
                if found < 0:
                    break
                stop = end if not exact else lib.vfu_bits_next(cdata, found, end, 0)
                stop = end if stop < 0 else stop
                if base + found != run_end:
                    if run_end >= 0:
                        yield run_start, run_end - run_start
                        exact -= exact > 0
                    run_start = base + found
                run_end = base + stop
                bit = stop
        if run_end >= 0:
            yield run_start, run_end - run_start

    def or_into(self, out: WritableBuffer, first: int, count: int, at: int) -> None:
        """OR pages ``[first, first + count)`` into bits ``[at, at + count)`` of ``out``.

        ``out`` is a bitmap of u64 words in native order (as the thin functions take);
        the work is a few passes over each chunk held, whatever its dirty pages.
        """
        count = self._pages(first, count)
        with _Words(out) as target:
            target.check(at, count)
            if self.overflowed:
                lib.vfu_bits_set(target.cdata, at, count)
                return
            for index, start, n in self._pieces(first, count):
                bits = int.from_bytes(
                    _to_wire(_extract(self._chunks[index], start, n, 0, clear=False)), "little"
                )
                if not bits:
                    continue
                pos = at + (index << self._chunk_shift) + start - first
                lo, skew = divmod(pos, 64)
                window = target._view[lo * 8 : (lo + (skew + n + 63) // 64) * 8]
                merged = int.from_bytes(_to_wire(bytearray(window)), "little") | bits << skew
                window[:] = _to_wire(bytearray(merged.to_bytes(len(window), "little")))

    def clear(self, first: int = 0, n_pages: int | None = None) -> None:
        """Mark pages clean (default: all); no effect once the bitmap has overflowed."""
        n_pages = self._pages(first, n_pages)
        if self.overflowed:
            return
        bits = 1 << self._chunk_shift
        for index, start, n in list(self._pieces(first, n_pages)):
            words = self._chunks[index]
            lib.vfu_bits_clear(words.cdata, start, n)
            if lib.vfu_bits_next(words.cdata, 0, bits, 1) < 0:
                del self._chunks[index]
                words.release()
                self._budget.give(self._chunk_bytes)

    def release(self) -> None:
        """Free the chunks (idempotent); the bitmap then reads as clean and not overflowed."""
        self._drop_chunks()
        self.overflowed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "overflowed" if self.overflowed else f"{len(self._chunks)} chunks"
        return f"<SparseDirtyBitmap {self.n_pages} pages of {self.page_size:#x} bytes, {state}>"
