"""VERSION: capabilities JSON and the negotiation rules of both sides."""

from __future__ import annotations

import errno
import struct

import pytest

from vfiouser_trio.protocol import (
    Capabilities,
    ProtocolError,
    TwinSocket,
    VersionReply,
    VersionRequest,
    check_server_reply,
    negotiate_server_reply,
    wants_twin_socket,
)


def version_payload(major: int, minor: int, json_text: bytes | None) -> bytes:
    head = struct.pack("=HH", major, minor)
    return head if json_text is None else head + json_text + b"\0"


# libvfio-user's server reply, as json-c prints it (JSON_C_TO_STRING_SPACED).
LIBVFIO_USER_JSON = (
    b'{ "capabilities": { "max_msg_fds": 8, "max_data_xfer_size": 1048576, '
    b'"migration": { "pgsize": 4096 } } }'
)
# QEMU 10.1's client proposal (qobject_to_json; key order is QEMU's hash order).
QEMU_JSON = (
    b'{"capabilities": {"max_data_xfer_size": 1048576, "pgsizes": 4096, '
    b'"migration": {"pgsize": 4096, "max_bitmap_size": 268435456}, '
    b'"write_multiple": true, "max_dma_maps": 65535, "max_msg_fds": 16}}'
)


def test_absent_json_means_defaults() -> None:
    req = VersionRequest.unpack(version_payload(0, 0, None))
    assert req == VersionRequest(0, 0, None)
    caps = req.effective_capabilities
    assert caps == Capabilities()
    assert (caps.max_msg_fds, caps.max_data_xfer_size, caps.max_dma_maps, caps.pgsizes) == (
        1,
        1 << 20,
        65535,
        4096,
    )
    assert caps.twin_socket is None and not caps.write_multiple


def test_json_without_capabilities_means_defaults() -> None:
    req = VersionRequest.unpack(version_payload(0, 1, b'{"other": 1}'))
    assert req.capabilities is None
    assert req.effective_capabilities == Capabilities()


def test_unknown_capabilities_are_ignored_and_kept() -> None:
    req = VersionRequest.unpack(
        version_payload(
            0, 0, b'{"capabilities": {"future_thing": [1, {"a": null}], "max_msg_fds": 4}}'
        )
    )
    assert req.capabilities is not None
    assert req.capabilities.max_msg_fds == 4
    assert req.capabilities.extra_value("future_thing") == [1, {"a": None}]
    with pytest.raises(KeyError):
        req.capabilities.extra_value("absent")


def test_libvfio_user_reply_parses() -> None:
    reply = VersionReply.unpack(version_payload(0, 2, LIBVFIO_USER_JSON))
    caps = reply.effective_capabilities
    assert (reply.major, reply.minor) == (0, 2)
    assert caps.max_msg_fds == 8 and caps.max_data_xfer_size == 1 << 20
    assert caps.max_dma_maps == 65535 and caps.pgsizes == 4096  # defaults
    assert caps.extra_value("migration") == {"pgsize": 4096}
    assert not caps.twin_supported


def test_qemu_proposal_parses() -> None:
    req = VersionRequest.unpack(version_payload(0, 0, QEMU_JSON))
    caps = req.effective_capabilities
    assert caps.max_msg_fds == 16 and caps.write_multiple
    assert caps.max_dma_maps == 65535 and caps.pgsizes == 4096
    assert caps.extra_value("migration") == {"pgsize": 4096, "max_bitmap_size": 268435456}


def test_capabilities_json_round_trip() -> None:
    caps = Capabilities(
        max_msg_fds=16,
        max_data_xfer_size=1 << 16,
        max_dma_maps=10,
        pgsizes=4096 | (2 << 20),
        twin_socket=TwinSocket(True, 1),
        write_multiple=True,
        extra=Capabilities.extra_from({"migration": {"pgsize": 4096}}),
    )
    assert Capabilities.from_json(caps.to_json()) == caps
    assert Capabilities.from_json("{}") is None


def test_nul_ends_the_json_string() -> None:
    req = VersionRequest.unpack(b"\0\0\0\0{}\0garbage\0")
    assert req.capabilities is None


def test_major_is_not_checked_by_unpack() -> None:
    assert VersionRequest.unpack(version_payload(1, 0, None)).major == 1


# -- server side ------------------------------------------------------------


SERVER = Capabilities(
    max_msg_fds=8,
    write_multiple=True,
    extra=Capabilities.extra_from({"migration": {"pgsize": 4096}}),
)


def test_server_reply_minor_is_min_and_limits_are_ours() -> None:
    req = VersionRequest.unpack(version_payload(0, 0, QEMU_JSON))
    reply, session = negotiate_server_reply(req, SERVER)
    assert (reply.major, reply.minor) == (0, 0)
    assert reply.capabilities is not None
    assert reply.capabilities.max_msg_fds == 8
    assert reply.capabilities.write_multiple  # QEMU proposed it, we support it
    assert reply.capabilities.twin_socket is None
    assert reply.capabilities.extra_value("migration") == {"pgsize": 4096}
    assert reply.fds == ()
    assert session.write_multiple and not session.twin_socket
    assert session.send_max_msg_fds == 16  # QEMU can receive 16
    assert session.send_max_data_xfer_size == 1 << 20
    _, newer = negotiate_server_reply(VersionRequest(0, 7), SERVER)
    assert newer.minor == 2


