"""disconnect: what a client's departure leaves behind (spec: "Client Disconnection": maps and
IRQ file descriptors go, the device state stays). The maps are dma-06's."""

from __future__ import annotations

import os

from ....protocol.constants import (
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_NONE,
    Command,
    PciRegion,
)
from ....protocol.device_info import DeviceGetInfoRequest
from ..context import Probe
from ..model import Level, check
from .irqs import _assigned_eventfd, _set
from .region_io import INTERRUPT_LINE, _access, _config_wire

G = "disconnect"
S = "Client Disconnection"
CONFIG = PciRegion.CONFIG


@check(
    "dis-01",
    G,
    Level.SHOULD,
    S,
    "keeps the device state for the next client (a config "
    "space register the last client wrote reads back the same), and serves that client",
)
async def state_kept(probe: Probe) -> None:
    _survey, _size, wire = await _config_wire(probe)
    original = await _access(probe, wire, INTERRUPT_LINE, None)
    changed = bytes([original[0] ^ 0x5A])
    await _access(probe, wire, INTERRUPT_LINE, changed)
    try:
        wire = await probe.connect()  # the first client leaves here
        now = await _access(probe, wire, INTERRUPT_LINE, None)
        if now != changed:
            probe.fail(
                "the next client finds the Interrupt Line as it was before the last "
                "client wrote it",
                received=now.hex(),
                expected=changed.hex(),
            )
    finally:
        if not wire.closed:
            await _access(probe, wire, INTERRUPT_LINE, original)  # as the checker found it


@check(
    "dis-02",
    G,
    Level.SHOULD,
    S,
    "lets go of a departed client's IRQ eventfds: a trigger by the "
    "next client does not signal them",
)
async def irq_fds_dropped(probe: Probe) -> None:
    async with _assigned_eventfd(probe, empty_reply=False) as (index, _first, fd):
        wire = await probe.connect()  # the first client leaves; its eventfd stays open here
        await wire.call(
            Command.DEVICE_SET_IRQS, _set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, index, 0, 1)
        )
        trigger = _set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, index, 0, 1)
        await probe.call_ok(
            wire, Command.DEVICE_SET_IRQS, trigger, what="the next client's SET_IRQS trigger"
        )
        info = DeviceGetInfoRequest().pack()
        await wire.call(Command.DEVICE_GET_INFO, info)  # one more round trip, for a late signal
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        probe.fail(
            "the departed client's eventfd was signalled by the next client's trigger",
            expected="the eventfd released when its client left",
        )
