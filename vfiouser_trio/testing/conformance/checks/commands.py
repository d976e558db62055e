"""commands: the info commands' replies, their exact sizes and the argsz rule (spec:
"VFIO_USER_DEVICE_GET_INFO", "VFIO_USER_DEVICE_GET_REGION_INFO", "VFIO_USER_DEVICE_GET_IRQ_INFO",
"Message sizes")."""

from __future__ import annotations

import errno

from ....protocol.constants import (
    DEVICE_FLAGS_RESET,
    PCI_NUM_REGIONS,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    Command,
    PciRegion,
)
from ....protocol.framing import close_fds
from ....protocol.regions import RegionInfoReply
from ..context import Probe
from ..layouts import DEVICE_INFO as _INFO
from ..layouts import IO_FDS as _IO_FDS
from ..layouts import REGION_INFO as _REGION
from ..layouts import SUB_REGION as _SUB_REGION
from ..model import Level, check
from ..wire import describe, hexdump

G = "commands"
REGION_INFO_SIZE = _REGION.size
EINVAL = frozenset({errno.EINVAL})


@check(
    "cmd-01",
    G,
    Level.MUST,
    "VFIO_USER_DEVICE_GET_INFO",
    "answers DEVICE_GET_INFO with the "
    "16-byte structure, argsz 16, the PCI flag and at least the 9 PCI regions",
)
async def device_info(probe: Probe) -> str:
    wire = await probe.connect()
    payload = _INFO.pack(_INFO.size, 0, 0, 0)
    frame = await probe.call_ok(wire, Command.DEVICE_GET_INFO, payload, what="DEVICE_GET_INFO")
    if len(frame.payload) < _INFO.size:
        probe.fail(
            "the reply is shorter than the structure",
            received=describe(frame),
            expected="16 bytes: argsz, flags, num_regions, num_irqs",
        )
    argsz, flags, num_regions, num_irqs = _INFO.unpack_from(frame.payload)
    expected = "argsz 16, flags with VFIO_DEVICE_FLAGS_PCI (2), num_regions >= 9"
    if argsz < _INFO.size or not flags & 2 or num_regions < PCI_NUM_REGIONS:
        probe.fail(
            "the reply's fields are not a PCI device's", received=describe(frame), expected=expected
        )
    expect = probe.expectations
    for name, value, want in (
        ("num_regions", num_regions, expect.num_regions),
        ("num_irqs", num_irqs, expect.num_irqs),
    ):
        if want is not None and value != want:
            probe.fail(f"{name} is {value}, the device declares {want}", received=describe(frame))
    if expect.reset is not None and bool(flags & DEVICE_FLAGS_RESET) != expect.reset:
        probe.fail(
            f"VFIO_DEVICE_FLAGS_RESET is {'set' if flags & 1 else 'clear'}",
            received=describe(frame),
            expected=f"reset {'offered' if expect.reset else 'not offered'}",
        )
    if len(frame.payload) != _INFO.size:
        probe.warn(
            "the reply is longer than the structure (clients read exactly 16 bytes)",
            received=describe(frame),
            expected="a 16-byte payload",
        )
    return f"flags {flags:#x}, {num_regions} regions, {num_irqs} IRQ indexes"


@check(
    "cmd-02",
    G,
    Level.SHOULD,
    "Message sizes",
    "accepts a request longer than its structure "
    "and an argsz above the reply's size (kernel VFIO's argsz rule), replying 16 bytes",
)
async def device_info_argsz(probe: Probe) -> None:
    wire = await probe.connect()
    payload = _INFO.pack(256, 0, 0, 0) + bytes(240)
    frame = await probe.call_ok(
        wire,
        Command.DEVICE_GET_INFO,
        payload,
        what="DEVICE_GET_INFO with argsz 256 and trailing bytes",
    )
    if len(frame.payload) != _INFO.size or _INFO.unpack_from(frame.payload)[0] != _INFO.size:
        probe.warn(
            "the reply is not the 16-byte structure with argsz 16",
            sent=hexdump(payload),
            received=describe(frame),
            expected="16 bytes, argsz 16",
        )


