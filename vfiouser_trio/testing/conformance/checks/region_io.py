"""region_io: REGION_READ / REGION_WRITE bounds, zero-length access and data sizes (spec:
"VFIO_USER_REGION_READ", "VFIO_USER_REGION_WRITE"). Only config space is touched: its reads
have no side effects, and the only writes put the Interrupt Line register's own value back
(0x3C: a scratch byte for software, of no meaning to the device)."""

from __future__ import annotations

import errno
import struct

from ....protocol.capabilities import Capabilities
from ....protocol.constants import Command, PciRegion
from ..context import Probe, Survey
from ..layouts import REGION_ACCESS as _ACCESS
from ..layouts import WRITE_MULTI_ENTRY as _WR_ONE
from ..model import Level, check
from ..wire import Wire, describe, hexdump

G = "region_io"
EINVAL = frozenset({errno.EINVAL})
CONFIG = PciRegion.CONFIG
INTERRUPT_LINE = 0x3C


def _config_size(probe: Probe, survey: Survey) -> int:
    region = survey.regions[CONFIG] if len(survey.regions) > CONFIG else None
    if region is None or not region.size:
        probe.skip("the device has no config space region")
    return region.size


async def _config_wire(probe: Probe) -> tuple[Survey, int, Wire]:
    """The survey, the config space's size (SKIP without one), and a new connection."""
    survey = await probe.survey()
    size = _config_size(probe, survey)
    return survey, size, await probe.connect()


@check(
    "rio-01",
    G,
    Level.MUST,
    "VFIO_USER_REGION_READ",
    "answers REGION_READ with offset, region and count echoed and exactly count bytes",
)
async def read_echo(probe: Probe) -> str:
    _survey, _size, wire = await _config_wire(probe)
    payload = _ACCESS.pack(0, CONFIG, 4)
    frame = await probe.call_ok(wire, Command.REGION_READ, payload, what="REGION_READ config 0+4")
    if len(frame.payload) != _ACCESS.size + 4 or _ACCESS.unpack_from(frame.payload) != (
        0,
        CONFIG,
        4,
    ):
        probe.fail(
            "the reply is not {offset 0, region 7, count 4} and 4 bytes",
            sent=hexdump(payload),
            received=describe(frame),
            expected="20 bytes: the request's fields, then the data",
        )
    ids = struct.unpack_from("=HH", frame.payload, _ACCESS.size)
    return f"vendor {ids[0]:04x} device {ids[1]:04x}"


@check(
    "rio-02",
    G,
    Level.SHOULD,
    "VFIO_USER_REGION_READ",
    "refuses reads that start or end past "
    "the region's end, or name a region that does not exist (EINVAL)",
)
async def read_bounds(probe: Probe) -> None:
    survey, size, wire = await _config_wire(probe)
    cases = (
        (size - 2, CONFIG, 4, "ending past the end"),
        (size, CONFIG, 4, "at the end"),
        ((1 << 64) - 2, CONFIG, 4, "whose end wraps"),
        (0, survey.info.num_regions, 4, "of region num_regions"),
    )
    for offset, region, count, what in cases:
        payload = _ACCESS.pack(offset, region, count)
        await probe.call_refused(
            wire,
            Command.REGION_READ,
            payload,
            what=f"REGION_READ {what}",
            errnos=EINVAL,
            may_close=False,
        )


@check(
    "rio-03",
    G,
    Level.SHOULD,
    "VFIO_USER_REGION_READ",
    "answers a zero-length read without "
    "harm: an empty success or an error, and serves the next command",
)
async def read_zero(probe: Probe) -> str:
    _survey, _size, wire = await _config_wire(probe)
    payload = _ACCESS.pack(0, CONFIG, 0)
    header, reply = await wire.call(Command.REGION_READ, payload)
    if reply is None:
        probe.fail(
            "hung up on a zero-length read",
            sent=hexdump(payload),
            expected="a reply (empty data or an error)",
        )
    if reply.header.is_error:
        outcome = "refused"
    else:
        probe.expect_reply(header, reply, what="zero-length REGION_READ", payload=payload)
        if len(reply.payload) != _ACCESS.size:
            probe.warn(
                f"the reply to a zero-length read is {len(reply.payload)} bytes",
                received=describe(reply),
                expected="the 16-byte {offset, region, count} echo and no data",
            )
        outcome = "answered empty"
    check_payload = _ACCESS.pack(0, CONFIG, 2)
    await probe.call_ok(
        wire, Command.REGION_READ, check_payload, what="REGION_READ after a zero-length one"
    )
    return outcome


@check(
    "rio-04",
    G,
    Level.SHOULD,
    "Read and Write Operations",
    "refuses a REGION_READ whose count "
    "is above its max_data_xfer_size (EINVAL), without sending that much",
)
async def read_too_big(probe: Probe) -> None:
    survey, _size, wire = await _config_wire(probe)
    payload = _ACCESS.pack(0, CONFIG, survey.capabilities.max_data_xfer_size + 4096)
    await probe.call_refused(
        wire,
        Command.REGION_READ,
        payload,
        what="REGION_READ above max_data_xfer_size",
        errnos=EINVAL,
        may_close=False,
    )


