"""robustness: malformed frames, after which the server must still serve (spec: "Security
Considerations": servers should not trust clients)."""

from __future__ import annotations

import os

from ....protocol.constants import Command
from ....protocol.device_info import DeviceGetInfoRequest
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


@check(
    "rob-03",
    G,
    Level.SHOULD,
    "Security Considerations",
    "closes file descriptors sent with a "
    "command that takes none (whether it refuses the command or not)",
)
async def stray_fds(probe: Probe) -> str:
    wire = await probe.connect()
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        payload = DeviceGetInfoRequest().pack()
        try:
            _header, reply = await wire.call(Command.DEVICE_GET_INFO, payload, fds=(write_end,))
        finally:
            os.close(write_end)  # the server's copy is now the only write end
        outcome = "refused" if reply is not None and reply.header.is_error else "answered"
        await wire.call(Command.DEVICE_GET_INFO, payload)  # one more round trip
        try:
            if os.read(read_end, 1) == b"":
                return f"the command was {outcome}, the fd closed"
        except BlockingIOError:
            pass
        probe.fail(
            f"the command was {outcome} but the server kept the fd sent with it",
            expected="the fd closed (EOF on the other end of the pipe)",
        )
    finally:
        os.close(read_end)
