"""config: the PCI configuration space behind region 7 (spec: "Region Information"; the
layout is the PCI Local Bus specification's). Writes put back what they change."""

from __future__ import annotations

import struct

from ....protocol.constants import PCI_NUM_REGIONS, Command, PciRegion
from ..context import Probe, Survey
from ..layouts import REGION_ACCESS as _ACCESS
from ..model import Level, check
from ..wire import Wire, describe

G = "config"
S = "Region Information"
CONFIG = PciRegion.CONFIG
STATUS_CAP_LIST = 0x10
#: More capabilities than fit in the standard space (48 dwords past the header): a loop.
MAX_CAPS = 48
#: Same for the extended space (960 dwords past 0x100).
MAX_EXT_CAPS = 960


class Config:
    """Reads and writes of config space over one connection."""

    def __init__(self, probe: Probe, wire: Wire, size: int) -> None:
        self.probe, self.wire, self.size = probe, wire, size

    async def read(self, offset: int, count: int) -> bytes:
        payload = _ACCESS.pack(offset, CONFIG, count)
        header, reply = await self.wire.call(Command.REGION_READ, payload)
        frame = self.probe.expect_reply(
            header, reply, what=f"config read {offset:#x}+{count}", payload=payload
        )
        data = bytes(frame.payload[_ACCESS.size :])
        if len(data) != count:
            self.probe.fail(
                f"config read {offset:#x}+{count}: {len(data)} bytes came back",
                received=describe(frame),
            )
        return data

    async def read_int(self, offset: int, count: int) -> int:
        return int.from_bytes(await self.read(offset, count), "little")

    async def write(self, offset: int, data: bytes) -> bool:
        """Write; True if accepted (an error reply is an answer too: a refused write)."""
        payload = _ACCESS.pack(offset, CONFIG, len(data)) + data
        header, reply = await self.wire.call(Command.REGION_WRITE, payload)
        if reply is not None and reply.header.is_error:
            return False
        self.probe.expect_reply(
            header, reply, what=f"config write {offset:#x}+{len(data)}", payload=payload
        )
        return True


async def _config(probe: Probe) -> tuple[Survey, Config]:
    survey = await probe.survey()
    region = survey.regions[CONFIG] if len(survey.regions) > CONFIG else None
    if region is None or region.size < 64:
        probe.skip("the device has no config space region")
    return survey, Config(probe, await probe.connect(), region.size)


@check(
    "cfg-01",
    G,
    Level.MUST,
    S,
    "presents a type-0 header: a vendor ID, header type 0, and a "
    "Capabilities List status bit that agrees with the capability pointer",
)
async def header(probe: Probe) -> str:
    _survey, cfg = await _config(probe)
    vendor, device = struct.unpack("=HH", await cfg.read(0, 4))
    status = await cfg.read_int(0x06, 2)
    header_type = await cfg.read_int(0x0E, 1)
    pointer = await cfg.read_int(0x34, 1)
    if vendor in (0, 0xFFFF):
        probe.fail(f"vendor ID {vendor:#06x}", expected="a vendor ID (not 0 nor 0xffff)")
    if header_type & 0x7F:
        probe.fail(f"header type {header_type:#04x}", expected="header type 0 (an endpoint)")
    if bool(status & STATUS_CAP_LIST) != bool(pointer):
        probe.fail(
            f"status {status:#06x} and capability pointer {pointer:#04x} disagree",
            expected="the Capabilities List bit set exactly when the pointer is non-zero",
        )
    return f"{vendor:04x}:{device:04x}"


@check(
    "cfg-02",
    G,
    Level.MUST,
    S,
    "has a well-formed capability chain: each pointer in 0x40..0xfc, dword-aligned, no loop",
)
async def capabilities(probe: Probe) -> str:
    _survey, cfg = await _config(probe)
    if not await cfg.read_int(0x06, 2) & STATUS_CAP_LIST:
        return "no capabilities"
    pointer = await cfg.read_int(0x34, 1)
    seen: set[int] = set()
    ids: list[str] = []
    while pointer:
        if pointer < 0x40 or pointer & 3 or pointer in seen or len(seen) >= MAX_CAPS:
            probe.fail(
                f"capability pointer {pointer:#04x} after {[hex(p) for p in sorted(seen)]}",
                expected="pointers in 0x40..0xfc, dword-aligned, each once",
            )
        seen.add(pointer)
        cap_id, pointer = await cfg.read(pointer, 2)
        ids.append(f"{cap_id:#04x}")
    return "capabilities " + " ".join(ids)