@check(
    "rio-05",
    G,
    Level.SHOULD,
    "VFIO_USER_REGION_WRITE",
    "refuses a REGION_WRITE whose data is shorter or longer than its count (EINVAL)",
)
async def write_size(probe: Probe) -> None:
    _survey, _size, wire = await _config_wire(probe)
    line = await _interrupt_line(probe, wire)
    # Were it accepted, either write only puts the register's own value back.
    for payload, what in (
        (_ACCESS.pack(INTERRUPT_LINE, CONFIG, 2) + line, "1 data byte for count 2"),
        (_ACCESS.pack(INTERRUPT_LINE, CONFIG, 1) + line * 2, "2 data bytes for count 1"),
    ):
        await probe.call_refused(
            wire,
            Command.REGION_WRITE,
            payload,
            what=f"REGION_WRITE with {what}",
            errnos=EINVAL,
            may_close=False,
        )


async def _access(probe: Probe, wire: Wire, offset: int, data: bytes | None) -> bytes:
    """Read one byte of config space (``data`` None) or write ``data`` there."""
    if data is None:
        header, reply = await wire.call(Command.REGION_READ, _ACCESS.pack(offset, CONFIG, 1))
        frame = probe.expect_reply(header, reply, what=f"config read at {offset:#x}")
        return bytes(frame.payload[_ACCESS.size : _ACCESS.size + 1])
    payload = _ACCESS.pack(offset, CONFIG, len(data)) + data
    await probe.call_ok(wire, Command.REGION_WRITE, payload, what=f"config write at {offset:#x}")
    return data


async def _interrupt_line(probe: Probe, wire: Wire) -> bytes:
    header, reply = await wire.call(Command.REGION_READ, _ACCESS.pack(INTERRUPT_LINE, CONFIG, 1))
    frame = probe.expect_reply(header, reply, what="REGION_READ of the Interrupt Line")
    return bytes(frame.payload[_ACCESS.size : _ACCESS.size + 1])


@check(
    "rio-06",
    G,
    Level.MUST,
    "VFIO_USER_REGION_WRITE",
    "answers REGION_WRITE with offset, "
    "region and count echoed, and the data written reads back (the Interrupt Line's own value)",
)
async def write_echo(probe: Probe) -> None:
    _survey, _size, wire = await _config_wire(probe)
    line = await _interrupt_line(probe, wire)
    payload = _ACCESS.pack(INTERRUPT_LINE, CONFIG, 1) + line
    frame = await probe.call_ok(
        wire, Command.REGION_WRITE, payload, what="REGION_WRITE of the Interrupt Line"
    )
    if len(frame.payload) < _ACCESS.size or _ACCESS.unpack_from(frame.payload) != (
        INTERRUPT_LINE,
        CONFIG,
        1,
    ):
        probe.fail(
            "the reply does not echo {offset 0x3c, region 7, count 1}",
            sent=hexdump(payload),
            received=describe(frame),
            expected="16 bytes: offset, region, count",
        )
    if len(frame.payload) != _ACCESS.size:
        probe.warn("the REGION_WRITE reply is longer than 16 bytes", received=describe(frame))
    after = await _interrupt_line(probe, wire)
    if after != line:
        probe.fail(
            "the Interrupt Line does not read back what was written",
            received=after.hex(),
            expected=line.hex(),
        )


@check(
    "rio-07",
    G,
    Level.SHOULD,
    "VFIO_USER_VERSION",
    "refuses REGION_WRITE_MULTI unless write_multiple was negotiated, and when it was, does "
    "every write and answers their count",
)
async def write_multi(probe: Probe) -> str:
    _survey, _size, wire = await _config_wire(probe)
    line = await _interrupt_line(probe, wire)
    entry = _WR_ONE.pack(INTERRUPT_LINE, CONFIG, 1, line.ljust(8, b"\0"))
    payload = struct.pack("=Q", 2) + entry * 2
    await probe.call_refused(
        wire,
        Command.REGION_WRITE_MULTI,
        payload,
        what="REGION_WRITE_MULTI without write_multiple",
        may_close=False,
    )
    wire = await probe.connect(capabilities=Capabilities(max_msg_fds=16, write_multiple=True))
    assert wire.negotiated is not None
    if not wire.negotiated.write_multiple:
        return "write_multiple not offered"
    frame = await probe.call_ok(
        wire, Command.REGION_WRITE_MULTI, payload, what="REGION_WRITE_MULTI"
    )
    if len(frame.payload) < 8 or struct.unpack_from("=Q", frame.payload)[0] != 2:
        probe.fail(
            "the REGION_WRITE_MULTI reply does not count 2 writes",
            received=describe(frame),
            expected="wr_cnt 2 (u64)",
        )
    if await _interrupt_line(probe, wire) != line:
        probe.fail("the Interrupt Line does not read back what REGION_WRITE_MULTI wrote")
    return "write_multiple offered and working"
