"""DmaTable: fd-backed and message-only maps, permissions, scatter-gather, unmap waiting."""

from __future__ import annotations

import array
import errno
import mmap
import os

import pytest
import trio
import trio.testing

from tests.fd_leaks import fd_count
from tests.raw_client import GuestRam, session
from tests.victims import assert_survived, run_victim
from vfiouser_trio.client import GuestMemory
from vfiouser_trio.engine import ConnectionClosedError, HandlerResult, ReplyTimeout
from vfiouser_trio.limits import ServerLimits
from vfiouser_trio.protocol import DmaMapRequest, RegionWriteRequest
from vfiouser_trio.protocol.constants import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    Command,
    PciRegion,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.dma import DmaError, DmaTable, DmaWindow, mark_command_task
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.testing import nested_device

RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
PAGE = mmap.PAGESIZE


def guest_memfd(size: int) -> tuple[int, mmap.mmap]:
    """A memfd standing in for guest RAM, and the 'client' side mapping of it.

    Created sealable, as a VMM does, so the table can seal it against shrinking and
    allow views (tests/test_hardening_memory.py covers the other kinds).
    """
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd, mmap.mmap(fd, size)


class FakeClient:
    """Serves DMA_READ/DMA_WRITE from a bytearray, recording the message sizes."""

    def __init__(self, base: int, size: int, max_xfer: int) -> None:
        self.base = base
        self.mem = bytearray(size)
        self.max_data_xfer_size = max_xfer
        self.calls: list[tuple[str, int, int]] = []

    async def dma_read(self, address: int, count: int) -> bytes:
        assert count <= self.max_data_xfer_size
        self.calls.append(("read", address, count))
        await trio.lowlevel.checkpoint()
        off = address - self.base
        return bytes(self.mem[off : off + count])

    async def dma_write(self, address: int, data: bytes | memoryview) -> None:
        assert len(data) <= self.max_data_xfer_size
        self.calls.append(("write", address, len(data)))
        await trio.lowlevel.checkpoint()
        off = address - self.base
        self.mem[off : off + len(data)] = data


async def test_fd_map_read_write_shares_memory() -> None:
    before = fd_count()
    table = DmaTable()
    fd, client_view = guest_memfd(4 * PAGE)
    table.map(0x10000, 2 * PAGE, RW, fd, offset=PAGE)
    client_view[PAGE : PAGE + 5] = b"hello"
    assert await table.read(0x10000, 5) == b"hello"
    await table.write(0x10000 + 10, b"world")
    assert client_view[PAGE + 10 : PAGE + 15] == b"world"
    await table.unmap(0x10000, 2 * PAGE)
    client_view.close()
    assert len(table) == 0
    assert fd_count() == before


async def test_unaligned_fd_offset_is_honoured() -> None:
    table = DmaTable()
    fd, client_view = guest_memfd(2 * PAGE)
    client_view[100:104] = b"abcd"
    table.map(0, 64, DMA_MAP_FLAG_READ, fd, offset=100)
    assert await table.read(0, 4) == b"abcd"
    await table.unmap_all()
    client_view.close()


async def test_an_identical_map_again_is_a_no_op_and_closes_its_fd() -> None:
    """A client replaying its maps (libvfio-user treats this as success) used to get EEXIST."""
    table = DmaTable(max_maps=2)
    fd, client_view = guest_memfd(4 * PAGE)
    again = os.dup(fd)
    first = table.map(0x10000, 2 * PAGE, RW, fd, offset=PAGE)
    table.map(0x20000, PAGE, RW, None)  # the table is now full (max_maps=2)
    before = fd_count()
    assert table.map(0x10000, 2 * PAGE, RW, again, offset=PAGE) is first
    assert fd_count() == before - 1  # the repeated map's fd was closed, nothing else kept
    assert table.map(0x20000, PAGE, RW, None).iova == 0x20000  # message-only, the same
    assert len(table) == 2
    client_view[PAGE : PAGE + 4] = b"same"
    assert await table.read(0x10000, 4) == b"same"
    await table.unmap_all()
    client_view.close()


