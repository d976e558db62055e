"""Migration with other implementations: raw device streams, and migrate() against the ways
libvfio-user's server and client differ from ours (issue 10, items 6 and 7).

libvfio-user itself is not run here: its behaviours are reproduced on our server by the
fixtures below, each named for the rule it imitates (libvfio-user's lib/dma.c dirty-page
report and lib/migration.c), so that every test fails the way the real peer made the
client fail.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from tests.migration_pair import (
    IOVA,
    MEMORY,
    PAGE,
    STATE,
    TIMEOUT,
    Blob,
    S,
    pair,
    served,
    state,
)
from vfiouser_trio.client import (
    Client,
    GuestMemory,
    MigrationError,
    MigrationStep,
    VfioUserError,
    connect,
    migrate,
)
from vfiouser_trio.client.dirty import ClientWrites, DirtyPages, merge_reports, split_by_maps
from vfiouser_trio.protocol import Capabilities, MigState
from vfiouser_trio.protocol.features import (
    DeviceFeatureReply,
    DeviceFeatureRequest,
    DmaLoggingReport,
)
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.migration import MigrationRefused, SessionMigration
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.serve import serve_connection

pytestmark = pytest.mark.usefixtures("no_fd_leak")


# --- libvfio-user's rules, on our server --------------------------------------------------


@pytest.fixture
def libvfio_user_reports(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """DMA_LOGGING_REPORT as libvfio-user answers it: the range must lie in one DMA map and
    start at its start (else ENOTSUP), and a map without an fd is refused (EINVAL: the
    server does not access it directly, so it logs nothing there). Yields the reports asked."""
    asked: list[tuple[int, int]] = []
    original = SessionMigration._report

    def report(
        self: SessionMigration,
        request: DeviceFeatureRequest,
        data: DmaLoggingReport,
        max_data: int,
    ) -> DeviceFeatureReply:
        asked.append((data.iova, data.length))
        assert isinstance(self.device, Device)
        windows = self.device.dma.windows(data.iova, data.length)
        if (
            len(windows) != 1
            or windows[0].iova != data.iova
            or data.iova + data.length > windows[0].end
        ):
            raise VfioUserError(
                errno.ENOTSUP, f"{data.iova:#x}+{data.length:#x}: not from a map's start"
            )
        if windows[0].file is None:
            raise VfioUserError(errno.EINVAL, f"DMA region {data.iova:#x} isn't accessed directly")
        return original(self, request, data, max_data)

    monkeypatch.setattr(SessionMigration, "_report", report)
    yield asked


@pytest.fixture
def keeps_migration_state_on_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """DEVICE_RESET resets the device but not its migration state (libvfio-user since its
    change #844)."""

    async def device_reset(self: SessionMigration) -> None:
        return None

    monkeypatch.setattr(SessionMigration, "device_reset", device_reset)


# --- a raw-mode device ----------------------------------------------------------------------


class Snapshots(Device):
    """A raw-mode device whose every stream part is a whole snapshot of its ``SIZE`` bytes,
    as libvfio-user's sample server restarts its stream at STOP_COPY: a client that drops
    the PRE_COPY part and one that forwards it both deliver a loadable stream (the last
    snapshot wins). An empty stream loads nothing, as that sample accepts."""

    SIZE = 3000

    def __init__(self, fill: int = 0) -> None:
        super().__init__(PciIdentity(vendor_id=0x4E58, device_id=0x0001, class_code=0xFF0000))
        self.data = bytearray(bytes([fill]) * self.SIZE)
        self.enable_migration(pre_copy=True, raw=True)
        self.resets = 0

    async def reset(self) -> None:
        self.resets += 1

    async def precopy_chunks(self) -> AsyncIterator[bytes]:
        yield bytes(self.data)

    async def save_chunks(self) -> AsyncIterator[bytes]:
        yield bytes(self.data[:1000])  # a snapshot in two chunks: boundaries are not kept
        yield bytes(self.data[1000:])

    async def load_state(self, data: bytes) -> None:
        if len(data) % self.SIZE:
            raise ValueError(f"{len(data)} bytes are not whole snapshots")
        if data:
            self.data[:] = data[-self.SIZE :]


@asynccontextmanager
async def serving(
    device: Device, xfer: int = 64 * 1024, *, propose: Capabilities | None = None
) -> AsyncIterator[Client]:
    """A client of ``device`` served with a ``xfer`` limit (the client proposing ``propose``)."""
    ours, theirs = socket.socketpair()
    caps = Capabilities(max_msg_fds=8, max_data_xfer_size=xfer)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(serve_connection, device, theirs, capabilities=caps))
            async with connect(ours, capabilities=propose) as client:
                yield client
            nursery.cancel_scope.cancel()
    finally:
        device.close()


async def read_all(client: Client) -> bytes:
    """The device's stream until a short read."""
    out = bytearray()
    while True:
        data = await client.read_migration_data()
        out += data
        if len(data) < client.max_data_xfer_size:
            return bytes(out)


