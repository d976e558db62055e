"""Malformed input gives ProtocolError(EINVAL); trailing bytes after a fixed layout do not."""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Sequence

import pytest

from vfiouser_trio.protocol import (
    REQUEST_TYPES,
    DeviceFeatureReply,
    DeviceFeatureRequest,
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DeviceResetReply,
    DeviceResetRequest,
    DmaLayout,
    DmaMapReply,
    DmaMapRequest,
    DmaReadRequest,
    DmaUnmapReply,
    DmaUnmapRequest,
    DmaWriteReply,
    DmaWriteRequest,
    IrqInfoReply,
    IrqInfoRequest,
    Message,
    MigDataReadReply,
    MigDataReadRequest,
    MigDataWriteReply,
    MigDataWriteRequest,
    ProtocolError,
    RegionInfoReply,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteMultiReply,
    RegionWriteMultiRequest,
    RegionWriteReply,
    RegionWriteRequest,
    SetIrqsReply,
    SetIrqsRequest,
    VersionReply,
    VersionRequest,
    check_xfer_size,
    decode_reply,
    decode_request,
)
from vfiouser_trio.protocol.message import Buffer


def u32(*values: int) -> bytes:
    return struct.pack(f"={len(values)}I", *values)


def u64(*values: int) -> bytes:
    return struct.pack(f"={len(values)}Q", *values)


Decode = Callable[[Buffer, Sequence[int]], Message]


def parse_dma_read_as_spec(payload: Buffer, fds: Sequence[int]) -> Message:
    return DmaReadRequest(0x1000, 4).parse_reply(payload, fds, layout=DmaLayout.SPEC)


REGION_IO = struct.Struct("=QII")
SUB = struct.Struct("=QQIIIIQ")