@pytest.mark.parametrize(
    ("iova", "size", "flags", "offset", "other_file", "with_fd"),
    [
        (0x10000, 2 * PAGE, DMA_MAP_FLAG_READ, PAGE, False, True),  # other protection
        (0x10000, 2 * PAGE, RW, 0, False, True),  # other offset
        (0x10000, PAGE, RW, PAGE, False, True),  # other size
        (0x10000, 2 * PAGE, RW, PAGE, True, True),  # other file
        (0x10000, 2 * PAGE, RW, PAGE, False, False),  # no file where there was one
    ],
    ids=["protection", "offset", "size", "file", "no-fd"],
)
async def test_a_map_that_differs_in_anything_is_still_eexist(
    iova: int, size: int, flags: int, offset: int, other_file: bool, with_fd: bool
) -> None:
    table = DmaTable()
    fd, client_view = guest_memfd(4 * PAGE)
    second = guest_memfd(4 * PAGE) if other_file else (os.dup(fd), None)
    table.map(0x10000, 2 * PAGE, RW, fd, offset=PAGE)
    with pytest.raises(VfioUserError) as exc:
        table.map(iova, size, flags, second[0] if with_fd else None, offset=offset)
    assert exc.value.errno == errno.EEXIST
    if not with_fd:
        os.close(second[0])
    if second[1] is not None:
        second[1].close()
    await table.unmap_all()
    client_view.close()


async def test_overlap_is_eexist_and_limits_enospc() -> None:
    table = DmaTable(max_maps=2)
    table.map(0x1000, 0x1000, RW, None)
    with pytest.raises(VfioUserError) as exc:
        table.map(0x1800, 0x1000, RW, None)
    assert exc.value.errno == errno.EEXIST
    with pytest.raises(VfioUserError) as exc:
        table.map(0x0, 0x1001, RW, None)
    assert exc.value.errno == errno.EEXIST
    table.map(0x2000, 0x1000, RW, None)  # adjacent is fine
    with pytest.raises(VfioUserError) as exc:
        table.map(0x8000, 0x1000, RW, None)
    assert exc.value.errno == errno.ENOSPC


async def test_rejected_map_closes_its_fd() -> None:
    table = DmaTable()
    table.map(0, PAGE, RW, None)
    before = fd_count()
    fd, view = guest_memfd(PAGE)
    view.close()
    with pytest.raises(VfioUserError):
        table.map(0, PAGE, RW, fd)
    assert fd_count() == before  # the memfd we created is gone again
    with pytest.raises(VfioUserError) as exc:
        table.map(0x10000, PAGE, 0x4, None)
    assert exc.value.errno == errno.EINVAL


async def test_unmap_needs_exact_match() -> None:
    table = DmaTable()
    table.map(0x1000, 0x2000, RW, None)
    for iova, size in ((0x1000, 0x1000), (0x2000, 0x1000), (0x0, 0x2000)):
        with pytest.raises(VfioUserError) as exc:
            await table.unmap(iova, size)
        assert exc.value.errno == errno.ENOENT
    await table.unmap(0x1000, 0x2000)


async def test_permissions_and_unmapped_addresses() -> None:
    table = DmaTable()
    fd, view = guest_memfd(PAGE)
    table.map(0, PAGE, DMA_MAP_FLAG_READ, fd)
    with pytest.raises(DmaError) as exc:
        await table.write(0, b"x")
    assert exc.value.errno == errno.EFAULT
    with pytest.raises(DmaError):
        await table.read(PAGE - 2, 4)  # runs off the end into unmapped space
    with pytest.raises(DmaError), table.view(0, 4, writable=True):
        pass
    with table.view(0, 4) as ro:
        assert ro.readonly
    await table.unmap_all()
    view.close()


async def test_scatter_gather_across_fd_and_message_maps() -> None:
    client = FakeClient(base=PAGE, size=3 * PAGE, max_xfer=1000)
    table = DmaTable(messenger=client)
    fd, view = guest_memfd(PAGE)
    table.map(0, PAGE, RW, fd)
    table.map(PAGE, 3 * PAGE, RW, None)
    payload = bytes(range(256)) * 20  # 5120 bytes: 100 in the fd map, the rest by messages
    await table.write(PAGE - 100, payload)
    assert view[PAGE - 100 :] == payload[:100]
    assert bytes(client.mem[: len(payload) - 100]) == payload[100:]
    assert all(n <= 1000 for _, _, n in client.calls)
    assert await table.read(PAGE - 100, len(payload)) == payload
    await table.unmap_all()
    view.close()


