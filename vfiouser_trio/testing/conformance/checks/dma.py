"""dma: DMA_MAP / DMA_UNMAP (spec: "VFIO_USER_DMA_MAP", "VFIO_USER_DMA_UNMAP"), and what a
client's departure leaves of them (spec: "Client Disconnection"). Maps are made without an fd
in the window ``Expectations.dma_base``, and unmapped before the check ends."""

from __future__ import annotations

import errno
import os

from ....protocol.constants import DMA_UNMAP_FLAG_ALL, Command
from ....protocol.dma import DmaMapRequest, DmaUnmapRequest
from ..context import Probe
from ..dma_window import DmaWindow
from ..model import Level, check
from ..wire import Wire, describe

G = "dma"
PAGE = 4096


async def _map(probe: Probe, wire: Wire, address: int, size: int, what: str) -> None:
    request = DmaMapRequest(address, size)
    await probe.call_ok(wire, Command.DMA_MAP, request.pack(), what=what)


async def _unmap(probe: Probe, wire: Wire, address: int, size: int, what: str) -> None:
    request = DmaUnmapRequest(address, size)
    frame = await probe.call_ok(wire, Command.DMA_UNMAP, request.pack(), what=what)
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
    Level.MUST,
    "VFIO_USER_DMA_MAP",
    "refuses a DMA_MAP over a live map with a different window, with EEXIST",
)
async def overlap(probe: Probe) -> None:
    wire = await probe.connect()
    base = probe.expectations.dma_base
    await _map(probe, wire, base, 4 * PAGE, "DMA_MAP")
    request = DmaMapRequest(base + PAGE, 4 * PAGE)
    header, reply = await wire.call(Command.DMA_MAP, request.pack())
    try:
        # The spec: "A command to map over an existing region must be failed by the server
        # with EEXIST set in error field in the reply."
        probe.expect_refused(
            header,
            reply,
            what="an overlapping DMA_MAP",
            payload=request.pack(),
            errnos=frozenset({errno.EEXIST}),
            errno_required=True,
            may_close=False,
        )
    finally:
        await _unmap(probe, wire, base, 4 * PAGE, "DMA_UNMAP")


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
    await probe.call_refused(
        wire, Command.DMA_UNMAP, request.pack(), what="DMA_UNMAP of nothing", may_close=False
    )


@check(
    "dma-05",
    G,
    Level.SHOULD,
    "VFIO_USER_DMA_UNMAP",
    "unmaps every window with VFIO_DMA_UNMAP_FLAG_ALL, address and size 0 (kernel VFIO's flag, "
    "which QEMU sends; the spec leaves flags unused)",
)
async def unmap_all(probe: Probe) -> None:
    wire = await probe.connect()
    base = probe.expectations.dma_base
    await _map(probe, wire, base, PAGE, "DMA_MAP")
    await _map(probe, wire, base + 2 * PAGE, PAGE, "a second DMA_MAP")
    request = DmaUnmapRequest(0, 0, DMA_UNMAP_FLAG_ALL)
    await probe.call_ok(wire, Command.DMA_UNMAP, request.pack(), what="DMA_UNMAP with FLAG_ALL")
    # Both windows are gone: mapping them differently now works.
    await _map(probe, wire, base, 3 * PAGE, "DMA_MAP over the unmapped windows")
    await _unmap(probe, wire, base, 3 * PAGE, "DMA_UNMAP")


@check(
    "dma-09",
    G,
    Level.SHOULD,
    "VFIO_USER_DMA_UNMAP",
    "refuses a DMA_UNMAP that does not match a map exactly (part of one) and a DMA_MAP of size 0",
)
async def unmap_partial(probe: Probe) -> None:
    wire = await probe.connect()
    base = probe.expectations.dma_base
    await _map(probe, wire, base, 4 * PAGE, "DMA_MAP")
    try:
        for what, command, payload in (
            (
                "DMA_UNMAP of the map's first page",
                Command.DMA_UNMAP,
                DmaUnmapRequest(base, PAGE).pack(),
            ),
            ("DMA_MAP of size 0", Command.DMA_MAP, DmaMapRequest(base + 8 * PAGE, 0).pack()),
        ):
            await probe.call_refused(wire, command, payload, what=what, may_close=False)
    finally:
        await _unmap(probe, wire, base, 4 * PAGE, "DMA_UNMAP of the whole map")


@check(
    "dma-10",
    G,
    Level.MUST,
    "VFIO_USER_DMA_MAP",
    "maps a window backed by a file descriptor (a memfd, sent with the message) and unmaps it",
)
async def fd_map(probe: Probe) -> None:
    wire = await probe.connect()
    base = probe.expectations.dma_base
    fd = os.memfd_create("vfio-user-conform", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4 * PAGE)
        request = DmaMapRequest(base, 4 * PAGE, fds=(fd,))
        header, reply = await wire.call(Command.DMA_MAP, request.pack(), fds=(fd,))
    finally:
        os.close(fd)
    probe.expect_reply(header, reply, what="DMA_MAP with an fd", payload=request.pack())
    await _unmap(probe, wire, base, 4 * PAGE, "DMA_UNMAP")


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


@check(
    "dma-07",
    G,
    Level.MUST,
    "Client memory access",
    "reaches a map made without an fd through DMA_READ / DMA_WRITE inside the window and within "
    "the client's max_data_xfer_size, in either layout (reported); needs Expectations.dma_trigger",
)
async def message_dma(probe: Probe) -> str:
    return await _triggered_dma(probe, qemu=False)


@check(
    "dma-08",
    G,
    Level.SHOULD,
    "Client memory access",
    "works with a client that lays DMA_READ replies and DMA_WRITE out as QEMU does ({address "
    "u64, count u32, data, 4 pad}, DMA_WRITE answered empty); needs Expectations.dma_trigger",
)
async def qemu_layout(probe: Probe) -> str:
    return await _triggered_dma(probe, qemu=True)


async def _triggered_dma(probe: Probe, *, qemu: bool) -> str:
    trigger = probe.expectations.dma_trigger
    if trigger is None:
        probe.skip("no dma_trigger declared: the checker cannot know how to make the device DMA")
    wire = await probe.connect()
    assert wire.negotiated is not None
    base = probe.expectations.dma_base
    size = 16 * PAGE
    window = DmaWindow(
        wire, base, bytearray(size), wire.negotiated.ours.max_data_xfer_size, qemu=qemu
    )
    wire.on_server_command = window.serve
    await _map(probe, wire, base, size, "DMA_MAP")
    try:
        await trigger(window)
    except AssertionError as exc:
        if window.violations:  # the cause, rather than what the device made of our refusal
            probe.fail(
                window.violations[0], expected="DMA inside the window, at most max_data_xfer_size"
            )
        probe.fail(
            f"the device's DMA went wrong: {exc}",
            received=", ".join(window.seen) or "no DMA messages",
            expected="the trigger's DMA done" + (" in QEMU's layout" if qemu else ""),
        )
    await _unmap(probe, wire, base, size, "DMA_UNMAP")
    if window.violations:
        probe.fail(
            window.violations[0], expected="DMA inside the window, at most max_data_xfer_size"
        )
    if not window.seen:
        probe.fail(
            "the device did no DMA_READ or DMA_WRITE when triggered",
            expected="DMA_READ / DMA_WRITE messages for a map without an fd",
        )
    kinds = sorted(set(window.seen), key=window.seen.index)
    return f"{len(window.seen)} messages: " + ", ".join(kinds)