# (id, decoder, payload, fds). Every case must raise ProtocolError(EINVAL).
CASES: list[tuple[str, Decode, bytes, tuple[int, ...]]] = [
    # VERSION
    ("version payload < 4", VersionRequest.unpack, b"\0\0\0", ()),
    ("version with fds", VersionRequest.unpack, b"\0\0\0\0", (5,)),
    ("version JSON not NUL-terminated", VersionRequest.unpack, b"\0\0\0\0{}", ()),
    ("version JSON unparsable", VersionRequest.unpack, b"\0\0\0\0{nope\0", ()),
    ("version JSON empty", VersionRequest.unpack, b"\0\0\0\0\0", ()),
    ("version JSON not UTF-8", VersionRequest.unpack, b'\0\0\0\0{"a":"\xff"}\0', ()),
    ("version JSON top level array", VersionRequest.unpack, b"\0\0\0\0[]\0", ()),
    ("capabilities not object", VersionRequest.unpack, b'\0\0\0\0{"capabilities":[]}\0', ()),
    (
        "max_msg_fds not integer",
        VersionRequest.unpack,
        b'\0\0\0\0{"capabilities":{"max_msg_fds":"8"}}\0',
        (),
    ),
    (
        "max_msg_fds float",
        VersionRequest.unpack,
        b'\0\0\0\0{"capabilities":{"max_msg_fds":8.0}}\0',
        (),
    ),
    (
        "max_msg_fds bool",
        VersionRequest.unpack,
        b'\0\0\0\0{"capabilities":{"max_msg_fds":true}}\0',
        (),
    ),
    (
        "max_msg_fds > 1024",
        VersionRequest.unpack,
        b'\0\0\0\0{"capabilities":{"max_msg_fds":1025}}\0',
        (),
    ),
    (
        "max_msg_fds negative",
        VersionRequest.unpack,
        b'\0\0\0\0{"capabilities":{"max_msg_fds":-1}}\0',
        (),
    ),
    (
        "max_data_xfer_size not integer",
        VersionRequest.unpack,
        b'\0\0\0\0{"capabilities":{"max_data_xfer_size":null}}\0',
        (),
    ),
    (
        "twin_socket not object",
        VersionRequest.unpack,
        b'\0\0\0\0{"capabilities":{"twin_socket":true}}\0',
        (),
    ),
    (
        "twin_socket.supported not bool",
        VersionRequest.unpack,
        b'\0\0\0\0{"capabilities":{"twin_socket":{"supported":1}}}\0',
        (),
    ),
    (
        "write_multiple not bool",
        VersionRequest.unpack,
        b'\0\0\0\0{"capabilities":{"write_multiple":"yes"}}\0',
        (),
    ),
    ("version reply fds without twin", VersionReply.unpack, b"\0\0\0\0", (5,)),
    # DMA_MAP
    ("dma_map truncated", DmaMapRequest.unpack, u32(32, 3) + u64(0, 0)[:-1] + u64(0), ()),
    ("dma_map argsz < 32", DmaMapRequest.unpack, u32(31, 3) + u64(0, 0x1000, 0x1000), ()),
    ("dma_map unknown flags", DmaMapRequest.unpack, u32(32, 4) + u64(0, 0x1000, 0x1000), ()),
    ("dma_map two fds", DmaMapRequest.unpack, u32(32, 3) + u64(0, 0x1000, 0x1000), (5, 6)),
    # DMA_UNMAP
    ("dma_unmap truncated", DmaUnmapRequest.unpack, u32(24, 0) + u64(0), ()),
    ("dma_unmap argsz < 24", DmaUnmapRequest.unpack, u32(23, 0) + u64(0x1000, 0x1000), ()),
    (
        "dma_unmap dirty bitmap flag (not in this spec)",
        DmaUnmapRequest.unpack,
        u32(24, 1) + u64(0x1000, 0x1000),
        (),
    ),
    ("dma_unmap unknown flags", DmaUnmapRequest.unpack, u32(24, 4) + u64(0x1000, 0x1000), ()),
    ("dma_unmap ALL with address", DmaUnmapRequest.unpack, u32(24, 2) + u64(0x1000, 0), ()),
    ("dma_unmap ALL with size", DmaUnmapRequest.unpack, u32(24, 2) + u64(0, 0x1000), ()),
    ("dma_unmap with fds", DmaUnmapRequest.unpack, u32(24, 0) + u64(0x1000, 0x1000), (5,)),
    ("dma_unmap reply truncated", DmaUnmapReply.unpack, u32(24, 0) + u64(0), ()),
    # DEVICE_GET_INFO
    ("get_info truncated", DeviceGetInfoRequest.unpack, u32(16, 0, 0), ()),
    ("get_info argsz < 16", DeviceGetInfoRequest.unpack, u32(15, 0, 0, 0), ()),
    ("get_info reply truncated", DeviceGetInfoReply.unpack, u32(16, 3, 9), ()),
    # DEVICE_GET_REGION_INFO
    ("region_info truncated", RegionInfoRequest.unpack, u32(32, 0, 0, 0) + u64(0), ()),
    ("region_info argsz < 32", RegionInfoRequest.unpack, u32(31, 0, 0, 0) + u64(0, 0), ()),
    ("region_info reply truncated", RegionInfoReply.unpack, u32(32, 3, 0, 0) + u64(0), ()),
    (
        "region_info reply two fds without sparse cap",
        RegionInfoReply.unpack,
        u32(32, 7, 0, 0) + u64(0x1000, 0),
        (5, 6),
    ),
    (
        "region_info reply caps shorter than argsz",
        RegionInfoReply.unpack,
        u32(64, 0xF, 0, 32) + u64(0x1000, 0) + struct.pack("=HHI", 2, 1, 0),
        (),
    ),
    (
        "region_info reply cap offset inside struct",
        RegionInfoReply.unpack,
        u32(48, 0xF, 0, 8) + u64(0x1000, 0) + struct.pack("=HHI", 2, 1, 0) + u32(1, 1),
        (),
    ),
    (
        "region_info reply cap chain loops",
        RegionInfoReply.unpack,
        u32(48, 0xF, 0, 32) + u64(0x1000, 0) + struct.pack("=HHI", 2, 1, 32) + u32(1, 1),
        (),
    ),
    (
        "region_info reply sparse cap too short for its areas",
        RegionInfoReply.unpack,
        u32(48, 0xF, 0, 32) + u64(0x1000, 0) + struct.pack("=HHI", 1, 1, 0) + u32(1, 0),
        (),
    ),
    # DEVICE_GET_REGION_IO_FDS
    ("io_fds truncated", RegionIoFdsRequest.unpack, u32(16, 0, 0), ()),
    ("io_fds argsz < 16", RegionIoFdsRequest.unpack, u32(15, 0, 0, 0), ()),
    ("io_fds flags set", RegionIoFdsRequest.unpack, u32(16, 1, 0, 0), ()),
    ("io_fds count set", RegionIoFdsRequest.unpack, u32(16, 0, 0, 1), ()),
    ("io_fds reply flags set", RegionIoFdsReply.unpack, u32(16, 1, 0, 0), ()),
    ("io_fds reply fds without entries", RegionIoFdsReply.unpack, u32(16, 0, 0, 1), (5,)),
    (
        "io_fds reply entries without fds",
        RegionIoFdsReply.unpack,
        u32(56, 0, 0, 1) + SUB.pack(0, 4, 0, 0, 0, 0, 0),
        (),
    ),
    (
        "io_fds reply fd_index out of range",
        RegionIoFdsReply.unpack,
        u32(56, 0, 0, 1) + SUB.pack(0, 4, 1, 0, 0, 0, 0),
        (5,),
    ),
    (
        "io_fds reply unknown type",
        RegionIoFdsReply.unpack,
        u32(56, 0, 0, 1) + SUB.pack(0, 4, 0, 7, 0, 0, 0),
        (5,),
    ),
    (
        "io_fds reply entries do not match count",
        RegionIoFdsReply.unpack,
        u32(56, 0, 0, 2) + SUB.pack(0, 4, 0, 0, 0, 0, 0),
        (5,),
    ),
    # DEVICE_GET_IRQ_INFO
    ("irq_info truncated", IrqInfoRequest.unpack, u32(16, 0, 0), ()),
    ("irq_info argsz < 16", IrqInfoRequest.unpack, u32(15, 0, 2, 0), ()),
    ("irq_info reply truncated", IrqInfoReply.unpack, u32(16, 0, 2), ()),
    # DEVICE_SET_IRQS
    ("set_irqs truncated", SetIrqsRequest.unpack, u32(20, 0x24, 0, 0), ()),
    ("set_irqs argsz < 20", SetIrqsRequest.unpack, u32(19, 0x21, 0, 0, 1), ()),
    ("set_irqs two data bits", SetIrqsRequest.unpack, u32(20, 0x23, 0, 0, 1), ()),
    ("set_irqs no data bit", SetIrqsRequest.unpack, u32(20, 0x20, 0, 0, 1), ()),
    ("set_irqs two action bits", SetIrqsRequest.unpack, u32(20, 0x31, 0, 0, 1), ()),
    ("set_irqs no action bit", SetIrqsRequest.unpack, u32(20, 0x01, 0, 0, 1), ()),
    ("set_irqs unknown flag", SetIrqsRequest.unpack, u32(20, 0x61, 0, 0, 1), ()),
    ("set_irqs count 0 start 1", SetIrqsRequest.unpack, u32(20, 0x21, 0, 1, 0), ()),
    ("set_irqs count 0 with MASK", SetIrqsRequest.unpack, u32(20, 0x09, 0, 0, 0), ()),
    ("set_irqs count 0 with EVENTFD", SetIrqsRequest.unpack, u32(20, 0x24, 0, 0, 0), ()),
    ("set_irqs fds with DATA_NONE", SetIrqsRequest.unpack, u32(20, 0x21, 0, 0, 1), (5,)),
    ("set_irqs fds with DATA_BOOL", SetIrqsRequest.unpack, u32(21, 0x22, 0, 0, 1) + b"\1", (5,)),
    ("set_irqs fds != count", SetIrqsRequest.unpack, u32(20, 0x24, 2, 0, 2), (5,)),
    ("set_irqs BOOL bytes < count", SetIrqsRequest.unpack, u32(21, 0x22, 0, 0, 2) + b"\1", ()),
    ("set_irqs BOOL bytes > count", SetIrqsRequest.unpack, u32(22, 0x22, 0, 0, 1) + b"\1\1", ()),
    # REGION_READ / REGION_WRITE
    ("region_read payload < 16", RegionReadRequest.unpack, REGION_IO.pack(0, 0, 4)[:15], ()),
    ("region_write payload < 16", RegionWriteRequest.unpack, REGION_IO.pack(0, 0, 0)[:12], ()),
    ("region_write data < count", RegionWriteRequest.unpack, REGION_IO.pack(0, 0, 4) + b"abc", ()),
    ("region_write data > count", RegionWriteRequest.unpack, REGION_IO.pack(0, 0, 2) + b"abc", ()),
    ("region_write with fds", RegionWriteRequest.unpack, REGION_IO.pack(0, 0, 1) + b"a", (5,)),
    (
        "region_read reply data != count",
        RegionReadReply.unpack,
        REGION_IO.pack(0, 0, 4) + b"abc",
        (),
    ),
    (
        "region_read reply count != requested",
        RegionReadRequest(0, 0, 4).parse_reply,
        REGION_IO.pack(0, 0, 2) + b"ab",
        (),
    ),
    ("region_write reply truncated", RegionWriteReply.unpack, REGION_IO.pack(0, 0, 4)[:8], ()),
    # DMA_READ / DMA_WRITE
    ("dma_read reply short", DmaReadRequest(0x1000, 4).parse_reply, u64(0x1000, 4) + b"abc", ()),
    (
        "dma_read reply fits neither layout",
        DmaReadRequest(0x1000, 4).parse_reply,
        u64(0x1000, 5) + b"abcd",
        (),
    ),
    (
        "dma_read reply spec count mismatch",
        parse_dma_read_as_spec,
        u64(0x1000, 3) + b"abcd",
        (),
    ),
    (
        "dma_read reply for another address",
        DmaReadRequest(0x1000, 4).parse_reply,
        u64(0x2000, 4) + b"abcd",
        (),
    ),
    ("dma_write data < count", DmaWriteRequest.unpack, u64(0x1000, 4) + b"abc", ()),
    ("dma_write data > count", DmaWriteRequest.unpack, u64(0x1000, 2) + b"abc", ()),
    ("dma_write reply 8 bytes", DmaWriteReply.unpack, u64(0x1000), ()),
    # DEVICE_RESET and empty replies
    ("reset with fds", DeviceResetRequest.unpack, b"", (5,)),
    # REGION_WRITE_MULTI
    ("write_multi truncated", RegionWriteMultiRequest.unpack, b"\1\0\0", ()),
    (
        "write_multi count beyond 8",
        RegionWriteMultiRequest.unpack,
        u64(1) + REGION_IO.pack(0, 0, 9) + bytes(8),
        (),
    ),
    ("write_multi wr_cnt mismatch", RegionWriteMultiRequest.unpack, u64(2) + bytes(24), ()),
    ("write_multi bytes past the entries", RegionWriteMultiRequest.unpack, u64(0) + b"x", ()),
    ("write_multi reply truncated", RegionWriteMultiReply.unpack, b"\1\0\0\0", ()),
    # DEVICE_FEATURE
    ("feature payload < 8", DeviceFeatureRequest.unpack, u32(8), ()),
    ("feature argsz < 8", DeviceFeatureRequest.unpack, u32(7, 0x10001), ()),
    ("feature GET and SET", DeviceFeatureRequest.unpack, u32(16, 0x30002) + u32(1, 0), ()),
    ("feature no operation", DeviceFeatureRequest.unpack, u32(8, 0x00001), ()),
    ("feature unknown index", DeviceFeatureRequest.unpack, u32(8, 0x10003), ()),
    ("feature unknown index probe", DeviceFeatureRequest.unpack, u32(8, 0x40000), ()),
    ("feature unknown flag bit", DeviceFeatureRequest.unpack, u32(8, 0x90001), ()),
    ("feature SET MIGRATION", DeviceFeatureRequest.unpack, u32(16, 0x20001) + u64(1), ()),
    ("feature GET LOGGING_START", DeviceFeatureRequest.unpack, u32(8, 0x10006), ()),
    ("feature SET LOGGING_REPORT", DeviceFeatureRequest.unpack, u32(8, 0x20008), ()),
    ("feature SET state short", DeviceFeatureRequest.unpack, u32(12, 0x20002, 1), ()),
    (
        "feature START ranges short",
        DeviceFeatureRequest.unpack,
        u32(40, 0x20006) + u64(4096) + u32(2, 0) + u64(0, 4096),
        (),
    ),
    ("feature REPORT request short", DeviceFeatureRequest.unpack, u32(32, 0x10008) + u64(0), ()),
    ("feature with fds", DeviceFeatureRequest.unpack, u32(8, 0x10001), (5,)),
    ("feature reply MIGRATION short", DeviceFeatureReply.unpack, u32(12, 0x10001, 1), ()),
    ("feature reply REPORT short", DeviceFeatureReply.unpack, u32(16, 0x10008) + u64(0), ()),
    (
        "feature reply answers another request",
        DeviceFeatureRequest(0x10001).parse_reply,
        u32(16, 0x10002) + u32(2, 0),
        (),
    ),
    # MIG_DATA_READ / MIG_DATA_WRITE
    ("mig_read payload < 8", MigDataReadRequest.unpack, u32(24), ()),
    ("mig_read argsz < 8 + size", MigDataReadRequest.unpack, u32(23, 16), ()),
    ("mig_read reply size > data", MigDataReadReply.unpack, u32(12, 4) + b"abc", ()),
    ("mig_read reply beyond request", MigDataReadRequest(2).parse_reply, u32(12, 4) + b"abcd", ()),
    ("mig_write size > data", MigDataWriteRequest.unpack, u32(12, 4) + b"abc", ()),
    ("mig_write size < data", MigDataWriteRequest.unpack, u32(12, 2) + b"abc", ()),
    ("mig_write argsz < 8 + size", MigDataWriteRequest.unpack, u32(10, 3) + b"abc", ()),
]


