"""Dirty-page logging of device DMA writes (DMA_LOGGING_START / STOP / REPORT).

A :class:`DirtyLog` watches one client's :class:`DmaTable`: every device write to guest
memory (``dma.write``, and writable ``dma.view`` s when they close) reaches it as a write
observer, and marks the touched pages in a bitmap per DMA map. Pages are ``page_size``
bytes aligned on absolute IOVA multiples of ``page_size``, so a bitmap covers its map from
the page holding its first byte to the page holding its last.

``report`` answers DMA_LOGGING_REPORT: the bitmap of any IOVA range at any power-of-two
page size, output bit ``j`` standing for ``[iova + j*page_size, iova + (j+1)*page_size)``
(set when any byte of it was written), as little-endian u64 words with every bit past the
range zero. It clears what it reports, except tracking pages that reach outside the range
(or that the range only partly covers): those stay dirty for the next report, because
clearing them would lose writes the client has not seen. Over-reporting is safe for
migration; under-reporting is not.

Memory follows the pages written, not the size of the maps (a client may map 2**64 bytes
of message-only memory): each map's bitmap is a :class:`SparseDirtyBitmap`, and one client's
bitmaps together hold at most ``max_bitmap_bytes`` (``ServerLimits.max_dirty_bitmap_bytes``).
A map whose bitmap would pass that bound *overflows*: its bits are dropped and every page of
it is reported dirty, in every report, until it is unmapped or logging stops (a WARNING says
so). The reply of a report is bounded by the caller (the session refuses a bitmap larger than
its ``max_data_xfer_size`` with EINVAL), and its cost by the chunks held, not by the range
asked nor the dirty pages: at the tracking page size from an aligned IOVA the bits are copied
chunk by chunk; otherwise the first ``REPORT_RUNS`` runs of dirty pages are marked exactly and
past them each chunk is reported dirty from its next dirty page to its end (over-reporting,
which only costs the client pages sent again). A START names
at most ``max_ranges`` ranges (``ServerLimits.max_dirty_ranges``, E2BIG beyond, as Linux's
VFIO does); empty, overlapping or past-2**64 ranges are EINVAL. The commands are described in
https://www.qemu.org/docs/master/interop/vfio-user.html, section "VFIO_USER_DEVICE_FEATURE".
"""

from __future__ import annotations

import array
import bisect
import errno
import itertools
import logging
import mmap
import sys
from collections.abc import Sequence

from ..bitmap import BitmapBudget, DirtyBitmap, SparseDirtyBitmap, bitmap_nbytes
from ..limits import DEFAULT_LIMITS
from ..protocol.errors import VfioUserError
from .dma import DmaMapping, DmaTable

__all__ = ["MIN_PAGE_SIZE", "DirtyLog", "select_page_size"]

#: The finest tracking granularity we accept; finer requests are raised to it (and the
#: client told so in the DMA_LOGGING_START reply).
MIN_PAGE_SIZE = mmap.PAGESIZE

_IOVA_LIMIT = 1 << 64

#: Runs of dirty pages a report at another page size (or from an unaligned IOVA) marks
#: exactly; past them it reports from each chunk's next dirty page to the chunk's end.
REPORT_RUNS = 1 << 14

log = logging.getLogger(__name__)


def _refuse(message: str) -> VfioUserError:
    return VfioUserError(errno.EINVAL, message)


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def select_page_size(requested: int) -> int:
    """The tracking page size we use for a requested one: at least MIN_PAGE_SIZE.

    EINVAL for zero or a value that is not a power of two (up to 2**63).
    """
    if not _is_power_of_two(requested) or requested > 1 << 63:
        raise _refuse(f"dirty page size {requested:#x} is not a power of two")
    return max(requested, MIN_PAGE_SIZE)


def _check_range(iova: int, length: int) -> None:
    if length <= 0 or iova < 0 or iova + length > _IOVA_LIMIT:
        raise _refuse(f"bad IOVA range {iova:#x}+{length:#x}")


