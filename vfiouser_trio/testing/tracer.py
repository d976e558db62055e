"""A recording tracer: every message of a connection, both ways, for assertions and debugging.

Install it as (or in a :func:`~vfiouser_trio.testing.hooks.chain` of) the connection's hooks::

    tracer = Tracer()
    async with open_connection(sock, handler=..., hooks=tracer) as conn:
        ...
    [read] = tracer.commands(Command.REGION_READ)
    assert read.decode() == RegionReadRequest(0, 0, 4)
    print(tracer)                    # one line per message

Recording costs one small record per message: payload bytes are kept by reference and
decoding and formatting happen only when asked for. A connection without hooks pays nothing.

Memory is bounded: every record keeps its header and the first ``payload_prefix`` bytes of
its payload; full payloads are kept only for the most recent records, as long as together they
hold at most ``full_payload_bytes``. Older records are then cut to their prefix (oldest
first; ``record.truncated`` tells), and decode only as far as the prefix allows.
One tracer records one connection (the side it is installed on): ``SENT`` is what that side
sent, ``RECEIVED`` what it received.

It also records when each command it saw arrive is processed: a :class:`ProcessingRecord`
when the side's ordering policy starts it and one when it is done (handler run, reply queued),
No_reply commands included, which the wire alone never shows. These feed the spec-order
checker (:mod:`vfiouser_trio.testing.order_check`) and the wait-for graph
(:func:`vfiouser_trio.testing.wait_for.wait_for_graph`).
"""

from __future__ import annotations

import dataclasses
import enum
import errno as _errno
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO

import trio

from ..engine import Connection, ConnectionHooks, Forward, FramingError, Link
from ..ordering import Processing
from ..protocol.constants import Command
from ..protocol.errors import ProtocolError, command_name
from ..protocol.framing import BrokenStream, Frame, OversizedFrame
from ..protocol.header import Header
from ..protocol.message import Message, Request
from ..protocol.registry import decode_reply, decode_request
from .hooks import Direction

__all__ = ["ErrorReply", "FramingRecord", "ProcessingRecord", "TraceRecord", "Tracer"]

#: The fd placeholder decoded messages carry: a tracer never keeps the real fds.
PLACEHOLDER_FD = -1


