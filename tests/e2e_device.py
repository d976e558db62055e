"""The end-to-end tests' device (BAR0 callbacks with a DMA engine, mmap-able and sparse
BARs, a doorbell) and the server they drive it through."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

from vfiouser_trio.client import (
    Client,
    VfioUserError,
    connect,
)
from vfiouser_trio.engine import ConnectionHooks
from vfiouser_trio.protocol import Capabilities
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import InterruptPin, PciIdentity
from vfiouser_trio.server.pci_caps import PowerManagementCapability
from vfiouser_trio.server.regions import RegionType, SparseArea
from vfiouser_trio.server.serve import serve_connection
from vfiouser_trio.server.session import DEFAULT_SERVER_CAPABILITIES

PAGE = os.sysconf("SC_PAGE_SIZE")
TIMEOUT = 10
REG_COPY = 0x10  # write N: DMA-read N bytes at SRC, write them reversed at DST
REG_FILL = 0x18  # write byte b: DMA-write 16 bytes of b at DST
DOORBELL = 0x100
SRC = 0x10_0000
DST = 0x20_0000


class TestDevice(Device):
    """BAR0 callbacks (with a DMA engine), BAR1 fully mmap-able, BAR2 sparse, BAR4 I/O."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__(
            PciIdentity(0x1AF4, 0x10F0, 0x1AF4, 0x0001, class_code=0x018000, revision=2),
            interrupt_pin=InterruptPin.INTA,
        )
        self.bar0 = bytearray(0x1000)
        self.bar0_reads: list[tuple[int, int]] = []
        self.bar0_writes: list[tuple[int, bytes]] = []
        self.bar2_calls: list[tuple[str, int, int]] = []
        self.blocker: trio.Event | None = None
        self.entered = trio.Event()
        self.resets = 0
        self.dma_error: VfioUserError | None = None
        self.add_bar(0, 0x1000, read=self.read_bar0, write=self.write_bar0)
        self.add_bar(1, 4 * PAGE, mmap=True)
        self.add_bar(
            2,
            4 * PAGE,
            read=self.read_bar2,
            write=self.write_bar2,
            sparse=[SparseArea(PAGE, 2 * PAGE)],
            is_64bit=True,
            prefetchable=True,
        )
        self.add_bar(4, 0x40, io=True, read=self.read_bar0, write=self.write_bar0)
        self.add_msix(4, bar=0, table_offset=0x800)
        self.add_msi(2)
        self.add_capability(PowerManagementCapability())
        self.add_region(9, 0x100, memory=True, region_type=RegionType(0x8086_0000, 3))
        self.doorbell = self.add_doorbell(0, DOORBELL)

    async def read_bar0(self, offset: int, size: int) -> bytes:
        self.bar0_reads.append((offset, size))
        if self.blocker is not None:
            self.entered.set()
            await self.blocker.wait()
        return bytes(self.bar0[offset : offset + size])

    async def write_bar0(self, offset: int, data: bytes) -> None:
        self.bar0_writes.append((offset, data))
        self.bar0[offset : offset + len(data)] = data
        value = int.from_bytes(data, "little")
        try:
            if offset == REG_COPY:
                source = await self.dma.read(SRC, value)
                await self.dma.write(DST, source[::-1])
            elif offset == REG_FILL:
                await self.dma.write(DST, bytes([value]) * 16)
        except VfioUserError as exc:
            self.dma_error = exc
            raise

    async def read_bar2(self, offset: int, size: int) -> bytes:
        self.bar2_calls.append(("read", offset, size))
        return bytes([0xB2]) * size

    async def write_bar2(self, offset: int, data: bytes) -> None:
        self.bar2_calls.append(("write", offset, len(data)))

    async def reset(self) -> None:
        self.resets += 1


@asynccontextmanager
async def served(
    device: Device,
    *,
    twin: bool = True,
    offer_twin: bool = True,
    write_multiple: bool = True,
    client_caps: Capabilities | None = None,
    server_caps: Capabilities = DEFAULT_SERVER_CAPABILITIES,
    hooks: ConnectionHooks | None = None,
    server_hooks: ConnectionHooks | None = None,
) -> AsyncIterator[tuple[Client, socket.socket]]:
    """Serve ``device`` on one end of a socketpair and connect the client to the other."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(
                        serve_connection,
                        device,
                        theirs,
                        capabilities=server_caps,
                        offer_twin_socket=offer_twin,
                        hooks=server_hooks,
                    )
                )
                async with connect(
                    ours,
                    twin_socket=twin,
                    write_multiple=write_multiple,
                    capabilities=client_caps,
                    hooks=hooks,
                ) as client:
                    yield client, theirs
                # The server notices the client is gone and its session ends by itself.
    finally:
        device.close()
