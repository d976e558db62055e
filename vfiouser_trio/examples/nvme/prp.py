"""Physical Region Page walking (NVMe 1.4, section 4.3 "Physical Region Page Entry and List").

A command's data is described by PRP1 and PRP2. PRP1 points at the first byte and may
start anywhere in a page (dword aligned); every later entry is page aligned. When the
data fits in two pages PRP2 is the second page; beyond that PRP2 points at a PRP list,
whose last entry chains to the next list page when more entries follow.

The guest writes these entries: every one is checked (alignment, the number of list
pages bounded by the transfer length) and any fault is an `NvmeError` carrying the
status the command completes with, never an exception of ours.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable

from ...protocol.errors import VfioUserError
from .spec import DATA_TRANSFER_ERROR, INVALID_FIELD, INVALID_PRP_OFFSET, NvmeError

#: Reads guest memory: (address, count) -> bytes; VfioUserError when unmapped.
DmaReader = Callable[[int, int], Awaitable[bytes]]

Segment = tuple[int, int]  # (guest address, length)


async def prp_segments(
    prp1: int, prp2: int, length: int, page_size: int, read: DmaReader
) -> list[Segment]:
    """The guest ranges holding ``length`` bytes, adjacent pages merged into one range."""
    if length <= 0:
        return []
    if prp1 & 0x3:
        raise NvmeError(INVALID_PRP_OFFSET, f"PRP1 {prp1:#x} is not dword aligned")
    first = min(length, page_size - (prp1 % page_size))
    pages = [(prp1, first)]
    remaining = length - first
    if remaining > page_size:
        pages += [(a, min(page_size, remaining - i * page_size)) for i, a in
                  enumerate(await _prp_list(prp2, remaining, page_size, read))]  # fmt: skip
    elif remaining:
        _check_page_aligned(prp2, page_size, "PRP2")
        pages.append((prp2, remaining))
    return _merge(pages)


async def _prp_list(address: int, remaining: int, page_size: int, read: DmaReader) -> list[int]:
    """The page addresses a PRP list starting at ``address`` gives for ``remaining`` bytes."""
    needed = -(-remaining // page_size)
    if address & 0x7:
        raise NvmeError(INVALID_PRP_OFFSET, f"PRP list pointer {address:#x} is not qword aligned")
    entries: list[int] = []
    while len(entries) < needed:
        # Entries up to the end of this list page; its last one chains on if more follow.
        room = (page_size - address % page_size) // 8
        want = needed - len(entries)
        count = want if want <= room else room
        try:
            raw = await read(address, 8 * count)
        except VfioUserError as error:
            raise NvmeError(DATA_TRANSFER_ERROR, f"PRP list at {address:#x}: {error}") from None
        values = list(struct.unpack(f"<{count}Q", raw))
        if want > room:
            # Page aligned, so the next list page has room for a page's worth of entries:
            # the walk ends after needed / (entries per page) pages (MDTS bounds needed).
            address = values.pop()
            _check_page_aligned(address, page_size, "a chained PRP list pointer")
        for value in values:
            _check_page_aligned(value, page_size, "a PRP list entry")
        entries += values
    return entries


def _check_page_aligned(address: int, page_size: int, what: str) -> None:
    if address % page_size:
        raise NvmeError(INVALID_PRP_OFFSET, f"{what} {address:#x} has an offset in its page")


def _merge(pages: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for address, size in pages:
        if merged and merged[-1][0] + merged[-1][1] == address:
            merged[-1] = (merged[-1][0], merged[-1][1] + size)
        else:
            merged.append((address, size))
    return merged


def check_transfer(length: int, limit: int) -> None:
    """Invalid Field for a transfer longer than the controller's MDTS allows."""
    if length > limit:
        raise NvmeError(INVALID_FIELD, f"a {length}-byte transfer exceeds MDTS ({limit} bytes)")
