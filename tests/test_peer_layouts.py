"""Wire layouts real peers use, replayed over real sockets.

libvfio-user's client sends payloads longer than the structure (kernel VFIO's argsz
rule): its GET_REGION_INFO first asks with argsz 32, learns the size with the caps,
then re-sends its whole zeroed buffer of that size; its GET_INFO and GET_IRQ_INFO
buffers may be the kernel's newer 24-byte structures. QEMU lays DMA_READ replies and
DMA_WRITE requests out as {address u64, count u32, data} and answers DMA_WRITE with a
header-only reply.
"""

from __future__ import annotations

import mmap
import struct

import pytest
from raw_client import session

from vfiouser_trio.protocol import (
    DeviceGetInfoReply,
    IrqInfoReply,
    RegionInfoReply,
)
from vfiouser_trio.protocol.constants import Command, PciIrq
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.regions import SparseArea

pytestmark = pytest.mark.usefixtures("no_fd_leak")

PAGE = mmap.PAGESIZE
BAR1 = 1


def u32(*values: int) -> bytes:
    return struct.pack(f"={len(values)}I", *values)


class Sparse(Device):
    """BAR1 memory-backed with two sparse mmap areas: its caps take GET_REGION_INFO to 80 bytes."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10FF, class_code=0xFF0000))
        self.add_bar(BAR1, 4 * PAGE, sparse=[SparseArea(0, PAGE), SparseArea(2 * PAGE, PAGE)])


def _region_info_buffer(argsz: int, index: int) -> bytes:
    """libvfio-user's buffer: zeroed, argsz and index set, sent whole."""
    return u32(argsz, 0, index) + bytes(argsz - 12)


async def test_libvfio_user_region_info_resent_with_its_whole_buffer() -> None:
    async with session(Sparse()) as conn:
        first = await conn.request_raw(
            Command.DEVICE_GET_REGION_INFO, _region_info_buffer(32, BAR1)
        )
        first.close_fds()
        short = RegionInfoReply.unpack(first.payload)
        assert len(first.payload) == 32 and short.caps == ()
        assert short.argsz == 80  # the size it needs with its caps
        # msg_size 96: header + the 80-byte buffer, argsz 80.
        second = await conn.request_raw(
            Command.DEVICE_GET_REGION_INFO, _region_info_buffer(short.argsz, BAR1)
        )
        try:
            full = RegionInfoReply.unpack(second.payload, second.fds)
            assert len(second.payload) == 80 and full.argsz == 80
            assert full.sparse_mmap is not None
            assert [(a.offset, a.size) for a in full.sparse_mmap.areas] == [
                (0, PAGE),
                (2 * PAGE, PAGE),
            ]
        finally:
            second.close_fds()


async def test_libvfio_user_24_byte_get_info_and_irq_info() -> None:
    async with session(Sparse()) as conn:
        frame = await conn.request_raw(Command.DEVICE_GET_INFO, u32(24, 0, 0, 0, 0, 0))
        info = DeviceGetInfoReply.unpack(frame.payload)
        assert info.num_regions >= BAR1 + 1 and info.is_pci
        frame = await conn.request_raw(Command.DEVICE_GET_IRQ_INFO, u32(24, 0, PciIrq.MSI, 0, 0, 0))
        assert IrqInfoReply.unpack(frame.payload).index == PciIrq.MSI
