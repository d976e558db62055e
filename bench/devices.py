"""Bench-only devices, and a server process serving many devices at once.

- :class:`IrqEchoDevice` answers a doorbell with an MSI-X interrupt: a client that rings the
  doorbell eventfd and waits on the interrupt eventfd does an eventfd ping-pong through the
  server (figure 4). Serve it with ``vfio-user-trio serve bench.devices:IrqEchoDevice``.
- :class:`DmaBenchDevice` gives a benchmark direct access to a client's DMA map (figure 3).
- :class:`PolicyBenchDevice` has a region whose writes are slow, a region read at once and
  queue doorbells, for the ordering policies' figure (9); :func:`policy_bench` and
  :func:`policy_bench_fast` build it for ``vfio-user-trio serve``, and :func:`queue_lanes`
  is the per-queue ``KeyedOrder`` policy (``--policy bench.devices:queue_lanes``).
- ``python -m bench.devices serve DEVICE --count N --dir DIR`` serves N instances of DEVICE
  (an example name or ``module:attribute``) in one process on ``DIR/dev-<i>.sock``, prints
  ``ready`` once all listen, and exits with status 0 on SIGTERM or SIGINT (figure 5).
"""

from __future__ import annotations

import argparse
import signal
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from vfiouser_trio.cli import load_device_factory
from vfiouser_trio.ordering import KeyedOrder
from vfiouser_trio.protocol.constants import Command, PciIrq
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.server import Device, PciIdentity, serve

# 0x1234 is the vendor ID QEMU's test devices use; these devices never leave the bench.
IRQ_ECHO_IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x7EB0, class_code=0xFF0000)
DMA_BENCH_IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x7EB1, class_code=0xFF0000)
POLICY_BENCH_IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x7EB2, class_code=0xFF0000)

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


#: PolicyBenchDevice: writes to this BAR take ``write_latency`` each ...
SLOW_BAR = 0
#: ... reads of this one are answered at once ...
FAST_BAR = 1
#: ... and this one holds QUEUES doorbells, QUEUE_STRIDE bytes apart from offset 0, each
#: write to one taking ``doorbell_latency`` (the queue's work before it answers).
QUEUE_BAR = 2
QUEUES = 8
QUEUE_STRIDE = 4
#: The latencies of :func:`policy_bench`, in seconds.
BENCH_LATENCY = 0.001

_REGION_ACCESS = struct.Struct("=QI")  # offset, region: the head of REGION_READ/WRITE


class PolicyBenchDevice(Device):
    """Three BARs (see :data:`SLOW_BAR`, :data:`FAST_BAR`, :data:`QUEUE_BAR`): what the
    ordering policies are compared on. Latencies are ``trio.sleep``s, as a device waiting
    for its backend."""

    def __init__(self, write_latency: float = 0.0, doorbell_latency: float = 0.0) -> None:
        super().__init__(POLICY_BENCH_IDENTITY, name="policy-bench")
        self.write_latency = write_latency
        self.doorbell_latency = doorbell_latency
        self.add_bar(SLOW_BAR, 0x1000, read=_zeros, write=self._slow_write)
        self.add_bar(FAST_BAR, 0x1000, read=_zeros, write=_ignore)
        self.add_bar(QUEUE_BAR, 0x1000, read=_zeros, write=self._doorbell)

    async def _slow_write(self, offset: int, data: bytes) -> None:
        await _wait(self.write_latency)

    async def _doorbell(self, offset: int, data: bytes) -> None:
        await _wait(self.doorbell_latency)


async def _wait(seconds: float) -> None:
    if seconds > 0:
        await trio.sleep(seconds)


def policy_bench() -> PolicyBenchDevice:
    """PolicyBenchDevice with 1 ms slow writes and doorbells (:data:`BENCH_LATENCY`)."""
    return PolicyBenchDevice(BENCH_LATENCY, BENCH_LATENCY)


def policy_bench_fast() -> PolicyBenchDevice:
    """PolicyBenchDevice with no latency: what a reordering policy costs by itself."""
    return PolicyBenchDevice()


def queue_key(frame: Frame) -> int | None:
    """KeyedOrder key: a doorbell write's queue; None (a barrier) for everything else."""
    header = frame.header
    if header.command == Command.REGION_WRITE and len(frame.payload) >= _REGION_ACCESS.size:
        offset: int
        region: int
        offset, region = _REGION_ACCESS.unpack_from(frame.payload)
        if region == QUEUE_BAR and offset < QUEUES * QUEUE_STRIDE:
            return offset // QUEUE_STRIDE
    return None


def queue_lanes() -> KeyedOrder:
    """One lane per queue: doorbells of different queues are processed at once."""
    return KeyedOrder(queue_key)


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