@pytest.mark.parametrize("count", [600, 2500], ids=["one-message", "three-messages"])
async def test_a_dma_read_reply_of_the_wrong_size_is_eio(count: int) -> None:
    """A client answering DMA_READ with fewer bytes than asked fails the access (EIO), by
    read and read_into alike, whether the access takes one message or several."""

    class ShortClient(FakeClient):
        async def dma_read(self, address: int, count: int) -> bytes:
            return (await super().dma_read(address, count))[:-1]

    table = DmaTable(messenger=ShortClient(base=0, size=4 * PAGE, max_xfer=1000))
    table.map(0, 4 * PAGE, RW, None)
    with pytest.raises(DmaError) as read:
        await table.read(0, count)
    with pytest.raises(DmaError) as read_into:
        await table.read_into(0, bytearray(count))
    assert read.value.errno == read_into.value.errno == errno.EIO
    assert "wanted" in str(read.value)
    await table.unmap_all()


async def test_unmap_waits_for_in_flight_message_dma() -> None:
    gate = trio.Event()

    class SlowClient(FakeClient):
        async def dma_read(self, address: int, count: int) -> bytes:
            await gate.wait()
            return await super().dma_read(address, count)

    client = SlowClient(base=0, size=PAGE, max_xfer=PAGE)
    table = DmaTable(messenger=client)
    table.map(0, PAGE, RW, None)
    unmapped = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(table.read, 0, 16)
        await trio.testing.wait_all_tasks_blocked()

        async def unmap() -> None:
            await table.unmap(0, PAGE)
            unmapped.set()

        nursery.start_soon(unmap)
        await trio.testing.wait_all_tasks_blocked()
        assert not unmapped.is_set()
        with pytest.raises(DmaError):  # a new access after the unmap began is refused
            await table.read(0, 4)
        gate.set()
    assert unmapped.is_set()
    assert len(table) == 0


async def test_unmap_waits_for_open_views() -> None:
    table = DmaTable()
    fd, view = guest_memfd(PAGE)
    table.map(0, PAGE, RW, fd)
    unmapped = trio.Event()

    async def unmap() -> None:
        await table.unmap(0, PAGE)
        unmapped.set()

    async with trio.open_nursery() as nursery:
        with table.view(8, 8, writable=True) as v:
            nursery.start_soon(unmap)
            await trio.testing.wait_all_tasks_blocked()
            assert not unmapped.is_set()
            v[:] = b"12345678"
    assert unmapped.is_set()
    assert view[8:16] == b"12345678"
    view.close()


async def test_can_view_says_beforehand_whether_view_would_raise() -> None:
    """can_view and view share one rule: each refusal of view() is a False of can_view()
    (same range, same access), and a True is a view that opens."""
    table = DmaTable()
    fd, guest = guest_memfd(2 * PAGE)
    second = os.dup(fd)
    table.map(0, PAGE, RW, fd)  # (the table takes each fd)
    table.map(PAGE, PAGE, DMA_MAP_FLAG_READ, second, offset=PAGE)
    table.map(4 * PAGE, PAGE, RW, None)  # message-only
    frozen = os.memfd_create("frozen", os.MFD_CLOEXEC)  # seals refused: it can shrink
    os.ftruncate(frozen, PAGE)
    table.map(8 * PAGE, PAGE, RW, frozen)
    refused = [
        (0x10, -1, False, errno.EINVAL),  # negative length
        (2 * PAGE, 4, False, errno.EFAULT),  # not mapped
        (PAGE - 4, 8, False, errno.EFAULT),  # crosses from one map into the next
        (PAGE, 4, True, errno.EFAULT),  # a read-only map, written
        (4 * PAGE, 4, False, errno.EFAULT),  # no fd: messages only
        (8 * PAGE, 4, False, errno.EFAULT),  # a file the client can still shrink
    ]
    for iova, length, writable, code in refused:
        assert not table.can_view(iova, length, writable=writable)
        with pytest.raises(DmaError) as caught:
            table.view(iova, length, writable=writable)
        assert caught.value.errno == code
    for iova, length, writable in [(0, PAGE, True), (PAGE, 4, False), (PAGE - 4, 4, True)]:
        assert table.can_view(iova, length, writable=writable)
        with table.view(iova, length, writable=writable) as v:
            assert len(v) == length
    table.trust_client_memory = True
    assert table.can_view(8 * PAGE, 4, writable=True)
    table.stop()
    assert not table.can_view(0, 4)
    with pytest.raises(DmaError) as caught:
        table.view(0, 4)
    assert caught.value.errno == errno.EBUSY
    table.resume()
    assert table.can_view(0, 4)
    await table.unmap_all()
    guest.close()