async def libvfio_user_sample_client(source: Client, destination: Client) -> bytes:
    """What libvfio-user's samples/client does: read the PRE_COPY data and drop it, stop,
    read STOP_COPY and send only that. Returns what it sent."""
    await source.set_migration_state(MigState.PRE_COPY)
    await read_all(source)  # dropped
    await source.set_migration_state(MigState.STOP_COPY)
    stream = await read_all(source)
    await source.set_migration_state(MigState.STOP)
    await destination.set_migration_state(MigState.RESUMING)
    await destination.write_migration_data(stream)
    await destination.set_migration_state(MigState.STOP)
    await destination.set_migration_state(MigState.RUNNING)
    return stream


# --- item 6: raw streams --------------------------------------------------------------------


async def test_raw_device_migrates_between_two_servers_with_our_client() -> None:
    source, destination = Snapshots(fill=0x5A), Snapshots()
    source.data[7] = 1
    with trio.fail_after(TIMEOUT):
        async with serving(source, 1024) as src, serving(destination, 512) as dst:
            summary = await migrate(src, dst)
            assert (state(source), state(destination)) == (S.STOP, S.RUNNING)
    assert destination.data == source.data
    assert summary.pre_copy
    # The stream is the device's bytes and nothing else: a snapshot in each phase.
    assert summary.bytes == 2 * Snapshots.SIZE


async def test_libvfio_user_style_client_gets_the_whole_device_stream() -> None:
    source, destination = Snapshots(fill=0x33), Snapshots()
    with trio.fail_after(TIMEOUT):
        async with serving(source, 1024) as src, serving(destination) as dst:
            sent = await libvfio_user_sample_client(src, dst)
    assert sent == bytes(source.data)  # exactly the device's STOP_COPY bytes
    assert destination.data == source.data


async def test_framework_stream_refuses_a_client_that_drops_pre_copy_clearly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with pair(Blob(seed=5, pre_copy=True)) as (src, dst):
        with pytest.raises(VfioUserError) as caught:
            await libvfio_user_sample_client(src.client, dst.client)
        assert caught.value.errno == errno.EINVAL
        [line] = [r for r in caplog.records if "migration data refused" in r.getMessage()]
        assert line.levelname == "WARNING"
        expected = "Blob: migration data refused: invalid migration data: the stream does not "
        assert expected + "begin with its header" in line.getMessage()
        assert "PRE_COPY part not forwarded" in line.getMessage()
        assert state(dst.device) == S.RESUMING
        assert dst.device.data == bytes(STATE)


# --- item 7a: logging over every write ------------------------------------------------------


async def test_logging_started_over_all_writes_reports_every_map() -> None:
    with GuestMemory(MEMORY) as memory:
        async with pair() as (src, dst):
            await src.client.dma_map(memory, IOVA)
            await src.client.start_dirty_logging(ranges=[])  # num_ranges 0: all writes
            src.device.stop_writes = [7 * PAGE]
            summary = await migrate(src.client, dst.client)
            await src.client.stop_dirty_logging()
    assert summary.dirty is not None
    [report] = summary.dirty
    assert (report.iova, report.length) == (IOVA, MEMORY)
    assert report.addresses() == [IOVA + 7 * PAGE]


# --- item 7b and e: reports libvfio-user accepts --------------------------------------------


async def test_pages_the_client_writes_itself_are_reported_without_asking_the_server(
    libvfio_user_reports: list[tuple[int, int]],
) -> None:
    second = IOVA + MEMORY
    with GuestMemory(MEMORY) as unshared, GuestMemory(MEMORY) as shared:
        async with pair() as (src, dst):
            await src.client.dma_map(unshared, IOVA, share_fd=False)  # served by DMA_WRITE
            await src.client.dma_map(shared, second)
            # The device writes page 3 of the first map (through us) and page 2 of the second.
            src.device.stop_writes = [3 * PAGE, MEMORY + 2 * PAGE]
            summary = await migrate(src.client, dst.client)
            assert unshared.read(3 * PAGE, 8) == b"stopping"
    assert summary.dirty is not None
    assert [(r.iova, r.length) for r in summary.dirty] == [(IOVA, MEMORY), (second, MEMORY)]
    assert [r.addresses() for r in summary.dirty] == [[IOVA + 3 * PAGE], [second + 2 * PAGE]]
    assert libvfio_user_reports == [(second, MEMORY)]  # never asked about the unshared map


async def test_a_logged_range_over_two_maps_is_reported_map_by_map(
    libvfio_user_reports: list[tuple[int, int]],
) -> None:
    second = IOVA + MEMORY
    with GuestMemory(MEMORY) as one, GuestMemory(MEMORY) as two:
        async with pair() as (src, dst):
            await src.client.dma_map(one, IOVA)
            await src.client.dma_map(two, second)
            await src.client.start_dirty_logging(ranges=[(IOVA, 2 * MEMORY)])
            src.device.stop_writes = [MEMORY - 8, MEMORY]  # the last page of one, the first of two
            summary = await migrate(src.client, dst.client)
            await src.client.stop_dirty_logging()
    assert summary.dirty is not None
    assert [r.addresses() for r in summary.dirty] == [[second - PAGE], [second]]
    assert libvfio_user_reports == [(IOVA, MEMORY), (second, MEMORY)]


