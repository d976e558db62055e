"""Byte-exact golden vectors for every message, written by hand from the spec tables.

Each vector is the payload after the 16-byte header, little-endian (the host
order of every machine we run on). Both directions are checked: pack() gives
the bytes, and decoding the bytes (with the fds that travel beside them) gives
the object back.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import pytest

from vfiouser_trio.protocol import (
    REPLY_TYPES,
    REQUEST_TYPES,
    Capabilities,
    DeviceFeatureReply,
    DeviceFeatureRequest,
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DeviceResetReply,
    DeviceResetRequest,
    DmaLayout,
    DmaLoggingBitmap,
    DmaLoggingControl,
    DmaLoggingRange,
    DmaLoggingReport,
    DmaMapReply,
    DmaMapRequest,
    DmaReadReply,
    DmaReadRequest,
    DmaUnmapReply,
    DmaUnmapRequest,
    DmaWriteReply,
    DmaWriteRequest,
    IoEventFdSubRegion,
    IoRegionFdSubRegion,
    IrqInfoReply,
    IrqInfoRequest,
    Message,
    MigDataReadRequest,
    MigDataWriteReply,
    MigDataWriteRequest,
    MigDeviceState,
    MigrationInfo,
    RegionInfoReply,
    RegionInfoRequest,
    RegionIoFdsReply,
    RegionIoFdsRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionTypeCap,
    RegionWriteEntry,
    RegionWriteMultiReply,
    RegionWriteMultiRequest,
    RegionWriteReply,
    RegionWriteRequest,
    SetIrqsReply,
    SetIrqsRequest,
    SparseMmapArea,
    SparseMmapCap,
    TwinSocket,
    VersionReply,
    VersionRequest,
    decode_request,
    detect_dma_write_layout,
    dma_write_probe,
    region_info_reply,
    region_io_fds_reply,
)
from vfiouser_trio.protocol.message import Buffer

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="vectors are little-endian")


def h(text: str) -> bytes:
    """Hex with ``#`` comments and whitespace ignored."""
    return bytes.fromhex("".join(line.split("#", 1)[0] for line in text.splitlines()))


Decoder = Callable[[Buffer, Sequence[int]], Message]


@dataclass
class Golden:
    name: str
    message: Message
    payload: bytes
    fds: tuple[int, ...] = ()
    decode: Decoder | None = None  # default: type(message).unpack


VERSION_JSON = (
    b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,'
    b'"max_dma_maps":65535,"pgsizes":4096,"twin_socket":{"supported":true}}}'
)
VERSION_REPLY_JSON = (
    b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,'
    b'"max_dma_maps":65535,"pgsizes":4096,"twin_socket":{"supported":true,"fd_index":0},'
    b'"write_multiple":true,"migration":{"pgsize":4096}}}'
)

FULL_REGION = RegionInfoReply(
    index=1,
    flags=0x7,  # READ|WRITE|MMAP; CAPS is added because caps are present
    size=0x4000,
    offset=1 << 40,
    caps=(
        SparseMmapCap((SparseMmapArea(0x1000, 0x1000), SparseMmapArea(0x3000, 0x1000))),
        RegionTypeCap(type=3, subtype=1),
    ),
    fds=(40,),
)
FULL_REGION_BYTES = h("""
    60000000          # argsz = 96 (32 + 48 sparse + 16 type)
    0f000000          # flags = READ|WRITE|MMAP|CAPS
    01000000          # index = 1
    20000000          # cap_offset = 32
    0040000000000000  # size = 0x4000
    0000000000010000  # offset = 1 << 40
    0100 0100 50000000  # cap header: id SPARSE_MMAP, version 1, next = 80
    02000000 00000000   # nr_areas = 2, reserved
    0010000000000000 0010000000000000  # area 0: offset 0x1000, size 0x1000
    0030000000000000 0010000000000000  # area 1: offset 0x3000, size 0x1000
    0200 0100 00000000  # cap header: id TYPE, version 1, next = 0
    03000000 01000000   # type 3, subtype 1
""")