def test_server_reply_is_a_subset_of_the_proposal() -> None:
    reply, session = negotiate_server_reply(VersionRequest(0, 2), SERVER)
    assert reply.capabilities is not None
    assert not reply.capabilities.write_multiple  # not proposed
    assert not session.write_multiple
    plain = Capabilities()
    req = VersionRequest(0, 2, Capabilities(write_multiple=True))
    reply, _ = negotiate_server_reply(req, plain)
    assert reply.capabilities is not None and not reply.capabilities.write_multiple


def test_server_enables_twin_only_if_proposed() -> None:
    proposing = VersionRequest(0, 2, Capabilities(twin_socket=TwinSocket(True)))
    assert wants_twin_socket(proposing)
    reply, session = negotiate_server_reply(proposing, SERVER, twin_fd_index=0)
    assert reply.capabilities is not None
    assert reply.capabilities.twin_socket == TwinSocket(True, 0)
    assert session.twin_fd_index == 0
    silent = VersionRequest(0, 2, Capabilities(twin_socket=TwinSocket(False)))
    assert not wants_twin_socket(silent)
    with pytest.raises(ValueError):
        negotiate_server_reply(silent, SERVER, twin_fd_index=0)
    reply, session = negotiate_server_reply(proposing, SERVER)  # server declines
    assert reply.capabilities is not None and reply.capabilities.twin_socket is None
    assert not session.twin_socket


def test_server_rejects_other_major() -> None:
    with pytest.raises(ProtocolError) as info:
        negotiate_server_reply(VersionRequest(1, 0), SERVER)
    assert info.value.errno == errno.EINVAL


# -- client side ------------------------------------------------------------

PROPOSAL = VersionRequest(
    0, 2, Capabilities(max_msg_fds=16, twin_socket=TwinSocket(True), write_multiple=True)
)


def reply_with(caps: Capabilities | None, *, major: int = 0, minor: int = 2) -> VersionReply:
    return VersionReply(major, minor, caps)


def test_client_accepts_libvfio_user_reply() -> None:
    reply = VersionReply.unpack(version_payload(0, 2, LIBVFIO_USER_JSON))
    session = check_server_reply(PROPOSAL, reply, 0)
    assert session.minor == 2 and not session.twin_socket and not session.write_multiple
    assert session.send_max_msg_fds == 8
    assert session.recv_max_data_xfer_size == 1 << 20


def test_client_accepts_twin_socket() -> None:
    caps = Capabilities(twin_socket=TwinSocket(True, 1), max_data_xfer_size=4096)
    payload = version_payload(0, 1, caps.to_json().encode())
    reply = VersionReply.unpack(payload, (40, 41))
    session = check_server_reply(PROPOSAL, reply, 2)
    assert session.twin_fd_index == 1 and session.minor == 1
    assert session.send_max_data_xfer_size == 4096  # the server's value


def test_client_accepts_reply_without_json() -> None:
    session = check_server_reply(PROPOSAL, reply_with(None), 0)
    assert session.peer == Capabilities()


@pytest.mark.parametrize(
    ("reply", "nfds"),
    [
        (reply_with(None, major=1), 0),  # major mismatch
        (reply_with(None, minor=3), 0),  # minor above proposal
        (reply_with(Capabilities(twin_socket=TwinSocket(True))), 0),  # no fd_index
        (reply_with(Capabilities(twin_socket=TwinSocket(True, 1))), 1),  # index out of range
        (reply_with(Capabilities(twin_socket=TwinSocket(False, 0))), 1),  # fd without twin
        (reply_with(None), 1),  # fd without twin
    ],
)
def test_client_rejects_inconsistent_reply(reply: VersionReply, nfds: int) -> None:
    with pytest.raises(ProtocolError) as info:
        check_server_reply(PROPOSAL, reply, nfds)
    assert info.value.errno == errno.EINVAL


def test_client_rejects_features_it_did_not_propose() -> None:
    modest = VersionRequest(0, 0)
    with pytest.raises(ProtocolError):
        check_server_reply(modest, reply_with(Capabilities(write_multiple=True), minor=0), 0)
    with pytest.raises(ProtocolError):
        check_server_reply(
            modest, reply_with(Capabilities(twin_socket=TwinSocket(True, 0)), minor=0), 1
        )


def test_server_reply_passes_client_check() -> None:
    req = VersionRequest.unpack(PROPOSAL.pack())
    reply, server_side = negotiate_server_reply(req, SERVER, twin_fd_index=0)
    wire = VersionReply.unpack(reply.pack(), (77,))
    client_side = check_server_reply(PROPOSAL, wire, 1)
    assert client_side.minor == server_side.minor == 2
    assert client_side.twin_fd_index == server_side.twin_fd_index == 0
    assert client_side.write_multiple and server_side.write_multiple
    assert client_side.send_max_msg_fds == 8 and server_side.send_max_msg_fds == 16
