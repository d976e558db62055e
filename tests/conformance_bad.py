"""Scripted bad servers for the conformance tests: our server, broken in one exact way.

A breakage is a server-side ``ConnectionHooks`` that rewrites what the server receives
(``receive``) or sends (``send``), or drops it, so that the server misbehaves as the
broken implementation a check is about would: accepts what it must refuse, replies with
the wrong size, forgets to answer, processes commands out of order.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from tests.conformance_devices import EXPECTATIONS
from vfiouser_trio.engine import Connection, ConnectionHooks, Forward, FramingError, Link
from vfiouser_trio.examples import DmaEngine, GpioDevice
from vfiouser_trio.limits import DEFAULT_LIMITS, ServerLimits
from vfiouser_trio.protocol.constants import FLAG_TYPE_COMMAND, FLAG_TYPE_REPLY, Command
from vfiouser_trio.protocol.dma import DmaLayout
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.protocol.header import error_header, reply_header
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.serve import serve
from vfiouser_trio.testing.conformance import Expectations, PathTarget
from vfiouser_trio.testing.hooks import close_hooks

#: Rewrites a frame; None drops it.
Rewrite = Callable[[Connection, Frame], Frame | None]


class Breakage(ConnectionHooks):
    """Applies ``receive`` to frames the server gets and ``send`` to those it sends."""

    def __init__(self, *, receive: Rewrite | None = None, send: Rewrite | None = None) -> None:
        self.receive = receive
        self.send = send
        #: Set by a framing error on any connection: later connections are never answered.
        self.wedge_on_framing_error = False
        self.wedged = False
        #: Duplicates of fds the broken server holds on to; closed by close().
        self.kept: list[int] = []

    def _apply(
        self, rewrite: Rewrite | None, conn: Connection, frame: Frame, forward: Forward
    ) -> None:
        if self.wedged:
            frame.close_fds()
            return
        out = rewrite(conn, frame) if rewrite is not None else frame
        if out is None:
            frame.close_fds()
        else:
            forward(out)

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self._apply(self.receive, conn, frame, forward)

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self._apply(self.send, conn, frame, forward)

    def on_framing_error(self, conn: Connection, link: Link, event: FramingError) -> None:
        if self.wedge_on_framing_error:
            self.wedged = True

    def close(self) -> None:
        """Close the fds a breakage kept (see close_hooks)."""
        for fd in self.kept:
            os.close(fd)
        self.kept.clear()


@dataclass(frozen=True)
class Setup:
    """A breakage that needs more than hooks on the gpio example."""

    hooks: ConnectionHooks | None = None
    device: Callable[[], Device] = GpioDevice
    limits: ServerLimits = DEFAULT_LIMITS
    expectations: Expectations | None = None


def setup_of(made: ConnectionHooks | Setup) -> Setup:
    return made if isinstance(made, Setup) else Setup(hooks=made)


@asynccontextmanager
async def broken_server(
    tmp_path: Path, hooks: ConnectionHooks | Setup | None
) -> AsyncIterator[PathTarget]:
    """The gpio example (or the Setup's device) served on a socket in ``tmp_path``."""
    setup = setup_of(hooks) if hooks is not None else Setup()
    path = tmp_path / "bad.sock"
    device = setup.device()

    async def run(task_status: trio.TaskStatus[object]) -> None:
        await serve(device, path, hooks=setup.hooks, limits=setup.limits, task_status=task_status)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            yield PathTarget(path)
            nursery.cancel_scope.cancel()
    finally:
        device.close()
        close_hooks(setup.hooks)


# -- building blocks --------------------------------------------------------------------------

#: A frame's payload as the engine hands it on (``Frame.payload``): ``bytes``, or the
#: ``bytearray`` a frame that did not arrive in one read was received into.
Payload = bytes | bytearray


def success(frame: Frame, payload: Payload) -> Frame:
    """The success reply ``payload`` in place of ``frame`` (an error reply)."""
    frame.close_fds()
    return Frame(reply_header(frame.header.msg_id, frame.header.command, len(payload)), payload)


def refused(frame: Frame, code: int = errno.EINVAL) -> Frame:
    frame.close_fds()
    return Frame(error_header(frame.header.msg_id, frame.header.command, code), b"")


def with_payload(frame: Frame, payload: Payload) -> Frame:
    header = replace(frame.header, msg_size=16 + len(payload))
    return Frame(header, payload, frame.take_fds())


def accepts(command: int, payload: Payload | Callable[[Frame], Payload]) -> Breakage:
    """Answers with success where the server refused ``command``."""

    def send(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == command and frame.header.is_error:
            return success(frame, payload(frame) if callable(payload) else payload)
        return frame

    return Breakage(send=send)


def refuses(command: int) -> Breakage:
    """Refuses (EINVAL) every ``command`` it would have answered with success."""

    def send(conn: Connection, frame: Frame) -> Frame:
        h = frame.header
        if h.command == command and h.is_reply and not h.is_error:
            return refused(frame)
        return frame

    return Breakage(send=send)


def replies(command: int, change: Callable[[Payload], Payload]) -> Breakage:
    """Rewrites the payload of every success reply to ``command``."""

    def send(conn: Connection, frame: Frame) -> Frame:
        h = frame.header
        if h.command == command and h.is_reply and not h.is_error:
            return with_payload(frame, change(frame.payload))
        return frame

    return Breakage(send=send)


def requests(command: int, change: Callable[[Frame], Frame | None]) -> Breakage:
    """Rewrites (or drops) every ``command`` the server receives."""

    def receive(conn: Connection, frame: Frame) -> Frame | None:
        if frame.header.command == command and frame.header.is_command:
            return change(frame)
        return frame

    return Breakage(receive=receive)


def patch(payload: Payload, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(payload)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


VERSION_OK = struct.pack("=HH", 0, 2) + b'{"capabilities":{}}\0'
DEVICE_INFO = struct.pack("=IIII", 16, 3, 9, 5)


def _version_json(payload: Payload, change: Callable[[dict[str, object]], None]) -> Payload:
    doc = json.loads(payload[4:].rstrip(b"\0"))
    change(doc["capabilities"])
    return payload[:4] + json.dumps(doc).encode() + b"\0"


def _set_wm(caps: dict[str, object]) -> None:
    caps["write_multiple"] = True


# -- one breakage per check -------------------------------------------------------------------


def _refuse_plain_version() -> Breakage:
    plain: set[Connection] = set()

    def receive(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == Command.VERSION and len(frame.payload) == 4:
            plain.add(conn)
        return frame

    def send(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == Command.VERSION and conn in plain:
            return refused(frame)
        return frame

    return Breakage(receive=receive, send=send)


def _refuse_higher_minor(frame: Frame) -> Frame:
    minor = struct.unpack_from("=HH", frame.payload)[1]
    if minor > 2:  # refused as if it were another major
        return with_payload(frame, struct.pack("=HH", 9, minor) + frame.payload[4:])
    return frame


def _accept_any_major() -> Breakage:
    lied: set[Connection] = set()

    def receive(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == Command.VERSION and frame.payload[:2] == b"\xff\xff":
            lied.add(conn)
            return with_payload(frame, b"\0\0" + frame.payload[2:])
        return frame

    def send(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == Command.VERSION and conn in lied and frame.header.is_reply:
            return with_payload(frame, b"\xff\xff" + frame.payload[2:])
        return frame

    return Breakage(receive=receive, send=send)


def _refuse_unknown_caps(frame: Frame) -> Frame:
    if b"x_conform_unknown" in frame.payload:
        return with_payload(frame, frame.payload[:4] + b"{oops}\0")
    return frame


def _ignore_no_reply(conn: Connection, frame: Frame) -> Frame:
    h = frame.header
    return Frame(replace(h, flags=h.flags & ~0x10), frame.payload, frame.take_fds())


def _drop_reused_ids() -> Breakage:
    seen: dict[Connection, set[int]] = {}

    def receive(conn: Connection, frame: Frame) -> Frame | None:
        ids = seen.setdefault(conn, set())
        if frame.header.is_command and frame.header.msg_id in ids:
            return None  # "already have that one"
        ids.add(frame.header.msg_id)
        return frame

    return Breakage(receive=receive)


def _unmap_later() -> ConnectionHooks:
    from vfiouser_trio.testing.faults import Reorder  # noqa: PLC0415
    from vfiouser_trio.testing.hooks import Direction  # noqa: PLC0415

    return Reorder(direction=Direction.RECEIVED, command=Command.DMA_MAP)


def _wedged_after_framing_error() -> Breakage:
    b = Breakage()
    b.wedge_on_framing_error = True
    return b


def _silent_on_oversized(conn: Connection, frame: Frame) -> Frame | None:
    return None if frame.header.msg_id == 0x0606 and frame.header.is_error else frame


def _answer_replies(conn: Connection, frame: Frame) -> Frame:
    h = frame.header
    if h.flags & 0xF == FLAG_TYPE_REPLY:
        return Frame(replace(h, flags=FLAG_TYPE_COMMAND), frame.payload, frame.take_fds())
    return frame


def _keep_old_maps() -> Breakage:
    """Remembers every client's maps: a later client's overlapping DMA_MAP gets EEXIST."""
    # The connections themselves, not their ids: a departed connection's id may be reused.
    maps: list[tuple[Connection, int, int]] = []  # (conn, start, end)
    doomed: set[tuple[Connection, int]] = set()

    def receive(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == Command.DMA_MAP and frame.header.is_command:
            _argsz, _flags, _offset, address, size = struct.unpack_from("=IIQQQ", frame.payload)
            if any(c is not conn and s < address + size and address < e for c, s, e in maps):
                doomed.add((conn, frame.header.msg_id))
            maps.append((conn, address, address + size))
        return frame

    def send(conn: Connection, frame: Frame) -> Frame:
        if (conn, frame.header.msg_id) in doomed and frame.header.command == Command.DMA_MAP:
            return refused(frame, errno.EEXIST)
        return frame

    return Breakage(receive=receive, send=send)


def _identical_map_is_eexist() -> Breakage:
    seen: set[tuple[Connection, bytes]] = set()

    def receive(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == Command.DMA_MAP and frame.header.is_command:
            key = (conn, bytes(frame.payload))  # a bytearray payload is not hashable
            if key in seen:  # make it overlap instead of repeat
                return with_payload(
                    frame,
                    patch(
                        frame.payload,
                        16,
                        "=Q",
                        struct.unpack_from("=Q", frame.payload, 16)[0] + 4096,
                    ),
                )
            seen.add(key)
        return frame

    return Breakage(receive=receive)


def _unmap_all_unmaps_one(frame: Frame) -> Frame:
    argsz, flags, _address, _size = struct.unpack_from("=IIQQ", frame.payload)
    if flags & 2:
        return with_payload(frame, struct.pack("=IIQQ", argsz, 0, 1 << 40, 4096))
    return frame


def _hang_up_on_zero_read(conn: Connection, frame: Frame) -> Frame:
    h = frame.header
    if h.command == Command.REGION_READ and h.is_command and frame.payload[12:16] == bytes(4):
        conn.close()
    return frame


def _fake_read(frame: Frame) -> bytes:
    return bytes(16) + bytes(4)


def _trigger_does_nothing(frame: Frame) -> Frame:
    """A client's TRIGGER (DATA_NONE/BOOL) is done as an UNMASK: answered, never signalled."""
    argsz, flags, index, start, count = struct.unpack_from("=IIIII", frame.payload)
    if flags & 0x20 and not flags & 0x4 and count:
        flags = flags & ~0x20 | 0x10
        return with_payload(
            frame, struct.pack("=IIIII", argsz, flags, index, start, count) + frame.payload[20:]
        )
    return frame


def _keeps_eventfd(frame: Frame) -> Frame:
    """DATA_EVENTFD without fds is answered but changes nothing (done as an UNMASK)."""
    argsz, flags, index, start, count = struct.unpack_from("=IIIII", frame.payload)
    if flags & 0x4 and not frame.fds and count:
        return with_payload(frame, struct.pack("=IIIII", argsz, 0x11, index, start, count))
    return frame


def config_reads(change: Callable[[int, Payload], Payload]) -> Breakage:
    """Rewrites the data of config space reads: ``change(offset, data)``."""

    def rewrite(payload: Payload) -> Payload:
        offset, region, _count = struct.unpack_from("=QII", payload)
        if region != 7:
            return payload
        return payload[:16] + change(offset, payload[16:])

    return replies(Command.REGION_READ, rewrite)


def _cap_list_bit_flipped(offset: int, data: Payload) -> Payload:
    return bytes([data[0] ^ 0x10, data[1]]) if offset == 6 else data


def _cap_loop(offset: int, data: Payload) -> Payload:
    """A capability list (gpio has none) whose first capability, at 0x40, points at itself."""
    if offset == 6:
        return bytes([data[0] | 0x10, data[1]])
    if offset == 0x34:
        return b"\x40"
    if offset == 0x40 and len(data) == 2:
        return b"\x05\x40"
    return data


def _extended_loop() -> Breakage:
    """Says config space is 4 KiB, and its extended capability at 0x100 points at itself."""

    def send(conn: Connection, frame: Frame) -> Frame:
        h, p = frame.header, frame.payload
        if (
            h.command == Command.DEVICE_GET_REGION_INFO
            and not h.is_error
            and p[8:12] == b"\7\0\0\0"
        ):
            return with_payload(frame, patch(p, 16, "=Q", 4096))
        if h.command == Command.REGION_READ and h.is_error:  # the reads past 256 it refused
            return success(frame, bytes(16) + struct.pack("=I", 0x100 << 20 | 1))
        return frame

    return Breakage(send=send)


def _writable_revision() -> Breakage:
    """Read-only registers take what is written: later reads return it."""
    written: dict[tuple[Connection, int], Payload] = {}

    def receive(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == Command.REGION_WRITE and frame.header.is_command:
            offset, region, count = struct.unpack_from("=QII", frame.payload)
            if region == 7 and offset in (0x08, 0x0E):
                written[conn, offset] = frame.payload[16 : 16 + count]
        return frame

    def send(conn: Connection, frame: Frame) -> Frame:
        h = frame.header
        if h.command == Command.REGION_READ and h.is_reply and not h.is_error:
            offset = struct.unpack_from("=Q", frame.payload)[0]
            if (conn, offset) in written:
                return with_payload(frame, frame.payload[:16] + written[conn, offset])
        return frame

    return Breakage(receive=receive, send=send)


def _bar_too_small(offset: int, data: Payload) -> Payload:
    if 0x10 <= offset < 0x28 and len(data) == 4 and data[3] == 0xFF:  # a BAR being sized
        return struct.pack("=I", 0xFFFFFFF0 | data[0] & 0xF)
    return data


def accepts_echo(command: int) -> Breakage:
    """Answers with success, echoing the request's payload, where the server refused."""
    last: dict[Connection, Payload] = {}

    def receive(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == command and frame.header.is_command:
            last[conn] = frame.payload
        return frame

    def send(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == command and frame.header.is_error:
            return success(frame, last.get(conn, b""))
        return frame

    return Breakage(receive=receive, send=send)


def _no_stop_copy_flag(payload: Payload) -> Payload:
    flags = struct.unpack_from("=I", payload, 4)[0]
    if flags & 0xFFFF == 1 and flags & 0x10000 and len(payload) >= 16:  # GET MIGRATION
        return patch(payload, 8, "=Q", 0)
    return payload


def _refuse_stop_copy(frame: Frame) -> Frame:
    flags = struct.unpack_from("=I", frame.payload, 4)[0]
    if flags & 0xFFFF == 2 and flags & 0x20000 and frame.payload[8:12] == b"\3\0\0\0":
        return with_payload(frame, patch(frame.payload, 8, "=I", 99))
    return frame


def _dma_outside_window() -> Setup:
    """dmaengine, whose DMA_READ requests land 16 pages past where the device meant."""

    def send(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == Command.DMA_READ and frame.header.is_command:
            address = struct.unpack_from("=Q", frame.payload)[0]
            return with_payload(frame, patch(frame.payload, 0, "=Q", address + 16 * 4096))
        return frame

    return Setup(Breakage(send=send), DmaEngine, expectations=EXPECTATIONS["dmaengine"])


def _forgets_config() -> Breakage:
    """Config space reads as if no client had written it: the Interrupt Line reads 0."""
    return config_reads(lambda offset, data: b"\0" if offset == 0x3C and len(data) == 1 else data)


def _keeps_old_eventfds() -> Breakage:
    """A departed client's eventfd keeps being signalled: the next client's triggers write it."""
    b = Breakage()
    kept = b.kept

    def receive(conn: Connection, frame: Frame) -> Frame:
        h = frame.header
        if h.command == Command.DEVICE_SET_IRQS and h.is_command:
            if frame.fds:
                kept.extend(os.dup(fd) for fd in frame.fds)
            elif frame.payload[4:8] == b"\x21\0\0\0" and kept:  # DATA_NONE|TRIGGER
                os.eventfd_write(kept[-1], 1)
        return frame

    b.receive = receive
    return b


def _keeps_stray_fds() -> Breakage:
    """fds sent with a command that takes none are kept (until the breakage closes them)."""
    b = Breakage()
    kept = b.kept

    def receive(conn: Connection, frame: Frame) -> Frame:
        if frame.header.command == Command.DEVICE_GET_INFO and frame.fds:
            kept.extend(os.dup(fd) for fd in frame.fds)
        return frame

    b.receive = receive
    return b


def _io_fd_index_out_of_range(payload: Payload) -> Payload:
    """The first sub-region of a GET_REGION_IO_FDS reply names an fd that was not sent."""
    if len(payload) >= 16 + 40:
        return patch(payload, 16 + 16, "=I", 9)
    return payload


def _dirty_bitmap(payload: Payload) -> Payload:
    """Every DMA logging report says the range's first page is dirty."""
    flags = struct.unpack_from("=I", payload, 4)[0]
    if flags & 0xFFFF == 8 and len(payload) >= 40:
        return patch(payload, 32, "=Q", 1)
    return payload


def _refuses_own_state() -> Breakage:
    """After migration data was written, leaving RESUMING (SET STOP) is refused."""
    resumed: set[Connection] = set()

    def receive(conn: Connection, frame: Frame) -> Frame:
        h, p = frame.header, frame.payload
        if h.command == Command.MIG_DATA_WRITE and h.is_command:
            resumed.add(conn)
        elif (
            h.command == Command.DEVICE_FEATURE
            and conn in resumed
            and p[4:12]
            == (
                b"\x02\x00\x02\x00\x01\x00\x00\x00"  # SET MIG_DEVICE_STATE, state STOP
            )
        ):
            resumed.discard(conn)
            return with_payload(frame, patch(p, 8, "=I", 99))
        return frame

    return Breakage(receive=receive)


#: check id -> the server broken in exactly the way that check catches.
BROKEN: dict[str, Callable[[], ConnectionHooks | Setup]] = {
    "neg-01": lambda: replies(Command.VERSION, lambda p: patch(p, 2, "=H", 0x7FFF)),
    "neg-02": _refuse_plain_version,
    "neg-03": lambda: requests(Command.VERSION, _refuse_higher_minor),
    "neg-04": _accept_any_major,
    "neg-05": lambda: requests(Command.VERSION, _refuse_unknown_caps),
    "neg-06": lambda: replies(Command.VERSION, lambda p: _version_json(p, _set_wm)),
    "neg-07": lambda: accepts(Command.VERSION, VERSION_OK),
    "neg-08": lambda: accepts(Command.DEVICE_GET_INFO, DEVICE_INFO),
    "neg-09": lambda: accepts(Command.VERSION, VERSION_OK),
    "frm-01": lambda: Breakage(
        send=lambda c, f: (
            Frame(replace(f.header, msg_id=f.header.msg_id ^ 1), f.payload, f.take_fds())
            if f.header.msg_id == 0x1234
            else f
        )
    ),
    "frm-02": lambda: Breakage(receive=_ignore_no_reply),
    "frm-03": _drop_reused_ids,
    "frm-04": _unmap_later,
    "frm-05": _wedged_after_framing_error,
    "frm-06": lambda: Breakage(send=_silent_on_oversized),
    "frm-07": lambda: accepts(14, b""),
    "frm-08": lambda: accepts(Command.DMA_READ, b""),
    "frm-09": lambda: Breakage(receive=_answer_replies),
    "cmd-01": lambda: replies(Command.DEVICE_GET_INFO, lambda p: patch(p, 4, "=I", 1)),
    "cmd-02": lambda: requests(
        Command.DEVICE_GET_INFO,
        lambda f: (
            with_payload(f, f.payload[:16])
            if len(f.payload) == 16
            else with_payload(f, f.payload[:8])
        ),
    ),
    "cmd-03": lambda: accepts(Command.DEVICE_GET_INFO, DEVICE_INFO),
    "cmd-04": lambda: replies(Command.DEVICE_GET_REGION_INFO, lambda p: patch(p, 8, "=I", 99)),
    "cmd-05": lambda: accepts(
        Command.DEVICE_GET_REGION_INFO, struct.pack("=IIIIQQ", 32, 0, 0, 0, 0, 0)
    ),
    "cmd-06": lambda: replies(
        Command.DEVICE_GET_REGION_INFO, lambda p: patch(p, 0, "=I", len(p) + 8)
    ),
    "cmd-07": lambda: replies(Command.DEVICE_GET_IRQ_INFO, lambda p: patch(p, 8, "=I", 99)),
    "cmd-08": lambda: accepts(Command.DEVICE_GET_IRQ_INFO, struct.pack("=IIII", 16, 0, 0, 0)),
    "cmd-09": lambda: refuses(Command.DEVICE_RESET),
    "cmd-10": lambda: Setup(
        replies(Command.DEVICE_GET_REGION_IO_FDS, _io_fd_index_out_of_range), DmaEngine
    ),
    "rio-01": lambda: replies(Command.REGION_READ, lambda p: p[:-1]),
    "rio-02": lambda: accepts(Command.REGION_READ, _fake_read),
    "rio-03": lambda: Breakage(receive=_hang_up_on_zero_read),
    "rio-04": lambda: accepts(Command.REGION_READ, _fake_read),
    "rio-05": lambda: accepts(Command.REGION_WRITE, bytes(16)),
    "rio-07": lambda: accepts(Command.REGION_WRITE_MULTI, struct.pack("=Q", 2)),
    "rio-06": lambda: replies(Command.REGION_WRITE, lambda p: patch(p, 0, "=Q", 0x40)),
    "cfg-01": lambda: config_reads(_cap_list_bit_flipped),
    "cfg-02": lambda: config_reads(_cap_loop),
    "cfg-03": _extended_loop,
    "cfg-04": _writable_revision,
    "cfg-05": lambda: config_reads(_bar_too_small),
    "irq-01": lambda: refuses(Command.DEVICE_SET_IRQS),
    "irq-02": lambda: requests(Command.DEVICE_SET_IRQS, _trigger_does_nothing),
    "irq-03": lambda: accepts(Command.DEVICE_SET_IRQS, b""),
    "irq-04": lambda: requests(Command.DEVICE_SET_IRQS, _keeps_eventfd),
    "dma-07": _dma_outside_window,
    # A server that speaks only the spec's layout (ours, told so).
    "dma-08": lambda: Setup(
        device=DmaEngine,
        limits=ServerLimits(dma_layout=DmaLayout.SPEC),
        expectations=EXPECTATIONS["dmaengine"],
    ),
    "mig-08": lambda: replies(Command.MIG_DATA_READ, lambda p: patch(p, 0, "=I", len(p) + 4)),
    "mig-09": _refuses_own_state,
    "mig-02": lambda: replies(Command.DEVICE_FEATURE, _no_stop_copy_flag),
    "mig-03": lambda: requests(Command.DEVICE_FEATURE, _refuse_stop_copy),
    "mig-04": lambda: accepts_echo(Command.DEVICE_FEATURE),
    "mig-05": lambda: accepts(Command.MIG_DATA_READ, struct.pack("=II", 8, 0)),
    "mig-06": lambda: accepts_echo(Command.DEVICE_FEATURE),
    "dma-01": lambda: requests(Command.DMA_MAP, lambda f: with_payload(f, f.payload[:8])),
    "dma-02": _identical_map_is_eexist,
    "dma-03": lambda: accepts(Command.DMA_MAP, b""),
    "dma-04": lambda: accepts(Command.DMA_UNMAP, bytes(24)),
    "dma-05": lambda: requests(Command.DMA_UNMAP, _unmap_all_unmaps_one),
    "dma-06": _keep_old_maps,
    "dma-10": lambda: requests(
        Command.DMA_MAP, lambda f: with_payload(f, f.payload[:8]) if f.fds else f
    ),
    "mig-07": lambda: replies(Command.DEVICE_FEATURE, _dirty_bitmap),
    "dma-09": lambda: accepts(Command.DMA_UNMAP, bytes(24)),
    "dis-01": _forgets_config,
    "dis-02": _keeps_old_eventfds,
    "rob-03": _keeps_stray_fds,
    "rob-01": lambda: accepts(Command.DEVICE_FEATURE, b""),
    "rob-02": _wedged_after_framing_error,
}