IO_FDS_FULL = RegionIoFdsReply(
    index=0,
    sub_regions=(
        IoEventFdSubRegion(offset=0x100, size=4, fd_index=0, flags=1, datamatch=0x1234),
        IoRegionFdSubRegion(offset=0x200, size=8, fd_index=1, flags=0, user_data=0xDEADBEEF),
    ),
    fds=(50, 51),
)

MIGRATION_GET = DeviceFeatureRequest(flags=0x00010001)  # GET | MIGRATION
STATE_SET = DeviceFeatureRequest(flags=0x00020002, data=MigDeviceState(device_state=3))
LOG_START = DeviceFeatureRequest(
    flags=0x00020006, data=DmaLoggingControl(4096, (DmaLoggingRange(0x100000, 0x200000),))
)
REPORT_GET = DeviceFeatureRequest(
    flags=0x00010008, data=DmaLoggingReport(iova=0x100000, length=0x40000, page_size=4096)
)
READ_REQ = RegionReadRequest(region=7, offset=0x10, count=4)
DMA_READ_REQ = DmaReadRequest(address=0x1000, count=2)
MIG_READ_REQ = MigDataReadRequest(size=16)

GOLDEN = [
    Golden("VERSION request, no JSON", VersionRequest(0, 0), h("0000 0000  # major 0, minor 0")),
    Golden(
        "VERSION request with JSON",
        VersionRequest(0, 2, Capabilities(max_msg_fds=8, twin_socket=TwinSocket(supported=True))),
        h("0000 0200  # major 0, minor 2") + VERSION_JSON + b"\0",
    ),
    Golden(
        "VERSION reply with twin socket",
        VersionReply(
            0,
            2,
            Capabilities(
                max_msg_fds=8,
                twin_socket=TwinSocket(True, 0),
                write_multiple=True,
                extra=(("migration", '{"pgsize":4096}'),),
            ),
            fds=(30,),
        ),
        h("0000 0200") + VERSION_REPLY_JSON + b"\0",
        fds=(30,),
    ),
    Golden(
        "DMA_MAP request with fd",
        DmaMapRequest(address=0x10000, size=0x2000, flags=3, offset=0x1000, fds=(20,)),
        h("""
            20000000          # argsz = 32
            03000000          # flags = READ|WRITE
            0010000000000000  # offset = 0x1000
            0000010000000000  # address = 0x10000
            0020000000000000  # size = 0x2000
        """),
        fds=(20,),
    ),
    Golden(
        "DMA_MAP request without fd, read-only",
        DmaMapRequest(address=0xC0000, size=0x1000, flags=1),
        h("20000000 01000000 0000000000000000 00000c0000000000 0010000000000000"),
    ),
    Golden("DMA_MAP reply", DmaMapReply(), b""),
    Golden(
        "DMA_UNMAP request",
        DmaUnmapRequest(address=0x10000, size=0x2000),
        h("""
            18000000          # argsz = 24
            00000000          # flags
            0000010000000000  # address
            0020000000000000  # size
        """),
    ),
    Golden(
        "DMA_UNMAP request UNMAP_ALL",
        DmaUnmapRequest(address=0, size=0, flags=2),
        h("18000000 02000000 0000000000000000 0000000000000000"),
    ),
    Golden(
        "DMA_UNMAP reply",
        DmaUnmapReply(address=0x10000, size=0x2000),
        h("18000000 00000000 0000010000000000 0020000000000000"),
    ),
    Golden(
        "DEVICE_GET_INFO request",
        DeviceGetInfoRequest(),
        h("10000000 00000000 00000000 00000000  # argsz 16, rest zero"),
    ),
    Golden(
        "DEVICE_GET_INFO reply",
        DeviceGetInfoReply(flags=3, num_regions=9, num_irqs=5),
        h("""
            10000000  # argsz = 16
            03000000  # flags = RESET|PCI
            09000000  # num_regions = 9
            05000000  # num_irqs = 5
        """),
    ),
    Golden(
        "DEVICE_GET_REGION_INFO request",
        RegionInfoRequest(index=7, argsz=128),
        h("""
            80000000  # argsz = 128
            00000000  # flags
            07000000  # index = 7 (config space)
            00000000  # cap_offset
            0000000000000000 0000000000000000  # size, offset
        """),
    ),
    Golden(
        "DEVICE_GET_REGION_INFO reply, no caps",
        RegionInfoReply(index=7, flags=3, size=0x100),
        h("20000000 03000000 07000000 00000000 0001000000000000 0000000000000000"),
    ),
    Golden(
        "DEVICE_GET_REGION_INFO reply with sparse + type caps and fd",
        FULL_REGION,
        FULL_REGION_BYTES,
        fds=(40,),
    ),
    Golden(
        "DEVICE_GET_REGION_INFO reply cut to argsz 40",
        region_info_reply(FULL_REGION, 40),
        h("""
            60000000          # argsz = 96 needed
            07000000          # flags: no CAPS
            01000000          # index
            00000000          # cap_offset = 0
            0040000000000000 0000000000010000  # size, offset
            0000000000000000  # zero padding up to the request's 40 bytes
        """),
    ),
    Golden(
        "DEVICE_GET_REGION_IO_FDS request",
        RegionIoFdsRequest(index=0, argsz=0x60),
        h("60000000 00000000 00000000 00000000  # argsz 96, flags 0, index 0, count 0"),
    ),
    Golden(
        "DEVICE_GET_REGION_IO_FDS reply",
        IO_FDS_FULL,
        h("""
            60000000 00000000 00000000 02000000  # argsz 96, flags 0, index 0, count 2
            0001000000000000 0400000000000000    # offset 0x100, size 4
            00000000 00000000 01000000 00000000  # fd_index 0, type IOEVENTFD, DATAMATCH, pad
            3412000000000000                     # datamatch 0x1234
            0002000000000000 0800000000000000    # offset 0x200, size 8
            01000000 01000000 00000000 00000000  # fd_index 1, type IOREGIONFD, flags 0, pad
            efbeadde00000000                     # user_data 0xdeadbeef
        """),
        fds=(50, 51),
    ),
    Golden(
        "DEVICE_GET_REGION_IO_FDS reply cut short",
        region_io_fds_reply(IO_FDS_FULL, 16),
        h("60000000 00000000 00000000 02000000  # argsz 96 needed, count 2, no entries"),
    ),
    Golden(
        "DEVICE_GET_IRQ_INFO request",
        IrqInfoRequest(index=2),
        h("10000000 00000000 02000000 00000000  # argsz 16, flags 0, index MSIX, count 0"),
    ),
    Golden(
        "DEVICE_GET_IRQ_INFO reply",
        IrqInfoReply(index=2, flags=0x9, count=32),
        h("10000000 09000000 02000000 20000000  # argsz, EVENTFD|NORESIZE, MSIX, 32"),
    ),
    Golden(
        "DEVICE_SET_IRQS request, eventfds",
        SetIrqsRequest(index=2, flags=0x24, start=0, count=2, fds=(60, 61)),
        h("""
            14000000  # argsz = 20
            24000000  # flags = DATA_EVENTFD|ACTION_TRIGGER
            02000000  # index = MSIX
            00000000  # start = 0
            02000000  # count = 2
        """),
        fds=(60, 61),
    ),
    Golden(
        "DEVICE_SET_IRQS request, bool data",
        SetIrqsRequest(index=0, flags=0x12, start=0, count=1, data=b"\x01"),
        h("15000000 12000000 00000000 00000000 01000000 01  # argsz 21, BOOL|UNMASK"),
    ),
    Golden(
        "DEVICE_SET_IRQS request, disable all",
        SetIrqsRequest(index=1, flags=0x21),
        h("14000000 21000000 01000000 00000000 00000000  # NONE|TRIGGER, MSI, 0, 0"),
    ),
    Golden("DEVICE_SET_IRQS reply", SetIrqsReply(), b""),
    Golden(
        "REGION_READ request",
        READ_REQ,
        h("1000000000000000 07000000 04000000  # offset 0x10, region 7, count 4"),
    ),
    Golden(
        "REGION_READ reply",
        RegionReadReply(region=7, offset=0x10, data=b"\xf4\x1a\x00\x11"),
        h("1000000000000000 07000000 04000000 f41a0011  # ... data"),
        decode=READ_REQ.parse_reply,
    ),
    Golden(
        "REGION_WRITE request",
        RegionWriteRequest(region=0, offset=0x2000, data=b"\x01\x00"),
        h("0020000000000000 00000000 02000000 0100  # offset, region 0, count 2, data"),
    ),
    Golden(
        "REGION_WRITE reply",
        RegionWriteReply(region=0, offset=0x2000, count=2),
        h("0020000000000000 00000000 02000000"),
    ),
    Golden(
        "DMA_READ request",
        DMA_READ_REQ,
        h("0010000000000000 0200000000000000  # address 0x1000, count 2 (u64)"),
    ),
    Golden(
        "DMA_READ reply, spec layout",
        DmaReadReply(address=0x1000, data=b"\xaa\xbb"),
        h("0010000000000000 0200000000000000 aabb"),
        decode=DMA_READ_REQ.parse_reply,
    ),
    Golden(
        "DMA_READ reply, QEMU layout",
        DmaReadReply(address=0x1000, data=b"\xaa\xbb", layout=DmaLayout.QEMU),
        h("0010000000000000 02000000 aabb 00000000  # u32 count, data at 12, 4 zero bytes"),
        decode=DMA_READ_REQ.parse_reply,
    ),
    Golden(
        "DMA_WRITE request",
        DmaWriteRequest(address=0x2000, data=b"\x11\x22\x33"),
        h("0020000000000000 0300000000000000 112233"),
    ),
    Golden(
        "DMA_WRITE reply",
        DmaWriteReply(address=0x2000, count=3),
        h("0020000000000000 0300000000000000  # address, count as u64"),
    ),
    Golden("DEVICE_RESET request", DeviceResetRequest(), b""),
    Golden("DEVICE_RESET reply", DeviceResetReply(), b""),
    Golden(
        "REGION_WRITE_MULTI request",
        RegionWriteMultiRequest(
            (
                RegionWriteEntry(region=0, offset=0x1000, data=b"\x01\x00\x00\x00"),
                RegionWriteEntry(region=2, offset=0x8, data=b"\xff\xee\xdd\xcc\xbb\xaa\x99\x88"),
            )
        ),
        h("""
            0200000000000000                     # wr_cnt = 2
            0010000000000000 00000000 04000000   # offset, region 0, count 4
            0100000000000000                     # data, zero padded to 8
            0800000000000000 02000000 08000000   # offset 8, region 2, count 8
            ffeeddccbbaa9988
        """),
    ),
    Golden("REGION_WRITE_MULTI reply", RegionWriteMultiReply(2), h("0200000000000000")),
    Golden(
        "DEVICE_FEATURE GET MIGRATION request",
        MIGRATION_GET,
        h("10000000 01000100  # argsz 16 (8 + 8 reply data), flags GET|MIGRATION"),
    ),
    Golden(
        "DEVICE_FEATURE GET MIGRATION reply",
        DeviceFeatureReply(flags=0x00010001, data=MigrationInfo(flags=0x5)),
        h("10000000 01000100 0500000000000000  # STOP_COPY|PRE_COPY"),
        decode=MIGRATION_GET.parse_reply,
    ),
    Golden(
        "DEVICE_FEATURE GET MIG_DEVICE_STATE reply",
        DeviceFeatureReply(flags=0x00010002, data=MigDeviceState(device_state=2)),
        h("10000000 02000100 02000000 00000000  # RUNNING, data_fd 0"),
    ),
    Golden(
        "DEVICE_FEATURE SET MIG_DEVICE_STATE request",
        STATE_SET,
        h("10000000 02000200 03000000 00000000  # argsz 16, SET|MIG_DEVICE_STATE, STOP_COPY"),
    ),
    Golden(
        "DEVICE_FEATURE SET MIG_DEVICE_STATE reply (echo)",
        STATE_SET.echo_reply(),
        h("10000000 02000200 03000000 00000000"),
        decode=STATE_SET.parse_reply,
    ),
    Golden(
        "DEVICE_FEATURE SET DMA_LOGGING_START request",
        LOG_START,
        h("""
            28000000 06000200                    # argsz 40, SET|DMA_LOGGING_START
            0010000000000000 01000000 00000000   # page_size 4096, num_ranges 1, reserved
            0000100000000000 0000200000000000    # iova 0x100000, length 0x200000
        """),
    ),
    Golden(
        "DEVICE_FEATURE SET DMA_LOGGING_STOP request",
        DeviceFeatureRequest(flags=0x00020007),
        h("08000000 07000200"),
    ),
    Golden(
        "DEVICE_FEATURE GET DMA_LOGGING_REPORT request",
        REPORT_GET,
        h("""
            28000000 08000100                    # argsz 40 = 8 + 24 + 8-byte bitmap
            0000100000000000 0000040000000000    # iova 0x100000, length 0x40000
            0010000000000000                     # page_size 4096
        """),
    ),
    Golden(
        "DEVICE_FEATURE GET DMA_LOGGING_REPORT reply",
        DeviceFeatureReply(
            flags=0x00010008,
            data=DmaLoggingBitmap(0x100000, 0x40000, 4096, bitmap=h("0300000000000080")),
        ),
        h("""
            28000000 08000100
            0000100000000000 0000040000000000 0010000000000000
            0300000000000080                     # pages 0, 1 and 63 dirty
        """),
        decode=REPORT_GET.parse_reply,
    ),
    Golden(
        "DEVICE_FEATURE PROBE request",
        DeviceFeatureRequest.probe(6, set=True),
        h("08000000 06000600  # argsz 8, SET|PROBE|DMA_LOGGING_START"),
    ),
    Golden(
        "MIG_DATA_READ request",
        MIG_READ_REQ,
        h("18000000 10000000  # argsz 24, size 16"),
    ),
    Golden(
        "MIG_DATA_READ reply, short read padded to the request",
        MIG_READ_REQ.reply(b"abcd"),
        h("0c000000 04000000 61626364 000000000000000000000000  # argsz 12, size 4"),
        decode=MIG_READ_REQ.parse_reply,
    ),
    Golden(
        "MIG_DATA_WRITE request",
        MigDataWriteRequest(data=b"xyz"),
        h("0b000000 03000000 78797a  # argsz 11, size 3, data"),
    ),
    Golden("MIG_DATA_WRITE reply", MigDataWriteReply(), b""),
]


