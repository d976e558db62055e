"""migration: DEVICE_FEATURE's migration features, the state machine's arcs and MIG_DATA's
rules (spec: "VFIO_USER_DEVICE_FEATURE", "Direct State Transitions",
"VFIO_USER_MIG_DATA_READ"). Every check that moves the device's state brings it back to
RUNNING (and, if a refused arc left it in ERROR, resets it)."""

from __future__ import annotations

import errno
import struct

from ....protocol.constants import (
    DEVICE_FEATURE_GET,
    DEVICE_FEATURE_PROBE,
    DEVICE_FEATURE_SET,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    Command,
    Feature,
    MigState,
)
from ..context import Probe
from ..layouts import DMA_MAP as _DMA_MAP
from ..layouts import FEATURE as _FEATURE
from ..layouts import LOG_CONTROL as _LOG_CONTROL
from ..layouts import LOG_RANGE as _LOG_RANGE
from ..layouts import LOG_REPORT as _LOG_REPORT
from ..layouts import MIG_DATA as _MIG_DATA
from ..layouts import MIG_STATE as _STATE
from ..model import Level, check
from ..wire import Wire, describe, hexdump

G = "migration"
RUNNING, STOP, STOP_COPY, RESUMING, PRE_COPY = (
    MigState.RUNNING,
    MigState.STOP,
    MigState.STOP_COPY,
    MigState.RESUMING,
    MigState.PRE_COPY,
)


def _feature(flags: int, data: bytes = b"", argsz: int = 0) -> bytes:
    return _FEATURE.pack(argsz or _FEATURE.size + len(data), flags) + data


async def _migration_flags(probe: Probe, wire: Wire) -> int | None:
    """The MIGRATION feature's flags, or None if the device does not offer migration."""
    payload = _feature(DEVICE_FEATURE_GET | Feature.MIGRATION, argsz=16)
    header, reply = await wire.call(Command.DEVICE_FEATURE, payload)
    if reply is not None and reply.header.is_error:
        return None
    frame = probe.expect_reply(header, reply, what="DEVICE_FEATURE GET MIGRATION", payload=payload)
    if len(frame.payload) < 16:
        probe.fail(
            "the GET MIGRATION reply has no 8-byte flags",
            sent=hexdump(payload),
            received=describe(frame),
            expected="argsz, flags, then the u64 migration flags",
        )
    return int(struct.unpack_from("=Q", frame.payload, 8)[0])


async def _migratable(probe: Probe) -> tuple[Wire, int]:
    wire = await probe.connect()
    flags = await _migration_flags(probe, wire)
    if flags is None:
        probe.skip("the device does not offer migration")
    return wire, flags


async def get_state(probe: Probe, wire: Wire) -> int:
    payload = _feature(DEVICE_FEATURE_GET | Feature.MIG_DEVICE_STATE, argsz=16)
    frame = await probe.call_ok(wire, Command.DEVICE_FEATURE, payload, what="GET MIG_DEVICE_STATE")
    if len(frame.payload) != 16:
        probe.warn(
            "the GET MIG_DEVICE_STATE reply is not 16 bytes",
            received=describe(frame),
            expected="argsz, flags, device_state, data_fd",
        )
    if len(frame.payload) < 12:
        probe.fail("the GET MIG_DEVICE_STATE reply carries no state", received=describe(frame))
    return int(struct.unpack_from("=I", frame.payload, 8)[0])


async def set_state(probe: Probe, wire: Wire, state: int) -> bool:
    """SET the state: True if done (the reply echoes the request), False if refused."""
    payload = _feature(DEVICE_FEATURE_SET | Feature.MIG_DEVICE_STATE, _STATE.pack(state, -1))
    header, reply = await wire.call(Command.DEVICE_FEATURE, payload)
    if reply is not None and reply.header.is_error:
        return False
    what = f"SET MIG_DEVICE_STATE {_name(state)}"
    frame = probe.expect_reply(header, reply, what=what, payload=payload)
    if (
        frame.payload[:8] != payload[:8]
        or len(frame.payload) < 12
        or frame.payload[8:12] != payload[8:12]
    ):
        probe.warn(
            f"{what}: the reply is not the request's payload",
            sent=hexdump(payload),
            received=describe(frame),
            expected="the request's payload (spec: DEVICE_FEATURE reply)",
        )
    return True


def _name(state: int) -> str:
    return MigState(state).name if state in MigState._value2member_map_ else str(state)


