"""DMA_WRITE decoded without copying its data (``unpack_as(..., copy=False)``)."""

from __future__ import annotations

import pytest

from vfiouser_trio.protocol.dma import DmaLayout, DmaWriteRequest
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
