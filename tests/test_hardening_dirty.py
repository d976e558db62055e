"""Hardening: dirty-page logging over maps far larger than memory (issue 9).

A client may map 2**52 bytes of message-only memory and start logging over it. The bitmaps
must follow the pages written, stay within ``ServerLimits.max_dirty_bitmap_bytes`` per client
(past it: every page of the map reported dirty, never a page lost), and the process must go on
serving its other devices.
"""

from __future__ import annotations

import errno
import logging
import socket
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.raw_client import expect_errno
from vfiouser_trio.bitmap import CHUNK_BITS, DirtyBitmap
from vfiouser_trio.engine import Connection, HandlerResult, open_connection
from vfiouser_trio.limits import DEFAULT_LIMITS, ServerLimits
from vfiouser_trio.protocol import (
    Capabilities,
    DeviceFeatureRequest,
    DmaLoggingControl,
    DmaLoggingRange,
    DmaLoggingReport,
    DmaMapRequest,
    DmaWriteReply,
    DmaWriteRequest,
    Feature,
    VersionReply,
    VersionRequest,
    decode_request,
)
from vfiouser_trio.protocol.constants import (
    DEVICE_FEATURE_GET,
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.protocol.features import DeviceFeatureReply, DmaLoggingBitmap
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.server import dirty
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.dirty import DirtyLog
from vfiouser_trio.server.dma import DmaTable
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.serve import serve_connection

pytestmark = pytest.mark.usefixtures("no_fd_leak")

RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
PAGE = 4096
HUGE = 1 << 52
#: Four message-only maps of 2**50 bytes each: 2**52 bytes, 2**40 pages (a 128 GiB bitmap).
MAPS = tuple((i << 50, 1 << 50) for i in range(4))
#: Pages the device dirties: the first, one deep in the second map, the very last.
DIRTY = (0, (1 << 50) + 7 * PAGE, HUGE - PAGE)


class Logged(Device):
    def __init__(self, name: str) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10F2), name=name)
        self.enable_migration()


class SinkRam:
    """The client's side of DMA_WRITE for maps of any size: keeps only what was written."""

    def __init__(self) -> None:
        self.written: dict[int, bytes] = {}

    async def handle(self, frame: Frame) -> HandlerResult:
        request = decode_request(frame.header.command, frame.payload, frame.fds)
        if not isinstance(request, DmaWriteRequest):
            raise VfioUserError(errno.EINVAL)
        self.written[request.address] = bytes(request.data)
        return DmaWriteReply(request.address, len(request.data))


@asynccontextmanager
async def client(
    device: Device, limits: ServerLimits = DEFAULT_LIMITS
) -> AsyncIterator[tuple[Connection, SinkRam]]:
    """A negotiated connection to ``device``, served with ``limits`` over a socketpair."""
    ram = SinkRam()
    client_sock, server_sock = socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_connection, device, server_sock, limits=limits))
        async with open_connection(client_sock, handler=ram.handle) as conn:
            reply = await conn.request(VersionRequest(0, 2, Capabilities()))
            assert isinstance(reply, VersionReply)
            yield conn, ram


def start(page_size: int, *ranges: tuple[int, int]) -> DeviceFeatureRequest:
    control = DmaLoggingControl(page_size, tuple(DmaLoggingRange(a, n) for a, n in ranges))
    return DeviceFeatureRequest.set(Feature.DMA_LOGGING_START, control)