async def test_write_observers_see_device_writes() -> None:
    table = DmaTable()
    seen: list[tuple[int, int]] = []
    table.add_write_observer(lambda iova, n: seen.append((iova, n)))
    fd, view = guest_memfd(PAGE)
    table.map(0x4000, PAGE, RW, fd)
    await table.write(0x4010, b"abc")
    with table.view(0x4100, 16, writable=True):
        pass
    with table.view(0x4200, 16):
        pass
    assert seen == [(0x4010, 3), (0x4100, 16)]
    await table.unmap_all()
    view.close()


# --- scatter-gather over several maps (libvfio-user's vfu_addr_to_sgl / vfu_sgl_read) ---


async def test_sgl_and_accesses_span_adjacent_maps_from_two_memfds() -> None:
    table = DmaTable()
    fd_a, mem_a = guest_memfd(PAGE)
    fd_b, mem_b = guest_memfd(2 * PAGE)
    table.map(0x10000, PAGE, RW, fd_a)
    table.map(0x10000 + PAGE, PAGE, DMA_MAP_FLAG_READ, fd_b, offset=PAGE)
    start, length = 0x10000 + PAGE - 16, 48
    segments = table.sgl(start, length)
    assert [(s.iova, s.length) for s in segments] == [(start, 16), (0x10000 + PAGE, 32)]
    assert [(s.window.iova, s.window.writable, s.window.fd_backed) for s in segments] == [
        (0x10000, True, True),
        (0x10000 + PAGE, False, True),
    ]
    mem_a[PAGE - 16 :] = b"a" * 16
    mem_b[PAGE : PAGE + 32] = b"b" * 32
    assert await table.read(start, length) == b"a" * 16 + b"b" * 32
    with table.pin(start, length):  # one pin holds both windows
        assert [m.busy for m in table] == [1, 1]
    # Zero-copy, one segment at a time.
    pieces = []
    for seg in segments:
        with table.view(seg.iova, seg.length) as piece:
            pieces.append(bytes(piece))
    assert b"".join(pieces) == b"a" * 16 + b"b" * 32
    # The second map is read-only: a writable range over both is refused, nothing written.
    with pytest.raises(DmaError) as exc:
        table.sgl(start, length, write=True)
    assert exc.value.errno == errno.EFAULT
    with pytest.raises(DmaError):
        await table.write(start, bytes(length))
    assert mem_a[PAGE - 16 :] == b"a" * 16
    await table.unmap_all()
    mem_a.close()
    mem_b.close()


async def test_a_range_over_a_gap_between_maps_is_efault() -> None:
    table = DmaTable()
    fd_a, mem_a = guest_memfd(PAGE)
    fd_b, mem_b = guest_memfd(PAGE)
    table.map(0, PAGE, RW, fd_a)
    table.map(2 * PAGE, PAGE, RW, fd_b)  # one page unmapped in between
    for call in (
        lambda: table.sgl(PAGE - 4, PAGE + 8),
        lambda: table.pin(PAGE - 4, PAGE + 8).__enter__(),
    ):
        with pytest.raises(DmaError) as exc:
            call()
        assert exc.value.errno == errno.EFAULT
    with pytest.raises(DmaError) as exc:
        await table.read(PAGE - 4, PAGE + 8)
    assert exc.value.errno == errno.EFAULT
    assert table.sgl(2 * PAGE, 8)[0].window.iova == 2 * PAGE
    assert [m.busy for m in table] == [0, 0]  # a refused access holds nothing
    await table.unmap_all()
    mem_a.close()
    mem_b.close()


