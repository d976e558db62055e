"""negotiation: VERSION (spec: "VFIO_USER_VERSION")."""

from __future__ import annotations

import errno

from ....protocol.capabilities import Capabilities, TwinSocket
from ....protocol.constants import VERSION_MINOR, Command
from ....protocol.device_info import DeviceGetInfoRequest
from ....protocol.framing import close_fds
from ....protocol.version import VersionReply
from ...conformance.model import Level, check
from ..context import Probe
from ..layouts import VERSION as _VERSION
from ..wire import describe, hexdump

G = "negotiation"
S = "VFIO_USER_VERSION"


def _version(major: int, minor: int, data: bytes | None) -> bytes:
    return _VERSION.pack(major, minor) + (data if data is not None else b"")


async def _version_reply(probe: Probe, payload: bytes, what: str) -> VersionReply:
    """Send VERSION ``payload`` on a fresh connection; it must be accepted with a reply
    whose major is ours, minor not above the proposal, capabilities a subset."""
    wire = await probe.connect(negotiate=False)
    frame = await probe.call_ok(wire, Command.VERSION, payload, what=what)
    fds = frame.take_fds()
    try:
        parsed = VersionReply.unpack(frame.payload, fds)
    except Exception as exc:
        probe.fail(
            f"{what}: the reply is malformed: {exc}",
            sent=hexdump(payload),
            received=describe(frame),
            expected="major, minor, optional JSON",
        )
    finally:
        close_fds(fds)
    major, minor = _VERSION.unpack_from(payload)
    if parsed.major != major or parsed.minor > minor:
        probe.fail(
            f"{what}: reply version {parsed.major}.{parsed.minor} to a proposal of {major}.{minor}",
            sent=hexdump(payload),
            received=describe(frame),
            expected=f"major {major}, minor at most {minor}",
        )
    return parsed


@check(
    "neg-01",
    G,
    Level.MUST,
    S,
    "accepts VERSION 0.x with full capabilities; the reply's major is the proposal's, its "
    "minor not above it, its capabilities a consistent subset (twin socket only if proposed)",
)
async def plain_version(probe: Probe) -> str:
    proposal = Capabilities(max_msg_fds=16, twin_socket=TwinSocket(True), write_multiple=True)
    wire = await probe.connect(negotiate=False)
    negotiated = await wire.negotiate(proposal)
    return f"minor {negotiated.minor}, twin socket {'on' if negotiated.twin_socket else 'off'}"


@check(
    "neg-02",
    G,
    Level.MUST,
    S,
    "accepts VERSION without version data (every capability at its default)",
)
async def no_data(probe: Probe) -> None:
    await _version_reply(probe, _version(0, VERSION_MINOR, None), "VERSION without JSON")


@check(
    "neg-03",
    G,
    Level.MUST,
    S,
    "accepts a proposal of a higher minor version, replying with a minor it supports",
)
async def higher_minor(probe: Probe) -> str:
    reply = await _version_reply(
        probe, _version(0, 0xFFFF, b'{"capabilities":{}}\0'), "VERSION 0.65535"
    )
    return f"replied minor {reply.minor}"


@check(
    "neg-04",
    G,
    Level.MUST,
    S,
    "does not accept an unsupported major version (error reply or hang-up)",
)
async def other_major(probe: Probe) -> None:
    payload = _version(0xFFFF, 0, b'{"capabilities":{}}\0')
    wire = await probe.connect(negotiate=False)
    header, reply = await wire.call(Command.VERSION, payload)
    if reply is not None and reply.header.is_reply and not reply.header.is_error:
        reply.close_fds()
        major = _VERSION.unpack_from(reply.payload)[0] if len(reply.payload) >= 4 else None
        if major == 0xFFFF:
            probe.fail(
                "accepted major version 65535",
                sent=hexdump(payload),
                received=describe(reply),
                expected="an error reply or the connection closed",
            )
        return  # a reply with another major: the client is to close (spec), no harm done
    probe.expect_refused(header, reply, what="VERSION 65535.0", payload=payload)


@check(
    "neg-05",
    G,
    Level.SHOULD,
    S,
    "ignores capabilities it does not know (a newer minor may add some)",
)
async def unknown_capability(probe: Probe) -> None:
    data = b'{"capabilities":{"x_conform_unknown":{"nested":[1,2,{"a":null}]},"x_flag":true}}\0'
    await _version_reply(
        probe, _version(0, VERSION_MINOR, data), "VERSION with unknown capabilities"
    )