@check(
    "cfg-03",
    G,
    Level.SHOULD,
    S,
    "has a well-formed extended capability chain from 0x100 when "
    "its config space is 4 KiB: offsets dword-aligned inside it, no loop",
)
async def extended(probe: Probe) -> str:
    _survey, cfg = await _config(probe)
    if cfg.size <= 256:
        probe.skip("config space is 256 bytes: no extended capabilities")
    offset = 0x100
    seen: set[int] = set()
    ids: list[str] = []
    while True:
        word = await cfg.read_int(offset, 4)
        if word in (0, 0xFFFFFFFF) and offset == 0x100:
            return "no extended capabilities"
        seen.add(offset)
        ids.append(f"{word & 0xFFFF:#06x}")
        offset = word >> 20
        if not offset:
            return "extended capabilities " + " ".join(ids)
        if (
            offset < 0x100
            or offset & 3
            or offset + 4 > cfg.size
            or offset in seen
            or len(seen) >= MAX_EXT_CAPS
        ):
            probe.fail(
                f"extended capability next offset {offset:#x} (after {ids})",
                expected="offsets in 0x100..size-4, dword-aligned, each once",
            )


@check(
    "cfg-04",
    G,
    Level.SHOULD,
    S,
    "keeps read-only registers (revision ID, class code, header "
    "type) when written: the write is ignored or refused",
)
async def read_only(probe: Probe) -> None:
    _survey, cfg = await _config(probe)
    for offset, count, name in ((0x08, 4, "revision ID and class code"), (0x0E, 1, "header type")):
        before = await cfg.read(offset, count)
        flipped = bytes(b ^ 0xFF for b in before)
        await cfg.write(offset, flipped)
        after = await cfg.read(offset, count)
        if after != before:
            await cfg.write(offset, before)  # leave the device as it was
            probe.fail(
                f"the {name} changed when written",
                received=after.hex(),
                expected=f"{before.hex()} (read-only)",
            )


@check(
    "cfg-05",
    G,
    Level.SHOULD,
    S,
    "sizes its BARs as PCI does (all-ones written, the size read "
    "back) to at least the region's size, a power of two, and an unimplemented BAR reads 0",
)
async def bar_sizing(probe: Probe) -> str:
    survey, cfg = await _config(probe)
    found, index = [], 0
    while index < 6:
        region = (
            survey.regions[index] if index < min(len(survey.regions), PCI_NUM_REGIONS) else None
        )
        offset = 0x10 + 4 * index
        original = await cfg.read(offset, 4)
        low = int.from_bytes(original, "little")
        is_64 = not low & 1 and (low >> 1) & 3 == 2
        width = 8 if is_64 and index < 5 else 4
        if width == 8:
            original = await cfg.read(offset, 8)
        await cfg.write(offset, b"\xff" * width)
        sized = await cfg.read_int(offset, width)
        await cfg.write(offset, original)
        mask = ~0x3 if low & 1 else ~0xF
        size = (~(sized & mask) + 1) & ((1 << (8 * width)) - 1)
        want = region.size if region is not None else 0
        if want and (size < want or size & (size - 1)):
            probe.fail(
                f"BAR{index} sizes to {size:#x}",
                received=f"{sized:#x} after all-ones",
                expected=f"a power of two >= the region's {want:#x}",
            )
        if not want and sized & mask:
            probe.fail(
                f"BAR{index} has no region but sizes to {size:#x}",
                received=f"{sized:#x} after all-ones",
                expected="0: an unimplemented BAR",
            )
        if await cfg.read(offset, width) != original:
            probe.fail(f"BAR{index} did not take back its value", expected=original.hex())
        if want:
            found.append(f"BAR{index} {size:#x}")
        index += width // 4
    return ", ".join(found) or "no BARs"