@check(
    "cmd-03",
    G,
    Level.SHOULD,
    "Message sizes",
    "refuses DEVICE_GET_INFO whose argsz cannot "
    "hold the reply, and one shorter than the structure (EINVAL)",
)
async def device_info_small(probe: Probe) -> None:
    wire = await probe.connect()
    for payload, what in (
        (_INFO.pack(8, 0, 0, 0), "argsz 8"),
        (b"\x10\0\0\0", "a 4-byte payload"),
    ):
        await probe.call_refused(
            wire,
            Command.DEVICE_GET_INFO,
            payload,
            what=f"DEVICE_GET_INFO with {what}",
            errnos=EINVAL,
            may_close=False,
        )


@check(
    "cmd-04",
    G,
    Level.MUST,
    "VFIO_USER_DEVICE_GET_REGION_INFO",
    "answers GET_REGION_INFO for "
    "every region: index echoed, argsz at least 32, no more payload than the request's argsz, "
    "a well-formed capability chain",
)
async def region_info(probe: Probe) -> str:
    survey = await probe.survey()
    wire = await probe.connect()
    described = []
    for index in range(len(survey.regions)):
        payload = _REGION.pack(REGION_INFO_SIZE, 0, index, 0, 0, 0)
        header, reply = await wire.call(Command.DEVICE_GET_REGION_INFO, payload)
        what = f"GET_REGION_INFO {index}"
        if reply is not None and reply.header.is_error and index != PciRegion.CONFIG:
            continue  # a region the device lacks (VGA, ROM...) may be refused
        frame = probe.expect_reply(header, reply, what=what, payload=payload)
        fds = frame.take_fds()
        close_fds(fds)
        if len(frame.payload) < REGION_INFO_SIZE:
            probe.fail(
                f"{what}: the reply is shorter than the 32-byte structure", received=describe(frame)
            )
        argsz, flags, got_index, _cap_offset, size, _offset = _REGION.unpack_from(frame.payload)
        if got_index != index or argsz < REGION_INFO_SIZE:
            probe.fail(
                f"{what}: index or argsz wrong",
                received=describe(frame),
                expected=f"index {index}, argsz >= 32",
            )
        if len(frame.payload) > REGION_INFO_SIZE:
            probe.warn(
                f"{what}: the reply is longer than the request's argsz 32",
                received=describe(frame),
                expected="32 bytes; the full size in argsz (the client asks again)",
            )
        if argsz > REGION_INFO_SIZE:
            # The capabilities: ask again with room for them, and read the chain.
            payload = _REGION.pack(argsz, 0, index, 0, 0, 0)
            frame = await probe.call_ok(
                wire, Command.DEVICE_GET_REGION_INFO, payload, what=f"{what} with argsz {argsz}"
            )
            fds = frame.take_fds()
            try:
                RegionInfoReply.unpack(frame.payload, fds)
            except Exception as exc:
                probe.fail(
                    f"{what} with argsz {argsz}: the capability chain is malformed: {exc}",
                    received=describe(frame),
                )
            finally:
                close_fds(fds)
        if index == PciRegion.CONFIG:
            rw = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
            if size < 256:
                probe.fail(
                    f"{what}: the config space region is smaller than 256 bytes",
                    received=describe(frame),
                )
            if flags & rw != rw:
                # Linux vfio-pci sets both; libvfio-user's config region sets neither.
                probe.warn(
                    f"{what}: the config space region's flags say it is not readable and writable",
                    received=describe(frame),
                    expected="VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE",
                )
        if size:
            described.append(f"{index}: {size:#x}")
    return "regions " + ", ".join(described)