def _wire(words: bytearray) -> bytes:
    """Native-order u64 words as the wire's little-endian words."""
    if sys.byteorder == "little":
        return bytes(words)
    swapped = array.array("Q", words)
    swapped.byteswap()
    return swapped.tobytes()


class DirtyLog:
    """Logs device writes into ``dma`` at ``page_size``, within ``ranges`` (empty: all).

    ``ranges`` are (iova, length) pairs; they must not overlap (EINVAL), and there may be
    at most ``max_ranges`` of them (E2BIG). Logging starts when the log is created and
    stops at ``close()``. The bitmaps hold at most ``max_bitmap_bytes`` in all (see the
    module docstring); ``name`` labels the log's warnings (the device, the client).
    """

    def __init__(
        self,
        dma: DmaTable,
        page_size: int,
        ranges: Sequence[tuple[int, int]] = (),
        *,
        max_bitmap_bytes: int = DEFAULT_LIMITS.max_dirty_bitmap_bytes,
        max_ranges: int = DEFAULT_LIMITS.max_dirty_ranges,
        name: str = "dirty log",
    ) -> None:
        if not _is_power_of_two(page_size):
            raise _refuse(f"dirty page size {page_size:#x} is not a power of two")
        self.page_size = page_size
        self._shift = page_size.bit_length() - 1
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.max_ranges = max_ranges
        self.set_ranges(ranges)
        self.name = name
        self._budget = BitmapBudget(max_bitmap_bytes)
        self._bitmaps: dict[DmaMapping, tuple[int, SparseDirtyBitmap]] = {}
        self._dma = dma
        dma.add_write_observer(self.mark)
        self._closed = False

    @property
    def bitmap_bytes(self) -> int:
        """Bytes of bitmap held now, over every map."""
        return self._budget.used

    @property
    def overflowed(self) -> list[DmaMapping]:
        """The maps whose bitmap overflowed (reported all dirty)."""
        return [m for m, (_, bitmap) in self._bitmaps.items() if bitmap.overflowed]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The logged (iova, length) ranges; empty when every write is logged."""
        return [(a, b - a) for a, b in zip(self._starts, self._ends, strict=True)]

    def set_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Log writes within ``ranges`` from now on (empty: all); the bits so far stay."""
        if len(ranges) > self.max_ranges:
            raise VfioUserError(
                errno.E2BIG, f"{len(ranges)} logging ranges, more than {self.max_ranges}"
            )
        for iova, length in ranges:
            _check_range(iova, length)
        spans = sorted((iova, iova + length) for iova, length in ranges)
        for (_, end), (next_iova, _) in itertools.pairwise(spans):
            if next_iova < end:
                raise _refuse(f"logging ranges overlap at {next_iova:#x}")
        self._starts = [iova for iova, _ in spans]
        self._ends = [end for _, end in spans]

    def close(self) -> None:
        """Stop logging and drop the bitmaps (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._dma.remove_write_observer(self.mark)
        for _, bitmap in self._bitmaps.values():
            bitmap.release()
        self._bitmaps.clear()

    # --- marking (the DmaTable write observer) ------------------------------------------

    def mark(self, iova: int, length: int) -> None:
        """Record that the device wrote ``[iova, iova+length)``."""
        if length <= 0:
            return
        end = iova + length
        if not self._starts:
            self._mark_maps(iova, end)
            return
        i = max(bisect.bisect_right(self._starts, iova) - 1, 0)
        while i < len(self._starts) and self._starts[i] < end:
            lo, hi = max(iova, self._starts[i]), min(end, self._ends[i])
            if lo < hi:
                self._mark_maps(lo, hi)
            i += 1

    def _mark_maps(self, iova: int, end: int) -> None:
        for mapping in self._dma.windows(iova, end - iova):
            base, bitmap = self._bitmap_of(mapping)
            if bitmap.overflowed:
                continue  # every page of it is dirty already
            lo, hi = max(iova, mapping.iova), min(end, mapping.end)
            bitmap.mark(lo - (base << self._shift), hi - lo)
            if bitmap.overflowed:
                log.warning(
                    "%s: dirty bitmaps reached their limit of %d bytes: every page of DMA map "
                    "%#x+%#x is reported dirty until it is unmapped or logging stops",
                    self.name,
                    self._budget.limit,
                    mapping.iova,
                    mapping.size,
                )

    def _bitmap_of(self, mapping: DmaMapping) -> tuple[int, SparseDirtyBitmap]:
        """The map's bitmap and the absolute page number of its bit 0 (made on first use)."""
        entry = self._bitmaps.get(mapping)
        if entry is None:
            base = mapping.iova >> self._shift
            last = (mapping.end - 1) >> self._shift
            entry = (base, SparseDirtyBitmap(last - base + 1, self.page_size, self._budget))
            self._bitmaps[mapping] = entry
        return entry

    def _forget_unmapped(self) -> None:
        live = set(self._dma)
        for mapping in [m for m in self._bitmaps if m not in live]:
            self._bitmaps.pop(mapping)[1].release()

    # --- DMA_LOGGING_REPORT ----------------------------------------------------------------

    def covers(self, iova: int, length: int) -> bool:
        """Whether every byte of the range is logged."""
        if not self._starts:
            return True
        pos, end = iova, iova + length
        i = max(bisect.bisect_right(self._starts, pos) - 1, 0)
        while pos < end:
            if i == len(self._starts) or self._starts[i] > pos or self._ends[i] <= pos:
                return False
            pos = self._ends[i]
            i += 1
        return True

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """The wire bitmap of ``[iova, iova+length)`` at ``page_size``; clears what it reports.

        EINVAL for an empty or overflowing range, a page size that is not a power of
        two, or a range not entirely logged.
        """
        _check_range(iova, length)
        if not _is_power_of_two(page_size) or page_size > 1 << 63:
            raise _refuse(f"report page size {page_size:#x} is not a power of two")
        if not self.covers(iova, length):
            raise _refuse(f"{iova:#x}+{length:#x} is not inside the logged ranges")
        end = iova + length
        n_bits = -(-length // page_size)
        out = bytearray(bitmap_nbytes(n_bits))
        self._forget_unmapped()
        with DirtyBitmap(n_bits, page_size, buffer=out) as marks:  # pinned once for all runs
            self._report_into(out, marks, iova, end)
        return _wire(out)

    def _report_into(self, out: bytearray, marks: DirtyBitmap, iova: int, end: int) -> None:
        shift = self._shift
        # At the tracking page size from a page boundary (what a VMM asks), output bit j is
        # tracking page iova/page_size + j: the bits are copied, chunk by chunk. Otherwise
        # each run of dirty pages is marked, the first REPORT_RUNS exactly (see the module
        # docstring).
        copy = marks.page_size == self.page_size and iova % self.page_size == 0
        runs_left = REPORT_RUNS
        for mapping, (base, bitmap) in self._bitmaps.items():
            lo, hi = max(iova, mapping.iova), min(end, mapping.end)
            if lo >= hi:
                continue
            first = (lo >> shift) - base
            stop = ((hi - 1) >> shift) - base + 1
            if copy:
                bitmap.or_into(out, first, stop - first, base + first - (iova >> shift))
            else:
                for page, count in bitmap.runs(first, stop - first, limit=runs_left):
                    a = max(lo, (base + page) << shift)
                    b = min(hi, (base + page + count) << shift)
                    marks.mark(a - iova, b - a)
                    runs_left = max(runs_left - 1, 0)
            # A tracking page is cleared only if its part inside the map is inside the range.
            if max((base + first) << shift, mapping.iova) < iova:
                first += 1
            if min((base + stop) << shift, mapping.end) > end:
                stop -= 1
            if first < stop:
                bitmap.clear(first, stop - first)