async def _back_to_running(probe: Probe, wire: Wire) -> None:
    """Leave the device RUNNING: STOP then RUNNING, or DEVICE_RESET out of ERROR."""
    state = await get_state(probe, wire)
    if state in (STOP_COPY, RESUMING):
        await set_state(probe, wire, STOP)
        state = await get_state(probe, wire)
    if state in (MigState.ERROR, RESUMING) and probe.expectations.allow_reset:
        # Stuck (a refused arc, or a RESUMING left without data): only a reset frees it.
        await wire.call(Command.DEVICE_RESET)
        state = await get_state(probe, wire)
    if state != RUNNING:
        await set_state(probe, wire, RUNNING)
    if await get_state(probe, wire) != RUNNING:
        probe.warn(
            "the device could not be brought back to RUNNING",
            expected="RUNNING after SET RUNNING (or DEVICE_RESET)",
        )


@check(
    "mig-01",
    G,
    Level.INFO,
    "VFIO_DEVICE_FEATURE_MIGRATION",
    "migration offered (the MIGRATION feature's flags) and DMA logging probed",
)
async def offered(probe: Probe) -> str:
    wire = await probe.connect()
    flags = await _migration_flags(probe, wire)
    probe_log = _feature(DEVICE_FEATURE_PROBE | DEVICE_FEATURE_SET | Feature.DMA_LOGGING_START)
    _header, reply = await wire.call(Command.DEVICE_FEATURE, probe_log)
    logging = reply is not None and reply.header.is_reply and not reply.header.is_error
    if flags is None:
        return f"no migration; DMA logging {'offered' if logging else 'not offered'}"
    names = [
        n
        for bit, n in (
            (MIGRATION_STOP_COPY, "STOP_COPY"),
            (2, "P2P"),
            (MIGRATION_PRE_COPY, "PRE_COPY"),
        )
        if flags & bit
    ]
    logs = "offered" if logging else "not offered"
    return f"migration flags {flags:#x} ({' '.join(names)}); DMA logging {logs}"


@check(
    "mig-02",
    G,
    Level.MUST,
    "VFIO_DEVICE_FEATURE_MIGRATION",
    "offering migration, sets "
    "VFIO_MIGRATION_STOP_COPY, answers PROBE of MIGRATION and MIG_DEVICE_STATE, and starts "
    "RUNNING",
)
async def basics(probe: Probe) -> str:
    wire, flags = await _migratable(probe)
    if not flags & MIGRATION_STOP_COPY:
        probe.fail(
            f"migration flags {flags:#x} lack STOP_COPY",
            expected="VFIO_MIGRATION_STOP_COPY (1) set",
        )
    for feature in (Feature.MIGRATION, Feature.MIG_DEVICE_STATE):
        payload = _feature(DEVICE_FEATURE_PROBE | DEVICE_FEATURE_GET | feature)
        await probe.call_ok(
            wire, Command.DEVICE_FEATURE, payload, what=f"DEVICE_FEATURE PROBE|GET {feature.name}"
        )
    state = await get_state(probe, wire)
    if state != RUNNING:
        probe.fail(f"a new client finds the device in state {state}", expected="RUNNING (2)")
    return f"flags {flags:#x}"


@check(
    "mig-03",
    G,
    Level.MUST,
    "Direct State Transitions",
    "takes every direct arc the spec "
    "lists (RUNNING-STOP, STOP-STOP_COPY, STOP-RESUMING, and PRE_COPY's when offered), each "
    "reported by GET",
)
async def arcs(probe: Probe) -> str:
    wire, flags = await _migratable(probe)
    path = [STOP, STOP_COPY, STOP, RUNNING]
    if flags & MIGRATION_PRE_COPY:
        path += [PRE_COPY, RUNNING, PRE_COPY, STOP_COPY, STOP, RUNNING]
    # Last, as leaving it without data may fail (the spec lets RESUMING -> STOP refuse an
    # incomplete stream): _back_to_running then resets the device.
    path += [STOP, RESUMING]
    done = [RUNNING]
    try:
        for state in path:
            if not await set_state(probe, wire, state):
                probe.fail(
                    f"the arc {MigState(done[-1]).name} -> {MigState(state).name} was refused",
                    received=wire.log[-1],
                    expected="a success reply",
                )
            now = await get_state(probe, wire)
            if now != state:
                probe.fail(
                    f"after SET {MigState(state).name}, GET says {now}", expected=str(int(state))
                )
            done.append(state)
    finally:
        if not wire.closed:
            await _back_to_running(probe, wire)
    return " -> ".join(MigState(s).name for s in done)


