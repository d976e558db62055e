"""Bench-only devices, and a server process serving many devices at once.

- :class:`IrqEchoDevice` answers a doorbell with an MSI-X interrupt: a client that rings the
  doorbell eventfd and waits on the interrupt eventfd does an eventfd ping-pong through the
  server (figure 4). Serve it with ``vfio-user-trio serve bench.devices:IrqEchoDevice``.
- :class:`DmaBenchDevice` gives a benchmark direct access to a client's DMA map (figure 3).
- ``python -m bench.devices serve DEVICE --count N --dir DIR`` serves N instances of DEVICE
  (an example name or ``module:attribute``) in one process on ``DIR/dev-<i>.sock``, prints
  ``ready`` once all listen, and exits with status 0 on SIGTERM or SIGINT (figure 5).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from vfiouser_trio.cli import load_device_factory
from vfiouser_trio.protocol.constants import PciIrq
from vfiouser_trio.server import Device, PciIdentity, serve

# 0x1234 is the vendor ID QEMU's test devices use; these devices never leave the bench.
IRQ_ECHO_IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x7EB0, class_code=0xFF0000)
DMA_BENCH_IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x7EB1, class_code=0xFF0000)

#: The doorbell of IrqEchoDevice: a dword at this offset of BAR0.
DOORBELL_BAR = 0
DOORBELL_OFFSET = 0
#: DmaBenchDevice: the client writes the IOVA of its map (8 bytes) here, in BAR0.
DMA_READY_OFFSET = 0


async def _zeros(offset: int, size: int) -> bytes:
    return bytes(size)


async def _ignore(offset: int, data: bytes) -> None:
    pass


class IrqEchoDevice(Device):
    """Each ring of the BAR0 doorbell raises MSI-X vector 0 (rings coalesced meanwhile are one)."""

    def __init__(self) -> None:
        super().__init__(IRQ_ECHO_IDENTITY, name="irq-echo")
        self.add_bar(DOORBELL_BAR, 0x1000, read=_zeros, write=_ignore)
        self.add_bar(2, 0x1000, read=_zeros, write=_ignore)
        self.add_msix(1, bar=2, table_offset=0, pba_offset=0x800)
        self.doorbell = self.add_doorbell(DOORBELL_BAR, DOORBELL_OFFSET, size=4)

    async def run(self) -> None:
        while True:
            await self.doorbell.wait()
            self.trigger(0, index=PciIrq.MSIX)


class DmaBenchDevice(Device):
    """A device whose ``dma`` table the benchmark drives directly.

    The client announces its map by writing the map's IOVA (8 bytes, little-endian) at
    BAR0 offset 0; :meth:`wait_ready` returns that IOVA.
    """

    def __init__(self) -> None:
        super().__init__(DMA_BENCH_IDENTITY, name="dma-bench")
        self.add_bar(0, 0x1000, read=_zeros, write=self._write_bar0)
        self._announced: trio.MemorySendChannel[int]
        self._announced, self._announcements = trio.open_memory_channel[int](1)

    async def _write_bar0(self, offset: int, data: bytes) -> None:
        if offset == DMA_READY_OFFSET and len(data) == 8:
            await self._announced.send(int.from_bytes(data, "little"))

    async def wait_ready(self) -> int:
        """Wait until the client has mapped its memory; the IOVA of the map."""
        return await self._announcements.receive()


async def serve_many(devices: Sequence[Device], directory: Path) -> None:
    """Serve each device on ``directory/dev-<i>.sock``; print ``ready`` once all listen.

    Returns (after closing every listener) on SIGTERM or SIGINT.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            for index, device in enumerate(devices):
                await nursery.start(serve, device, directory / f"dev-{index}.sock")
            print("ready", flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.devices", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    many = sub.add_parser("serve", help="serve COUNT instances of DEVICE in this process")
    many.add_argument("device", help="example name (gpio, null, dmaengine) or module:attribute")
    many.add_argument("--count", type=int, required=True)
    many.add_argument("--dir", type=Path, required=True, help="directory of the sockets")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be positive")
    factory = load_device_factory(args.device)
    devices = [factory() for _ in range(args.count)]
    for device in devices:
        # Build config space and IRQ tables now, not at the first client: a device's own
        # state must not count as per-connection memory.
        _ = device.config
    try:
        trio.run(serve_many, devices, args.dir)
    finally:
        for device in devices:
            device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