@pytest.mark.parametrize("case", GOLDEN, ids=[g.name for g in GOLDEN])
def test_pack_matches_golden(case: Golden) -> None:
    assert case.message.pack() == case.payload


@pytest.mark.parametrize("case", GOLDEN, ids=[g.name for g in GOLDEN])
def test_unpack_golden(case: Golden) -> None:
    decode = case.decode or type(case.message).unpack
    assert decode(case.payload, case.fds) == case.message
    # memoryview input decodes the same as bytes.
    assert decode(memoryview(case.payload), case.fds) == case.message


@pytest.mark.parametrize(
    "case", [g for g in GOLDEN if not g.message.IS_REPLY], ids=lambda g: g.name
)
def test_decode_request_by_command(case: Golden) -> None:
    assert decode_request(case.message.COMMAND, case.payload, case.fds) == case.message


def test_every_command_has_golden_request_and_reply() -> None:
    requests = {type(g.message) for g in GOLDEN if not g.message.IS_REPLY}
    replies = {type(g.message) for g in GOLDEN if g.message.IS_REPLY}
    assert requests == set(REQUEST_TYPES.values())
    assert replies == set(REPLY_TYPES.values())


def test_fds_exposed_as_tuple() -> None:
    assert FULL_REGION.fds == (40,) and FULL_REGION.fd == 40
    assert DmaMapRequest(0, 1, fds=(3,)).fd == 3
    assert DmaMapRequest(0, 1).fd is None
    assert DmaMapReply().fds == ()