@check(
    "mig-04",
    G,
    Level.SHOULD,
    "Direct State Transitions",
    "refuses STOP_COPY -> PRE_COPY, and "
    "states that cannot be asked for (ERROR, the P2P states, unknown numbers)",
)
async def illegal(probe: Probe) -> None:
    wire, flags = await _migratable(probe)
    try:
        asked = [MigState.ERROR, MigState.RUNNING_P2P, MigState.PRE_COPY_P2P, 99]
        for state in asked:
            if await set_state(probe, wire, state):
                probe.fail(f"SET MIG_DEVICE_STATE {state} was accepted", expected="an error reply")
            await _back_to_running(probe, wire)
        if flags & MIGRATION_PRE_COPY:
            for state in (STOP, STOP_COPY):
                await set_state(probe, wire, state)
            if await set_state(probe, wire, PRE_COPY):
                probe.fail(
                    "STOP_COPY -> PRE_COPY was accepted",
                    expected="an error reply (the spec forbids it)",
                )
    finally:
        if not wire.closed:
            await _back_to_running(probe, wire)


@check(
    "mig-05",
    G,
    Level.SHOULD,
    "VFIO_USER_MIG_DATA_READ",
    "refuses MIG_DATA_READ outside the saving states and MIG_DATA_WRITE outside RESUMING",
)
async def mig_data_rules(probe: Probe) -> None:
    wire, _flags = await _migratable(probe)
    read = _MIG_DATA.pack(_MIG_DATA.size, 64)
    await probe.call_refused(
        wire, Command.MIG_DATA_READ, read, what="MIG_DATA_READ while RUNNING", may_close=False
    )
    write = _MIG_DATA.pack(_MIG_DATA.size + 8, 8) + bytes(8)
    await probe.call_refused(
        wire, Command.MIG_DATA_WRITE, write, what="MIG_DATA_WRITE while RUNNING", may_close=False
    )


@check(
    "mig-06",
    G,
    Level.SHOULD,
    "VFIO_USER_DEVICE_FEATURE",
    "refuses DEVICE_FEATURE with both GET "
    "and SET (without PROBE), or an unknown feature (EINVAL or ENOTTY/ENOTSUP)",
)
async def feature_rules(probe: Probe) -> None:
    wire = await probe.connect()
    codes = frozenset({errno.EINVAL, errno.ENOTTY, errno.ENOTSUP})
    for what, payload in (
        (
            "GET|SET MIG_DEVICE_STATE",
            _feature(
                DEVICE_FEATURE_GET | DEVICE_FEATURE_SET | Feature.MIG_DEVICE_STATE,
                _STATE.pack(RUNNING, -1),
            ),
        ),
        ("GET of feature 0x7777", _feature(DEVICE_FEATURE_GET | 0x7777, argsz=64)),
    ):
        await probe.call_refused(
            wire,
            Command.DEVICE_FEATURE,
            payload,
            what=f"DEVICE_FEATURE {what}",
            errnos=codes,
            may_close=False,
        )


@check(
    "mig-07",
    G,
    Level.MUST,
    "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT",
    "offering DMA logging, starts it over a mapped range, reports a u64 bitmap of the range "
    "(nothing dirty without DMA, no bits past the range) and stops it",
)
async def dirty_logging(probe: Probe) -> str:
    wire = await probe.connect()
    page, pages = 4096, 8
    base = probe.expectations.dma_base
    start = _feature(DEVICE_FEATURE_PROBE | DEVICE_FEATURE_SET | Feature.DMA_LOGGING_START)
    _header, reply = await wire.call(Command.DEVICE_FEATURE, start)
    if reply is None or reply.header.is_error:
        probe.skip("the device does not offer DMA logging")
    mapping = _DMA_MAP.pack(_DMA_MAP.size, 3, 0, base, pages * page)
    await probe.call_ok(wire, Command.DMA_MAP, mapping, what="DMA_MAP")
    control = _LOG_CONTROL.pack(page, 1, 0) + _LOG_RANGE.pack(base, pages * page)
    payload = _feature(DEVICE_FEATURE_SET | Feature.DMA_LOGGING_START, control)
    await probe.call_ok(wire, Command.DEVICE_FEATURE, payload, what="SET DMA_LOGGING_START")
    try:
        # A report of 7 pages: one u64 word, whose bits past the 7th must be zero.
        report = _LOG_REPORT.pack(base, 7 * page, page)
        argsz = _FEATURE.size + _LOG_REPORT.size + 8
        payload = _feature(DEVICE_FEATURE_GET | Feature.DMA_LOGGING_REPORT, report, argsz=argsz)
        frame = await probe.call_ok(
            wire, Command.DEVICE_FEATURE, payload, what="GET DMA_LOGGING_REPORT"
        )
        if len(frame.payload) != argsz or frame.payload[8:32] != report:
            probe.fail(
                "the report is not the request's fields and one u64 of bitmap",
                sent=hexdump(payload),
                received=describe(frame),
                expected=f"{argsz} bytes: argsz, flags, iova, length, page_size, bitmap",
            )
        bitmap = struct.unpack_from("=Q", frame.payload, 32)[0]
        if bitmap:
            probe.fail(
                f"bitmap {bitmap:#x} with no DMA done (or bits past the range)",
                received=describe(frame),
                expected="0",
            )
    finally:
        if not wire.closed:
            stop = _feature(
                DEVICE_FEATURE_SET | Feature.DMA_LOGGING_STOP, _LOG_CONTROL.pack(page, 0, 0)
            )
            await probe.call_ok(wire, Command.DEVICE_FEATURE, stop, what="SET DMA_LOGGING_STOP")
    return "started, reported and stopped"


