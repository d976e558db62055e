"""The device's DMA map hooks (dma_mapped / dma_unmapped), over a real socket with our client.

What they promise (server/dma_hooks.py): dma_mapped once per new map, usable inside the
hook, not again for a replayed identical map; dma_unmapped before the memory goes, for
DMA_UNMAP, UNMAP_ALL and the client leaving; the unmap then waits for the device's pins;
dma_mapped's failure is the client's errno, a device bug is a DeviceCodeError, and the
table and the client agree afterwards.
"""

from __future__ import annotations

import errno
import mmap

import pytest
import trio
import trio.testing

from vfiouser_trio.client import GuestMemory, VfioUserError
from vfiouser_trio.protocol import DmaMapRequest
from vfiouser_trio.protocol.constants import DMA_MAP_FLAG_READ, Command
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.dma import DmaWindow
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.testing import nested_device

pytestmark = pytest.mark.usefixtures("no_fd_leak")

PAGE = mmap.PAGESIZE
ID = PciIdentity(vendor_id=0x1234, device_id=0x7112)
IOVA = 0x10_0000


class Registrar(Device):
    """Records what its hooks are told, and what the memory held when they ran."""

    def __init__(self) -> None:
        super().__init__(ID, name="registrar0")
        self.add_bar(0, 0x1000, read=self.read0)
        self.events: list[tuple[str, DmaWindow, bytes]] = []
        self.refuse: BaseException | None = None
        self.fail_unmap: BaseException | None = None

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def dma_mapped(self, window: DmaWindow) -> None:
        first = await self.dma.read(window.iova, 4)  # usable inside the hook
        self.events.append(("mapped", window, first))
        if self.refuse is not None:
            raise self.refuse

    async def dma_unmapped(self, window: DmaWindow) -> None:
        last = await self.dma.read(window.iova, 4)  # still usable: the memory is not gone
        self.events.append(("unmapped", window, last))
        if self.fail_unmap is not None:
            raise self.fail_unmap


@pytest.mark.parametrize("share_fd", [True, False])
async def test_hooks_see_each_map_once_and_its_memory_while_it_lasts(share_fd: bool) -> None:
    device = Registrar()
    async with nested_device(device) as pair:
        client = pair.client
        with GuestMemory(4 * PAGE) as memory:
            memory.write(0, b"ring")
            await client.dma_map(memory, IOVA, size=2 * PAGE, writable=False, share_fd=share_fd)
            # A client replaying its maps (libvfio-user's rule): a no-op, not announced again.
            fds = (memory.fileno(),) if share_fd else ()
            await client.connection.request(
                DmaMapRequest(IOVA, 2 * PAGE, DMA_MAP_FLAG_READ, 0, fds)
            )
            window = DmaWindow(IOVA, 2 * PAGE, True, False, share_fd)
            assert device.events == [("mapped", window, b"ring")]
            memory.write(0, b"gone")
            await client.dma_unmap(IOVA, 2 * PAGE)
            assert device.events[1:] == [("unmapped", window, b"gone")]
            assert len(device.dma) == 0


async def test_unmap_all_and_the_client_leaving_call_dma_unmapped() -> None:
    device = Registrar()
    async with nested_device(device) as pair:
        with GuestMemory(4 * PAGE) as memory:
            for i in range(3):
                await pair.client.dma_map(memory, IOVA + i * PAGE, offset=i * PAGE, size=PAGE)
            await pair.client.dma_unmap_all()
            unmapped = [w.iova for kind, w, _ in device.events if kind == "unmapped"]
            assert unmapped == [IOVA, IOVA + PAGE, IOVA + 2 * PAGE]
            device.events.clear()
            memory.write(0, b"last")
            await pair.client.dma_map(memory, IOVA, size=PAGE)
    # The client left with a map: the device is told, before the memory goes.
    assert [(kind, w.iova, data) for kind, w, data in device.events] == [
        ("mapped", IOVA, b"last"),
        ("unmapped", IOVA, b"last"),
    ]
    assert len(device.dma) == 0


