"""DMA_WRITE decoded without copying its data (``unpack_as(..., copy=False)``), and the
server's object-free packing and checks of DMA_READ/DMA_WRITE."""

from __future__ import annotations

import errno

import pytest

from vfiouser_trio.protocol.dma import (
    DmaLayout,
    DmaReadReply,
    DmaReadRequest,
    DmaWriteReply,
    DmaWriteRequest,
    check_dma_write_reply,
    dma_read_reply_data,
    dma_read_request_payload,
    dma_rw_pieces,
)
from vfiouser_trio.protocol.errors import ProtocolError


@pytest.mark.parametrize("layout", list(DmaLayout))
def test_a_dma_write_decodes_to_a_read_only_view_of_its_frame(layout: DmaLayout) -> None:
    payload = DmaWriteRequest(0x1000, b"data" * 1000, layout).pack()
    request = DmaWriteRequest.unpack_as(payload, (), layout, copy=False)
    assert isinstance(request.data, memoryview) and request.data.obj is payload
    assert request.data.readonly and request.data == b"data" * 1000
    assert request == DmaWriteRequest.unpack_as(payload, (), layout)  # the copying decode
    assert type(DmaWriteRequest.unpack_as(payload, (), layout).data) is bytes


def test_the_view_decode_checks_as_the_copying_one() -> None:
    payload = DmaWriteRequest(0x1000, b"abcd").pack()
    with pytest.raises(ProtocolError):
        DmaWriteRequest.unpack_as(payload[:-1], (), DmaLayout.SPEC, copy=False)


# --- the server's per-message checks, without message objects ---------------------------


@pytest.mark.parametrize("layout", list(DmaLayout))
def test_a_dma_read_reply_gives_a_view_of_its_data_once_it_echoes_the_request(
    layout: DmaLayout,
) -> None:
    payload = DmaReadReply(0x2000, b"wxyz" * 8, layout).pack()
    data = dma_read_reply_data(payload, 0x2000, 32, layout)
    assert data == b"wxyz" * 8 and data.readonly and data.obj is payload
    assert dma_read_request_payload(0x2000, 32) == DmaReadRequest(0x2000, 32).pack()
    bad = [
        (payload, 0x2008, 32),  # another address
        (payload, 0x2000, 31),  # another count
        (payload[:-1], 0x2000, 32),  # a byte short
        (payload + b"\0", 0x2000, 32),  # a byte over
        (payload[:8], 0x2000, 0),  # shorter than any DMA header
    ]
    for wrong, address, count in bad:
        with pytest.raises(ProtocolError) as raised:
            dma_read_reply_data(wrong, address, count, layout)
        assert raised.value.errno == errno.EINVAL
        with pytest.raises(ProtocolError):  # the message class applies the same rule
            DmaReadRequest(address, count).parse_reply(wrong, layout=layout)


@pytest.mark.parametrize("layout", list(DmaLayout))
def test_a_dma_write_reply_must_echo_the_request_in_its_layout(layout: DmaLayout) -> None:
    request = DmaWriteRequest(0x3000, b"q" * 64, layout)
    assert dma_rw_pieces(0x3000, b"q" * 64, layout) == request.pack_pieces()
    reply = DmaWriteReply(0x3000, 64, layout).pack()
    check_dma_write_reply(reply, 0x3000, 64, layout)
    if layout is DmaLayout.SPEC:
        check_dma_write_reply(reply[:12], 0x3000, 64, layout)  # the spec table's u32 count
        wrong = [reply[:11], DmaWriteReply(0x3000, 63).pack(), DmaWriteReply(0, 64).pack()]
    else:
        assert reply == b""  # QEMU answers with the header alone
        wrong = [DmaWriteReply(0x3000, 64).pack()]
    for payload in wrong:
        with pytest.raises(ProtocolError):
            check_dma_write_reply(payload, 0x3000, 64, layout)
        with pytest.raises(ProtocolError):
            request.parse_reply(payload)