# --- message DMA on an fd-backed map (libvfio-user's samples/server does both) ----------


async def test_messages_can_be_forced_on_an_fd_backed_map() -> None:
    client = FakeClient(base=0, size=PAGE, max_xfer=PAGE)
    table = DmaTable(messenger=client)
    fd, view = guest_memfd(PAGE)
    table.map(0, PAGE, RW, fd)
    view[:4] = b"fd!!"
    client.mem[:4] = b"msg!"
    assert await table.read(0, 4) == b"fd!!"  # direct by default
    assert await table.read(0, 4, messages=True) == b"msg!"
    await table.write(8, b"over the socket", messages=True)
    assert client.calls == [("read", 0, 4), ("write", 8, 15)]
    table.prefer_messages = True
    assert await table.read(0, 4) == b"msg!"
    assert await table.read(0, 4, messages=False) == b"fd!!"  # per call wins
    assert client.calls[-1] == ("read", 0, 4) and len(client.calls) == 3
    await table.unmap_all()
    view.close()


class Echo(Device):
    """A write to BAR0 copies 4 bytes of guest memory from IOVA 0 to IOVA 8."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7113))
        self.add_bar(0, 0x1000, write=self.write0)

    async def write0(self, offset: int, data: bytes) -> None:
        await self.dma.write(8, await self.dma.read(0, 4))


async def test_forced_messages_reach_the_clients_dma_servicing_over_a_socket() -> None:
    device = Echo()
    device.dma.prefer_messages = True
    async with nested_device(device) as pair:
        with GuestMemory(PAGE) as memory:
            await pair.client.dma_map(memory, 0, size=PAGE)  # the server gets the memfd
            assert [m.mapped for m in device.dma] == [True]
            memory.write(0, b"echo")
            await pair.client.write(PciRegion.BAR0, 0, b"\1\0\0\0")
            assert memory.read(8, 4) == b"echo"
        served = [r.command for r in pair.tracer.commands(Command.DMA_READ, Command.DMA_WRITE)]
    # The layout probe (a zero-length DMA_WRITE) may come first; then our read and write.
    assert served[-2:] == [Command.DMA_READ, Command.DMA_WRITE]


class DmaReader(Device):
    """A write to BAR0 reads 4 bytes of guest memory at IOVA 0; keeps what that raised."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7114))
        self.add_bar(0, 0x1000, write=self.write0)
        self.failures: list[BaseException] = []

    async def write0(self, offset: int, data: bytes) -> None:
        try:
            await self.dma.read(0, 4)
        except BaseException as exc:
            self.failures.append(exc)
            raise


class SilentRam(GuestRam):
    """A client that reads the server's DMA messages and never answers them."""

    async def handle(self, frame: Frame) -> HandlerResult:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


