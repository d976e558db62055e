"""VERSION from a hostile peer: every capability is bounded, in both directions, and the
JSON itself is bounded in size and depth (issue 9)."""

from __future__ import annotations

import errno
import json
import socket
import struct

import pytest
import trio

from tests.raw_client import GuestRam, expect_raw_errno
from vfiouser_trio.engine import open_connection
from vfiouser_trio.protocol import Capabilities, ProtocolError, VersionReply, VersionRequest
from vfiouser_trio.protocol.capabilities import (
    CAPABILITY_BOUNDS,
    MAX_JSON_DEPTH,
    MAX_VERSION_JSON_SIZE,
)
from vfiouser_trio.protocol.constants import Command
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.serve import serve_connection

DECODERS = pytest.mark.parametrize(
    "unpack", [VersionRequest.unpack, VersionReply.unpack], ids=["request", "reply"]
)


def payload(doc: object) -> bytes:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    return struct.pack("=HH", 0, 2) + text.encode() + b"\0"


def caps_payload(**entries: object) -> bytes:
    return payload({"capabilities": entries})


# (capability named in the error, capabilities entries)
BAD = [
    ("max_data_xfer_size", {"max_data_xfer_size": 0}),
    ("max_data_xfer_size", {"max_data_xfer_size": -1}),
    ("max_data_xfer_size", {"max_data_xfer_size": 63}),
    ("max_data_xfer_size", {"max_data_xfer_size": (1 << 30) + 1}),
    ("max_data_xfer_size", {"max_data_xfer_size": 1 << 64}),
    ("max_data_xfer_size", {"max_data_xfer_size": True}),
    ("max_data_xfer_size", {"max_data_xfer_size": 4096.0}),
    ("max_data_xfer_size", {"max_data_xfer_size": "4096"}),
    ("max_msg_fds", {"max_msg_fds": 0}),
    ("max_msg_fds", {"max_msg_fds": 1025}),
    ("max_msg_fds", {"max_msg_fds": False}),
    ("max_dma_maps", {"max_dma_maps": 0}),
    ("max_dma_maps", {"max_dma_maps": 1 << 32}),
    ("max_dma_maps", {"max_dma_maps": True}),
    ("pgsizes", {"pgsizes": 0}),
    ("pgsizes", {"pgsizes": 512}),
    ("pgsizes", {"pgsizes": 4096 | 512}),  # a page size below 4 KiB
    ("pgsizes", {"pgsizes": 1 << 64}),
    ("pgsizes", {"pgsizes": True}),
    ("twin_socket", {"twin_socket": []}),
    ("twin_socket", {"twin_socket": True}),
    ("twin_socket.supported", {"twin_socket": {"supported": 1}}),
    ("twin_socket.fd_index", {"twin_socket": {"supported": True, "fd_index": True}}),
    ("twin_socket.fd_index", {"twin_socket": {"supported": True, "fd_index": -1}}),
    ("twin_socket.fd_index", {"twin_socket": {"supported": True, "fd_index": 1024}}),
    ("twin_socket.fd_index", {"twin_socket": {"supported": True, "fd_index": "0"}}),
    ("write_multiple", {"write_multiple": 1}),
    ("write_multiple", {"write_multiple": "true"}),
    ("migration", {"migration": "yes"}),
    ("migration", {"migration": [4096]}),
    ("migration.pgsize", {"migration": {"pgsize": 0}}),
    ("migration.pgsize", {"migration": {"pgsize": 4097}}),
    ("migration.pgsize", {"migration": {"pgsize": 2048}}),
    ("migration.pgsize", {"migration": {"pgsize": True}}),
    ("migration.max_bitmap_size", {"migration": {"max_bitmap_size": 0}}),
    ("migration.max_bitmap_size", {"migration": {"max_bitmap_size": -5}}),
]


@DECODERS
@pytest.mark.parametrize(("name", "entries"), BAD, ids=[f"{n}={e}" for n, e in BAD])
def test_bad_capability_is_refused_naming_it(
    unpack: object, name: str, entries: dict[str, object]
) -> None:
    assert callable(unpack)
    with pytest.raises(ProtocolError) as info:
        unpack(caps_payload(**entries))
    assert info.value.errno == errno.EINVAL
    assert name in info.value.message


