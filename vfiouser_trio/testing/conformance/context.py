"""What a check works with: connections to the target, the device's survey, expectations."""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from ...protocol.capabilities import Capabilities
from ...protocol.constants import HEADER_SIZE
from ...protocol.device_info import DeviceGetInfoReply, DeviceGetInfoRequest
from ...protocol.framing import Frame, close_fds
from ...protocol.header import Header
from ...protocol.irqs import IrqInfoReply, IrqInfoRequest
from ...protocol.regions import RegionInfoReply, RegionInfoRequest
from .dma_window import DmaTrigger
from .model import Skipped, Violation, Warned
from .wire import Target, Wire, describe, describe_header, hexdump


@dataclass(frozen=True, slots=True)
class Expectations:
    """What a device author declares about their device, beyond what the spec says.

    The checks read these to know what they may do and what to expect; every field has a
    default that suits a device the checker knows nothing about.
    """

    #: check id -> reason: the check is reported SKIP ("waived: reason") and not run.
    waive: Mapping[str, str] = field(default_factory=dict)
    #: num_regions / num_irqs DEVICE_GET_INFO must report (None: any).
    num_regions: int | None = None
    num_irqs: int | None = None
    #: Whether the device must (True) or must not (False) offer DEVICE_RESET; None: either.
    reset: bool | None = None
    #: The checker may send DEVICE_RESET (it resets the device's own state).
    allow_reset: bool = True
    #: First IOVA of the window the DMA checks map and unmap (16 pages from here).
    dma_base: int = 1 << 40
    #: Makes the device DMA into a window mapped without an fd (``dma-07``): an async
    #: function of a :class:`~.dma_window.DmaWindow`, returning once the device is done and
    #: put back as it was. None: the check is skipped (the checker cannot know how).
    dma_trigger: DmaTrigger | None = None


@dataclass(frozen=True, slots=True)
class Survey:
    """What a plain client learns of the device: VERSION's outcome and every info reply."""

    capabilities: Capabilities
    info: DeviceGetInfoReply
    regions: tuple[RegionInfoReply | None, ...]
    irqs: tuple[IrqInfoReply | None, ...]