async def test_a_map_whose_bitmap_exceeds_one_message() -> None:
    """A server limit of 64 bytes makes 512-page bitmaps; the map has 1024 pages."""
    size = 1024 * PAGE
    with GuestMemory(size) as memory, trio.fail_after(TIMEOUT):
        async with served(Blob(), 64) as one:
            await one.client.dma_map(memory, IOVA)
            await one.client.start_dirty_logging()
            for offset in (8, 700 * PAGE):
                await one.client.write(0, 0, offset.to_bytes(4, "little"))
            pages = await one.client.dirty_pages(IOVA, size)  # our server: two reports
            assert pages.addresses() == [IOVA, IOVA + 700 * PAGE]
            await one.client.stop_dirty_logging()


async def test_a_map_whose_bitmap_exceeds_one_message_fails_clearly_with_libvfio_user(
    libvfio_user_reports: list[tuple[int, int]],
) -> None:
    size = 1024 * PAGE
    with GuestMemory(size) as memory, trio.fail_after(TIMEOUT):
        async with served(Blob(), 64) as one:
            await one.client.dma_map(memory, IOVA)
            await one.client.start_dirty_logging()
            with pytest.raises(VfioUserError) as caught:
                await one.client.dirty_pages(IOVA, size)
            assert caught.value.errno == errno.ENOTSUP
            assert "only from a DMA map's start" in caught.value.message
            assert "log at a larger page size" in caught.value.message
            await one.client.stop_dirty_logging()
    assert libvfio_user_reports == [(IOVA, 512 * PAGE), (IOVA + 512 * PAGE, 512 * PAGE)]


def test_client_writes_and_merged_reports() -> None:
    page = 0x1000
    writes = ClientWrites(page)
    writes.mark(0x10_0FF8, 16)  # pages 0x100 and 0x101
    writes.mark(0x20_0000, 0)  # nothing
    # A report of half of page 0x101 keeps that page's mark for a later report.
    first = writes.take(0x10_0000, 0x1800, page)
    assert first.addresses() == [0x10_0000, 0x10_1000]
    assert len(writes) == 1
    assert writes.take(0x10_1000, page, page).addresses() == [0x10_1000]
    assert len(writes) == 0

    server = DirtyPages(0x10_0000, 4 * page, page, (0b1000).to_bytes(8, "little"))
    mine = DirtyPages(0x10_0000, 2 * page, page, (0b01).to_bytes(8, "little"))
    merged = merge_reports(0x10_0000, 4 * page, 2 * page, [server, mine])
    assert merged.addresses() == [0x10_0000, 0x10_2000]

    maps = [(0x2000, 0x1000, False), (0x1000, 0x1000, True)]
    assert split_by_maps(0, 0x4000, maps) == (
        [(0, 0x1000), (0x1000, 0x1000), (0x3000, 0x1000)],
        [(0x2000, 0x1000)],
    )


# --- item 7c: transfer sizes ----------------------------------------------------------------


async def test_migration_data_chunks_follow_the_clients_own_limit_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes: list[int] = []
    read, write = SessionMigration.data_read, SessionMigration.data_write

    async def data_read(self: SessionMigration, request: object, max_size: int) -> object:
        sizes.append(request.size)  # type: ignore[attr-defined]
        return await read(self, request, max_size)  # type: ignore[arg-type]

    async def data_write(self: SessionMigration, request: object, max_size: int) -> object:
        sizes.append(len(request.data))  # type: ignore[attr-defined]
        return await write(self, request, max_size)  # type: ignore[arg-type]

    monkeypatch.setattr(SessionMigration, "data_read", data_read)
    monkeypatch.setattr(SessionMigration, "data_write", data_write)
    small = Capabilities(max_msg_fds=8, max_data_xfer_size=1024)
    source, destination = Snapshots(fill=1), Snapshots()
    with trio.fail_after(TIMEOUT):
        async with (
            serving(source, 1 << 20, propose=small) as src,
            serving(destination, 1 << 20, propose=small) as dst,
        ):
            assert src.max_data_xfer_size == 1024
            await migrate(src, dst)
    assert destination.data == source.data
    assert sizes and max(sizes) == 1024


# --- item 7d: the destination after a failure -----------------------------------------------


@pytest.mark.usefixtures("keeps_migration_state_on_reset")
async def test_failed_migration_leaves_the_destination_running_when_reset_keeps_resuming() -> None:
    source, destination = Snapshots(fill=9), Snapshots()
    with trio.fail_after(TIMEOUT):
        async with serving(source) as src, serving(destination) as dst:

            async def refuse(dirty: tuple[DirtyPages, ...] | None) -> None:
                raise MigrationRefused("not now")

            with pytest.raises(MigrationError) as caught:
                await migrate(src, dst, on_switchover=refuse)
            assert caught.value.step == MigrationStep.SWITCHOVER
            assert caught.value.destination_state == S.RUNNING
            assert not caught.value.cleanup_errors
            assert state(destination) == S.RUNNING
    assert destination.resets == 2  # reset, SET RUNNING, reset: it runs its reset state
