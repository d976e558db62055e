"""``vfio-user-trio demo``: the gpio example and a client talking, in one process.

The device is served on a real UNIX socket in a temporary directory; the client
connects to it like any vfio-user client would. Everything printed comes from
messages that crossed that socket, except where a line says the device itself acted.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import trio

from .client import GuestMemory, connect
from .examples.gpio import BAR, IN_0_7, IRQ_CONTROL, IRQ_STATUS, OUT_0_7, GpioDevice
from .protocol.constants import PciIrq, PciRegion
from .server.serve import serve

REGION_NAMES = {r.value: r.name for r in PciRegion}
IRQ_NAMES = {i.value: i.name for i in PciIrq}


async def tour(out: Callable[[str], None] = print) -> None:
    """Serve the gpio card, connect a client, and walk through what the protocol does."""
    device = GpioDevice()
    with tempfile.TemporaryDirectory(prefix="vfio-user-demo-") as tmp:
        path = Path(tmp) / "gpio.sock"
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, device, path)
            out(f"gpio device (PCI-IDIO-16) serving on {path}")
            with trio.fail_after(30):
                await _client_tour(device, path, out)
            nursery.cancel_scope.cancel()
    device.close()


async def _client_tour(device: GpioDevice, path: Path, out: Callable[[str], None]) -> None:
    async with connect(path) as client:
        n = client.negotiated
        assert n is not None
        out("\n== negotiated (VFIO_USER_VERSION) ==")
        out(
            f"version 0.{n.minor}, twin socket: {'yes' if n.twin_socket else 'no'}, "
            f"write_multiple: {'yes' if n.write_multiple else 'no'}"
        )
        out(
            f"server accepts {n.peer.max_data_xfer_size} bytes per transfer, "
            f"{n.peer.max_msg_fds} fds per message, {n.peer.max_dma_maps} DMA maps"
        )

        out("\n== device (GET_INFO, GET_REGION_INFO, GET_IRQ_INFO) ==")
        out(
            f"{client.info.num_regions} regions, {client.info.num_irqs} IRQ types, "
            f"reset {'supported' if client.info.supports_reset else 'not supported'}"
        )
        for index, region in sorted(client.regions.items()):
            if region.size:
                access = ("r" if region.readable else "-") + ("w" if region.writable else "-")
                name = REGION_NAMES.get(index, f"region {index}")
                out(f"  {name:<7} {region.size:#7x} bytes {access}")
        for index, info in sorted(client.irq_info.items()):
            if info.count:
                out(f"  IRQ {IRQ_NAMES.get(index, index)}: {info.count} vector(s)")

        out("\n== config space, decoded ==")
        header = await client.config.header()
        out(
            f"vendor {header.vendor_id:04x} device {header.device_id:04x} "
            f"class {header.class_code:06x} rev {header.revision:02x}, "
            f"interrupt pin {'ABCD'[header.interrupt_pin - 1] if header.interrupt_pin else '-'}"
        )
        for bar in await client.config.bars():
            kind = "I/O ports" if bar.io else "memory"
            out(f"  BAR{bar.index}: {kind}, {bar.size} bytes (sized by writing all-ones)")
        caps = await client.config.capabilities()
        out(f"  capabilities: {', '.join(c.name for c in caps) if caps else 'none'}")

        out("\n== registers (REGION_READ / REGION_WRITE on BAR2) ==")
        await client.write(BAR, OUT_0_7, b"\xa5")
        readback = (await client.read(BAR, OUT_0_7, 1))[0]
        out(f"wrote outputs 0-7 = 0xa5, read back {readback:#04x}")
        device.set_inputs(0x0003)
        inputs = (await client.read(BAR, IN_0_7, 1))[0]
        out(f"the device drives inputs 0 and 1; the client reads inputs 0-7 = {inputs:#04x}")

        out("\n== an interrupt (SET_IRQS with an eventfd, INTx) ==")
        irq = (await client.enable_irqs(PciIrq.INTX))[0]
        await client.read(BAR, IRQ_CONTROL, 1)  # reading offset 2 enables the card's IRQ
        device.set_input(4, True)  # a field input changes: the card latches its interrupt
        count = await irq.wait()
        status = (await client.read(BAR, IRQ_STATUS, 1))[0]
        out(f"input 4 changed: INTx delivered ({count} trigger), interrupt status {status:#04x}")
        await client.write(BAR, IN_0_7, b"\x00")  # writing offset 1 clears the latch
        await client.unmask_irqs(PciIrq.INTX, 0, 1)

        out("\n== DMA round trip (DMA_MAP; device reads and writes guest memory) ==")
        with GuestMemory(0x2000) as memory:
            await client.dma_map(memory, 0x10000, size=0x1000)
            await client.dma_map(memory, 0x20000, offset=0x1000, size=0x1000, share_fd=False)
            memory.write(0x10, b"hello, device")
            seen = await device.dma.read(0x10010, 13)
            await device.dma.write(0x20000, seen.upper())
            out(f"fd-backed map: device read {seen.decode()!r} straight from guest memory")
            out(
                f"message-only map: device wrote {memory.read(0x1000, 13).decode()!r} "
                "with VFIO_USER_DMA_WRITE"
            )
            await client.dma_unmap_all()
        out("\ndone: every step above crossed a real vfio-user socket.")


def run() -> int:
    trio.run(tour)
    return 0