@DECODERS
@pytest.mark.parametrize("caps", [[], 1, "x", None, True])
def test_capabilities_that_are_not_an_object_are_refused(unpack: object, caps: object) -> None:
    assert callable(unpack)
    with pytest.raises(ProtocolError, match="capabilities is not a JSON object"):
        unpack(payload({"capabilities": caps}))


@DECODERS
def test_bounds_are_inclusive_and_unknown_capabilities_ignored(unpack: object) -> None:
    assert callable(unpack)
    for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps"):
        bounds = CAPABILITY_BOUNDS[name]
        for value in (bounds.low, bounds.high):
            message = unpack(caps_payload(**{name: value}))
            assert getattr(message.capabilities, name) == value
    message = unpack(
        caps_payload(
            pgsizes=4096 | (2 << 20) | (1 << 63),
            migration={"pgsize": 4096, "max_bitmap_size": 1 << 28, "later": "x"},
            future={"nested": [1, {"a": None}]},
        )
    )
    caps = message.capabilities
    assert caps is not None and caps.pgsizes == 4096 | (2 << 20) | (1 << 63)
    assert caps.extra_value("future") == {"nested": [1, {"a": None}]}


@DECODERS
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100, 100_000])
def test_deep_json_is_a_protocol_error_not_recursion(unpack: object, depth: int) -> None:
    assert callable(unpack)
    # Nested inside an unknown capability, where the old decoder recursed on json.loads.
    inner = "[" * (depth - 2) + "]" * (depth - 2)
    text = '{"capabilities":{"x":' + inner + "}}"
    with pytest.raises(ProtocolError) as info:
        unpack(struct.pack("=HH", 0, 2) + text.encode() + b"\0")
    assert info.value.errno == errno.EINVAL


@DECODERS
def test_json_depth_and_size_limits(unpack: object) -> None:
    assert callable(unpack)
    inner = "[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2)
    at_limit = '{"capabilities":{"x":' + inner + "}}"
    assert unpack(payload(at_limit)).capabilities is not None
    # Brackets inside strings (escaped quotes too) are not nesting.
    quoted = {"capabilities": {"s": '\\"[[[[' * 100, "t": "{" * 100}}
    assert unpack(payload(quoted)).capabilities is not None
    padding = "x" * MAX_VERSION_JSON_SIZE
    with pytest.raises(ProtocolError, match="exceeds"):
        unpack(payload({"capabilities": {"pad": padding}}))
    with pytest.raises(ProtocolError, match="unparsable"):
        unpack(payload('{"capabilities": {"s": "[[[[[['))


def test_bounds_table_covers_every_numeric_capability() -> None:
    numeric = {"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"}
    assert numeric <= set(CAPABILITY_BOUNDS)
    Capabilities().check()  # the spec's defaults are inside the bounds
    with pytest.raises(ProtocolError, match="max_data_xfer_size"):
        Capabilities(max_data_xfer_size=0).check()


# --- through a running server ---------------------------------------------------------------


class Tiny(Device):
    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10FE, class_code=0xFF0000))
        self.add_bar(0, 0x100)


HOSTILE_VERSIONS = [
    caps_payload(max_data_xfer_size=0),
    caps_payload(max_data_xfer_size=True),
    caps_payload(max_msg_fds=0),
    caps_payload(pgsizes=0),
    struct.pack("=HH", 0, 2) + b'{"capabilities":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}\0",
]


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize(
    "version", HOSTILE_VERSIONS, ids=["xfer0", "xfer-true", "fds0", "pg0", "deep"]
)
async def test_server_refuses_hostile_version_and_keeps_serving(version: bytes) -> None:
    device = Tiny()
    client_sock, server_sock = socket.socketpair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, device, server_sock)
            async with open_connection(client_sock, handler=GuestRam(0, 0).handle) as conn:
                # EINVAL, not EIO (an escaped RecursionError) nor a session on a zero size.
                await expect_raw_errno(conn, Command.VERSION, version, errno.EINVAL)
                reply = await conn.request(VersionRequest(0, 2, Capabilities()))
                assert isinstance(reply, VersionReply)
    device.close()