async def report(conn: Connection, iova: int, length: int, page_size: int) -> set[int]:
    """The output pages a REPORT says are dirty."""
    request = DeviceFeatureRequest.get(
        Feature.DMA_LOGGING_REPORT, DmaLoggingReport(iova, length, page_size)
    )
    reply = await conn.request(request)
    assert isinstance(reply, DeviceFeatureReply)
    assert isinstance(reply.data, DmaLoggingBitmap)
    bitmap = reply.data.bitmap
    dirty = {
        i * 8 + bit
        for i, byte in enumerate(bitmap)
        if byte  # a huge bitmap is mostly zero bytes
        for bit in range(8)
        if byte >> bit & 1
    }
    assert all(j < -(-length // page_size) for j in dirty)  # nothing past the range
    return dirty


async def map_huge(conn: Connection) -> None:
    for iova, size in MAPS:
        await conn.request(DmaMapRequest(iova, size, RW))


async def test_logging_over_2_52_bytes_stays_small_and_exact() -> None:
    device = Logged("huge")
    tracemalloc.start()
    try:
        async with client(device) as (conn, ram):
            await map_huge(conn)
            await conn.request(start(PAGE))  # every write logged: the whole 2**52 bytes
            await conn.request(start(PAGE, (0, HUGE)))  # the same as one explicit range
            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for iova in DIRTY:
                await device.dma.write(iova + 5, b"dirty")
            assert sorted(ram.written) == [iova + 5 for iova in DIRTY]
            # Around each dirty page, at the tracking page size: exactly that page.
            for iova in DIRTY:
                low = min(max(iova - 64 * PAGE, 0), HUGE - 128 * PAGE)
                assert await report(conn, low, 128 * PAGE, PAGE) == {(iova - low) // PAGE}
            for iova in DIRTY:
                await device.dma.write(iova, b"again")
            # All 2**52 bytes at 4 GiB a bit (a 128 KiB bitmap), then nothing left.
            assert await report(conn, 0, HUGE, 1 << 32) == {iova >> 32 for iova in DIRTY}
            assert await report(conn, 0, HUGE, 1 << 32) == set()
            # A bitmap larger than the transfer limit is refused before anything is built.
            too_big = DmaLoggingReport(0, 1 << 40, 1)  # 128 GiB of bitmap
            get = Feature.DMA_LOGGING_REPORT | DEVICE_FEATURE_GET
            await expect_errno(conn, DeviceFeatureRequest(get, too_big, 1 << 20), errno.EINVAL)
            peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    device.close()
    # Three pages dirty: three 4 KiB chunks and replies, not the 128 GiB the maps span.
    assert peak < 2 << 20, peak


async def test_past_the_limit_a_map_is_reported_all_dirty(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = Logged("capped")
    one_chunk = ServerLimits(max_dirty_bitmap_bytes=4096)  # 32768 pages' worth
    async with client(device, one_chunk) as (conn, _):
        await map_huge(conn)
        await conn.request(DmaMapRequest(HUGE, 64 * PAGE, RW))  # a small map beside
        await conn.request(start(PAGE))
        await device.dma.write(0, b"first chunk")
        assert await report(conn, 0, 64 * PAGE, PAGE) == {0}
        await device.dma.write(0, b"first chunk")
        with caplog.at_level(logging.WARNING, logger="vfiouser_trio.server.dirty"):
            await device.dma.write(1 << 40, b"a second chunk: over the limit")
        assert "capped" in caplog.text and "reported dirty" in caplog.text
        # Every page of that map is dirty, in report after report: nothing was lost.
        for _ in range(2):
            assert await report(conn, 0, 64 * PAGE, PAGE) == set(range(64))
            assert await report(conn, (1 << 50) - 64 * PAGE, 64 * PAGE, PAGE) == set(range(64))
        # The overflowed map gave its chunk back: the other maps still log exactly.
        await device.dma.write(HUGE + 3 * PAGE, b"small map")
        assert await report(conn, HUGE, 64 * PAGE, PAGE) == {3}
        assert await report(conn, 1 << 50, 64 * PAGE, PAGE) == set()
        # Logging again from scratch starts clean.
        await conn.request(DeviceFeatureRequest.set(Feature.DMA_LOGGING_STOP))
        await conn.request(start(PAGE))
        await device.dma.write(PAGE, b"exact again")
        assert await report(conn, 0, 64 * PAGE, PAGE) == {1}
    device.close()


async def test_another_device_answers_after_huge_logging() -> None:
    hostile, other = Logged("hostile"), Logged("other")
    async with client(hostile) as (conn, _), client(other) as (other_conn, _):
        await map_huge(conn)
        await conn.request(start(PAGE))
        for iova in DIRTY:
            await hostile.dma.write(iova, b"x")
        assert await report(conn, 0, HUGE, 1 << 32) == {iova >> 32 for iova in DIRTY}
        # The other device, in the same process, still serves its client.
        await other_conn.request(DmaMapRequest(0, 64 * PAGE, RW))
        await other_conn.request(start(PAGE))
        await other.dma.write(2 * PAGE, b"y")
        assert await report(other_conn, 0, 64 * PAGE, PAGE) == {2}
    hostile.close()
    other.close()


async def test_start_bounds_the_number_of_ranges() -> None:
    device = Logged("ranges")
    many = [(i * 2 * PAGE, PAGE) for i in range(DEFAULT_LIMITS.max_dirty_ranges + 1)]
    async with client(device) as (conn, _):
        await map_huge(conn)
        await expect_errno(conn, start(PAGE, *many), errno.E2BIG)
        await conn.request(start(PAGE, *many[:-1]))  # at the limit: fine
        await expect_errno(conn, start(PAGE, *many), errno.E2BIG)  # a restart is bounded too
        await device.dma.write(2 * PAGE, b"in the second range")
        assert await report(conn, 2 * PAGE, PAGE, PAGE) == {0}  # the refusal changed nothing
    async with client(device, ServerLimits(max_dirty_ranges=2)) as (conn, _):
        await expect_errno(conn, start(PAGE, *many[:3]), errno.E2BIG)
        await conn.request(start(PAGE, *many[:2]))
    device.close()


# --- a bounded log never under-reports ------------------------------------------------------

CHUNK = CHUNK_BITS * PAGE  # bytes of memory one bitmap chunk covers
#: Maps of several chunks, one with unaligned edges, and gaps between them.
WINDOWS = ((0, 4 * CHUNK), (4 * CHUNK + 0x1800, 2 * CHUNK + 0x800), (8 * CHUNK, CHUNK))
SPACE = 9 * CHUNK

writes = st.tuples(st.just(0), st.integers(0, SPACE - 1), st.integers(1, 0x3000))
reports = st.tuples(
    st.sampled_from([PAGE // 2, PAGE, 1 << 21, CHUNK]),
    st.integers(0, SPACE - 1),
    st.integers(1, 1 << 16),  # in output pages: a bounded bitmap
)


@settings(max_examples=60, deadline=None)
@given(budget_chunks=st.integers(0, 3), ops=st.lists(st.one_of(writes, reports), max_size=20))
def test_a_bounded_log_reports_a_superset(
    budget_chunks: int, ops: list[tuple[int, int, int]]
) -> None:
    table = DmaTable()
    for iova, size in WINDOWS:
        table.map(iova, size, RW, None)
    bounded = DirtyLog(table, PAGE, max_bitmap_bytes=budget_chunks * CHUNK_BITS // 8)
    exact = DirtyLog(table, PAGE, max_bitmap_bytes=1 << 30)
    for kind, iova, n in ops:
        if not kind:
            for w_iova, w_size in WINDOWS:  # only inside maps, as DmaTable.write ensures
                a, b = max(iova, w_iova), min(iova + n, w_iova + w_size)
                if a < b:
                    table.note_written(a, b - a)
            assert bounded.bitmap_bytes <= budget_chunks * CHUNK_BITS // 8
            continue
        length = min(n * kind, SPACE - iova)
        got = int.from_bytes(bounded.report(iova, length, kind), "little")
        want = int.from_bytes(exact.report(iova, length, kind), "little")
        assert got & want == want  # every page written is reported
        if not bounded.overflowed:
            assert got == want
    bounded.close()
    exact.close()


def test_report_work_follows_the_chunks_not_the_dirty_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = DmaTable()
    table.map(0, 4 * CHUNK, RW, None)
    log = DirtyLog(table, PAGE)
    pages = range(0, 4 * CHUNK_BITS, 194)  # 676 separate runs over 4 chunks

    def scatter() -> None:
        for page in pages:
            table.note_written(page * PAGE + 9, 1)

    marked: list[int] = []
    mark = DirtyBitmap.mark

    def counting(self: DirtyBitmap, offset: int, length: int) -> None:
        marked.append(length)
        mark(self, offset, length)

    monkeypatch.setattr(DirtyBitmap, "mark", counting)
    # At the tracking page size from a page boundary (as a VMM asks): copied, exact.
    scatter()
    report = int.from_bytes(log.report(0, 4 * CHUNK, PAGE), "little")
    assert report == sum(1 << page for page in pages)
    assert marked == []  # not one run marked by itself
    # Any other page size: a few runs exact, then whole chunk tails, a superset.
    monkeypatch.setattr(dirty, "REPORT_RUNS", 8)
    scatter()
    report = int.from_bytes(log.report(0, 4 * CHUNK, 2 * PAGE), "little")
    expected = sum(1 << (page // 2) for page in pages)
    assert report & expected == expected and report != expected
    assert len(marked) <= 8 + 1 + 4  # the exact runs, the one under way, a tail per chunk
    assert int.from_bytes(log.report(0, 4 * CHUNK, PAGE), "little") == 0  # all taken
    log.close()