#: Every capability form the spec defines, proposed one at a time.
_FORMS = {
    "max_msg_fds": b'{"capabilities":{"max_msg_fds":8}}\0',
    "max_data_xfer_size": b'{"capabilities":{"max_data_xfer_size":65536}}\0',
    "max_dma_maps": b'{"capabilities":{"max_dma_maps":16}}\0',
    "pgsizes": b'{"capabilities":{"pgsizes":4096}}\0',
    "twin_socket false": b'{"capabilities":{"twin_socket":{"supported":false}}}\0',
    "twin_socket true": b'{"capabilities":{"twin_socket":{"supported":true}}}\0',
    "write_multiple false": b'{"capabilities":{"write_multiple":false}}\0',
    "write_multiple true": b'{"capabilities":{"write_multiple":true}}\0',
    "migration (legacy)": b'{"capabilities":{"migration":{"pgsize":4096}}}\0',
    "empty capabilities": b'{"capabilities":{}}\0',
    "empty document": b"{}\0",
}


@check(
    "neg-06",
    G,
    Level.MUST,
    S,
    "accepts every capability form of the spec, each alone, and "
    "enables twin sockets / write_multiple only when proposed",
)
async def every_form(probe: Probe) -> None:
    for name, data in _FORMS.items():
        payload = _version(0, VERSION_MINOR, data)
        reply = await _version_reply(probe, payload, f"VERSION with {name}")
        caps = reply.effective_capabilities
        proposed_twin = b'"supported":true' in data
        proposed_wm = b'"write_multiple":true' in data
        if (caps.twin_supported and not proposed_twin) or (caps.write_multiple and not proposed_wm):
            probe.fail(
                f"VERSION with {name}: the reply enables what was not proposed",
                sent=hexdump(payload),
                received=caps.to_json(),
                expected="capabilities that are a subset of the proposal",
            )


#: Version data no server may accept: name -> bytes after major/minor.
_MALFORMED = {
    "JSON not NUL-terminated": b'{"capabilities":{}}',
    "invalid JSON": b'{"capabilities":\0',
    "JSON not an object": b"[1,2]\0",
    "capabilities not an object": b'{"capabilities":7}\0',
    "invalid UTF-8": b'{"capabilities":{"\xff":1}}\0',
    "max_msg_fds of the wrong type": b'{"capabilities":{"max_msg_fds":"many"}}\0',
}


@check(
    "neg-07",
    G,
    Level.SHOULD,
    S,
    "refuses malformed version data (error reply or hang-up), and is not hurt by it",
)
async def malformed(probe: Probe) -> None:
    for name, data in _MALFORMED.items():
        payload = _version(0, VERSION_MINOR, data)
        wire = await probe.connect(negotiate=False)
        await probe.call_refused(
            wire,
            Command.VERSION,
            payload,
            what=f"VERSION with {name}",
            errnos=frozenset({errno.EINVAL}),
        )
    await probe.still_serves("malformed VERSION data")


@check("neg-08", G, Level.SHOULD, "Connection Initiation", "refuses a command sent before VERSION")
async def not_first(probe: Probe) -> None:
    wire = await probe.connect(negotiate=False)
    request = DeviceGetInfoRequest()
    await probe.call_refused(
        wire, request.COMMAND, request.pack(), what="DEVICE_GET_INFO before VERSION"
    )


@check("neg-09", G, Level.SHOULD, S, "refuses a second VERSION on a negotiated connection")
async def second_version(probe: Probe) -> None:
    wire = await probe.connect()
    payload = _version(0, VERSION_MINOR, b'{"capabilities":{}}\0')
    header, reply = await wire.call(Command.VERSION, payload)
    if reply is not None:
        reply.close_fds()
    probe.expect_refused(header, reply, what="a second VERSION", payload=payload)


@check(
    "neg-10", G, Level.INFO, S, "capabilities the server offers to a client proposing everything"
)
async def offered(probe: Probe) -> str:
    proposal = Capabilities(max_msg_fds=16, twin_socket=TwinSocket(True), write_multiple=True)
    wire = await probe.connect(negotiate=False)
    negotiated = await wire.negotiate(proposal)
    peer = negotiated.peer
    return (
        f"version 0.{negotiated.minor}; max_msg_fds {peer.max_msg_fds}, max_data_xfer_size "
        f"{peer.max_data_xfer_size}, max_dma_maps {peer.max_dma_maps}, pgsizes "
        f"{peer.pgsizes:#x}, twin_socket {'granted' if negotiated.twin_socket else 'not granted'}, "
        f"write_multiple {'on' if negotiated.write_multiple else 'off'}"
        + (f", other: {', '.join(k for k, _ in peer.extra)}" if peer.extra else "")
    )
