"""Dirty-page reports as the client receives them (DMA_LOGGING_REPORT), decoded.

The server's bitmap has one bit per ``page_size`` bytes from ``iova``: bit ``j`` (bit
``j % 64`` of little-endian u64 word ``j // 64``) is set when the device wrote any byte of
``[iova + j * page_size, iova + (j + 1) * page_size)`` since the last report of that page.

The server sees only its own writes. While logging runs the client also marks, in a
:class:`ClientWrites`, the pages it writes itself when it serves the server's DMA_WRITE (the
only way a server reaches a map whose fd it was not given); ``Client.dirty_pages`` answers
those maps from these marks alone (a server cannot report on memory it does not access:
libvfio-user answers EINVAL) and ORs them into the server's reports elsewhere
(:func:`merge_reports`), as libvfio-user's own client does.
"""

from __future__ import annotations

import array
import itertools
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..bitmap import DirtyBitmap, bitmap_nbytes, count_bits, next_clear_bit, next_set_bit

__all__ = [
    "ClientWrites",
    "DirtyLogging",
    "DirtyPages",
    "merge_reports",
    "split_by_maps",
]


@dataclass(frozen=True, slots=True)
class DirtyLogging:
    """Dirty-page logging in force on a client: the server's page size and the logged ranges."""

    page_size: int
    #: ``(iova, length)`` of every logged range.
    ranges: tuple[tuple[int, int], ...]


def _native_words(wire: bytes) -> bytearray:
    """The wire bitmap (little-endian u64 words) in the native order the bitmap module uses."""
    if sys.byteorder == "little":
        return bytearray(wire)
    words = array.array("Q", wire)
    words.byteswap()
    return bytearray(words.tobytes())