def _as_command(command: int) -> Command | int:
    try:
        return Command(command)
    except ValueError:
        return command


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """What an error reply decodes to: the command it answers and the errno it carries."""

    command: Command | int
    errno: int

    @property
    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One message as it passed the tracer."""

    #: Position in the tracer (counts framing records too).
    index: int
    #: ``trio.current_time()`` when the message passed.
    time: float
    #: Seconds since the tracer started.
    elapsed: float
    link: Link
    direction: Direction
    header: Header
    #: The payload, or only its first ``Tracer.payload_prefix`` bytes (see ``truncated``).
    payload: bytes = dataclasses.field(repr=False)
    fd_count: int
    #: Length of the payload as it passed (``len(payload)`` unless truncated).
    payload_size: int
    #: For a reply: the record of the request it answers, when the tracer saw it.
    request: TraceRecord | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def command(self) -> Command | int:
        return _as_command(self.header.command)

    @property
    def msg_id(self) -> int:
        return self.header.msg_id

    @property
    def is_reply(self) -> bool:
        return self.header.is_reply

    @property
    def is_error(self) -> bool:
        return self.header.is_reply and self.header.is_error

    @property
    def errno(self) -> int:
        """The errno of an error reply, else 0."""
        return self.header.error if self.is_error else 0

    @property
    def truncated(self) -> bool:
        """True when the tracer kept only a prefix of the payload (see the module doc)."""
        return len(self.payload) < self.payload_size

    def decode(self) -> Message | ErrorReply:
        """The typed message (request or reply), or an :class:`ErrorReply`.

        fds in the result are placeholders (-1): the tracer does not keep them. A reply is
        checked against its request when the tracer saw that. Raises ProtocolError for a
        message that does not decode (unknown command, malformed payload).
        """
        header = self.header
        if header.is_reply and header.is_error:
            return ErrorReply(self.command, header.error)
        if self.truncated:
            raise ProtocolError(
                f"the tracer kept {len(self.payload)} of {self.payload_size} payload bytes",
                command=header.command,
            )
        fds = [PLACEHOLDER_FD] * self.fd_count
        if not header.is_reply:
            return decode_request(header.command, self.payload, fds)
        if header.is_error:
            return ErrorReply(self.command, header.error)
        request = self._request_message()
        if request is not None:
            return request.parse_reply(self.payload, fds)
        return decode_reply(header.command, self.payload, fds)

    def _request_message(self) -> Request | None:
        if self.request is None or self.request.truncated:
            return None
        try:
            return decode_request(
                self.request.header.command,
                self.request.payload,
                [PLACEHOLDER_FD] * self.request.fd_count,
            )
        except ProtocolError:
            return None

    def __str__(self) -> str:
        header = self.header
        words = [f"+{self.elapsed:.6f}", self.link.value, self.direction.arrow]
        words.append(command_name(header.command))
        if header.is_reply:
            words.append("error" if header.is_error else "reply")
        words.append(f"id={header.msg_id}")
        if header.is_reply and header.is_error:
            words.append(_errno.errorcode.get(header.error, str(header.error)))
        else:
            words.append(self._describe_body())
        if header.no_reply:
            words.append("no_reply")
        if self.fd_count:
            words.append(f"fds={self.fd_count}")
        return " ".join(w for w in words if w)

    def _describe_body(self) -> str:
        if self.truncated:
            kept = len(self.payload)
            return f"<{self.payload_size} bytes, {kept} kept> {_format_bytes(self.payload)}"
        try:
            message = self.decode()
        except ProtocolError as exc:
            return f"<undecodable: {exc.message}> payload={_format_bytes(self.payload)}"
        return _describe_fields(message)


@dataclass(frozen=True, slots=True)
class FramingRecord:
    """A framing problem the tracer was told about (oversized frame, stray fds, broken stream)."""

    index: int
    time: float
    elapsed: float
    link: Link
    event: FramingError

    def __str__(self) -> str:
        event = self.event
        if isinstance(event, BrokenStream):
            what = f"broken stream: {event.reason}"
        elif isinstance(event, OversizedFrame):
            header = event.header
            what = f"oversized {command_name(header.command)} id={header.msg_id}"
            what += f" msg_size={header.msg_size}"
        else:
            what = f"{event.count} stray fds"
        return f"+{self.elapsed:.6f} {self.link.value} ! {what}"


@dataclass(frozen=True, slots=True)
class ProcessingRecord:
    """A command's processing started or ended on the side the tracer is installed on."""

    index: int
    time: float
    elapsed: float
    link: Link
    phase: Processing
    header: Header
    #: The record of the command's arrival, when the tracer saw it.
    command: TraceRecord | None = dataclasses.field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        header = self.header
        words = [f"+{self.elapsed:.6f}", self.link.value, "·", command_name(header.command)]
        words += [f"id={header.msg_id}", self.phase.value]
        if header.no_reply:
            words.append("no_reply")
        return " ".join(words)