@check(
    "cmd-05",
    G,
    Level.SHOULD,
    "VFIO_USER_DEVICE_GET_REGION_INFO",
    "refuses GET_REGION_INFO of an index past num_regions, and argsz below 32 (EINVAL)",
)
async def region_info_bad(probe: Probe) -> None:
    survey = await probe.survey()
    wire = await probe.connect()
    cases = (
        (
            _REGION.pack(REGION_INFO_SIZE, 0, survey.info.num_regions, 0, 0, 0),
            "index num_regions",
        ),
        (_REGION.pack(REGION_INFO_SIZE, 0, 0xFFFFFFFF, 0, 0, 0), "index 0xffffffff"),
        (_REGION.pack(16, 0, PciRegion.CONFIG, 0, 0, 0), "argsz 16"),
    )
    for payload, what in cases:
        await probe.call_refused(
            wire,
            Command.DEVICE_GET_REGION_INFO,
            payload,
            what=f"GET_REGION_INFO with {what}",
            errnos=EINVAL,
            may_close=False,
        )


@check(
    "cmd-06",
    G,
    Level.SHOULD,
    "Message sizes",
    "accepts GET_REGION_INFO with trailing bytes "
    "and a large argsz, replying argsz the size it needs",
)
async def region_info_argsz(probe: Probe) -> None:
    wire = await probe.connect()
    payload = _REGION.pack(4096, 0, PciRegion.CONFIG, 0, 0, 0) + bytes(64)
    frame = await probe.call_ok(
        wire,
        Command.DEVICE_GET_REGION_INFO,
        payload,
        what="GET_REGION_INFO with argsz 4096 and trailing bytes",
    )
    close_fds(frame.take_fds())
    if len(frame.payload) < REGION_INFO_SIZE or _REGION.unpack_from(frame.payload)[0] != len(
        frame.payload
    ):
        probe.warn(
            "the reply's argsz is not the size of the reply it sent",
            received=describe(frame),
            expected="argsz == the payload's size, when it all fits",
        )


@check(
    "cmd-07",
    G,
    Level.MUST,
    "VFIO_USER_DEVICE_GET_IRQ_INFO",
    "answers GET_IRQ_INFO for every index below num_irqs with the 16-byte structure, index echoed",
)
async def irq_info(probe: Probe) -> str:
    survey = await probe.survey()
    wire = await probe.connect()
    seen = []
    for index in range(survey.info.num_irqs):
        payload = _INFO.pack(_INFO.size, 0, index, 0)
        frame = await probe.call_ok(
            wire, Command.DEVICE_GET_IRQ_INFO, payload, what=f"GET_IRQ_INFO {index}"
        )
        if len(frame.payload) < _INFO.size:
            probe.fail(
                f"GET_IRQ_INFO {index}: the reply is shorter than 16 bytes",
                received=describe(frame),
            )
        argsz, _flags, got, count = _INFO.unpack_from(frame.payload)
        if got != index or argsz < _INFO.size:
            probe.fail(
                f"GET_IRQ_INFO {index}: index or argsz wrong",
                received=describe(frame),
                expected=f"index {index}, argsz 16",
            )
        if len(frame.payload) != _INFO.size:
            probe.warn(
                f"GET_IRQ_INFO {index}: the reply is longer than 16 bytes", received=describe(frame)
            )
        seen.append(f"{index}: {count}")
    return "vectors " + ", ".join(seen)


@check(
    "cmd-08",
    G,
    Level.SHOULD,
    "VFIO_USER_DEVICE_GET_IRQ_INFO",
    "refuses GET_IRQ_INFO of an index past num_irqs (EINVAL)",
)
async def irq_info_bad(probe: Probe) -> None:
    survey = await probe.survey()
    wire = await probe.connect()
    payload = _INFO.pack(_INFO.size, 0, survey.info.num_irqs, 0)
    await probe.call_refused(
        wire,
        Command.DEVICE_GET_IRQ_INFO,
        payload,
        what=f"GET_IRQ_INFO {survey.info.num_irqs}",
        errnos=EINVAL,
        may_close=False,
    )


