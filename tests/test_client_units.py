"""Client building blocks on their own: guest memory, DMA maps and service, region mapping,
the argsz dance, PCI config helpers, interrupt bookkeeping."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from tests.fd_leaks import fd_count
from vfiouser_trio.client.config import PciConfig
from vfiouser_trio.client.dma import DmaMap, DmaMaps, DmaService
from vfiouser_trio.client.guest_memory import GuestMemory
from vfiouser_trio.client.irqs import Interrupt, InterruptTable
from vfiouser_trio.client.regions import Region, query_with_argsz
from vfiouser_trio.engine import HandlerResult, RawMessage
from vfiouser_trio.eventfd import EventFd
from vfiouser_trio.memory import MemFd
from vfiouser_trio.protocol import (
    DmaLayout,
    DmaReadReply,
    DmaReadRequest,
    DmaWriteReply,
    DmaWriteRequest,
    Frame,
    ProtocolError,
    RegionInfoReply,
    RegionInfoRequest,
    RegionTypeCap,
    SparseMmapArea,
    SparseMmapCap,
    VfioUserError,
    command_header,
)
from vfiouser_trio.protocol.constants import (
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    Command,
)
from vfiouser_trio.protocol.message import Buffer, Message, Request
from vfiouser_trio.server.pci import BarSpec, PciConfigSpace, PciIdentity
from vfiouser_trio.server.pci_caps import (
    ExpressCapability,
    MsiCapability,
    PowerManagementCapability,
    SerialNumberCapability,
    VendorExtendedCapability,
)

pytestmark = pytest.mark.usefixtures("no_fd_leak")

RW = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- guest memory ---------------------------------------------------------------------------


def test_guest_memory_is_a_sealed_shared_memfd() -> None:
    with GuestMemory(2 * PAGE) as memory:
        assert os.readlink(f"/proc/self/fd/{memory.fileno()}").startswith("/memfd:")
        memory.write(10, b"hello")
        assert memory.read(10, 5) == b"hello"
        assert bytes(memory.view[10:15]) == b"hello"
        # What the server would see through its own mapping of the fd.
        assert os.pread(memory.fileno(), 5, 10) == b"hello"
        with pytest.raises(PermissionError):
            os.ftruncate(memory.fileno(), PAGE)
        assert fcntl.fcntl(memory.fileno(), fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        with pytest.raises(ValueError, match="outside"):
            memory.read(2 * PAGE - 1, 2)
    assert memory.closed
    memory.close()  # idempotent


def test_guest_memory_close_refuses_while_a_slice_lives() -> None:
    memory = GuestMemory(PAGE)
    piece = memory.view[0:4]
    with pytest.raises(BufferError):
        memory.close()
    piece.release()
    memory.close()
    assert memory.closed


def test_guest_memory_rejects_empty() -> None:
    with pytest.raises(ValueError, match="positive"):
        GuestMemory(0)


# --- DMA maps -------------------------------------------------------------------------------


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory(4 * PAGE) as mem:
        for i in range(4):
            mem.view[i * PAGE : (i + 1) * PAGE] = bytes([i + 1]) * PAGE
        yield mem


def test_dma_maps_reject_overlap(memory: GuestMemory) -> None:
    maps = DmaMaps()
    maps.add(DmaMap(0x10000, PAGE, memory))
    with pytest.raises(ValueError, match="overlaps"):
        maps.add(DmaMap(0x10000 + PAGE - 1, PAGE, memory))
    with pytest.raises(ValueError, match="overlaps"):
        maps.add(DmaMap(0x10000 - PAGE + 1, PAGE, memory))
    maps.add(DmaMap(0x10000 + PAGE, PAGE, memory, offset=PAGE))  # adjacent is fine
    assert len(maps) == 2
    assert maps.find_exact(0x10000, PAGE) is not None
    assert maps.find_exact(0x10000, 2 * PAGE) is None


def test_dma_maps_access_spans_adjacent_maps(memory: GuestMemory) -> None:
    maps = DmaMaps()
    # Two windows that are adjacent in IOVA space but far apart in the memory.
    maps.add(DmaMap(0x1000_0000, PAGE, memory, offset=3 * PAGE))
    maps.add(DmaMap(0x1000_0000 + PAGE, PAGE, memory, offset=0))
    data = maps.read(0x1000_0000 + PAGE - 2, 4)
    assert data == b"\x04\x04\x01\x01"
    maps.write(0x1000_0000 + PAGE - 1, b"xy")
    assert memory.read(4 * PAGE - 1, 1) == b"x"
    assert memory.read(0, 1) == b"y"


@pytest.mark.parametrize(
    ("iova", "count", "write"),
    [
        (0x2000_0000 - 1, 2, False),  # starts before the map
        (0x2000_0000 + PAGE - 1, 2, True),  # runs into the read-only window
        (0x2000_0000 + 3 * PAGE - 1, 2, True),  # runs past the last window
        (0x3000_0000, 1, False),  # nowhere near
        (0x2000_0000 + PAGE, 4, True),  # the read-only window
        (0x2000_0000 + 2 * PAGE, 4, False),  # the write-only window
    ],
)
def test_dma_maps_fault(memory: GuestMemory, iova: int, count: int, write: bool) -> None:
    maps = DmaMaps()
    maps.add(DmaMap(0x2000_0000, PAGE, memory))
    maps.add(DmaMap(0x2000_0000 + PAGE, PAGE, memory, offset=PAGE, writable=False))
    maps.add(DmaMap(0x2000_0000 + 2 * PAGE, PAGE, memory, offset=2 * PAGE, readable=False))
    before = bytes(memory.view)
    with pytest.raises(VfioUserError) as info:
        if write:
            maps.write(iova, b"\xff" * count)
        else:
            maps.read(iova, count)
    assert info.value.errno == errno.EFAULT
    assert bytes(memory.view) == before


def test_dma_maps_fault_on_closed_memory() -> None:
    maps = DmaMaps()
    mem = GuestMemory(PAGE)
    maps.add(DmaMap(0, PAGE, mem))
    mem.close()
    with pytest.raises(VfioUserError) as info:
        maps.read(0, 1)
    assert info.value.errno == errno.EFAULT


def _frame(request: Request) -> Frame:
    payload = request.pack()
    return Frame(command_header(7, request.COMMAND, len(payload)), payload, [])


def _payload(reply: HandlerResult) -> Buffer:
    """The payload a handler's result puts on the wire (a DMA_READ reply comes packed, in
    pieces: joined here, so no view of guest memory outlives the call)."""
    assert isinstance(reply, bytes | Message | RawMessage)
    if isinstance(reply, bytes):
        return reply
    payload = reply.pack() if isinstance(reply, Message) else reply.payload
    return b"".join(payload) if isinstance(payload, tuple) else payload


async def test_dma_service_reads_and_writes(memory: GuestMemory) -> None:
    maps = DmaMaps()
    maps.add(DmaMap(0x8000, 2 * PAGE, memory, offset=PAGE))
    service = DmaService(maps, max_data_xfer_size=PAGE)
    reply = service.handle(_frame(DmaReadRequest(0x8000 + 3, 5)))
    assert _payload(reply) == DmaReadReply(0x8000 + 3, b"\x02" * 5).pack()
    reply = service.handle(_frame(DmaWriteRequest(0x8000 + PAGE, b"abc")))
    assert _payload(reply) == DmaWriteReply(0x8000 + PAGE, 3).pack()
    assert memory.read(2 * PAGE, 3) == b"abc"
    # Zero-length transfers succeed without touching anything.
    assert _payload(service.handle(_frame(DmaReadRequest(0, 0)))) == DmaReadReply(0, b"").pack()
    assert _payload(service.handle(_frame(DmaWriteRequest(0, b"")))) == DmaWriteReply(0, 0).pack()


async def test_dma_service_reads_across_maps_and_keeps_no_view_of_the_memory() -> None:
    memory = GuestMemory(2 * PAGE)
    memory.view[:] = b"\x01" * PAGE + b"\x02" * PAGE
    maps = DmaMaps()
    maps.add(DmaMap(0x1000_0000, PAGE, memory, offset=PAGE))  # far apart in the memory
    maps.add(DmaMap(0x1000_0000 + PAGE, PAGE, memory, offset=0))
    service = DmaService(maps, max_data_xfer_size=PAGE)
    for address, want in (
        (0x1000_0000 + PAGE - 2, b"\x02\x02\x01\x01"),
        (0x1000_0000, b"\x02" * 4),
    ):
        reply = service.handle(_frame(DmaReadRequest(address, 4)))
        assert _payload(reply) == DmaReadReply(address, want).pack()
    del reply  # a reply within one map is sent from a view of the memory
    memory.close()  # no view of it outlives the reply (a live one: BufferError)


async def test_dma_service_qemu_layout(memory: GuestMemory) -> None:
    maps = DmaMaps()
    maps.add(DmaMap(0, PAGE, memory))
    service = DmaService(maps, max_data_xfer_size=PAGE, read_layout=DmaLayout.QEMU)
    reply = service.handle(_frame(DmaReadRequest(0, 4)))
    # u64 address, u32 count, data, 4 zero bytes
    assert _payload(reply) == bytes(8) + b"\x04\0\0\0" + b"\x01" * 4 + bytes(4)
    # QEMU answers a DMA_WRITE with the header alone; its data is read from offset 12.
    write = DmaWriteRequest(0x10, b"xyz", DmaLayout.QEMU)
    assert _payload(service.handle(_frame(write))) == b""
    assert memory.read(0x10, 3) == b"xyz"


async def test_dma_service_errors(memory: GuestMemory) -> None:
    maps = DmaMaps()
    maps.add(DmaMap(0, 4 * PAGE, memory))
    service = DmaService(maps, max_data_xfer_size=PAGE)
    cases: list[tuple[Frame, int]] = [
        (_frame(DmaReadRequest(0, PAGE + 1)), errno.EINVAL),  # above our limit
        (_frame(DmaWriteRequest(0, bytes(PAGE + 1))), errno.EINVAL),
        (_frame(DmaReadRequest(4 * PAGE, 1)), errno.EFAULT),
        (_frame(RegionInfoRequest(0)), errno.EINVAL),  # not a server->client command
        (Frame(command_header(1, Command.DMA_READ, 3), b"abc", []), errno.EINVAL),  # malformed
        (Frame(command_header(1, Command.DMA_WRITE, 3), b"abc", []), errno.EINVAL),
        (
            Frame(
                command_header(1, Command.DMA_WRITE, 19), bytes(8) + b"\4" + bytes(7) + b"abc", []
            ),
            errno.EINVAL,
        ),  # count 4, 3 bytes
    ]
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        # A DMA command never carries fds.
        for request in (DmaReadRequest(0, 1), DmaWriteRequest(0, b"a")):
            payload = request.pack()
            header = command_header(1, request.COMMAND, len(payload))
            cases.append((Frame(header, payload, [fd]), errno.EINVAL))
        for frame, code in cases:
            with pytest.raises(VfioUserError) as info:
                service.handle(frame)
            assert info.value.errno == code
    finally:
        os.close(fd)
    assert memory.read(0, 4) == b"\x01" * 4  # no write of those went through


# --- argsz dance and region mapping ----------------------------------------------------------


async def test_query_with_argsz_asks_again_with_the_needed_size() -> None:
    full = RegionInfoReply(3, RW, 0x1000, caps=(RegionTypeCap(1, 2),))
    asked: list[int] = []
    leftover = EventFd()

    async def send(request: Request) -> Message:
        await trio.lowlevel.checkpoint()
        assert isinstance(request, RegionInfoRequest)
        asked.append(request.argsz)
        if request.argsz < full.needed_size:
            # A cut-short reply; a careless server even attached an fd to it.
            fd = os.dup(leftover.fileno())
            return RegionInfoReply(3, RW, 0x1000, argsz=full.needed_size, fds=(fd,))
        return full

    def make(argsz: int) -> RegionInfoRequest:
        return RegionInfoRequest(3, argsz)

    before = fd_count()
    reply = await query_with_argsz(send, make, 32, RegionInfoReply)
    assert asked == [32, full.needed_size]
    assert reply.region_type == RegionTypeCap(1, 2)
    assert fd_count() == before  # the first reply's fd was closed
    leftover.close()


async def test_query_with_argsz_refuses_absurd_sizes() -> None:
    async def send(request: Request) -> Message:
        await trio.lowlevel.checkpoint()
        return RegionInfoReply(0, 0, 0, argsz=1 << 30)

    def make(argsz: int) -> RegionInfoRequest:
        return RegionInfoRequest(0, argsz)

    with pytest.raises(ProtocolError, match="argsz"):
        await query_with_argsz(send, make, 32, RegionInfoReply)


def _region_file(size: int) -> MemFd:
    memfd = MemFd.create("region", size)
    os.pwrite(memfd.fileno(), bytes(range(256)) * (size // 256), 0)
    return memfd


def test_region_maps_whole_region_and_closes_fd() -> None:
    with _region_file(4 * PAGE) as memfd:
        fd = os.dup(memfd.fileno())
        info = RegionInfoReply(2, RW | REGION_INFO_FLAG_MMAP, 2 * PAGE, offset=PAGE, fds=(fd,))
        region = Region.from_reply(info)
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)  # taken and closed
        assert region.info.fds == ()
        [area] = region.areas
        assert (area.offset, area.size) == (0, 2 * PAGE)
        assert area.view is not None
        assert region.mapped_area(2 * PAGE - 4, 4) is area
        assert region.mapped_area(2 * PAGE - 4, 5) is None
        # The mapping starts at the region's mmap offset in the file.
        assert bytes(area.view[:4]) == os.pread(memfd.fileno(), 4, PAGE)
        area.view[0:2] = b"zz"
        assert os.pread(memfd.fileno(), 2, PAGE) == b"zz"
        region.close()
        assert region.areas == ()


def test_region_maps_sparse_areas_only_valid_ones() -> None:
    areas = (
        SparseMmapArea(PAGE, PAGE),
        SparseMmapArea(3 * PAGE + 8, 16),  # unaligned: mapped from the page below
        SparseMmapArea(0, 0),  # empty: skipped
        SparseMmapArea(3 * PAGE, 8 * PAGE),  # beyond the region: skipped
    )
    with _region_file(4 * PAGE) as memfd:
        # libvfio-user style: one fd per area.
        fds = tuple(os.dup(memfd.fileno()) for _ in areas)
        info = RegionInfoReply(
            0, RW | REGION_INFO_FLAG_MMAP, 4 * PAGE, caps=(SparseMmapCap(areas),), fds=fds
        )
        region = Region.from_reply(info)
        assert [(a.offset, a.size) for a in region.areas] == [(PAGE, PAGE), (3 * PAGE + 8, 16)]
        assert region.sparse_areas == areas
        assert region.areas[1].view is not None
        assert bytes(region.areas[1].view) == os.pread(memfd.fileno(), 16, 3 * PAGE + 8)
        assert region.mapped_area(0, 4) is None
        region.close()


def test_region_read_only_mapping_and_no_mmap_flag() -> None:
    with _region_file(PAGE) as memfd:
        ro = Region.from_reply(
            RegionInfoReply(
                0,
                REGION_INFO_FLAG_READ | REGION_INFO_FLAG_MMAP,
                PAGE,
                fds=(os.dup(memfd.fileno()),),
            )
        )
        view = ro.areas[0].view
        assert view is not None
        assert view.readonly
        ro.close()
        # An fd without the MMAP flag is not mapped (and still closed).
        plain = Region.from_reply(RegionInfoReply(0, RW, PAGE, fds=(os.dup(memfd.fileno()),)))
        assert plain.areas == ()


# --- PCI config helpers ---------------------------------------------------------------------


class SpaceAccess:
    """ConfigAccess over an emulated config space, counting accesses."""

    def __init__(self, space: PciConfigSpace) -> None:
        self.space = space
        self.writes: list[tuple[int, bytes]] = []

    async def read(self, region: int, offset: int, count: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.space.read(offset, count)

    async def write(self, region: int, offset: int, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.writes.append((offset, data))
        self.space.write(offset, data)


def _space(*, express: bool = False) -> PciConfigSpace:
    caps: list[object] = [PowerManagementCapability(), MsiCapability(4)]
    if express:
        caps += [ExpressCapability(), SerialNumberCapability(0x1122), VendorExtendedCapability(7)]
    return PciConfigSpace(
        PciIdentity(0x8086, 0x1234, 0x1AF4, 0x0042, class_code=0x010802, revision=3),
        bars={
            0: BarSpec(0x4000),
            2: BarSpec(1 << 33, is_64bit=True, prefetchable=True),
            4: BarSpec(0x20, io=True),
        },
        rom_size=0x8000,
        interrupt_pin=2,
        capabilities=caps,  # type: ignore[arg-type]
    )


async def test_config_header() -> None:
    config = PciConfig(SpaceAccess(_space()))
    header = await config.header()
    assert (header.vendor_id, header.device_id) == (0x8086, 0x1234)
    assert (header.subsystem_vendor_id, header.subsystem_id) == (0x1AF4, 0x0042)
    assert header.class_code == 0x010802
    assert header.revision == 3
    assert header.layout == 0 and not header.multifunction
    assert header.has_capabilities
    assert header.interrupt_pin == 2
    assert header.capability_pointer >= 0x40


async def test_config_bar_sizing_saves_and_restores() -> None:
    space = _space()
    access = SpaceAccess(space)
    config = PciConfig(access)
    # Program addresses and enable decoding, as firmware would have.
    await config.write(0x10, 0xFEB0_0000)
    await config.write(0x1C, 0x0000_0004)  # 64-bit BAR2 at 16 GiB (its upper half)
    await config.write(0x20, 0xC000)
    await config.write(0x04, 0x0007, 2)
    before = space.read(0, 0x40)
    access.writes.clear()

    bars = await config.bars()
    assert [(b.index, b.size, b.io, b.is_64bit, b.prefetchable) for b in bars] == [
        (0, 0x4000, False, False, False),
        (2, 1 << 33, False, True, True),
        (4, 0x20, True, False, False),
    ]
    assert [b.address for b in bars] == [0xFEB0_0000, 4 << 32, 0xC000]
    # The real dance: decoding off first, all-ones written, everything restored.
    assert access.writes[0] == (0x04, (0x0004).to_bytes(2, "little"))
    assert (0x10, b"\xff\xff\xff\xff") in access.writes
    assert access.writes[-1] == (0x04, (0x0007).to_bytes(2, "little"))
    assert space.read(0, 0x40) == before
    assert await config.rom_size() == 0x8000
    assert space.read(0, 0x40) == before


class UnsizedBarsAccess(SpaceAccess):
    """Config space whose unimplemented BAR registers read back a type bit alone and ignore
    writes: 0x1 (I/O, as libvfio-user's do) at BARs 1, 3 and 5, 0x8 (prefetchable) at 4."""

    STUCK = {0x14: 0x1, 0x1C: 0x1, 0x20: 0x8, 0x24: 0x1}

    async def read(self, region: int, offset: int, count: int) -> bytes:
        if offset in self.STUCK and count == 4:
            await trio.lowlevel.checkpoint()
            return self.STUCK[offset].to_bytes(4, "little")
        return await super().read(region, offset, count)

    async def write(self, region: int, offset: int, data: bytes) -> None:
        if offset in self.STUCK:
            await trio.lowlevel.checkpoint()
            return
        await super().write(region, offset, data)


async def test_config_bars_that_size_to_zero_are_no_bars() -> None:
    space = PciConfigSpace(
        PciIdentity(0x4E58, 0x0001), bars={0: BarSpec(0x1000), 2: BarSpec(0x100, io=True)}
    )
    bars = await PciConfig(UnsizedBarsAccess(space)).bars()
    assert [(b.index, b.size, b.io) for b in bars] == [(0, 0x1000, False), (2, 0x100, True)]


async def test_config_capability_lists() -> None:
    config = PciConfig(SpaceAccess(_space()))
    caps = await config.capabilities()
    assert [(c.id, c.name) for c in caps] == [(0x01, "Power Management"), (0x05, "MSI")]
    assert all(0x40 <= c.offset < 0x100 and not c.extended for c in caps)
    assert await config.extended_capabilities() == []  # 256-byte space
    assert await config.find_capability(0x05) == caps[1].offset
    assert await config.find_capability(0x11) is None

    express = PciConfig(SpaceAccess(_space(express=True)), size=4096)
    caps = await express.capabilities()
    assert [c.name for c in caps] == ["Power Management", "MSI", "PCI Express"]
    ext = await express.extended_capabilities()
    assert [(c.id, c.offset >= 0x100, c.extended, c.version) for c in ext] == [
        (0x0003, True, True, 1),
        (0x000B, True, True, 1),
    ]
    assert ext[0].offset == 0x100
    assert [c.name for c in ext] == ["Device Serial Number", "Vendor Specific Extended"]


class RawAccess:
    """ConfigAccess over plain bytes (for malformed spaces)."""

    def __init__(self, data: bytearray) -> None:
        self.data = data

    async def read(self, region: int, offset: int, count: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return bytes(self.data[offset : offset + count])

    async def write(self, region: int, offset: int, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.data[offset : offset + len(data)] = data


async def test_config_walks_stop_on_loops_and_junk() -> None:
    data = bytearray(4096)
    data[0x06] = 0x10  # capabilities list present
    data[0x34] = 0x40
    data[0x40:0x42] = bytes([0x09, 0x50])
    data[0x50:0x52] = bytes([0x77, 0x40])  # loops back to 0x40
    # Extended: 0x100 -> 0x200 -> 0x100 (loop), unknown id at 0x200.
    data[0x100:0x104] = (0x0001 | 1 << 16 | 0x200 << 20).to_bytes(4, "little")
    data[0x200:0x204] = (0x0ABC | 2 << 16 | 0x100 << 20).to_bytes(4, "little")
    config = PciConfig(RawAccess(data), size=4096)
    caps = await config.capabilities()
    assert [(c.id, c.offset) for c in caps] == [(0x09, 0x40), (0x77, 0x50)]
    assert caps[1].name == "Unknown (0x77)"
    ext = await config.extended_capabilities()
    assert [(c.id, c.offset, c.version) for c in ext] == [(1, 0x100, 1), (0xABC, 0x200, 2)]
    # All-ones means "no extended space" (a conventional device behind a bridge).
    data[0x100:0x104] = b"\xff" * 4
    assert await config.extended_capabilities() == []


async def test_config_registers_and_dump() -> None:
    data = bytearray(range(256))
    config = PciConfig(RawAccess(data))
    assert await config.read(0x10, 4) == 0x13121110
    assert await config.read(0x10, 1) == 0x10
    await config.write(0x3C, 0xAB, 1)
    assert data[0x3C] == 0xAB
    assert await config.dump() == bytes(data)


# --- interrupts -----------------------------------------------------------------------------


async def test_interrupt_table_replaces_and_drops() -> None:
    table = InterruptTable()
    first = [Interrupt(2, v, EventFd()) for v in range(3)]
    table.install(first)
    assert table.get(2, 1) is first[1]
    replacement = Interrupt(2, 1, EventFd())
    table.install([replacement])
    assert first[1].closed and not first[0].closed
    assert [i.vector for i in table.enabled(2)] == [0, 1, 2]
    table.drop(2, iter([0]))
    assert first[0].closed
    with pytest.raises(LookupError):
        table.get(2, 0)
    table.close()
    assert replacement.closed and first[2].closed


async def test_interrupt_waits_and_iterates_until_closed() -> None:
    irq = Interrupt(0, 0, EventFd())
    irq.eventfd.signal(3)
    assert await irq.wait() == 3
    assert irq.try_read() is None
    seen: list[int] = []

    async def consume() -> None:
        async for count in irq:
            seen.append(count)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await trio.testing.wait_all_tasks_blocked()
            irq.eventfd.signal()
            await trio.testing.wait_all_tasks_blocked()
            irq.eventfd.signal(2)
            await trio.testing.wait_all_tasks_blocked()
            irq.close()  # ends the loop
    assert seen == [1, 2]