@dataclass(frozen=True, slots=True)
class DirtyPages:
    """Which pages of ``[iova, iova + length)`` the device dirtied, at ``page_size``."""

    iova: int
    length: int
    page_size: int
    #: The report's bitmap as on the wire: little-endian u64 words, zero past the last page.
    bitmap: bytes

    def __post_init__(self) -> None:
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page size {self.page_size} is not a power of two")
        if self.length < 0 or len(self.bitmap) < bitmap_nbytes(self.n_pages):
            raise ValueError(f"a {len(self.bitmap)}-byte bitmap cannot cover {self.n_pages} pages")

    @classmethod
    def concatenate(cls, parts: Sequence[DirtyPages]) -> DirtyPages:
        """One report from reports of consecutive ranges at one page size.

        Every part but the last must cover a whole number of 64-page bitmap words.
        """
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for before, after in itertools.pairwise(parts):
            if after.iova != before.iova + before.length or after.page_size != first.page_size:
                raise ValueError("reports are not consecutive at one page size")
            if before.n_pages % 64 or before.length % before.page_size:
                raise ValueError("only the last report may end inside a bitmap word")
        bitmap = b"".join(p.bitmap[: bitmap_nbytes(p.n_pages)] for p in parts)
        return cls(first.iova, sum(p.length for p in parts), first.page_size, bitmap)

    @property
    def n_pages(self) -> int:
        """Pages the report covers (the last one may reach past ``iova + length``)."""
        return -(-self.length // self.page_size)

    @property
    def count(self) -> int:
        """Number of dirty pages."""
        if not self.n_pages:
            return 0
        return count_bits(_native_words(self.bitmap), 0, self.n_pages)

    def is_dirty(self, address: int) -> bool:
        """Whether the page holding ``address`` is dirty (False outside the range)."""
        if not self.iova <= address < self.iova + self.length:
            return False
        page = (address - self.iova) // self.page_size
        return bool(self.bitmap[page // 8] >> (page % 8) & 1)

    def __contains__(self, address: object) -> bool:
        return isinstance(address, int) and self.is_dirty(address)

    def runs(self) -> Iterator[tuple[int, int]]:
        """Maximal dirty stretches as ``(iova, length)``, clipped to the report's range."""
        words = _native_words(self.bitmap)
        end = self.n_pages
        page = 0
        while page < end:
            start = next_set_bit(words, page, end)
            if start is None:
                return
            stop = next_clear_bit(words, start, end)
            stop = end if stop is None else stop
            first = self.iova + start * self.page_size
            last = min(self.iova + stop * self.page_size, self.iova + self.length)
            yield first, last - first
            page = stop

    def addresses(self) -> list[int]:
        """The IOVA of every dirty page, in order."""
        return [
            address
            for first, length in self.runs()
            for address in range(first, first + length, self.page_size)
        ]

    def to_bitmap(self) -> DirtyBitmap:
        """A :class:`~vfiouser_trio.bitmap.DirtyBitmap` holding a copy of these bits."""
        return DirtyBitmap(self.n_pages, self.page_size, buffer=_native_words(self.bitmap))

    def __repr__(self) -> str:
        return (
            f"<DirtyPages {self.count} of {self.n_pages} pages of {self.page_size:#x} "
            f"from {self.iova:#x}>"
        )


class ClientWrites:
    """The pages the client wrote itself (serving DMA_WRITE) while dirty logging runs.

    Pages are ``page_size`` bytes on absolute IOVA multiples of ``page_size``. It holds one
    integer per page written, so at most the pages of the client's own (writable) maps.
    """

    def __init__(self, page_size: int) -> None:
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        self.page_size = page_size
        self._shift = page_size.bit_length() - 1
        self._pages: set[int] = set()

    def __len__(self) -> int:
        return len(self._pages)

    def mark(self, iova: int, length: int) -> None:
        """Record a write of ``[iova, iova + length)``."""
        if length > 0:
            self._pages.update(range(iova >> self._shift, ((iova + length - 1) >> self._shift) + 1))

    def take(self, iova: int, length: int, page_size: int) -> DirtyPages:
        """The marked pages of ``[iova, iova + length)`` at ``page_size``; clears the marks
        of the tracking pages wholly inside the range (the others may hold writes outside
        it, which a later report must still see)."""
        n_pages = -(-length // page_size)
        end = iova + length
        first, last = iova >> self._shift, (end - 1) >> self._shift
        with DirtyBitmap(n_pages, page_size) as out:
            for page in sorted(p for p in self._pages if first <= p <= last):
                lo = max(page << self._shift, iova)
                hi = min((page + 1) << self._shift, end)
                out.mark(lo - iova, hi - lo)
                if lo == page << self._shift and hi == (page + 1) << self._shift:
                    self._pages.discard(page)
            wire = out.take(clear=False)
        return DirtyPages(iova, length, page_size, wire)


def split_by_maps(
    iova: int, length: int, maps: Iterable[tuple[int, int, bool]]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``[iova, iova + length)`` cut at the maps' edges: the pieces the server reports on,
    and the pieces inside maps it does not access (``shared`` False), as ``(iova, length)``.

    ``maps`` are ``(iova, size, shared)``, not overlapping. Each server piece inside a map
    starts at that map's start when the range does (libvfio-user reports only from there).
    """
    end = iova + length
    server: list[tuple[int, int]] = []
    local: list[tuple[int, int]] = []
    pos = iova
    for start, size, shared in sorted(maps):
        lo, hi = max(start, iova), min(start + size, end)
        if lo >= hi:
            continue
        if pos < lo:
            server.append((pos, lo - pos))
        (server if shared else local).append((lo, hi - lo))
        pos = hi
    if pos < end:
        server.append((pos, end - pos))
    return server, local


def merge_reports(
    iova: int, length: int, page_size: int, parts: Iterable[DirtyPages]
) -> DirtyPages:
    """One report of ``[iova, iova + length)`` at ``page_size``: the OR of ``parts`` (any
    ranges and page sizes; a part's dirty page marks every output page it touches)."""
    end = iova + length
    with DirtyBitmap(-(-length // page_size), page_size) as out:
        for part in parts:
            for first, count in part.runs():
                lo, hi = max(first, iova), min(first + count, end)
                if lo < hi:
                    out.mark(lo - iova, hi - lo)
        wire = out.take(clear=False)
    return DirtyPages(iova, length, page_size, wire)
