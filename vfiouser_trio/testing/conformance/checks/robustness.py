"""robustness: malformed frames, after which the server must still serve (spec: "Security
Considerations": servers should not trust clients)."""

from __future__ import annotations

from ....protocol.constants import Command
from ....protocol.header import Header
from ..context import Probe
from ..model import Level, check

G = "robustness"

#: Commands with a fixed-layout request: a payload shorter than it must be refused.
_TRUNCATED = (
    Command.DMA_MAP,
    Command.DMA_UNMAP,
    Command.DEVICE_GET_INFO,
    Command.DEVICE_GET_REGION_INFO,
    Command.DEVICE_GET_REGION_IO_FDS,
    Command.DEVICE_GET_IRQ_INFO,
    Command.DEVICE_SET_IRQS,
    Command.REGION_READ,
    Command.REGION_WRITE,
    Command.DEVICE_FEATURE,
    Command.MIG_DATA_READ,
    Command.MIG_DATA_WRITE,
)


@check(
    "rob-01",
    G,
    Level.SHOULD,
    "Security Considerations",
    "refuses every command whose payload "
    "is shorter than its structure, and goes on serving the connection",
)
async def truncated(probe: Probe) -> None:
    wire = await probe.connect()
    for command in _TRUNCATED:
        header, reply = await wire.call(command, b"\x01\x00")
        probe.expect_refused(
            header,
            reply,
            what=f"{command.name} with a 2-byte payload",
            payload=b"\x01\x00",
            may_close=False,
        )


@check(
    "rob-02",
    G,
    Level.MUST,
    "Security Considerations",
    "serves a new client after a battery of "
    "broken connections (garbage, a header cut short, a hang-up mid-message)",
)
async def battery(probe: Probe) -> None:
    wire = await probe.connect(negotiate=False)
    await wire.send_bytes(b"\xff" * 64)
    wire = await probe.connect(negotiate=False)
    await wire.send_bytes(b"\x01\x00\x01\x00")
    wire = await probe.connect()
    await wire.send_header(Header(7, Command.REGION_WRITE, 4096, 0, 0), b"\0" * 100)
    await probe.still_serves("broken connections")