#: Bytes one MIG_DATA_READ asks for, and the most the checker reads of a stream.
MIG_CHUNK = 4096
MIG_STREAM_MAX = 16 << 20


async def _read_stream(probe: Probe, wire: Wire) -> bytes:
    """MIG_DATA_READ until a short read (the end of the stream), checking every reply."""
    stream = bytearray()
    padded: list[int] = []
    while len(stream) < MIG_STREAM_MAX:
        payload = _MIG_DATA.pack(_MIG_DATA.size + MIG_CHUNK, MIG_CHUNK)
        frame = await probe.call_ok(
            wire, Command.MIG_DATA_READ, payload, what="MIG_DATA_READ in STOP_COPY"
        )
        if len(frame.payload) < _MIG_DATA.size:
            probe.fail("the MIG_DATA_READ reply is shorter than 8 bytes", received=describe(frame))
        argsz, size = _MIG_DATA.unpack_from(frame.payload)
        # Bytes past 8 + size are padding (libvfio-user pads the reply to the size asked).
        if size > MIG_CHUNK or len(frame.payload) < _MIG_DATA.size + size or argsz != 8 + size:
            probe.fail(
                "the MIG_DATA_READ reply's argsz, size and data disagree",
                received=describe(frame),
                expected=f"size <= {MIG_CHUNK}, size bytes of data, argsz = 8 + size",
            )
        if len(frame.payload) > _MIG_DATA.size + size and not padded:
            padded.append(len(frame.payload) - _MIG_DATA.size - size)
        stream += frame.payload[_MIG_DATA.size : _MIG_DATA.size + size]
        if size < MIG_CHUNK:
            if padded:
                probe.note("replies padded past their data to the size asked")
            return bytes(stream)
    probe.skip(f"the stream is longer than the {MIG_STREAM_MAX} bytes the checker reads")


@check(
    "mig-08",
    G,
    Level.MUST,
    "VFIO_USER_MIG_DATA_READ",
    "in STOP_COPY, answers MIG_DATA_READ with at most the size asked, argsz = 8 + size, and "
    "ends the stream with a short read",
)
async def stream_read(probe: Probe) -> str:
    wire, _flags = await _migratable(probe)
    try:
        for state in (STOP, STOP_COPY):
            if not await set_state(probe, wire, state):
                probe.fail(f"SET {MigState(state).name} was refused", expected="a success reply")
        stream = await _read_stream(probe, wire)
    finally:
        if not wire.closed:
            await _back_to_running(probe, wire)
    return f"a {len(stream)}-byte stream"


@check(
    "mig-09",
    G,
    Level.SHOULD,
    "VFIO_USER_MIG_DATA_WRITE",
    "takes its own saved state back: the stream it gave in STOP_COPY, written in RESUMING, "
    "then RESUMING -> STOP succeeds",
)
async def stream_resume(probe: Probe) -> str:
    wire, _flags = await _migratable(probe)
    try:
        for state in (STOP, STOP_COPY):
            await set_state(probe, wire, state)
        stream = await _read_stream(probe, wire)
        for state in (STOP, RESUMING):
            if not await set_state(probe, wire, state):
                probe.fail(f"SET {MigState(state).name} was refused", expected="a success reply")
        for start in range(0, len(stream), MIG_CHUNK):
            chunk = stream[start : start + MIG_CHUNK]
            payload = _MIG_DATA.pack(_MIG_DATA.size + len(chunk), len(chunk)) + chunk
            await probe.call_ok(
                wire, Command.MIG_DATA_WRITE, payload, what="MIG_DATA_WRITE in RESUMING"
            )
        if not await set_state(probe, wire, STOP):
            probe.fail(
                "RESUMING -> STOP refused the device's own saved state",
                received=wire.log[-1],
                expected="a success reply",
            )
    finally:
        if not wire.closed:
            await _back_to_running(probe, wire)
    return f"{len(stream)} bytes saved and restored"
