"""DmaTable.try_read_into / try_write: the synchronous fast-path copies, over a real socket.

What they promise (server/dma.py): inside one fd-backed window that the client cannot shrink,
while the device runs and no unmap of the window has begun, they copy now and return True
(writes are reported to the write observers); anything else returns False having copied
nothing, and the awaited ``read_into`` / ``write`` then gives the answer. The fast path's
safety rules hold for them: an unmap that has begun clears its flags (the pinning task's
awaited accesses still work, nobody else's), and the quiesce gate declines them.
"""

from __future__ import annotations

import array
import errno
import mmap
import os
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from vfiouser_trio.client import GuestMemory
from vfiouser_trio.protocol.constants import DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, PciRegion
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.dma import DmaError, DmaTable
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.testing import nested_device

pytestmark = pytest.mark.usefixtures("no_fd_leak")

PAGE = mmap.PAGESIZE
IOVA = 0x10_0000
RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE


class Copier(Device):
    """A write of (src, dst, length), three u32, to BAR0 copies guest memory src -> dst.

    Each access tries the synchronous copy first, records whether it served, then falls
    back to the awaited call (as device code is meant to).
    """

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7114), name="copier0")
        self.add_bar(0, 0x1000, write=self.write0)
        self.served: list[bool] = []

    async def write0(self, offset: int, data: bytes) -> None:
        src, dst, length = array.array("I", data)
        buffer = bytearray(length)
        self.served.append(self.dma.try_read_into(IOVA + src, buffer))
        if not self.served[-1]:
            await self.dma.read_into(IOVA + src, buffer)
        self.served.append(self.dma.try_write(IOVA + dst, buffer))
        if not self.served[-1]:
            await self.dma.write(IOVA + dst, buffer)


def copy_command(src: int, dst: int, length: int) -> bytes:
    return array.array("I", [src, dst, length]).tobytes()


async def test_sync_copies_serve_a_shared_map_and_report_writes() -> None:
    device = Copier()
    written: list[tuple[int, int]] = []
    device.dma.add_write_observer(lambda iova, n: written.append((iova, n)))
    async with nested_device(device) as pair:
        with GuestMemory(4 * PAGE) as memory:
            await pair.client.dma_map(memory, IOVA, size=4 * PAGE)  # the server gets the memfd
            memory.write(8, b"sync copy")
            await pair.client.write(PciRegion.BAR0, 0, copy_command(8, PAGE + 3, 9))
            assert memory.read(PAGE + 3, 9) == b"sync copy"
            assert device.served == [True, True]
            assert written == [(IOVA + PAGE + 3, 9)]
            # A byte memoryview slice of a bigger buffer works as well as a bytearray.
            into = memoryview(bytearray(32))
            assert device.dma.try_read_into(IOVA + 8, into[4:13])
            assert bytes(into[4:13]) == b"sync copy" and into[:4] == bytes(4)
            await pair.client.dma_unmap(IOVA, 4 * PAGE)


async def test_sync_copies_decline_maps_without_an_fd_and_spanning_maps() -> None:
    device = Copier()
    async with nested_device(device) as pair:
        with GuestMemory(4 * PAGE) as memory:
            # Two adjacent shared maps: a copy across their border is two pieces.
            await pair.client.dma_map(memory, IOVA, size=PAGE)
            await pair.client.dma_map(memory, IOVA + PAGE, size=PAGE, offset=PAGE)
            # A map the server reaches by DMA_READ / DMA_WRITE only.
            await pair.client.dma_map(
                memory, IOVA + 2 * PAGE, size=2 * PAGE, offset=2 * PAGE, share_fd=False
            )
            memory.write(PAGE - 4, b"acrossit")
            await pair.client.write(PciRegion.BAR0, 0, copy_command(PAGE - 4, 2 * PAGE + 16, 8))
            assert device.served == [False, False]  # the awaited calls did the work
            assert memory.read(2 * PAGE + 16, 8) == b"acrossit"
            into = bytearray(8)
            assert not device.dma.try_read_into(IOVA + 2 * PAGE + 16, into)
            assert into == bytes(8)