@check(
    "cmd-09",
    G,
    Level.SHOULD,
    "VFIO_USER_DEVICE_RESET",
    "answers DEVICE_RESET when it offers it (VFIO_DEVICE_FLAGS_RESET), with an empty reply",
)
async def reset(probe: Probe) -> None:
    survey = await probe.survey()
    if not survey.info.supports_reset:
        probe.skip("the device does not offer DEVICE_RESET")
    if not probe.expectations.allow_reset:
        probe.skip("the device's expectations forbid resetting it")
    wire = await probe.connect()
    header, reply = await wire.call(Command.DEVICE_RESET)
    frame = probe.expect_reply(header, reply, what="DEVICE_RESET")
    if frame.payload:
        probe.warn(
            "the DEVICE_RESET reply carries a payload",
            received=describe(frame),
            expected="an empty reply",
        )


@check(
    "cmd-10",
    G,
    Level.SHOULD,
    "VFIO_USER_DEVICE_GET_REGION_IO_FDS",
    "answers GET_REGION_IO_FDS for every region (an error where it has none): index echoed, "
    "flags 0, argsz covering the sub-regions, each inside the region and naming an fd it sent",
)
async def io_fds(probe: Probe) -> str:
    survey = await probe.survey()
    wire = await probe.connect()
    offered = []
    for index, region in enumerate(survey.regions):
        if region is None or not region.size:
            continue
        what = f"GET_REGION_IO_FDS {index}"
        payload = _IO_FDS.pack(_IO_FDS.size, 0, index, 0)
        header, reply = await wire.call(Command.DEVICE_GET_REGION_IO_FDS, payload)
        if reply is not None and reply.header.is_error:
            continue  # no io fds for this region
        frame = probe.expect_reply(header, reply, what=what, payload=payload)
        close_fds(frame.take_fds())
        if len(frame.payload) < _IO_FDS.size:
            probe.fail(f"{what}: the reply is shorter than 16 bytes", received=describe(frame))
        argsz, flags, got, count = _IO_FDS.unpack_from(frame.payload)
        if got != index or flags:
            probe.fail(
                f"{what}: index or flags wrong",
                received=describe(frame),
                expected=f"index {index}, flags 0",
            )
        if not count:
            continue
        if argsz < _IO_FDS.size + count * _SUB_REGION.size:
            probe.fail(
                f"{what}: argsz {argsz} cannot hold {count} sub-regions",
                received=describe(frame),
                expected=f"argsz >= {16 + 40 * count}",
            )
        payload = _IO_FDS.pack(argsz, 0, index, 0)
        frame = await probe.call_ok(
            wire, Command.DEVICE_GET_REGION_IO_FDS, payload, what=f"{what} with argsz {argsz}"
        )
        fds = frame.take_fds()
        close_fds(fds)
        entry = (argsz - _IO_FDS.size) // count
        if not fds or len(frame.payload) < _IO_FDS.size + count * entry:
            probe.fail(
                f"{what} with argsz {argsz}: {len(fds)} fds, {len(frame.payload)} bytes "
                f"for {count} sub-regions",
                received=describe(frame),
                expected="every sub-region, and at least one fd",
            )
        for i in range(count):
            offset, size, fd_index, kind, _flags, _match = _SUB_REGION.unpack_from(
                frame.payload, _IO_FDS.size + i * entry
            )
            if fd_index >= len(fds) or kind not in (0, 1) or offset + size > region.size:
                probe.fail(
                    f"{what}: sub-region {i} (offset {offset:#x} size {size:#x} fd_index "
                    f"{fd_index} type {kind}) is not valid",
                    received=describe(frame),
                    expected=f"inside the region's {region.size:#x} bytes, one of "
                    f"{len(fds)} fds, type 0 or 1",
                )
        offered.append(f"region {index}: {count}")
    return "io fds: " + (", ".join(offered) if offered else "none")
