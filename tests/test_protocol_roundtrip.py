"""Hypothesis round-trips: decode(pack(m), m.fds) == m for every message type."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    Feature,
    IoEventFdSubRegion,
    IoRegionFdSubRegion,
    IrqInfoReply,
    IrqInfoRequest,
    Message,
    MigDataReadReply,
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
    UnknownRegionCap,
    VersionReply,
    VersionRequest,
    decode_reply,
    decode_request,
)
from vfiouser_trio.protocol.capabilities import CAPABILITY_BOUNDS

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, (1 << 64) - 1)
FD = st.integers(3, 1 << 20)  # fds are never touched by unpack; any int will do
DATA = st.binary(max_size=64)
FAST = settings(max_examples=60, deadline=None)

# -- VERSION ----------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 53), 1 << 53) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
MODELLED = {
    "max_msg_fds",
    "max_data_xfer_size",
    "max_dma_maps",
    "pgsizes",
    "twin_socket",
    "write_multiple",
    "migration",  # legacy, kept in extra but its form is checked
}
EXTRA = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(lambda k: k not in MODELLED), JSON_VALUES, max_size=3
).map(Capabilities.extra_from)


def _bounded(name: str) -> st.SearchStrategy[int]:
    bounds = CAPABILITY_BOUNDS[name]
    return st.integers(bounds.low, bounds.high)


def capabilities(twin: st.SearchStrategy[TwinSocket | None]) -> st.SearchStrategy[Capabilities]:
    # Every value a decoder accepts (see CAPABILITY_BOUNDS); pgsizes names pages >= 4 KiB.
    return st.builds(
        Capabilities,
        max_msg_fds=_bounded("max_msg_fds"),
        max_data_xfer_size=_bounded("max_data_xfer_size"),
        max_dma_maps=_bounded("max_dma_maps"),
        pgsizes=st.integers(1, (1 << 52) - 1).map(lambda p: p << 12),
        twin_socket=twin,
        write_multiple=st.booleans(),
        extra=EXTRA,
    )


PROPOSED_TWIN = st.none() | st.builds(TwinSocket, st.booleans())
version_requests = st.builds(VersionRequest, U16, U16, st.none() | capabilities(PROPOSED_TWIN))


@st.composite
def version_replies(draw: st.DrawFn) -> VersionReply:
    nfds = draw(st.integers(0, 3))
    twin = draw(
        st.builds(TwinSocket, st.booleans(), st.integers(0, nfds - 1)) if nfds else PROPOSED_TWIN
    )
    caps = draw(capabilities(st.just(twin)) if nfds else st.none() | capabilities(st.just(twin)))
    fds = tuple(draw(st.lists(FD, min_size=nfds, max_size=nfds)))
    return VersionReply(draw(U16), draw(U16), caps, fds)


# -- DMA --------------------------------------------------------------------

dma_map_requests = st.builds(
    DmaMapRequest,
    address=U64,
    size=U64,
    flags=st.integers(0, 3),
    offset=U64,
    fds=st.lists(FD, max_size=1).map(tuple),
    argsz=st.integers(32, 0xFFFFFFFF),
)
dma_unmap_requests = st.one_of(
    st.builds(DmaUnmapRequest, U64, U64, st.just(0), st.integers(24, 0xFFFFFFFF)),
    st.builds(DmaUnmapRequest, st.just(0), st.just(0), st.just(2), st.integers(24, 0xFFFFFFFF)),
)
dma_unmap_replies = st.builds(DmaUnmapReply, U64, U64, U32, U32)
dma_read_requests = st.builds(DmaReadRequest, U64, U64)
dma_read_replies = st.builds(DmaReadReply, U64, DATA, st.sampled_from(DmaLayout))
dma_write_requests = st.builds(DmaWriteRequest, U64, DATA)
dma_write_replies = st.builds(DmaWriteReply, U64, U64)

# -- device info, regions, irqs ------------------------------------------------

get_info_requests = st.builds(DeviceGetInfoRequest, st.integers(16, 0xFFFFFFFF))
get_info_replies = st.builds(DeviceGetInfoReply, U32, U32, U32, U32)
region_info_requests = st.builds(RegionInfoRequest, U32, st.integers(32, 0xFFFFFFFF))
region_caps = st.one_of(
    st.builds(
        SparseMmapCap,
        st.lists(st.builds(SparseMmapArea, U64, U64), max_size=4).map(tuple),
        U16,
    ),
    st.builds(RegionTypeCap, U32, U32, U16),
    st.builds(UnknownRegionCap, U16.filter(lambda i: i not in (1, 2)), DATA, U16),
)


@st.composite
def region_info_replies(draw: st.DrawFn) -> RegionInfoReply:
    index, flags, size, offset = draw(U32), draw(U32), draw(U64), draw(U64)
    fds = tuple(draw(st.lists(FD, max_size=1)))
    if draw(st.booleans()):
        caps = tuple(draw(st.lists(region_caps, min_size=1, max_size=3)))
        return RegionInfoReply(index, flags, size, offset, caps, fds)
    # No caps: any argsz (e.g. a cut-short reply), optional zero padding.
    return RegionInfoReply(index, flags, size, offset, (), fds, draw(U32), draw(st.integers(0, 64)))


io_fds_requests = st.builds(RegionIoFdsRequest, U32, st.integers(16, 0xFFFFFFFF))


@st.composite
def io_fds_replies(draw: st.DrawFn) -> RegionIoFdsReply:
    index = draw(U32)
    if draw(st.booleans()):  # cut short: count only
        return RegionIoFdsReply(index, (), (), draw(U32), draw(U32))
    nfds = draw(st.integers(1, 4))
    fd_index = st.integers(0, nfds - 1)
    sub = st.one_of(
        st.builds(IoEventFdSubRegion, U64, U64, fd_index, U32, U64),
        st.builds(IoRegionFdSubRegion, U64, U64, fd_index, U32, U64),
    )
    subs = tuple(draw(st.lists(sub, min_size=1, max_size=4)))
    fds = tuple(draw(st.lists(FD, min_size=nfds, max_size=nfds)))
    return RegionIoFdsReply(index, subs, fds, argsz=draw(st.none() | U32))


irq_info_requests = st.builds(IrqInfoRequest, U32, st.integers(16, 0xFFFFFFFF))
irq_info_replies = st.builds(IrqInfoReply, U32, U32, U32, U32)


@st.composite
def set_irqs_requests(draw: st.DrawFn) -> SetIrqsRequest:
    index = draw(U32)
    argsz = draw(st.none() | st.integers(20, 0xFFFFFFFF))
    if draw(st.integers(0, 5)) == 0:
        return SetIrqsRequest(index, 0x21, argsz=argsz)  # disable all
    action = draw(st.sampled_from([0x08, 0x10, 0x20]))
    data_type = draw(st.sampled_from([0x1, 0x2, 0x4]))
    count = draw(st.integers(1, 16))
    start = draw(U32)
    data = b""
    fds: tuple[int, ...] = ()
    if data_type == 0x2:
        data = draw(st.binary(min_size=count, max_size=count))
    elif data_type == 0x4 and draw(st.booleans()):
        fds = tuple(draw(st.lists(FD, min_size=count, max_size=count)))
    return SetIrqsRequest(index, action | data_type, start, count, data, fds, argsz)


# -- region I/O ----------------------------------------------------------------

region_read_requests = st.builds(RegionReadRequest, U32, U64, U32)
region_read_replies = st.builds(RegionReadReply, U32, U64, DATA)
region_write_requests = st.builds(RegionWriteRequest, U32, U64, DATA)
region_write_replies = st.builds(RegionWriteReply, U32, U64, U32)
write_multi_requests = st.builds(
    RegionWriteMultiRequest,
    st.lists(st.builds(RegionWriteEntry, U32, U64, st.binary(max_size=8)), max_size=6).map(tuple),
)
write_multi_replies = st.builds(RegionWriteMultiReply, U64)

# -- DEVICE_FEATURE -------------------------------------------------------------

GET, SET, PROBE = 1 << 16, 1 << 17, 1 << 18
log_control = st.builds(
    DmaLoggingControl, U64, st.lists(st.builds(DmaLoggingRange, U64, U64), max_size=3).map(tuple)
)
mig_state = st.builds(MigDeviceState, U32, st.integers(-(1 << 31), (1 << 31) - 1))
feature_argsz = st.none() | st.integers(8, 0xFFFFFFFF)


def _feature_requests() -> st.SearchStrategy[DeviceFeatureRequest]:
    def req(flags: int, data: st.SearchStrategy[object]) -> st.SearchStrategy[DeviceFeatureRequest]:
        return st.builds(DeviceFeatureRequest, st.just(flags), data, feature_argsz)

    probe_ops = st.sampled_from([PROBE, PROBE | GET, PROBE | SET, PROBE | GET | SET])
    return st.one_of(
        req(Feature.MIGRATION | GET, st.just(b"")),
        req(Feature.MIG_DEVICE_STATE | GET, st.just(b"")),
        req(Feature.MIG_DEVICE_STATE | SET, mig_state),
        req(Feature.DMA_LOGGING_START | SET, log_control),
        req(Feature.DMA_LOGGING_STOP | SET, st.just(b"") | log_control),
        req(
            Feature.DMA_LOGGING_REPORT | GET,
            # Reports whose bitmap cannot fit a 32-bit argsz are refused at construction.
            st.builds(DmaLoggingReport, U64, U64, U64).filter(
                lambda r: r.bitmap_size <= 0xFFFFFFFF - 32
            ),
        ),
        st.builds(
            DeviceFeatureRequest,
            st.tuples(st.sampled_from(Feature), probe_ops).map(lambda t: t[0] | t[1]),
            DATA,
            feature_argsz,
        ),
    )


def _feature_replies() -> st.SearchStrategy[DeviceFeatureReply]:
    def rep(flags: int, data: st.SearchStrategy[object]) -> st.SearchStrategy[DeviceFeatureReply]:
        return st.builds(DeviceFeatureReply, st.just(flags), data, feature_argsz)

    return st.one_of(
        rep(Feature.MIGRATION | GET, st.builds(MigrationInfo, U64)),
        rep(Feature.MIG_DEVICE_STATE | GET, mig_state),
        rep(Feature.MIG_DEVICE_STATE | SET, mig_state),
        rep(Feature.DMA_LOGGING_START | SET, log_control),
        rep(Feature.DMA_LOGGING_REPORT | GET, st.builds(DmaLoggingBitmap, U64, U64, U64, DATA)),
        rep(Feature.DMA_LOGGING_START | PROBE, DATA),
    )


# -- migration data -------------------------------------------------------------

mig_read_requests = st.integers(0, 0xFFFF).flatmap(
    lambda size: st.builds(
        MigDataReadRequest, st.just(size), st.none() | st.integers(8 + size, 0xFFFFFFFF)
    )
)
mig_read_replies = DATA.flatmap(
    lambda d: st.builds(MigDataReadReply, st.just(d), st.none() | st.integers(len(d), len(d) + 32))
)
mig_write_requests = DATA.flatmap(
    lambda d: st.builds(
        MigDataWriteRequest, st.just(d), st.none() | st.integers(8 + len(d), 0xFFFFFFFF)
    )
)

STRATEGIES: dict[type[Message], st.SearchStrategy[Message]] = {
    VersionRequest: version_requests,
    VersionReply: version_replies(),
    DmaMapRequest: dma_map_requests,
    DmaMapReply: st.just(DmaMapReply()),
    DmaUnmapRequest: dma_unmap_requests,
    DmaUnmapReply: dma_unmap_replies,
    DeviceGetInfoRequest: get_info_requests,
    DeviceGetInfoReply: get_info_replies,
    RegionInfoRequest: region_info_requests,
    RegionInfoReply: region_info_replies(),
    RegionIoFdsRequest: io_fds_requests,
    RegionIoFdsReply: io_fds_replies(),
    IrqInfoRequest: irq_info_requests,
    IrqInfoReply: irq_info_replies,
    SetIrqsRequest: set_irqs_requests(),
    SetIrqsReply: st.just(SetIrqsReply()),
    RegionReadRequest: region_read_requests,
    RegionReadReply: region_read_replies,
    RegionWriteRequest: region_write_requests,
    RegionWriteReply: region_write_replies,
    DmaReadRequest: dma_read_requests,
    DmaReadReply: dma_read_replies,
    DmaWriteRequest: dma_write_requests,
    DmaWriteReply: dma_write_replies,
    DeviceResetRequest: st.just(DeviceResetRequest()),
    DeviceResetReply: st.just(DeviceResetReply()),
    RegionWriteMultiRequest: write_multi_requests,
    RegionWriteMultiReply: write_multi_replies,
    DeviceFeatureRequest: _feature_requests(),
    DeviceFeatureReply: _feature_replies(),
    MigDataReadRequest: mig_read_requests,
    MigDataReadReply: mig_read_replies,
    MigDataWriteRequest: mig_write_requests,
    MigDataWriteReply: st.just(MigDataWriteReply()),
}


def test_every_message_type_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(REQUEST_TYPES.values()) | set(REPLY_TYPES.values())


ANY_REQUEST = st.one_of([s for t, s in STRATEGIES.items() if not t.IS_REPLY])
ANY_REPLY = st.one_of([s for t, s in STRATEGIES.items() if t.IS_REPLY])


def _decode_reply(m: Message) -> Message:
    if isinstance(m, DmaReadReply):
        # Only the request knows the count; QEMU's layout needs the hint.
        req = DmaReadRequest(m.address, m.count)
        return req.parse_reply(m.pack(), m.fds, layout=m.layout)
    return decode_reply(m.COMMAND, m.pack(), m.fds)


@settings(max_examples=400, deadline=None)
@given(ANY_REQUEST)
def test_request_round_trip(m: Message) -> None:
    payload = m.pack()
    assert isinstance(payload, bytes)
    assert decode_request(m.COMMAND, payload, m.fds) == m
    assert type(m).unpack(memoryview(payload), m.fds) == m


@settings(max_examples=400, deadline=None)
@given(ANY_REPLY)
def test_reply_round_trip(m: Message) -> None:
    assert _decode_reply(m) == m


@FAST
@given(region_read_requests.filter(lambda r: r.count <= 256), st.data())
def test_region_read_reply_parsed_by_its_request(
    req: RegionReadRequest, data: st.DataObject
) -> None:
    body = data.draw(st.binary(min_size=req.count, max_size=req.count))
    reply = RegionReadReply(req.region, req.offset, body)
    assert req.parse_reply(reply.pack()) == reply


@FAST
@given(st.builds(DmaReadRequest, U64, st.integers(0, 64)), st.data())
def test_dma_read_reply_parsed_by_its_request(req: DmaReadRequest, data: st.DataObject) -> None:
    body = data.draw(st.binary(min_size=req.count, max_size=req.count))
    spec = DmaReadReply(req.address, body)
    qemu = DmaReadReply(req.address, body, DmaLayout.QEMU)
    assert req.parse_reply(spec.pack()).data == body
    assert req.parse_reply(qemu.pack(), layout=DmaLayout.QEMU) == qemu
    # Without a hint, QEMU's layout is recognised unless it is ambiguous.
    detected = req.parse_reply(qemu.pack())
    if detected.layout is DmaLayout.QEMU:
        assert detected == qemu


@FAST
@given(st.builds(DmaWriteRequest, U64, DATA, st.sampled_from(DmaLayout)))
def test_dma_write_in_either_layout(req: DmaWriteRequest) -> None:
    assert DmaWriteRequest.unpack_as(req.pack(), (), req.layout) == req
    reply = DmaWriteReply(req.address, req.count, req.layout)
    assert req.parse_reply(reply.pack()) == reply


@FAST
@given(
    st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.binary(min_size=n, max_size=n)))
)
def test_mig_data_read_reply_parsed_by_its_request(case: tuple[int, bytes]) -> None:
    size, body = case
    req = MigDataReadRequest(size)
    short = body[: size // 2]
    assert req.parse_reply(req.reply(short).pack()).data == short
    assert req.parse_reply(req.reply(body).pack()).data == body


def test_report_request_too_large_for_argsz_is_refused() -> None:
    report = DmaLoggingReport(0, 1 << 40, 1)  # a 2**37-byte bitmap
    with pytest.raises(ValueError, match="argsz"):
        DeviceFeatureRequest.get(Feature.DMA_LOGGING_REPORT, report)
    with pytest.raises(ValueError, match="argsz"):
        DeviceFeatureRequest(Feature.MIGRATION | GET, b"", 1 << 32)
