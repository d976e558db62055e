"""framing: the header, message IDs, No_reply and command order (spec: "Header",
"Command Concurrency")."""

from __future__ import annotations

import errno

from ....protocol.constants import (
    FLAG_TYPE_REPLY,
    HEADER_SIZE,
    Command,
)
from ....protocol.device_info import DeviceGetInfoRequest
from ....protocol.dma import DmaMapRequest, DmaUnmapRequest
from ....protocol.header import Header
from ..context import Probe
from ..model import Level, check
from ..wire import describe, describe_header

G = "framing"
_INFO = DeviceGetInfoRequest().pack()


@check(
    "frm-01",
    G,
    Level.MUST,
    "Header",
    "echoes the message ID and command in every reply, "
    "with the Reply type and a msg_size that covers the payload",
)
async def echo(probe: Probe) -> None:
    wire = await probe.connect()
    for msg_id in (0, 0x1234, 0xFFFF):
        header, reply = await wire.call(Command.DEVICE_GET_INFO, _INFO, msg_id=msg_id)
        frame = probe.expect_reply(
            header, reply, what=f"DEVICE_GET_INFO id={msg_id}", payload=_INFO
        )
        if frame.header.msg_size != HEADER_SIZE + len(frame.payload):
            probe.fail("msg_size does not match the bytes sent", received=describe(frame))


@check(
    "frm-02",
    G,
    Level.MUST,
    "Header",
    "sends no reply to a command with No_reply, and answers the next command",
)
async def no_reply(probe: Probe) -> None:
    wire = await probe.connect()
    quiet = await wire.send(Command.DEVICE_GET_INFO, _INFO, msg_id=0x0101, no_reply=True)
    loud = await wire.send(Command.DEVICE_GET_INFO, _INFO, msg_id=0x0202)
    reply = await wire.next_frame()
    if reply is not None and reply.header.msg_id == quiet.msg_id:
        probe.fail(
            "replied to a No_reply command",
            sent=describe_header(quiet),
            received=describe(reply),
            expected=f"only the reply to id={loud.msg_id}",
        )
    probe.expect_reply(loud, reply, what="the command after a No_reply one", payload=_INFO)


@check(
    "frm-03",
    G,
    Level.MUST,
    "Header",
    "answers every command when message IDs are reused while in flight (IDs belong to the sender)",
)
async def reused_ids(probe: Probe) -> None:
    wire = await probe.connect()
    sent = [await wire.send(Command.DEVICE_GET_INFO, _INFO, msg_id=0x4242) for _ in range(3)]
    for header in sent:
        reply = await wire.next_frame()
        probe.expect_reply(header, reply, what="a command whose ID is in flight", payload=_INFO)


@check(
    "frm-04",
    G,
    Level.MUST,
    "Command Concurrency",
    "processes pipelined commands in order: a "
    "No_reply DMA_MAP is done before the reply to the DMA_UNMAP sent after it",
)
async def pipelined(probe: Probe) -> None:
    wire = await probe.connect()
    base = probe.expectations.dma_base
    mapping = DmaMapRequest(base, 4096)
    unmap = DmaUnmapRequest(base, 4096)
    await wire.send(mapping.COMMAND, mapping.pack(), no_reply=True)
    await probe.call_ok(
        wire, unmap.COMMAND, unmap.pack(), what="DMA_UNMAP right after a No_reply DMA_MAP"
    )


@check(
    "frm-05",
    G,
    Level.MUST,
    "Header",
    "on a msg_size below the header size, hangs up or answers an error, and serves the next client",
)
async def short_size(probe: Probe) -> None:
    wire = await probe.connect()
    bad = Header(0x0505, Command.DEVICE_GET_INFO, 8, 0, 0)
    await wire.send_header(bad, _INFO)
    reply = await wire.next_frame()
    if reply is not None:
        probe.expect_refused(bad, reply, what="msg_size 8")
    await probe.still_serves("a msg_size of 8")


@check(
    "frm-06",
    G,
    Level.SHOULD,
    "Header",
    "refuses a message larger than it accepts (error or "
    "hang-up) without waiting for more, and serves the next client",
)
async def oversized(probe: Probe) -> None:
    survey = await probe.survey()
    wire = await probe.connect()
    # Past what max_data_xfer_size admits, with generous room for a message's own fields.
    size = survey.capabilities.max_data_xfer_size + (1 << 20)
    header = Header(0x0606, Command.REGION_WRITE, size, 0, 0)
    await wire.send_header(header)
    await wire.send_bytes(bytes(min(size - HEADER_SIZE, 1 << 16)))
    reply = await wire.next_frame()
    probe.expect_refused(
        header,
        reply,
        what=f"a {size}-byte message",
        errnos=frozenset({errno.EINVAL, errno.E2BIG, errno.EMSGSIZE}),
    )
    await probe.still_serves("an oversized message")


@check(
    "frm-07",
    G,
    Level.SHOULD,
    "Commands",
    "refuses an unknown command number with an error reply and goes on serving the connection",
)
async def unknown_command(probe: Probe) -> None:
    wire = await probe.connect()
    for command in (0, 14, 0x7FFF):
        header, reply = await wire.call(command, b"\0" * 16)
        probe.expect_refused(header, reply, what=f"command {command}", may_close=False)
    await probe.call_ok(
        wire, Command.DEVICE_GET_INFO, _INFO, what="DEVICE_GET_INFO after unknown commands"
    )


@check(
    "frm-08",
    G,
    Level.SHOULD,
    "Commands",
    "refuses a server-to-client command (DMA_READ, DMA_WRITE) sent by the client",
)
async def wrong_direction(probe: Probe) -> None:
    wire = await probe.connect()
    for command in (Command.DMA_READ, Command.DMA_WRITE):
        payload = (probe.expectations.dma_base).to_bytes(8, "little") + (8).to_bytes(8, "little")
        if command is Command.DMA_WRITE:
            payload += bytes(8)
        await probe.call_refused(wire, command, payload, what=command.name, may_close=False)


@check(
    "frm-09",
    G,
    Level.SHOULD,
    "Header",
    "does not act on a reply or an unknown message type from the client (ignores it or answers "
    "an error), and answers the next command",
)
async def stray_types(probe: Probe) -> None:
    wire = await probe.connect()
    await wire.send(Command.DEVICE_GET_INFO, _INFO, msg_id=0x0909, flags=FLAG_TYPE_REPLY)
    await wire.send(Command.DEVICE_GET_INFO, _INFO, msg_id=0x0A0A, flags=0x7)
    strays = "; ".join(wire.log[-2:])
    header, reply = await wire.call(Command.DEVICE_GET_INFO, _INFO, msg_id=0x0B0B)
    # An error answer to either stray message is fine; a success means it was processed as
    # a command; an answer echoing no message sent leaves a client unable to match it.
    while reply is not None and reply.header.msg_id != header.msg_id:
        stray = reply.header.msg_id in (0x0909, 0x0A0A)
        if stray and reply.header.is_error:
            reply = await wire.next_frame()
            continue
        probe.fail(
            "processed a stray message as a command"
            if stray
            else "answered with a reply that echoes none of the messages sent",
            sent=strays,
            received=describe(reply),
            expected="no answer to the stray messages (or an error reply echoing their ID), "
            f"then the reply to id={header.msg_id}",
        )
    if reply is None:
        return  # hung up: allowed for a peer that breaks the protocol
    probe.expect_reply(header, reply, what="DEVICE_GET_INFO after stray messages", payload=_INFO)