@pytest.mark.parametrize(
    "case",
    [
        "read-only map",
        "write-only map",
        "past the end",
        "unmapped",
        "negative",
        "not bytes",
        "read-only buffer",
        "messages preferred",
    ],
)
async def test_sync_copies_decline_and_the_awaited_call_answers(case: str) -> None:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 2 * PAGE)
    table = DmaTable()
    table.map(0, PAGE, DMA_MAP_FLAG_READ, os.dup(fd))
    table.map(PAGE, PAGE, DMA_MAP_FLAG_WRITE, fd, offset=PAGE)
    words = memoryview(array.array("I", [0] * 4))
    attempts: dict[str, tuple[Callable[[], bool], Callable[[], Awaitable[object]], int | None]] = {
        "read-only map": (
            lambda: table.try_write(0, b"x"),
            lambda: table.write(0, b"x"),
            errno.EFAULT,
        ),
        "write-only map": (
            lambda: table.try_read_into(PAGE, bytearray(1)),
            lambda: table.read_into(PAGE, bytearray(1)),
            errno.EFAULT,
        ),
        "past the end": (
            lambda: table.try_write(2 * PAGE - 2, b"abcd"),
            lambda: table.write(2 * PAGE - 2, b"abcd"),
            errno.EFAULT,
        ),
        "unmapped": (
            lambda: table.try_read_into(4 * PAGE, bytearray(1)),
            lambda: table.read_into(4 * PAGE, bytearray(1)),
            errno.EFAULT,
        ),
        "negative": (
            lambda: table.try_read_into(-1, bytearray(1)),
            lambda: table.read_into(-1, bytearray(1)),
            errno.EINVAL,
        ),
        # Not a 1-D buffer of bytes: declined, and read_into casts it (no error).
        "not bytes": (
            lambda: table.try_read_into(0, words),
            lambda: table.read_into(0, words),
            None,
        ),
        "read-only buffer": (
            lambda: table.try_read_into(0, memoryview(bytes(4))),
            lambda: table.read(0, 4),
            None,
        ),
        "messages preferred": (
            lambda: table.try_read_into(0, bytearray(4)),
            lambda: table.read_into(0, bytearray(4)),
            errno.EFAULT,
        ),
    }
    if case == "messages preferred":
        table.prefer_messages = True  # and no client to carry them: EFAULT
    sync, awaited, code = attempts[case]
    assert sync() is False
    if code is None:
        await awaited()
    else:
        with pytest.raises(DmaError) as exc:
            await awaited()
        assert exc.value.errno == code
    assert words.tobytes() == bytes(16)  # the declined copy wrote nothing
    await table.unmap_all()


async def test_sync_copies_decline_memory_the_client_can_shrink() -> None:
    fd = os.memfd_create("unsealable", os.MFD_CLOEXEC)  # takes no seals: it can shrink
    os.ftruncate(fd, PAGE)
    table = DmaTable()
    table.map(0, PAGE, RW, os.dup(fd))
    os.pwrite(fd, b"guarded", 0)
    into = bytearray(7)
    assert not table.try_read_into(0, into) and into == bytes(7)
    assert not table.try_write(8, b"x")
    await table.read_into(0, into)  # the guarded copy serves it
    assert into == b"guarded"
    await table.unmap_all()
    os.close(fd)


async def test_sync_copies_stop_at_an_unmap_that_has_begun() -> None:
    """A device task pins the window, the client unmaps it: from then on the sync copies
    decline; the pinning task's awaited accesses still work, nobody else's do, and the
    unmap completes once the pin is let go."""
    device = Copier()
    dma = device.dma
    pinned, release = trio.Event(), trio.Event()
    seen: list[object] = []

    async def operation() -> None:
        with dma.pin(IOVA, 16, write=True):
            pinned.set()
            await release.wait()
            into = bytearray(4)
            seen.append(dma.try_read_into(IOVA, into))
            seen.append(dma.try_write(IOVA + 4, b"late"))
            await dma.read_into(IOVA, into)  # the general path honours the pin
            await dma.write(IOVA + 4, b"pin!")
            seen.append(bytes(into))

    async with nested_device(device) as pair:
        with GuestMemory(PAGE) as memory:
            await pair.client.dma_map(memory, IOVA, size=PAGE)
            memory.write(0, b"mine")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(operation)
                await pinned.wait()
                assert dma.try_read_into(IOVA, bytearray(4))  # served before the unmap
                nursery.start_soon(pair.client.dma_unmap, IOVA, PAGE)
                await trio.testing.wait_all_tasks_blocked()
                assert len(dma) == 1  # the unmap waits for the pin
                into = bytearray(4)
                assert not dma.try_read_into(IOVA, into) and into == bytes(4)
                assert not dma.try_write(IOVA, b"gone")
                with pytest.raises(DmaError) as exc:
                    await dma.read_into(IOVA, into)  # not the pinning task
                assert exc.value.errno == errno.EFAULT
                release.set()
            assert seen == [False, False, b"mine"] and len(dma) == 0
            assert memory.read(0, 8) == b"minepin!"
            assert not dma.try_read_into(IOVA, into)


async def test_sync_copies_decline_while_the_device_is_stopped() -> None:
    device = Copier()
    dma = device.dma
    async with nested_device(device) as pair:
        with GuestMemory(PAGE) as memory:
            await pair.client.dma_map(memory, IOVA, size=PAGE)
            dma.stop()  # the quiesce gate (migration STOP) closes
            into = bytearray(4)
            memory.write(0, b"held")
            assert not dma.try_read_into(IOVA, into) and into == bytes(4)
            assert not dma.try_write(IOVA + 8, b"x")
            done = trio.Event()

            async def device_task() -> None:
                if not dma.try_write(IOVA + 8, b"after"):
                    await dma.write(IOVA + 8, b"after")  # waits at the gate
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(device_task)
                await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set() and memory.read(8, 5) == bytes(5)
                dma.resume()
            assert memory.read(8, 5) == b"after"
            assert dma.try_read_into(IOVA, into) and into == b"held"