class Probe:
    """Given to each check: opens connections (one at a time) and reports what it finds."""

    def __init__(self, target: Target, expectations: Expectations, runner_state: dict[str, object]):
        self.target = target
        self.expectations = expectations
        self._state = runner_state
        self.wires: list[Wire] = []
        #: Observations the check made, joined into its result's message.
        self.notes: list[str] = []
        #: Lesser problems found (``warn``): the check's outcome is WARN if it ends without FAIL.
        self.concerns: list[Warned] = []

    # ----------------------------------------------------------------- connections

    async def connect(
        self, *, negotiate: bool = True, capabilities: Capabilities | None = None
    ) -> Wire:
        """A new connection (earlier ones of this check are closed first: a device may
        serve one client at a time), negotiated unless ``negotiate=False``."""
        self.close()
        wire = Wire(await self.target.open())
        self.wires.append(wire)
        if negotiate:
            await wire.negotiate(capabilities)
        return wire

    def close(self) -> None:
        for wire in self.wires:
            wire.close()
        self.wires.clear()

    @property
    def last_sent(self) -> str:
        """The last frame the check sent, for a timeout's report."""
        for wire in reversed(self.wires):
            for line in reversed(wire.log):
                if line.startswith("→"):
                    return line
        return ""

    # ----------------------------------------------------------------- verdicts

    def fail(
        self, message: str, *, sent: str = "", received: str = "", expected: str = ""
    ) -> NoReturn:
        raise Violation(message, sent=sent, received=received, expected=expected)

    def warn(self, message: str, *, sent: str = "", received: str = "", expected: str = "") -> None:
        """Record a lesser problem and go on: the check ends WARN (unless it FAILs)."""
        self.concerns.append(Warned(message, sent=sent, received=received, expected=expected))

    def skip(self, message: str) -> NoReturn:
        raise Skipped(message)

    def note(self, text: str) -> None:
        self.notes.append(text)

    # ----------------------------------------------------------------- common judgements

    def expect_reply(
        self, sent: Header, reply: Frame | None, *, what: str, payload: bytes = b""
    ) -> Frame:
        """``reply`` must be a success reply to ``sent`` (same ID and command)."""
        shown = f"{describe_header(sent)}: {hexdump(payload)}"
        if reply is None or not reply.header.is_reply or reply.header.is_error:
            self.fail(
                f"{what}: no success reply",
                sent=shown,
                received=describe(reply),
                expected=f"a success reply to {describe_header(sent)}",
            )
        if reply.header.msg_id != sent.msg_id or reply.header.command != sent.command:
            self.fail(
                f"{what}: the reply does not echo the command's ID and command",
                sent=shown,
                received=describe(reply),
                expected=f"id={sent.msg_id} command={sent.command}",
            )
        return reply

    def expect_refused(
        self,
        sent: Header,
        reply: Frame | None,
        *,
        what: str,
        payload: bytes = b"",
        errnos: frozenset[int] | None = None,
        errno_required: bool = False,
        may_close: bool = True,
    ) -> int | None:
        """``reply`` must refuse ``sent``: an error reply (with one of ``errnos``, if given:
        another is a WARN, or with ``errno_required`` a violation; and a header alone: the
        spec's error-reply shape) or, with ``may_close``, a hang-up. Returns the errno, or
        None for a hang-up."""
        shown = f"{describe_header(sent)}: {hexdump(payload)}"
        want = "an error reply"
        if errnos:
            want += " with " + " or ".join(_errno.errorcode.get(e, str(e)) for e in sorted(errnos))
        if may_close:
            want += ", or the connection closed"
        if reply is None:
            if may_close:
                return None
            self.fail(
                f"{what}: the server hung up instead of answering",
                sent=shown,
                received=describe(reply),
                expected=want,
            )
        if not reply.header.is_reply or not reply.header.is_error:
            self.fail(f"{what}: accepted", sent=shown, received=describe(reply), expected=want)
        if reply.header.msg_id != sent.msg_id:
            self.fail(
                f"{what}: the error reply does not echo the message ID",
                sent=shown,
                received=describe(reply),
                expected=f"id={sent.msg_id}",
            )
        if reply.header.msg_size != HEADER_SIZE or reply.payload:
            self.warn(
                f"{what}: the error reply carries a payload (the spec: header only)",
                sent=shown,
                received=describe(reply),
                expected="a 16-byte error reply",
            )
        code = reply.header.error
        if errnos and code not in errnos and errno_required:
            self.fail(
                f"{what}: refused with another errno than the spec names",
                sent=shown,
                received=describe(reply),
                expected=want,
            )
        if errnos and code not in errnos:
            self.warn(
                f"{what}: refused with an unexpected errno",
                sent=shown,
                received=describe(reply),
                expected=want,
            )
        return code

    async def call_ok(
        self, wire: Wire, command: int, payload: bytes = b"", *, what: str, fds: Sequence[int] = ()
    ) -> Frame:
        """Send ``command`` on ``wire`` and expect a success reply (:meth:`expect_reply`)."""
        header, reply = await wire.call(command, payload, fds=fds)
        return self.expect_reply(header, reply, what=what, payload=payload)

    async def call_refused(
        self,
        wire: Wire,
        command: int,
        payload: bytes = b"",
        *,
        what: str,
        fds: Sequence[int] = (),
        errnos: frozenset[int] | None = None,
        errno_required: bool = False,
        may_close: bool = True,
    ) -> int | None:
        """Send ``command`` on ``wire`` and expect it refused (:meth:`expect_refused`)."""
        header, reply = await wire.call(command, payload, fds=fds)
        return self.expect_refused(
            header,
            reply,
            what=what,
            payload=payload,
            errnos=errnos,
            errno_required=errno_required,
            may_close=may_close,
        )

    async def still_serves(self, what: str) -> None:
        """A fresh client must be served: VERSION, then DEVICE_GET_INFO answered."""
        try:
            wire = await self.connect()
        except Violation as exc:
            self.fail(
                f"after {what}, a new client is not served: {exc.message}",
                sent=exc.sent,
                received=exc.received,
                expected=exc.expected,
            )
        request = DeviceGetInfoRequest()
        header, reply = await wire.call(request.COMMAND, request.pack())
        self.expect_reply(
            header, reply, what=f"after {what}, DEVICE_GET_INFO", payload=request.pack()
        )
        self.close()

    # ----------------------------------------------------------------- the survey

    async def survey(self) -> Survey:
        """The device as a plain client sees it (gathered once per run, on its own connection)."""
        cached = self._state.get("survey")
        if isinstance(cached, Survey):
            return cached
        if isinstance(cached, Skipped):
            raise cached
        try:
            result = await self._take_survey()
        except Violation as exc:
            skipped = Skipped(f"the device could not be surveyed: {exc.message}")
            self._state["survey"] = skipped
            raise skipped from None
        self._state["survey"] = result
        return result

    async def _take_survey(self) -> Survey:
        wire = await self.connect()
        assert wire.negotiated is not None
        info_request = DeviceGetInfoRequest()
        header, frame = await wire.call(info_request.COMMAND, info_request.pack())
        frame = self.expect_reply(header, frame, what="DEVICE_GET_INFO")
        info = _decode(self, DeviceGetInfoReply, frame, "DEVICE_GET_INFO")
        regions = await self._infos(
            wire, info.num_regions, RegionInfoRequest, RegionInfoReply, "DEVICE_GET_REGION_INFO"
        )
        irqs = await self._infos(
            wire, info.num_irqs, IrqInfoRequest, IrqInfoReply, "DEVICE_GET_IRQ_INFO"
        )
        self.close()
        return Survey(wire.negotiated.peer, info, tuple(regions), tuple(irqs))

    async def _infos(
        self,
        wire: Wire,
        count: int,
        request: Callable[[int], RegionInfoRequest | IrqInfoRequest],
        cls: type[_M],
        what: str,
    ) -> list[_M | None]:
        """The info replies for indexes 0..count-1 (at most 64): None where refused."""
        infos: list[_M | None] = []
        for index in range(min(count, 64)):
            sent = request(index)
            _header, frame = await wire.call(sent.COMMAND, sent.pack())
            if frame is None:
                self.fail(f"{what}: the server hung up")
            infos.append(None if frame.header.is_error else _decode(self, cls, frame, what))
        return infos


_M = TypeVar("_M", DeviceGetInfoReply, RegionInfoReply, IrqInfoReply)


def _decode(probe: Probe, cls: type[_M], frame: Frame, what: str) -> _M:
    fds = frame.take_fds()
    try:
        return cls.unpack(frame.payload, fds)
    except Exception as exc:
        probe.fail(f"{what}: the reply is malformed: {exc}", received=describe(frame))
    finally:
        # The survey keeps no region fds: checks that need one ask again.
        close_fds(fds)