@pytest.mark.parametrize("twin", [False, True], ids=["one-socket", "twin-socket"])
async def test_a_client_that_leaves_a_dma_read_unanswered_is_hung_up_on(
    twin: bool, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """ServerLimits.reply_timeout: the device's DMA fails and the session ends, instead of
    waiting for ever on a client that stopped answering."""
    device = DmaReader()
    limits = ServerLimits(reply_timeout=5.0)
    with trio.fail_after(60):
        async with session(device, SilentRam(0, PAGE), twin=twin, limits=limits) as conn:
            await conn.request(DmaMapRequest(0, PAGE, RW))
            started = trio.current_time()
            with pytest.raises(ConnectionClosedError):
                await conn.request(RegionWriteRequest(PciRegion.BAR0, 0, b"\1\0\0\0"))
            assert 5.0 <= trio.current_time() - started <= 1.25 * 5.0
    # The device's access ended with the session: failed by it, or cancelled with the
    # session's tasks (on the twin socket the requester sees the close as it reads).
    (failure,) = device.failures
    if isinstance(failure, ConnectionClosedError):
        assert isinstance(failure.__cause__, ReplyTimeout)
    else:
        assert isinstance(failure, trio.Cancelled)
    assert "no reply to DMA_READ (id 0) within 5 s" in caplog.text


async def test_two_unmaps_of_one_window_both_wait_and_the_device_is_told_once() -> None:
    """DMA_UNMAP racing the client's departure (UNMAP_ALL) while a view holds the window:
    both finish once the view closes, and dma_unmapped runs once."""
    told: list[tuple[str, int]] = []

    class Listener:
        async def mapped(self, window: DmaWindow) -> None:
            told.append(("mapped", window.iova))

        async def unmapped(self, window: DmaWindow) -> None:
            told.append(("unmapped", window.iova))

    table = DmaTable()
    fd, view = guest_memfd(PAGE)
    await table.map_announced(0, PAGE, RW, fd, 0, Listener())
    done: list[str] = []

    async def unmap(name: str) -> None:
        if name == "one":
            await table.unmap(0, PAGE)
        else:
            await table.unmap_all()
        done.append(name)

    with trio.fail_after(10):  # the old code left the first waiter hanging
        async with trio.open_nursery() as nursery:
            with table.view(0, 8):
                nursery.start_soon(unmap, "one")
                nursery.start_soon(unmap, "all")
                await trio.testing.wait_all_tasks_blocked()
                assert done == []
    assert sorted(done) == ["all", "one"] and len(table) == 0
    assert told == [("mapped", 0), ("unmapped", 0)]
    view.close()


# --- the copy fast path: read_into, and read/write inside one fd-backed window ----------


async def test_read_into_fills_buffers_of_any_byte_layout() -> None:
    table = DmaTable()
    fd, view = guest_memfd(2 * PAGE)
    table.map(0x10000, 2 * PAGE, RW, fd)
    view[: 2 * PAGE] = bytes(range(256)) * (2 * PAGE // 256)
    into = bytearray(16)
    await table.read_into(0x10000 + 3, into)
    assert into == view[3:19]
    mv = memoryview(bytearray(32))
    await table.read_into(0x10000 + PAGE, mv[8:24])  # a slice of a bigger buffer
    assert mv[8:24] == view[PAGE : PAGE + 16] and mv[:8] == bytes(8)
    words = array.array("I", [0] * 4)  # not bytes: cast to bytes, 16 of them
    await table.read_into(0x10000, memoryview(words))
    assert words.tobytes() == view[:16]
    square = memoryview(bytearray(16)).cast("B", (4, 4))  # 2-D
    await table.read_into(0x10000 + 16, square)
    assert square.tobytes() == view[16:32]
    await table.write(0x10000 + 64, memoryview(array.array("H", [0x4241, 0x4443])))
    assert view[64:68] == b"ABCD"
    with pytest.raises(TypeError):
        await table.read_into(0x10000, memoryview(bytes(4)))  # read-only buffer
    await table.unmap_all()
    view.close()


async def test_fast_copies_check_bounds_and_permissions() -> None:
    table = DmaTable()
    fd, view = guest_memfd(2 * PAGE)
    table.map(4 * PAGE, PAGE, DMA_MAP_FLAG_WRITE, os.dup(fd), offset=PAGE)
    table.map(0, PAGE, DMA_MAP_FLAG_READ, fd, offset=0)
    for access in (
        table.write(0, b"x"),  # read-only map
        table.read_into(4 * PAGE, bytearray(4)),  # write-only map
        table.read(4 * PAGE, 4),
        table.read_into(PAGE - 8, bytearray(16)),  # runs off the end into unmapped space
        table.write(5 * PAGE - 2, b"abcd"),
        table.read_into(2 * PAGE, bytearray(1)),  # between the maps
        table.read_into(-1, bytearray(1)),
    ):
        with pytest.raises(DmaError) as exc:
            await access
        assert exc.value.errno in (errno.EFAULT, errno.EINVAL)
    assert view[PAGE:] == bytes(PAGE)  # nothing was written
    await table.write(5 * PAGE - 4, b"last")
    assert view[2 * PAGE - 4 : 2 * PAGE] == b"last"
    await table.unmap_all()
    view.close()


async def test_fast_copies_stop_at_an_unmap_that_has_begun() -> None:
    table = DmaTable()
    fd, view = guest_memfd(PAGE)
    table.map(0, PAGE, RW, fd)
    pinned, release = trio.Event(), trio.Event()
    seen: list[bytes] = []

    async def operation() -> None:
        with table.pin(0, 16, write=True):
            pinned.set()
            await release.wait()
            await table.write(0, b"pin!")  # the pinning task finishes its operation
            into = bytearray(4)
            await table.read_into(0, into)
            seen.append(bytes(into))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(operation)
        await pinned.wait()
        nursery.start_soon(table.unmap, 0, PAGE)
        await trio.testing.wait_all_tasks_blocked()
        for access in (table.read_into(0, bytearray(4)), table.write(0, b"late"), table.read(0, 4)):
            with pytest.raises(DmaError) as exc:
                await access
            assert exc.value.errno == errno.EFAULT
        release.set()
    assert seen == [b"pin!"] and len(table) == 0
    view.close()


async def test_fast_copies_wait_at_the_quiesce_gate() -> None:
    table = DmaTable()
    fd, view = guest_memfd(PAGE)
    table.map(0, PAGE, RW, fd)
    table.stop()
    mark_command_task()  # this task handles commands (as a session's tasks do)
    for access in (table.read_into(0, bytearray(4)), table.write(0, b"x")):
        with pytest.raises(DmaError) as exc:
            await access
        assert exc.value.errno == errno.EBUSY
    done = trio.Event()

    async def device_task() -> None:
        # Started from the marked task, it inherits the context but not the mark.
        await table.write(0, b"after")
        done.set()

    async def former_command_task() -> None:
        mark_command_task()
        mark_command_task(False)  # the session's task once its connection has ended
        await table.write(8, b"later")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(device_task)
        nursery.start_soon(former_command_task)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set() and view[:13] == bytes(13)  # held while stopped
        table.resume()
    mark_command_task(False)
    assert view[:5] == b"after" and view[8:13] == b"later"
    await table.unmap_all()
    view.close()


async def test_fast_writes_are_observed_and_read_into_takes_messages_when_asked() -> None:
    client = FakeClient(base=0, size=PAGE, max_xfer=PAGE)
    table = DmaTable(messenger=client)
    fd, view = guest_memfd(PAGE)
    table.map(0, PAGE, RW, fd)
    written: list[tuple[int, int]] = []
    table.add_write_observer(lambda iova, n: written.append((iova, n)))
    await table.write(32, b"dirty")
    assert written == [(32, 5)]
    client.mem[:4] = b"msg!"
    into = bytearray(4)
    await table.read_into(0, into, messages=True)
    assert into == b"msg!" and client.calls == [("read", 0, 4)]
    table.prefer_messages = True
    await table.read_into(0, into)
    assert len(client.calls) == 2
    await table.unmap_all()
    view.close()


SHRINK_READ_INTO_VICTIM = """
    import errno, mmap, os
    import trio
    from vfiouser_trio.server.dma import DmaError, DmaTable

    PAGE = mmap.PAGESIZE

    async def main() -> None:
        fd = os.memfd_create("frozen", os.MFD_CLOEXEC)  # seals refused: it can shrink
        os.ftruncate(fd, 4 * PAGE)
        table = DmaTable()
        table.map(0, 4 * PAGE, 3, os.dup(fd))
        into = bytearray(16)
        await table.read_into(0, into)
        os.ftruncate(fd, PAGE)  # the client shrinks its memory under the map
        for access in (table.read_into(2 * PAGE, into), table.write(3 * PAGE, b"x" * 16)):
            try:
                await access
            except DmaError as exc:
                assert exc.errno == errno.EFAULT, exc
            else:
                raise AssertionError("DMA past the truncated end succeeded")
        await table.unmap_all()
        os.close(fd)
        print("survived")

    trio.run(main)
"""


def test_read_into_a_truncated_dma_file_gives_efault_not_sigbus() -> None:
    assert_survived(run_victim(SHRINK_READ_INTO_VICTIM))
