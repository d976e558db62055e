"""Dirty-page logging: device DMA writes marked per map, DMA_LOGGING_START/STOP/REPORT.

Over real sockets with the engine as the client (reply sizes, errnos, what REPORT returns and
clears), plus the DirtyLog against a reference model for arbitrary ranges and page sizes.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fd_leaks import fd_count
from tests.raw_client import GuestRam, expect_errno, raw_payload, session
from vfiouser_trio.bitmap import bitmap_nbytes
from vfiouser_trio.engine import Connection
from vfiouser_trio.protocol import (
    DeviceFeatureRequest,
    DmaLoggingControl,
    DmaLoggingRange,
    DmaLoggingReport,
    DmaMapRequest,
    DmaUnmapRequest,
    Feature,
)
from vfiouser_trio.protocol.constants import DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.dirty import DirtyLog
from vfiouser_trio.server.dma import DmaTable
from vfiouser_trio.server.pci import PciIdentity

RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
PAGE = mmap.PAGESIZE
IOVA = 0x100000
PAGES = 16


class Logged(Device):
    """A migratable device with no state of its own: the tests drive its DMA directly."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10F2))
        self.enable_migration()


def start(page_size: int, *ranges: tuple[int, int]) -> DeviceFeatureRequest:
    control = DmaLoggingControl(page_size, tuple(DmaLoggingRange(a, n) for a, n in ranges))
    return DeviceFeatureRequest.set(Feature.DMA_LOGGING_START, control)