def test_dma_write_reply_accepts_twelve_bytes() -> None:
    # The spec table gives count as 4 bytes.
    assert DmaWriteReply.unpack(h("0020000000000000 03000000")) == DmaWriteReply(0x2000, 3)


QEMU_DMA_WRITE = DmaWriteRequest(address=0x2000, data=b"\x11\x22\x33", layout=DmaLayout.QEMU)


def test_dma_write_in_qemus_layout() -> None:
    # QEMU's VFIOUserDMARW: u64 offset, u32 count, data at 12; its 4 padding bytes count.
    payload = h("0020000000000000 03000000 112233 00000000")
    assert QEMU_DMA_WRITE.pack() == payload
    assert DmaWriteRequest.unpack_as(payload, (), DmaLayout.QEMU) == QEMU_DMA_WRITE
    # QEMU answers header-only.
    assert DmaWriteReply(0x2000, 3, DmaLayout.QEMU).pack() == b""
    assert QEMU_DMA_WRITE.parse_reply(b"") == DmaWriteReply(0x2000, 3, DmaLayout.QEMU)


def test_qemu_reads_a_spec_dma_write_four_bytes_late() -> None:
    spec = DmaWriteRequest(0x2000, b"abcdefgh").pack()
    assert DmaWriteRequest.unpack_as(spec, (), DmaLayout.QEMU).data == b"\0\0\0\0abcd"


