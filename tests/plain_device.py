"""A device without behaviour, whose DMA tests drive directly (as a device's own task
would), served on one end of a socket pair."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

from vfiouser_trio.limits import ServerLimits
from vfiouser_trio.protocol import DmaLayout
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.serve import serve_connection


class Plain(Device):
    """One 0x100-byte BAR0 of plain memory semantics and nothing else."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10FF, class_code=0xFF0000))
        self.add_bar(0, 0x100)


@asynccontextmanager
async def served_plain(
    configured: DmaLayout | None, *, seconds: float = 10
) -> AsyncIterator[tuple[Device, socket.socket]]:
    """A Plain device served on one end of a socket pair (within ``seconds``), knowing the
    client's DMA layout only if ``configured`` (ServerLimits.dma_layout). Yields it and the
    other end."""
    device = Plain()
    ours, theirs = socket.socketpair()
    try:
        with trio.fail_after(seconds):
            async with trio.open_nursery() as nursery:
                limits = ServerLimits(dma_layout=configured)
                nursery.start_soon(partial(serve_connection, device, theirs, limits=limits))
                yield device, ours
    finally:
        device.close()