class Tracer(ConnectionHooks):
    """Records every message of the connection it is installed on (see the module doc).

    ``payload_prefix`` (bytes every record keeps) and ``full_payload_bytes`` (the most the
    recent records' full payloads hold together) bound its memory. ``label`` names the side
    (``"client"``, ``"server"``) in the wait-for graph.
    """

    def __init__(
        self,
        *,
        payload_prefix: int = 256,
        full_payload_bytes: int = 16 << 20,
        label: str = "",
    ) -> None:
        if payload_prefix < 0 or full_payload_bytes < 0:
            raise ValueError("payload_prefix and full_payload_bytes must not be negative")
        self.label = label
        #: The connection the tracer is installed on (known from its first message).
        self.connection: Connection | None = None
        self._processing: list[ProcessingRecord] = []
        # Commands received and not yet started, by (link, message ID), oldest first.
        self._arrived: dict[tuple[Link, int], deque[TraceRecord]] = {}
        # Commands started and not yet ended, by the frame being processed.
        self._running: dict[int, ProcessingRecord] = {}
        self.payload_prefix = payload_prefix
        self.full_payload_bytes = full_payload_bytes
        # Records holding more than the prefix, oldest first, and what they hold beyond it.
        self._full: deque[TraceRecord] = deque()
        self._full_bytes = 0
        self._entries: list[TraceRecord | FramingRecord | ProcessingRecord] = []
        self._records: list[TraceRecord] = []
        #: Requests awaiting their reply, by (direction they went, message ID).
        self._open: dict[tuple[Direction, int], TraceRecord] = {}
        self._lot = trio.lowlevel.ParkingLot()
        #: Time zero of ``elapsed``: when the tracer was created inside trio, else its first
        #: record.
        self.start: float | None
        try:
            self.start = trio.current_time()
        except RuntimeError:
            self.start = None

    # --- hooks ---------------------------------------------------------------------------

    def on_send(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self.connection = conn
        self._record(link, Direction.SENT, frame)
        forward(frame)

    def on_receive(self, conn: Connection, link: Link, frame: Frame, forward: Forward) -> None:
        self.connection = conn
        self._record(link, Direction.RECEIVED, frame)
        forward(frame)

    def on_processing(self, conn: Connection, link: Link, frame: Frame, phase: Processing) -> None:
        """Called by the connection's ordering-policy context as a command starts and ends."""
        self.connection = conn
        header = frame.header
        if phase is Processing.START:
            arrived = self._arrived.get((link, header.msg_id))
            command = arrived.popleft() if arrived else None
            if arrived is not None and not arrived:
                del self._arrived[(link, header.msg_id)]
        else:
            started = self._running.pop(id(frame), None)
            command = started.command if started is not None else None
        now, elapsed = self._now()
        record = ProcessingRecord(len(self._entries), now, elapsed, link, phase, header, command)
        if phase is Processing.START:
            self._running[id(frame)] = record
        self._entries.append(record)
        self._processing.append(record)
        if self._lot:
            self._lot.unpark_all()

    def on_framing_error(self, conn: Connection, link: Link, event: FramingError) -> None:
        now, elapsed = self._now()
        self._entries.append(FramingRecord(len(self._entries), now, elapsed, link, event))

    def _now(self) -> tuple[float, float]:
        now = trio.current_time()
        if self.start is None:
            self.start = now
        return now, now - self.start

    def _record(self, link: Link, direction: Direction, frame: Frame) -> None:
        header = frame.header
        request = None
        if header.is_reply:
            answered = Direction.RECEIVED if direction is Direction.SENT else Direction.SENT
            request = self._open.pop((answered, header.msg_id), None)
        now, elapsed = self._now()
        payload = frame.payload
        size = len(payload)
        prefix = self.payload_prefix
        extra = size - prefix
        if extra > self.full_payload_bytes:
            payload = bytes(payload[:prefix])
        elif type(payload) is not bytes:
            payload = bytes(payload)  # a frame received in place: the record keeps bytes
        record = TraceRecord(
            len(self._entries),
            now,
            elapsed,
            link,
            direction,
            header,
            payload,
            len(frame.fds),
            size,
            request,
        )
        if 0 < extra <= self.full_payload_bytes:
            self._keep_full(record, extra)
        if header.is_command and not header.no_reply:
            self._open[(direction, header.msg_id)] = record
        if header.is_command and direction is Direction.RECEIVED:
            self._arrived.setdefault((link, header.msg_id), deque()).append(record)
        elif request is not None and direction is Direction.SENT:
            # Answered without being processed (refused by the connection core): not waiting.
            waiting = self._arrived.get((link, header.msg_id))
            if waiting is not None and request in waiting:
                waiting.remove(request)
                if not waiting:
                    del self._arrived[(link, header.msg_id)]
        self._entries.append(record)
        self._records.append(record)
        if self._lot:
            self._lot.unpark_all()

    def _keep_full(self, record: TraceRecord, extra: int) -> None:
        """Keep ``record``'s full payload; cut the oldest ones to their prefix to make room."""
        self._full.append(record)
        self._full_bytes += extra
        while self._full_bytes > self.full_payload_bytes:
            old = self._full.popleft()
            self._full_bytes -= len(old.payload) - self.payload_prefix
            # Records are frozen for their readers; the tracer alone cuts them, in place, so
            # that replies pointing at them (``request``) see the same record.
            object.__setattr__(old, "payload", bytes(old.payload[: self.payload_prefix]))

    # --- reading -------------------------------------------------------------------------

    @property
    def records(self) -> list[TraceRecord]:
        """Every message, in the order it passed."""
        return list(self._records)

    @property
    def framing_errors(self) -> list[FramingRecord]:
        return [e for e in self._entries if isinstance(e, FramingRecord)]

    @property
    def processing(self) -> list[ProcessingRecord]:
        """Every processing start and end, in order."""
        return list(self._processing)

    @property
    def entries(self) -> list[TraceRecord | FramingRecord | ProcessingRecord]:
        """Messages, framing problems and processing records, in the order they happened."""
        return list(self._entries)

    def in_progress(self) -> list[ProcessingRecord]:
        """The start records of commands being processed now (started, not ended)."""
        return sorted(self._running.values(), key=lambda record: record.index)

    def not_started(self) -> list[TraceRecord]:
        """Commands received whose processing has not started (only meaningful on a side
        whose policy reports processing: every side the tracer is installed on)."""
        waiting = [r for queue in self._arrived.values() for r in queue]
        return sorted(waiting, key=lambda record: record.index)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[TraceRecord]:
        return iter(list(self._records))

    def __getitem__(self, index: int) -> TraceRecord:
        return self._records[index]

    def select(
        self,
        *commands: int,
        direction: Direction | None = None,
        link: Link | None = None,
        reply: bool | None = None,
        error: bool | None = None,
    ) -> list[TraceRecord]:
        """Records matching every filter given: any of ``commands``, the direction, the link,
        replies (``reply=True``) or commands (``reply=False``), error replies or not."""
        return [r for r in self._records if _matches(r, commands, direction, link, reply, error)]

    def commands(
        self, *commands: int, direction: Direction | None = None, link: Link | None = None
    ) -> list[TraceRecord]:
        """Command messages (not replies), optionally only of the given command numbers."""
        return self.select(*commands, direction=direction, link=link, reply=False)

    def replies(
        self, *commands: int, direction: Direction | None = None, link: Link | None = None
    ) -> list[TraceRecord]:
        """Replies, error replies included."""
        return self.select(*commands, direction=direction, link=link, reply=True)

    def errors(
        self, *commands: int, direction: Direction | None = None, link: Link | None = None
    ) -> list[TraceRecord]:
        """Error replies."""
        return self.select(*commands, direction=direction, link=link, error=True)

    def sent(self) -> list[TraceRecord]:
        return self.select(direction=Direction.SENT)

    def received(self) -> list[TraceRecord]:
        return self.select(direction=Direction.RECEIVED)

    async def wait_for(
        self, predicate: Callable[[TraceRecord], bool], *, count: int = 1
    ) -> list[TraceRecord]:
        """Wait until ``count`` records satisfy ``predicate``; return the matching records."""
        while True:
            found = [r for r in self._records if predicate(r)]
            if len(found) >= count:
                await trio.lowlevel.checkpoint()
                return found
            await self._lot.park()

    def clear(self) -> None:
        """Forget every record (requests awaiting replies are forgotten too)."""
        self._entries.clear()
        self._records.clear()
        self._open.clear()
        self._processing.clear()
        self._arrived.clear()
        self._running.clear()
        self._full.clear()
        self._full_bytes = 0

    # --- printing ------------------------------------------------------------------------

    def lines(self, *, processing: bool = False) -> list[str]:
        """One line per message and framing problem; with ``processing``, also one per
        processing start and end (``· REGION_WRITE id=3 end``)."""
        return [
            str(entry)
            for entry in self._entries
            if processing or not isinstance(entry, ProcessingRecord)
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def dump(self, file: TextIO | None = None) -> None:
        """Print one line per message (to stdout unless ``file`` is given)."""
        print(self, file=file if file is not None else sys.stdout)


def _matches(
    record: TraceRecord,
    commands: tuple[int, ...],
    direction: Direction | None,
    link: Link | None,
    reply: bool | None,
    error: bool | None,
) -> bool:
    return (
        (not commands or record.header.command in commands)
        and (direction is None or record.direction is direction)
        and (link is None or record.link is link)
        and (reply is None or record.is_reply == reply)
        and (error is None or record.is_error == error)
    )


# --- formatting message fields -----------------------------------------------------------

# Integer fields shown in hex: addresses, offsets, sizes and flag words.
_HEX_FIELDS = frozenset({"address", "offset", "size", "flags", "mmap_offset"})
_MAX_SHOWN_BYTES = 16
_MAX_SHOWN_ITEMS = 4


def _describe_fields(message: object, separator: str = " ") -> str:
    """``region=2 offset=0x0 count=4``: the fields of a message that differ from defaults."""
    if not dataclasses.is_dataclass(message):
        return ""
    words = []
    for field in dataclasses.fields(message):
        if field.name == "fds":  # shown as the fd count of the record
            continue
        value = getattr(message, field.name)
        if field.default is not dataclasses.MISSING and value == field.default:
            continue
        words.append(f"{field.name}={_format_value(field.name, value)}")
    return separator.join(words)


def _format_value(name: str, value: object) -> str:
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return hex(value) if name in _HEX_FIELDS else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _format_bytes(bytes(value))
    if isinstance(value, tuple):
        shown = [_format_value(name, v) for v in value[:_MAX_SHOWN_ITEMS]]
        if len(value) > _MAX_SHOWN_ITEMS:
            shown.append(f"…+{len(value) - _MAX_SHOWN_ITEMS}")
        return "[" + ", ".join(shown) + "]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return f"{type(value).__name__}({_describe_fields(value, ', ')})"
    return repr(value)


def _format_bytes(data: bytes) -> str:
    if len(data) <= _MAX_SHOWN_BYTES:
        return data.hex() if data else "''"
    return f"<{len(data)} bytes {data[:8].hex()}…>"