async def report(conn: Connection, iova: int, length: int, page_size: int) -> int:
    """REPORT, checking the reply's layout; the bitmap as an int (bit j = output page j)."""
    request = DeviceFeatureRequest.get(
        Feature.DMA_LOGGING_REPORT, DmaLoggingReport(iova, length, page_size)
    )
    payload = await raw_payload(conn, request)
    nbytes = bitmap_nbytes(-(-length // page_size))
    assert len(payload) == 8 + 24 + nbytes
    assert struct.unpack_from("=IIQQQ", payload) == (
        8 + 24 + nbytes,
        request.flags,
        iova,
        length,
        page_size,
    )
    value = int.from_bytes(payload[32:], "little")
    assert value >> -(-length // page_size) == 0  # nothing past the range
    return value


def bits(*positions: int) -> int:
    return sum(1 << p for p in positions)


@asynccontextmanager
async def mapped_session(device: Device) -> AsyncIterator[tuple[Connection, mmap.mmap]]:
    """A session with PAGES pages of fd-backed (sealable, so viewable) guest memory at IOVA."""
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, PAGES * PAGE)
    guest = mmap.mmap(fd, PAGES * PAGE)
    try:
        async with session(device) as conn:
            await conn.request(DmaMapRequest(IOVA, PAGES * PAGE, RW, fds=(fd,)))
            os.close(fd)
            yield conn, guest
    finally:
        guest.close()


async def scribble(device: Device) -> None:
    """Device writes: page 1 (dma.write), pages 4-5 (a writable view), reads elsewhere."""
    await device.dma.write(IOVA + PAGE + 16, b"12345678")
    with device.dma.view(IOVA + 5 * PAGE - 8, 16, writable=True) as view:
        view[:] = b"v" * 16
    with device.dma.view(IOVA + 9 * PAGE, 64) as view:  # read-only: not a write
        assert bytes(view) == bytes(64)
    await device.dma.read(IOVA + 10 * PAGE, 64)


# --- START / STOP -------------------------------------------------------------------------


async def test_start_and_stop_echo_and_pick_the_page_size() -> None:
    device = Logged()
    async with session(device) as conn:
        await expect_errno(
            conn,
            DeviceFeatureRequest.get(
                Feature.DMA_LOGGING_REPORT, DmaLoggingReport(IOVA, PAGE, PAGE)
            ),
            errno.EINVAL,
        )
        stop = DeviceFeatureRequest.set(Feature.DMA_LOGGING_STOP)
        assert await raw_payload(conn, stop) == stop.pack()  # stopping nothing is fine
        request = start(PAGE, (IOVA, PAGES * PAGE))
        payload = await raw_payload(conn, request)
        assert payload == request.pack() and len(payload) == 8 + 16 + 16
        assert await raw_payload(conn, request) == request.pack()  # again: same page size
        await expect_errno(conn, start(2 * PAGE), errno.EINVAL)  # another page size
        with_data = DeviceFeatureRequest.set(Feature.DMA_LOGGING_STOP, DmaLoggingControl(PAGE))
        assert await raw_payload(conn, with_data) == with_data.pack()
        await expect_errno(
            conn,
            DeviceFeatureRequest.get(
                Feature.DMA_LOGGING_REPORT, DmaLoggingReport(IOVA, PAGE, PAGE)
            ),
            errno.EINVAL,
        )
        # Finer than we track: the reply says which page size we chose.
        fine = start(512, (IOVA, PAGE))
        payload = await raw_payload(conn, fine)
        assert len(payload) == len(fine.pack())
        assert struct.unpack_from("=Q", payload, 8)[0] == PAGE
        assert payload[16:] == fine.pack()[16:]
        assert await raw_payload(conn, stop) == stop.pack()
        for bad in (
            start(0),
            start(3 * PAGE),
            start(PAGE, (IOVA, 0)),
            start(PAGE, (IOVA, 2 * PAGE), (IOVA + PAGE, PAGE)),  # overlap
            start(PAGE, ((1 << 64) - PAGE, 2 * PAGE)),  # past the end of the IOVA space
        ):
            await expect_errno(conn, bad, errno.EINVAL)
    device.close()


# --- what gets marked, and REPORT ---------------------------------------------------------


async def test_device_writes_mark_pages_and_report_clears_them() -> None:
    device = Logged()
    before = fd_count()
    async with mapped_session(device) as (conn, guest):
        await scribble(device)  # before START: not logged
        await conn.request(start(PAGE))
        assert await report(conn, IOVA, PAGES * PAGE, PAGE) == 0
        await scribble(device)
        assert guest[PAGE + 16 : PAGE + 24] == b"12345678"
        assert await report(conn, IOVA, PAGES * PAGE, PAGE) == bits(1, 4, 5)
        assert await report(conn, IOVA, PAGES * PAGE, PAGE) == 0  # cleared
    device.close()
    assert fd_count() == before


@pytest.mark.parametrize(
    ("page_size", "expected"),
    [
        (PAGE, bits(1, 4, 5)),
        (2 * PAGE, bits(0, 2)),  # OR of the pages each bit covers
        (16 * PAGE, bits(0)),
        (PAGE // 2, bits(2, 3, 8, 9, 10, 11)),  # each dirty page's bit repeated
        (PAGE // 4, bits(4, 5, 6, 7, *range(16, 24))),
    ],
)
async def test_report_at_other_page_sizes(page_size: int, expected: int) -> None:
    device = Logged()
    async with mapped_session(device) as (conn, _):
        await conn.request(start(PAGE))
        await scribble(device)
        assert await report(conn, IOVA, PAGES * PAGE, page_size) == expected
        assert await report(conn, IOVA, PAGES * PAGE, PAGE) == 0
    device.close()


async def test_report_of_a_range_takes_only_that_range() -> None:
    device = Logged()
    async with mapped_session(device) as (conn, _):
        await conn.request(start(PAGE))
        await device.dma.write(IOVA, bytes(PAGES * PAGE))  # everything dirty
        assert await report(conn, IOVA + 2 * PAGE, 3 * PAGE, PAGE) == 0b111
        rest = bits(*range(PAGES)) & ~bits(2, 3, 4)
        assert await report(conn, IOVA, PAGES * PAGE, PAGE) == rest
        # A range that only partly covers pages reports them and leaves them dirty.
        await device.dma.write(IOVA + PAGE, b"x")
        assert await report(conn, IOVA + PAGE // 2, PAGE, PAGE) == 0b1
        assert await report(conn, IOVA, PAGES * PAGE, PAGE) == bits(1)
    device.close()


async def test_report_refusals_leave_the_bits() -> None:
    device = Logged()
    async with mapped_session(device) as (conn, _):
        await conn.request(start(PAGE))
        await device.dma.write(IOVA + 3 * PAGE, b"x")
        whole = DmaLoggingReport(IOVA, PAGES * PAGE, PAGE)
        get = Feature.DMA_LOGGING_REPORT
        short = DeviceFeatureRequest(get | (1 << 16), whole, argsz=8 + 24 + 7)
        for bad in (
            short,
            DeviceFeatureRequest.get(get, DmaLoggingReport(IOVA, PAGE, 0)),
            DeviceFeatureRequest.get(get, DmaLoggingReport(IOVA, PAGE, 3000)),
            DeviceFeatureRequest.get(get, DmaLoggingReport(IOVA, 0, PAGE)),
            # 8 Mi pages at 1 byte each: a bitmap beyond our 1 MiB transfer limit.
            DeviceFeatureRequest.get(get, DmaLoggingReport(0, 1 << 33, 1)),
        ):
            await expect_errno(conn, bad, errno.EINVAL)
        assert await report(conn, IOVA, PAGES * PAGE, PAGE) == bits(3)
    device.close()


async def test_ranges_limit_what_is_logged_and_reported() -> None:
    device = Logged()
    async with mapped_session(device) as (conn, _):
        await conn.request(start(PAGE, (IOVA, 4 * PAGE), (IOVA + 8 * PAGE, 2 * PAGE)))
        await device.dma.write(IOVA + PAGE, b"in")
        await device.dma.write(IOVA + 6 * PAGE, b"outside the ranges")
        await device.dma.write(IOVA + 8 * PAGE - 1, b"xy")  # crosses into the range
        assert await report(conn, IOVA, 4 * PAGE, PAGE) == bits(1)
        assert await report(conn, IOVA + 8 * PAGE, 2 * PAGE, PAGE) == bits(0)
        unlogged = DmaLoggingReport(IOVA, 10 * PAGE, PAGE)
        await expect_errno(
            conn, DeviceFeatureRequest.get(Feature.DMA_LOGGING_REPORT, unlogged), errno.EINVAL
        )
        # Starting again with the same page size changes the ranges, keeps the log.
        await device.dma.write(IOVA, b"kept")
        await conn.request(start(PAGE))
        await device.dma.write(IOVA + 12 * PAGE, b"now logged")
        # Pages 6 and 7 were written while outside the ranges: not in the log.
        assert await report(conn, IOVA, PAGES * PAGE, PAGE) == bits(0, 12)
    device.close()


async def test_writes_through_dma_messages_are_logged() -> None:
    device = Logged()
    ram = GuestRam(0x400000, 4 * PAGE)
    async with session(device, ram) as conn:
        await conn.request(DmaMapRequest(0x400000, 4 * PAGE, RW))
        await conn.request(start(PAGE))
        await device.dma.write(0x400000 + 2 * PAGE + 5, b"by message")
        assert ram.mem[2 * PAGE + 5 : 2 * PAGE + 15] == b"by message"
        assert await report(conn, 0x400000, 4 * PAGE, PAGE) == bits(2)
    device.close()


async def test_report_across_maps_and_after_unmap() -> None:
    device = Logged()
    ram = GuestRam(0x400000, 4 * PAGE)
    async with session(device, ram) as conn:
        await conn.request(start(PAGE))
        await conn.request(DmaMapRequest(0x400000, PAGE, RW))
        await conn.request(DmaMapRequest(0x400000 + 2 * PAGE, 2 * PAGE, RW))
        await device.dma.write(0x400000, b"a")
        await device.dma.write(0x400000 + 3 * PAGE, b"b")
        assert await report(conn, 0x400000, 4 * PAGE, PAGE) == bits(0, 3)
        await device.dma.write(0x400000, b"a")
        await conn.request(DmaUnmapRequest(0x400000, PAGE))
        await conn.request(DmaMapRequest(0x400000, PAGE, RW))
        assert await report(conn, 0x400000, 4 * PAGE, PAGE) == 0  # that memory went away
    device.close()


async def test_logging_ends_with_the_session() -> None:
    device = Logged()
    async with mapped_session(device) as (conn, _):
        await conn.request(start(PAGE))
    async with session(device) as conn:
        await expect_errno(
            conn,
            DeviceFeatureRequest.get(
                Feature.DMA_LOGGING_REPORT, DmaLoggingReport(IOVA, PAGE, PAGE)
            ),
            errno.EINVAL,
        )
    device.close()


# --- DirtyLog against a model -------------------------------------------------------------

# Windows (iova, size) with unaligned edges, and a gap.
WINDOWS = ((0x0, 0x3000), (0x5000, 0x800), (0x5C00, 0x1400), (0x8000, 0x8000))
SPACE = 0x10000


def _model_report(
    dirty: set[tuple[int, int]], track: int, iova: int, length: int, page_size: int
) -> tuple[set[int], set[tuple[int, int]]]:
    """Bits a report should set, and the (window, page) marks it should clear."""
    end = iova + length
    out: set[int] = set()
    cleared: set[tuple[int, int]] = set()
    for window, page in dirty:
        w_iova, w_size = WINDOWS[window]
        lo = max(page * track, w_iova)
        hi = min((page + 1) * track, w_iova + w_size)
        a, b = max(lo, iova), min(hi, end)
        if a < b:
            out.update(range((a - iova) // page_size, (b - 1 - iova) // page_size + 1))
        if iova <= lo and hi <= end:
            cleared.add((window, page))
    return out, cleared


operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, SPACE - 1), st.integers(1, 0x3000)),
        st.tuples(
            st.sampled_from([0x200, 0x1000, 0x2000, 0x10000]),
            st.integers(0, SPACE - 1),
            st.integers(1, SPACE),
        ),
        # From a page boundary, as a VMM asks (at the tracking size, bits are copied).
        st.sampled_from([0x1000, 0x2000]).flatmap(
            lambda size: st.tuples(
                st.just(size), st.integers(0, SPACE // size - 1).map(size.__mul__), st.just(SPACE)
            )
        ),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(track=st.sampled_from([0x1000, 0x2000]), ops=operations)
def test_dirty_log_matches_a_model(track: int, ops: list[tuple[object, int, int]]) -> None:
    table = DmaTable()
    for iova, size in WINDOWS:
        table.map(iova, size, RW, None)
    log = DirtyLog(table, track)
    dirty: set[tuple[int, int]] = set()
    for kind, iova, length in ops:
        if kind == "write":
            # Only inside windows, as DmaTable.write guarantees.
            for window, (w_iova, w_size) in enumerate(WINDOWS):
                a, b = max(iova, w_iova), min(iova + length, w_iova + w_size)
                if a < b:
                    log.mark(a, b - a)
                    dirty.update((window, p) for p in range(a // track, (b - 1) // track + 1))
        else:
            assert isinstance(kind, int)
            span = min(length, SPACE - iova)
            expected, cleared = _model_report(dirty, track, iova, span, kind)
            got = log.report(iova, span, kind)
            assert len(got) == bitmap_nbytes(-(-span // kind))
            value = int.from_bytes(got, "little")
            assert {j for j in range(len(got) * 8) if value >> j & 1} == expected
            dirty -= cleared
    log.close()


def test_dirty_log_close_stops_marking() -> None:
    table = DmaTable()
    table.map(0, 0x4000, RW, None)
    log = DirtyLog(table, 0x1000)
    table.note_written(0x1000, 1)
    assert log.report(0, 0x4000, 0x1000) == bits(1).to_bytes(8, "little")
    log.close()
    log.close()  # idempotent
    table.note_written(0x2000, 1)  # no observer left: nothing raises, nothing is kept
    fresh = DirtyLog(table, 0x1000)
    assert fresh.report(0, 0x4000, 0x1000) == bytes(8)
    fresh.close()
