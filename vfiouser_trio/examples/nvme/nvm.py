"""NVM command set I/O commands (NVMe 1.4, section 6): Read, Write, Flush, Write Zeroes,
Dataset Management. Other opcodes complete with Invalid Opcode (`Controller.io`)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from .command import Command, Handler, Outcome
from .identify import NSID
from .spec import INVALID_NAMESPACE, LBA_OUT_OF_RANGE, SUCCESS, IoOpcode, NvmeError

if TYPE_CHECKING:
    from .controller import NvmeController

ALL_NAMESPACES = 0xFFFF_FFFF
#: A Dataset Management range: context attributes, length in blocks, starting LBA.
DSM_RANGE = struct.Struct("<IIQ")


def _blocks(ctrl: NvmeController, cmd: Command, slba: int, count: int) -> tuple[int, int]:
    """(byte offset, byte length) of ``count`` blocks from ``slba``, checked."""
    if cmd.nsid != NSID:
        raise NvmeError(INVALID_NAMESPACE, f"namespace {cmd.nsid:#x}")
    if slba + count > ctrl.blocks:
        raise NvmeError(LBA_OUT_OF_RANGE, f"LBAs {slba}+{count} beyond {ctrl.blocks}")
    return slba << ctrl.lba_shift, count << ctrl.lba_shift


def _range(ctrl: NvmeController, cmd: Command) -> tuple[int, int]:
    """Read, Write and Write Zeroes: SLBA in CDW10-11, 0-based NLB in CDW12 bits 15:0."""
    return _blocks(ctrl, cmd, cmd.cdw10 | cmd.cdw11 << 32, (cmd.cdw12 & 0xFFFF) + 1)


async def read(ctrl: NvmeController, cmd: Command) -> Outcome:
    offset, length = _range(ctrl, cmd)
    ctrl.check_transfer(length)
    await ctrl.to_host(cmd, await ctrl.backing.read(offset, length))
    ctrl.stats.read(length)
    return SUCCESS, 0


async def write(ctrl: NvmeController, cmd: Command) -> Outcome:
    offset, length = _range(ctrl, cmd)
    ctrl.check_transfer(length)
    await ctrl.backing.write(offset, await ctrl.from_host(cmd, length))
    ctrl.stats.wrote(length)
    return SUCCESS, 0


async def flush(ctrl: NvmeController, cmd: Command) -> Outcome:
    if cmd.nsid not in (NSID, ALL_NAMESPACES):
        raise NvmeError(INVALID_NAMESPACE, f"Flush of namespace {cmd.nsid:#x}")
    await ctrl.backing.flush()
    return SUCCESS, 0


async def write_zeroes(ctrl: NvmeController, cmd: Command) -> Outcome:
    offset, length = _range(ctrl, cmd)
    await ctrl.backing.write_zeroes(offset, length)
    return SUCCESS, 0


async def dataset_management(ctrl: NvmeController, cmd: Command) -> Outcome:
    """Every range is checked; deallocation is advisory (DLFEAT 0: what a deallocated
    block reads is unspecified), so the data stays as it was."""
    count = (cmd.cdw10 & 0xFF) + 1
    raw = await ctrl.from_host(cmd, count * DSM_RANGE.size)
    for i in range(count):
        _, blocks, slba = DSM_RANGE.unpack_from(raw, i * DSM_RANGE.size)
        _blocks(ctrl, cmd, slba, blocks)
    return SUCCESS, 0


HANDLERS: dict[int, Handler] = {
    IoOpcode.READ: read,
    IoOpcode.WRITE: write,
    IoOpcode.FLUSH: flush,
    IoOpcode.WRITE_ZEROES: write_zeroes,
    IoOpcode.DATASET_MANAGEMENT: dataset_management,
}