@pytest.mark.parametrize(
    ("decode", "payload", "fds"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_is_einval(decode: Decode, payload: bytes, fds: tuple[int, ...]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(payload, fds)
    assert info.value.errno == errno.EINVAL
    assert info.value.command is not None


# Kernel VFIO's argsz rule (libvfio-user follows it): a fixed-layout payload may be longer
# than its structure, and the bytes past it are ignored. (decoder, payload, decoded)
TRAILING = b"\xa5" * 9
ACCEPTED: list[tuple[str, Decode, bytes, Message]] = [
    (
        "get_info 24 bytes",
        DeviceGetInfoRequest.unpack,
        u32(24, 0, 0, 0) + bytes(8),
        DeviceGetInfoRequest(24),
    ),
    (
        "get_info reply",
        DeviceGetInfoReply.unpack,
        u32(16, 3, 9, 5) + TRAILING,
        DeviceGetInfoReply(3, 9, 5),
    ),
    (
        "region_info argsz 80",
        RegionInfoRequest.unpack,
        u32(80, 0, 2, 0) + u64(0, 0) + bytes(48),
        RegionInfoRequest(2, 80),
    ),
    (
        "irq_info 24 bytes",
        IrqInfoRequest.unpack,
        u32(24, 0, 4, 0) + bytes(8),
        IrqInfoRequest(4, 24),
    ),
    ("irq_info reply", IrqInfoReply.unpack, u32(16, 1, 4, 1) + TRAILING, IrqInfoReply(4, 1, 1)),
    ("io_fds", RegionIoFdsRequest.unpack, u32(32, 0, 2, 0) + TRAILING, RegionIoFdsRequest(2, 32)),
    (
        "dma_map",
        DmaMapRequest.unpack,
        u32(40, 3) + u64(0, 0x1000, 0x2000) + TRAILING,
        DmaMapRequest(0x1000, 0x2000, 3, 0, (), 40),
    ),
    (
        "dma_unmap",
        DmaUnmapRequest.unpack,
        u32(32, 0) + u64(0x1000, 0x2000) + TRAILING,
        DmaUnmapRequest(0x1000, 0x2000, 0, 32),
    ),
    (
        "dma_unmap reply",
        DmaUnmapReply.unpack,
        u32(24, 0) + u64(0x1000, 0x2000) + TRAILING,
        DmaUnmapReply(0x1000, 0x2000),
    ),
    (
        "region_read",
        RegionReadRequest.unpack,
        REGION_IO.pack(8, 1, 4) + TRAILING,
        RegionReadRequest(1, 8, 4),
    ),
    (
        "region_write reply",
        RegionWriteReply.unpack,
        REGION_IO.pack(8, 1, 4) + TRAILING,
        RegionWriteReply(1, 8, 4),
    ),
    (
        "write_multi reply",
        RegionWriteMultiReply.unpack,
        u64(3) + TRAILING,
        RegionWriteMultiReply(3),
    ),
    ("dma_read", DmaReadRequest.unpack, u64(0x1000, 4) + TRAILING, DmaReadRequest(0x1000, 4)),
    ("mig_read", MigDataReadRequest.unpack, u32(24, 16) + TRAILING, MigDataReadRequest(16, 24)),
    ("reset", DeviceResetRequest.unpack, TRAILING, DeviceResetRequest()),
    ("reset reply", DeviceResetReply.unpack, TRAILING, DeviceResetReply()),
    ("dma_map reply", DmaMapReply.unpack, TRAILING, DmaMapReply()),
    ("set_irqs reply", SetIrqsReply.unpack, TRAILING, SetIrqsReply()),
    ("mig_write reply", MigDataWriteReply.unpack, TRAILING, MigDataWriteReply()),
    (
        "set_irqs DATA_NONE",
        SetIrqsRequest.unpack,
        u32(28, 0x21, 2, 0, 1) + bytes(8),
        SetIrqsRequest(2, 0x21, 0, 1, argsz=28),
    ),
    (
        "mig_read reply padded beyond the request",
        MigDataReadRequest(4).parse_reply,
        u32(12, 2) + b"ab" + bytes(8),
        MigDataReadReply(b"ab", 10),
    ),
]


@pytest.mark.parametrize(
    ("decode", "payload", "decoded"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED]
)
def test_trailing_bytes_after_a_fixed_layout_are_ignored(
    decode: Decode, payload: bytes, decoded: Message
) -> None:
    assert decode(payload, ()) == decoded


def test_replies_longer_than_our_argsz_are_tolerated() -> None:
    reply = RegionInfoReply(0, 3, 0x100, padding=8)
    assert RegionInfoRequest(index=0, argsz=32).parse_reply(reply.pack()) == reply
    payload = u32(56, 0, 0, 1) + SUB.pack(0, 4, 0, 0, 0, 0, 0)
    assert RegionIoFdsRequest(index=0, argsz=16).parse_reply(payload, (5,)).count == 1


FD_FREE_REQUESTS = [
    (cmd, cls) for cmd, cls in REQUEST_TYPES.items() if cls not in (DmaMapRequest, SetIrqsRequest)
]

VALID_REQUEST_PAYLOADS: dict[type[Message], bytes] = {
    VersionRequest: b"\0\0\0\0",
    DmaUnmapRequest: u32(24, 0) + u64(0x1000, 0x1000),
    DeviceGetInfoRequest: u32(16, 0, 0, 0),
    RegionInfoRequest: u32(32, 0, 0, 0) + u64(0, 0),
    RegionIoFdsRequest: u32(16, 0, 0, 0),
    IrqInfoRequest: u32(16, 0, 0, 0),
    RegionReadRequest: REGION_IO.pack(0, 0, 4),
    RegionWriteRequest: REGION_IO.pack(0, 0, 1) + b"a",
    DmaReadRequest: u64(0x1000, 4),
    DmaWriteRequest: u64(0x1000, 1) + b"a",
    DeviceResetRequest: b"",
    RegionWriteMultiRequest: u64(0),
    DeviceFeatureRequest: u32(16, 0x10001),
    MigDataReadRequest: u32(24, 16),
    MigDataWriteRequest: u32(9, 1) + b"a",
}


@pytest.mark.parametrize(("command", "cls"), FD_FREE_REQUESTS, ids=str)
def test_fds_on_fd_free_request_are_einval(command: int, cls: type[Message]) -> None:
    payload = VALID_REQUEST_PAYLOADS[cls]
    assert isinstance(decode_request(command, payload), cls)  # valid without fds
    with pytest.raises(ProtocolError) as info:
        decode_request(command, payload, (5,))
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("command", [0, 14, 19, 0xFFFF])
def test_unknown_command_is_einval(command: int) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_request(command, b"")
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError):
        decode_reply(command, b"")


@pytest.mark.parametrize(
    ("start", "count", "ok"),
    [
        (0, 4, True),
        (3, 1, True),
        (0, 0, True),
        (4, 1, False),
        (3, 2, False),
        (0, 5, False),
        (0xFFFFFFFF, 2, False),  # would wrap in 32-bit arithmetic
        (1, 0xFFFFFFFF, False),
    ],
)
def test_set_irqs_validate_against(start: int, count: int, ok: bool) -> None:
    flags = 0x21 if count == 0 else 0x22  # NONE|TRIGGER for disable-all, else BOOL|TRIGGER
    req = SetIrqsRequest(index=2, flags=flags, start=start, count=count, data=b"\1" * min(count, 8))
    if ok:
        req.validate_against(4)
    else:
        with pytest.raises(ProtocolError) as info:
            req.validate_against(4)
        assert info.value.errno == errno.EINVAL


def test_set_irqs_eventfd_without_fds_is_deassign() -> None:
    req = SetIrqsRequest.unpack(u32(20, 0x24, 2, 0, 3))
    assert req.fds == () and req.count == 3


def test_check_xfer_size() -> None:
    check_xfer_size(RegionReadRequest(0, 0, 4096), 4096)
    with pytest.raises(ProtocolError) as info:
        check_xfer_size(RegionWriteRequest(0, 0, b"x" * 4097), 4096)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(ProtocolError):
        check_xfer_size(DmaReadRequest(0, 1 << 21), 1 << 20)
    with pytest.raises(ProtocolError):
        check_xfer_size(MigDataReadRequest(1 << 21), 1 << 20)
