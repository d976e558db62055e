"""A migratable device and a source/destination pair of servers, for the migration tests."""

from __future__ import annotations

import mmap
import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from vfiouser_trio.client import (
    Client,
    connect,
)
from vfiouser_trio.protocol import Capabilities, MigState
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.serve import serve_connection

STATE = 300 * 1024  # several chunks at the limits below
SOURCE_XFER = 64 * 1024
DESTINATION_XFER = 16 * 1024
PAGE = mmap.PAGESIZE
IOVA = 0x10_0000
MEMORY = 16 * PAGE
TIMEOUT = 30
S = MigState


class Blob(Device):
    """A migratable device holding ``STATE`` bytes, streamed in uneven chunks.

    A write of ``n`` to BAR0 makes it DMA-write 8 bytes at ``IOVA + n``. ``stop_writes``
    are such writes its ``on_stop`` does (DMA still works there). ``failures`` make a hook
    raise; ``on_run_action`` runs inside ``on_run``.
    """

    def __init__(self, *, seed: int = 0, pre_copy: bool = False, resettable: bool = True) -> None:
        identity = PciIdentity(vendor_id=0x1AF4, device_id=0x10F3, class_code=0xFF0000)
        super().__init__(identity, reset_supported=resettable)
        self.data = bytearray(random.Random(seed).randbytes(STATE) if seed else bytes(STATE))
        self.add_bar(0, 0x100, read=self._read0, write=self._write0)
        self.enable_migration(pre_copy=pre_copy)
        self.failures: dict[str, BaseException] = {}
        self.stop_writes: list[int] = []
        self.chunk_sizes: list[int] = []
        self.incoming = bytearray()
        self.precopied = 0
        self.resets = 0
        self.on_run_action: Callable[[], None] | None = None

    async def _read0(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def _write0(self, offset: int, data: bytes) -> None:
        await self.dma.write(IOVA + int.from_bytes(data, "little"), b"written!")

    def _hook(self, name: str) -> None:
        failure = self.failures.get(name)
        if failure is not None:
            raise failure

    async def reset(self) -> None:
        self.resets += 1

    async def on_stop(self) -> None:
        self._hook("stop")
        for offset in self.stop_writes:
            await self.dma.write(IOVA + offset, b"stopping")

    async def on_run(self) -> None:
        self._hook("run")
        if self.on_run_action is not None:
            self.on_run_action()
            await trio.lowlevel.checkpoint()  # where a cancellation it caused lands

    async def on_begin_save(self) -> None:
        self._hook("begin_save")
        self.precopied = 0

    async def precopy_chunks(self) -> AsyncIterator[bytes]:
        half = STATE // 2
        for start in range(0, half, 40_000):
            piece = bytes(self.data[start : min(start + 40_000, half)])
            self.precopied += len(piece)
            yield piece

    async def save_chunks(self) -> AsyncIterator[bytes]:
        self._hook("save")
        for start in range(self.precopied, STATE, 50_000):
            yield bytes(self.data[start : start + 50_000])

    async def on_begin_resume(self) -> None:
        self.incoming.clear()

    async def load_chunk(self, data: bytes) -> None:
        self.chunk_sizes.append(len(data))
        self.incoming += data

    async def on_end_resume(self) -> None:
        self._hook("load")
        if len(self.incoming) != STATE:
            raise ValueError(f"{len(self.incoming)} bytes of state, expected {STATE}")
        self.data[:] = self.incoming


@dataclass
class Served:
    device: Blob
    client: Client
    #: Cancelling it ends the server's side of the connection (a dying server).
    server: trio.CancelScope

    def kill(self) -> None:
        self.server.cancel()


@asynccontextmanager
async def served(device: Blob, max_xfer: int) -> AsyncIterator[Served]:
    ours, theirs = socket.socketpair()
    caps = Capabilities(max_msg_fds=8, max_data_xfer_size=max_xfer)
    scope = trio.CancelScope()

    async def server() -> None:
        with scope:
            await serve_connection(device, theirs, capabilities=caps)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            async with connect(ours) as client:
                yield Served(device, client, scope)
    finally:
        device.close()


@asynccontextmanager
async def pair(
    source: Blob | None = None, destination: Blob | None = None
) -> AsyncIterator[tuple[Served, Served]]:
    """A source (random state) and a destination (zeros), each with its client."""
    source = source or Blob(seed=1)
    destination = destination or Blob()
    with trio.fail_after(TIMEOUT):
        async with (
            served(source, SOURCE_XFER) as src,
            served(destination, DESTINATION_XFER) as dst,
        ):
            yield src, dst


def state(device: Device) -> MigState:
    assert device.migration is not None
    return device.migration.state