def test_dma_write_probe_is_the_same_in_both_layouts() -> None:
    probe = dma_write_probe(0x2000)
    assert (
        probe.pack()
        == replace(probe, layout=DmaLayout.QEMU).pack()
        == h("0020000000000000") + bytes(8)
    )
    assert detect_dma_write_layout(b"", (), 0x2000) is DmaLayout.QEMU
    assert detect_dma_write_layout(h("0020000000000000") + bytes(8), (), 0x2000) is DmaLayout.SPEC
    assert detect_dma_write_layout(h("0020000000000000 00000000"), (), 0x2000) is DmaLayout.SPEC


def test_region_read_reply_to_count_zero_may_be_empty() -> None:
    req = RegionReadRequest(region=1, offset=4, count=0)
    assert req.parse_reply(b"") == RegionReadReply(1, 4, b"")
    assert RegionWriteRequest(1, 4, b"").parse_reply(b"") == RegionWriteReply(1, 4, 0)


def test_libvfio_user_region_info_caps_flag_without_caps() -> None:
    # libvfio-user (older) sets CAPS but sends no caps when argsz is too small.
    payload = h("60000000 0f000000 01000000 00000000 0040000000000000 0000000000010000")
    reply = RegionInfoReply.unpack(payload)
    assert reply.caps == () and reply.argsz == 96 and reply.flags == 0xF


def test_libvfio_user_one_fd_per_sparse_area() -> None:
    reply = RegionInfoReply.unpack(FULL_REGION_BYTES, (40, 41))
    assert reply.fds == (40, 41)
