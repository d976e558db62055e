"""dma: DMA_MAP / DMA_UNMAP (spec: "VFIO_USER_DMA_MAP", "VFIO_USER_DMA_UNMAP"), and what a
client's departure leaves of them (spec: "Client Disconnection"). Maps are made without an fd
in the window ``Expectations.dma_base``, and unmapped before the check ends."""

from __future__ import annotations

import errno

from ....protocol.constants import DMA_UNMAP_FLAG_ALL, Command
from ....protocol.dma import DmaMapRequest, DmaUnmapRequest
from ..context import Probe
from ..model import Level, check
from ..wire import Wire, describe

G = "dma"
PAGE = 4096


async def _map(probe: Probe, wire: Wire, address: int, size: int, what: str) -> None:
    request = DmaMapRequest(address, size)
    header, reply = await wire.call(Command.DMA_MAP, request.pack())
    probe.expect_reply(header, reply, what=what, payload=request.pack())


async def _unmap(probe: Probe, wire: Wire, address: int, size: int, what: str) -> None:
    request = DmaUnmapRequest(address, size)
    header, reply = await wire.call(Command.DMA_UNMAP, request.pack())
    frame = probe.expect_reply(header, reply, what=what, payload=request.pack())
    if len(frame.payload) < 24:
        probe.warn(
            f"{what}: the reply does not carry the DMA entry back",
            received=describe(frame),
            expected="the request's 24-byte entry (argsz, flags, address, size)",
        )


@check(
    "dma-01",
    G,
    Level.MUST,
    "VFIO_USER_DMA_MAP",
    "maps a window without an fd and unmaps it, the DMA_UNMAP reply carrying the entry back",
)
async def map_unmap(probe: Probe) -> None:
    wire = await probe.connect()
    base = probe.expectations.dma_base
    await _map(probe, wire, base, 4 * PAGE, "DMA_MAP")
    await _unmap(probe, wire, base, 4 * PAGE, "DMA_UNMAP")


@check(
    "dma-02",
    G,
    Level.SHOULD,
    "VFIO_USER_DMA_MAP",
    "takes a DMA_MAP identical to a live map as "
    "a no-op (QEMU and libvfio-user's client replay their maps)",
)
async def identical(probe: Probe) -> None:
    wire = await probe.connect()
    base = probe.expectations.dma_base
    await _map(probe, wire, base, 4 * PAGE, "DMA_MAP")
    await _map(probe, wire, base, 4 * PAGE, "the same DMA_MAP again")
    await _unmap(probe, wire, base, 4 * PAGE, "DMA_UNMAP")


@check(
    "dma-03",
    G,
    Level.SHOULD,
    "VFIO_USER_DMA_MAP",
    "refuses a DMA_MAP overlapping a live map with a different window (kernel VFIO answers "
    "EEXIST, libvfio-user EINVAL)",
)
async def overlap(probe: Probe) -> str:
    wire = await probe.connect()
    base = probe.expectations.dma_base
    await _map(probe, wire, base, 4 * PAGE, "DMA_MAP")
    request = DmaMapRequest(base + PAGE, 4 * PAGE)
    header, reply = await wire.call(Command.DMA_MAP, request.pack())
    code = probe.expect_refused(
        header, reply, what="an overlapping DMA_MAP", payload=request.pack(), may_close=False
    )
    await _unmap(probe, wire, base, 4 * PAGE, "DMA_UNMAP")
    return f"refused with {errno.errorcode.get(code or 0, str(code))}"


@check(
    "dma-04",
    G,
    Level.SHOULD,
    "VFIO_USER_DMA_UNMAP",
    "refuses a DMA_UNMAP of a window that is not mapped",
)
async def unmap_unknown(probe: Probe) -> None:
    wire = await probe.connect()
    request = DmaUnmapRequest(probe.expectations.dma_base + 8 * PAGE, PAGE)
    header, reply = await wire.call(Command.DMA_UNMAP, request.pack())
    probe.expect_refused(
        header, reply, what="DMA_UNMAP of nothing", payload=request.pack(), may_close=False
    )


@check(
    "dma-05",
    G,
    Level.MUST,
    "VFIO_USER_DMA_UNMAP",
    "unmaps every window with VFIO_DMA_UNMAP_FLAG_ALL (address and size 0)",
)
async def unmap_all(probe: Probe) -> None:
    wire = await probe.connect()
    base = probe.expectations.dma_base
    await _map(probe, wire, base, PAGE, "DMA_MAP")
    await _map(probe, wire, base + 2 * PAGE, PAGE, "a second DMA_MAP")
    request = DmaUnmapRequest(0, 0, DMA_UNMAP_FLAG_ALL)
    header, reply = await wire.call(Command.DMA_UNMAP, request.pack())
    probe.expect_reply(header, reply, what="DMA_UNMAP with FLAG_ALL", payload=request.pack())
    # Both windows are gone: mapping them differently now works.
    await _map(probe, wire, base, 3 * PAGE, "DMA_MAP over the unmapped windows")
    await _unmap(probe, wire, base, 3 * PAGE, "DMA_UNMAP")


@check(
    "dma-06",
    G,
    Level.MUST,
    "Client Disconnection",
    "forgets a departed client's maps: the next client maps a different window over them",
)
async def disconnect(probe: Probe) -> None:
    wire = await probe.connect()
    base = probe.expectations.dma_base
    await _map(probe, wire, base, 2 * PAGE, "DMA_MAP")
    wire = await probe.connect()  # the first connection closes here
    await _map(probe, wire, base + PAGE, 2 * PAGE, "the next client's DMA_MAP over the old window")
    await _unmap(probe, wire, base + PAGE, 2 * PAGE, "DMA_UNMAP")