class Pinner(Device):
    """Holds a long-lived pin on the first window it is told of, as a device keeps a ring."""

    def __init__(self) -> None:
        super().__init__(ID, name="pinner0")
        self.add_bar(0, 0x1000)
        self.order: list[str] = []
        self.pinned = trio.Event()
        self.let_go = trio.Event()
        self.nursery: trio.Nursery | None = None

    async def dma_mapped(self, window: DmaWindow) -> None:
        assert self.nursery is not None
        self.nursery.start_soon(self._hold, window)

    async def _hold(self, window: DmaWindow) -> None:
        with self.dma.pin(window.iova, window.size):
            self.pinned.set()
            await self.let_go.wait()
            await trio.lowlevel.checkpoint()  # the unmap still waits: the pin is held
            self.order.append("pin released")

    async def dma_unmapped(self, window: DmaWindow) -> None:
        self.order.append("dma_unmapped")
        self.let_go.set()


async def test_unmap_waits_for_the_pins_the_hook_lets_go_of() -> None:
    device = Pinner()
    async with trio.open_nursery() as nursery:
        device.nursery = nursery
        async with nested_device(device) as pair:
            with GuestMemory(PAGE) as memory:
                await pair.client.dma_map(memory, IOVA, size=PAGE)
                await device.pinned.wait()
                with trio.fail_after(10):  # a regression would wait for the pin forever
                    await pair.client.dma_unmap(IOVA, PAGE)
                device.order.append("unmap answered")
    assert device.order == ["dma_unmapped", "pin released", "unmap answered"]


async def test_a_refused_map_is_the_hooks_errno_and_leaves_no_map() -> None:
    device = Registrar()
    device.refuse = VfioUserError(errno.ENOMEM, "cannot register that much")
    async with nested_device(device) as pair:
        with GuestMemory(PAGE) as memory:
            with pytest.raises(VfioUserError) as info:
                await pair.client.dma_map(memory, IOVA, size=PAGE)
            assert info.value.errno == errno.ENOMEM
            assert len(device.dma) == 0 and pair.client.dma_maps == ()
            device.refuse = None
            await pair.client.dma_map(memory, IOVA, size=PAGE)  # the same window, now taken
            assert len(device.dma) == 1
        assert pair.device_errors == []  # refusing is the device's choice, not a bug
    assert [kind for kind, _, _ in device.events] == ["mapped", "mapped", "unmapped"]


async def test_a_hook_that_raises_is_a_device_bug_eio_and_the_map_is_consistent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = Registrar()
    device.refuse = KeyError("no slot")
    async with nested_device(device, raise_device_errors=False) as pair:
        with GuestMemory(2 * PAGE) as memory:
            with pytest.raises(VfioUserError) as info:
                await pair.client.dma_map(memory, IOVA, size=PAGE)
            assert info.value.errno == errno.EIO
            assert len(device.dma) == 0
            (bug,) = pair.device_errors
            assert bug.device == "registrar0" and bug.command == "DMA_MAP"
            assert f"{IOVA:#x}" in bug.where and isinstance(bug.__cause__, KeyError)
            assert "registrar0: DMA_MAP" in caplog.text
            # dma_unmapped failing: a bug reported, and the window goes anyway (the client
            # takes its memory back whatever the device says), so the unmap succeeds.
            device.refuse = None
            device.fail_unmap = RuntimeError("forgot to unregister")
            await pair.client.dma_map(memory, IOVA, size=PAGE)
            await pair.client.dma_unmap(IOVA, PAGE)
            assert len(device.dma) == 0 and pair.client.dma_maps == ()
            assert [e.command for e in pair.device_errors] == ["DMA_MAP", "DMA_UNMAP"]
            # Nothing else is affected: a new map of the same window works.
            device.fail_unmap = None
            await pair.client.dma_map(memory, IOVA, size=PAGE)
            assert len(device.dma) == 1


async def test_trace_shows_the_hook_reading_a_message_only_map_before_the_reply() -> None:
    device = Registrar()
    async with nested_device(device) as pair:
        with GuestMemory(PAGE) as memory:
            await pair.client.dma_map(memory, IOVA, size=PAGE, share_fd=False)
        names = [
            (r.command, r.is_reply)
            for r in pair.tracer
            if r.command in (Command.DMA_MAP, Command.DMA_READ)
        ]
    # The hook's DMA_READ goes out and is answered before the DMA_MAP reply.
    assert names == [
        (Command.DMA_MAP, False),
        (Command.DMA_READ, False),
        (Command.DMA_READ, True),
        (Command.DMA_MAP, True),
    ]
