"""The raw wire layouts the checks build messages from and judge replies by.

Valid requests could come from ``protocol/``'s typed messages, but the checker must also
send what those refuse to build (truncated, contradictory, oversized) and judge replies
byte by byte where ``protocol/`` is lenient (the argsz rule takes longer replies). Its
layouts are stated here, once, from the spec's tables, independently of ``protocol/``: a
mistake there is then not mirrored into the tool meant to catch it.
"""

from __future__ import annotations

import struct

#: VERSION: major, minor (then the JSON).
VERSION = struct.Struct("=HH")
#: DEVICE_GET_INFO: argsz, flags, num_regions, num_irqs.
DEVICE_INFO = struct.Struct("=IIII")
#: DEVICE_GET_IRQ_INFO: argsz, flags, index, count.
IRQ_INFO = struct.Struct("=IIII")
#: DEVICE_GET_REGION_INFO: argsz, flags, index, cap_offset, size, offset.
REGION_INFO = struct.Struct("=IIIIQQ")
#: DEVICE_GET_REGION_IO_FDS: argsz, flags, index, count (then the sub-regions).
IO_FDS = struct.Struct("=IIII")
#: An ioeventfd sub-region: offset, size, fd_index, type, flags, padding, datamatch.
SUB_REGION = struct.Struct("=QQIII4xQ")
#: DEVICE_SET_IRQS: argsz, flags, index, start, count (then BOOL data).
IRQ_SET = struct.Struct("=IIIII")
#: REGION_READ / REGION_WRITE: offset, region, count (then the data).
REGION_ACCESS = struct.Struct("=QII")
#: One REGION_WRITE_MULTI entry: offset, region, count, data[8] (after a u64 wr_cnt).
WRITE_MULTI_ENTRY = struct.Struct("=QII8s")
#: DMA_MAP: argsz, flags, offset, address, size.
DMA_MAP = struct.Struct("=IIQQQ")
#: DMA_READ / DMA_WRITE in the spec's layout: address, count (u64).
DMA_RW = struct.Struct("=QQ")
#: DMA_WRITE and the DMA_READ reply as QEMU lays them out: address, count (u32).
QEMU_DMA_RW = struct.Struct("=QI")
#: DEVICE_FEATURE: argsz, flags (then the feature's data).
FEATURE = struct.Struct("=II")
#: MIG_DEVICE_STATE's data: device_state, data_fd.
MIG_STATE = struct.Struct("=Ii")
#: MIG_DATA_READ / MIG_DATA_WRITE: argsz, size.
MIG_DATA = struct.Struct("=II")
#: DMA_LOGGING_START/STOP's data: page_size, num_ranges, reserved (then the ranges).
LOG_CONTROL = struct.Struct("=QII")
#: One DMA logging range: iova, length.
LOG_RANGE = struct.Struct("=QQ")
#: DMA_LOGGING_REPORT's data: iova, length, page_size (then the bitmap).
LOG_REPORT = struct.Struct("=QQQ")
