"""Frame assembly for a vfio-user byte stream (sans-io).

Usage (the engine's reader loop)::

    decoder = FrameDecoder(max_msg_size=...)
    data, fds = <recvmsg>                      # fds that came with this chunk
    for event in decoder.feed(data, fds):
        match event:
            case Frame():          ...  # owns event.fds: take_fds() or close_fds()
            case OversizedFrame(): ...  # answer EINVAL to event.header; bytes are skipped
            case StrayFds():       ...  # fds already closed; log / count it
            case BrokenStream():   ...  # close the connection; decoder is dead
    if <EOF> and not decoder.at_boundary: ...  # peer hung up mid-frame

Events come out in stream order. ``feed`` parses every complete frame in the
buffer before returning and never raises for bad input (it reports events);
it raises ``ProtocolError`` only when fed again after ``BrokenStream``.

File descriptors: Linux AF_UNIX stream sockets attach SCM_RIGHTS to the first
byte of the ``sendmsg`` that carried them, and ``recvmsg`` stops right after the
data of such a send, but it *does* return data queued before it in the same
chunk (verified: ``send(A); sendmsg(B, fds)`` is read as ``A+B`` with the fds).
So the fds of a chunk belong to the *last* frame that starts inside the chunk.
That is exact when the sender sends each fd-carrying message with its own
``sendmsg`` (libvfio-user and QEMU do; our transport must too). fds of a chunk
in which no frame starts (pure continuation bytes) are a protocol error: they
are closed and reported as ``StrayFds``. fds attached to an oversized frame or
left with an unfinished frame at ``close()`` are closed too.

Ownership: once a ``Frame`` is returned its fds belong to the caller.

Choosing ``max_msg_size``: it must admit the largest message either direction
may legitimately carry. Replies to our own DMA_READ / REGION_READ carry up to
the PEER's max_data_xfer_size, requests to us up to OURS, so use
``max_msg_size_for(max(ours, peer's))``; a client fetching large
DMA_LOGGING_REPORT bitmaps needs room for them too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .constants import DEFAULT_MAX_DATA_XFER_SIZE, HEADER_SIZE
from .errors import ProtocolError
from .header import HEADER_STRUCT, Header

#: Bytes a message may carry beyond its data transfer (header, region/offset/count
#: fields, ...). REGION_WRITE of max_data_xfer_size bytes is 16 + 16 + data.
MSG_SIZE_OVERHEAD = 4096
#: Default limit on a received message: 1 MiB of data plus overhead.
DEFAULT_MAX_MSG_SIZE = DEFAULT_MAX_DATA_XFER_SIZE + MSG_SIZE_OVERHEAD

_unpack_header = HEADER_STRUCT.unpack_from


def max_msg_size_for(max_data_xfer_size: int) -> int:
    """A receive limit that admits any message moving ``max_data_xfer_size`` bytes."""
    return max_data_xfer_size + MSG_SIZE_OVERHEAD


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already closed (EBADF)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(slots=True)
class Frame:
    """One complete message: header, payload bytes after the header, and its fds.

    ``payload`` is ``bytes``, or for a frame received in place (one that did not arrive in
    one read) the ``bytearray`` it was received into: the frame's own, never reused by the
    decoder, so it stays intact across later receives. The holder owns ``fds``: hand them
    on with ``take_fds()`` (which empties the frame's list) or release them with
    ``close_fds()``.
    """

    header: Header
    payload: bytes | bytearray
    fds: list[int] = field(default_factory=list)

    def take_fds(self) -> list[int]:
        """Move the fds out of the frame; the caller now owns them."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        """Close any fds the frame still owns."""
        if self.fds:  # most frames carry none: skip the calls
            close_fds(self.take_fds())


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame whose ``msg_size`` exceeds the limit: its bytes are being skipped.

    The stream stays in sync; answer ``header`` with EINVAL (unless it is a reply
    or has No_reply set). ``closed_fds`` counts fds that came with it and were closed.
    """

    header: Header
    closed_fds: int = 0


@dataclass(frozen=True, slots=True)
class StrayFds:
    """fds arrived with a chunk in which no frame starts; they have been closed."""

    count: int


@dataclass(frozen=True, slots=True)
class BrokenStream:
    """The stream cannot be resynchronised (``msg_size`` < 16): close the connection.

    ``header`` is the bad header as read. Every fd the decoder held has been closed.
    """

    reason: str
    header: Header


FrameEvent = Frame | OversizedFrame | StrayFds | BrokenStream


class FrameDecoder:
    """Turns received chunks (bytes + the fds that came with them) into events.

    ``max_msg_size`` (settable at any time, e.g. after VERSION negotiation) is
    the largest ``msg_size`` accepted; larger frames become ``OversizedFrame``
    and their bytes are discarded as they arrive, never buffered.

    A frame that does not arrive whole gets a buffer of its announced size as soon as
    its header is in: at most ``max_msg_size`` bytes (the limit bounds what a peer can
    make us allocate without sending it), filled in place as its bytes come, so a large
    frame is never gathered piece by piece and copied out again. ``receive_space`` gives
    the missing part of it to receive into directly (a transport's ``recv_into``).
    """

    __slots__ = (
        "_broken",
        "_buf",
        "_filled",
        "_frame",
        "_frame_header",
        "_frame_view",
        "_pending_fds",
        "_skip",
        "max_msg_size",
    )

    def __init__(self, max_msg_size: int = DEFAULT_MAX_MSG_SIZE) -> None:
        if max_msg_size < HEADER_SIZE:
            raise ValueError("max_msg_size must be at least the header size")
        self.max_msg_size = max_msg_size
        # The first bytes of a frame whose header is not complete yet (fewer than 16).
        self._buf = bytearray()
        # The payload of the frame being received, once its header is in (of its size).
        self._frame: bytearray | None = None
        self._frame_view = memoryview(b"")
        self._frame_header: Header | None = None
        # Payload bytes of _frame received so far.
        self._filled = 0
        # fds owned by the unfinished frame.
        self._pending_fds: list[int] = []
        # Bytes of an oversized frame still to discard.
        self._skip = 0
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete (the buffer of its announced size): fewer
        than ``max_msg_size`` (an oversized frame is skipped, never held; a frame keeps the
        limit it started under)."""
        return len(self._buf) + (len(self._frame) if self._frame is not None else 0)

    @property
    def pending_fds(self) -> int:
        """fds held for the unfinished frame: those of one chunk at most (the chunk it
        started in); fds arriving with its continuation bytes are closed as stray."""
        return len(self._pending_fds)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending (a clean place for EOF)."""
        return not self._buf and self._frame is None and self._skip == 0

    @property
    def broken(self) -> bool:
        return self._broken

    def close(self) -> None:
        """Drop buffered bytes and close fds waiting for an unfinished frame."""
        self._buf.clear()
        self._drop_frame()
        self._skip = 0
        self._close_pending()

    def receive_space(self) -> memoryview | None:
        """The missing bytes of the frame being received, as a writable view to receive into
        (then call ``received``); None unless a frame's header is in and bytes of it are not.

        Bytes received there belong to that frame alone: a read into it never takes the
        start of the next frame.
        """
        if self._frame is None:
            return None
        return self._frame_view[self._filled :]

    def received(self, count: int, fds: Sequence[int] = ()) -> list[FrameEvent]:
        """``count`` bytes were written at the start of ``receive_space()``; the events.

        The frame once it is complete; fds that came with these continuation bytes are
        closed and reported (``StrayFds``), as ``feed`` does.
        """
        if self._broken:
            close_fds(fds)
            raise ProtocolError("frame decoder used after a broken stream")
        if self._frame is None or not 0 <= count <= len(self._frame) - self._filled:
            close_fds(fds)
            raise ValueError(f"{count} bytes received beyond the frame being received")
        self._filled += count
        events: list[FrameEvent] = []
        if self._filled == len(self._frame):
            events.append(self._complete())
        if fds:
            close_fds(fds)
            events.append(StrayFds(len(fds)))
        return events

    def feed(
        self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()
    ) -> list[FrameEvent]:
        """Consume one received chunk and the fds received with it; return the events.

        The decoder takes ownership of ``fds`` at once (closing those it rejects).
        """
        if self._broken:
            close_fds(fds)
            raise ProtocolError("frame decoder used after a broken stream")
        events: list[FrameEvent] = []
        # The transport passes a byte memoryview already: no need to wrap it again.
        view = data if type(data) is memoryview else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        end = len(view)
        pos = 0
        # Index in `events` of the last frame that started in this chunk, or
        # _PENDING when that frame is the unfinished one now held.
        owner: int | None = None
        buf = self._buf
        max_size = self.max_msg_size
        unpack = _unpack_header

        while pos < end:
            if self._skip:
                # Rest of an oversized frame: discard without buffering.
                n = min(self._skip, end - pos)
                self._skip -= n
                pos += n
            elif self._frame is not None:
                # Continue a frame that started in an earlier chunk, in place.
                filled = self._filled
                n = min(len(self._frame) - filled, end - pos)
                self._frame_view[filled : filled + n] = view[pos : pos + n]
                self._filled = filled + n
                pos += n
                if self._filled == len(self._frame):
                    events.append(self._complete())
            elif buf:
                # Complete the header of a frame that started in an earlier chunk.
                take = min(HEADER_SIZE - len(buf), end - pos)
                buf += view[pos : pos + take]
                pos += take
                if len(buf) < HEADER_SIZE:
                    break
                hdr = Header(*unpack(buf, 0))
                buf.clear()
                if hdr.msg_size < HEADER_SIZE:
                    return self._break(events, hdr, fds)
                if hdr.msg_size > max_size:
                    self._skip = hdr.msg_size - HEADER_SIZE
                    events.append(OversizedFrame(hdr, len(self._pending_fds)))
                    self._close_pending()
                    continue
                self._start(hdr)
                if hdr.msg_size == HEADER_SIZE:
                    events.append(self._complete())
            elif end - pos < HEADER_SIZE:
                # A frame starts here but even its header is incomplete.
                buf += view[pos:end]
                owner = _PENDING
                pos = end
            else:
                # Whole frames back to back, the common case: none of the state tested above
                # changes while they last, so it is not tested again for each.
                msg_id, command, msg_size, flags, error = unpack(view, pos)
                while HEADER_SIZE <= msg_size <= max_size and msg_size <= end - pos:
                    owner = len(events)
                    events.append(
                        Frame(
                            Header(msg_id, command, msg_size, flags, error),
                            # (tobytes: a byte view's copy without bytes()'s buffer
                            # protocol round trip, about half the time for a small frame)
                            view[pos + HEADER_SIZE : pos + msg_size].tobytes(),
                        )
                    )
                    pos += msg_size
                    if end - pos < HEADER_SIZE:
                        break  # the chunk's end, or a header to complete from the next one
                    msg_id, command, msg_size, flags, error = unpack(view, pos)
                else:
                    # The header at pos announces no frame whole in this chunk.
                    hdr = Header(msg_id, command, msg_size, flags, error)
                    if msg_size < HEADER_SIZE:
                        return self._break(events, hdr, fds)
                    if msg_size > max_size:
                        n = min(msg_size, end - pos)
                        self._skip = msg_size - n
                        pos += n
                        owner = len(events)
                        events.append(OversizedFrame(hdr))
                    else:
                        # The frame's buffer, of its announced size, filled as it arrives.
                        self._start(hdr)
                        n = end - pos - HEADER_SIZE
                        self._frame_view[:n] = view[pos + HEADER_SIZE : end]
                        self._filled = n
                        owner = _PENDING
                        pos = end

        if fds:
            self._attach_fds(events, list(fds), owner)
        return events

    # -- internals ---------------------------------------------------------

    def _start(self, header: Header) -> None:
        """Receive the frame ``header`` announces (``msg_size`` within the limit) in place."""
        self._frame_header = header
        self._frame = bytearray(header.msg_size - HEADER_SIZE)
        self._frame_view = memoryview(self._frame)
        self._filled = 0

    def _complete(self) -> Frame:
        """The frame now received whole; the decoder is back at a boundary."""
        assert self._frame is not None and self._frame_header is not None
        # The buffer itself: it is this frame's alone (the next frame gets a new one).
        frame = Frame(self._frame_header, self._frame, self._pending_fds)
        self._pending_fds = []
        self._drop_frame()
        return frame

    def _drop_frame(self) -> None:
        self._frame_view.release()
        self._frame_view = memoryview(b"")
        self._frame = None
        self._frame_header = None
        self._filled = 0

    def _attach_fds(self, events: list[FrameEvent], fds: list[int], owner: int | None) -> None:
        """Give the chunk's fds to the last frame that started in it (see module doc)."""
        if owner is None:
            close_fds(fds)
            events.append(StrayFds(len(fds)))
        elif owner == _PENDING:
            self._pending_fds = fds
        else:
            ev = events[owner]
            if isinstance(ev, Frame):
                ev.fds = fds
            else:
                assert isinstance(ev, OversizedFrame)
                close_fds(fds)
                events[owner] = OversizedFrame(ev.header, len(fds))

    def _close_pending(self) -> None:
        close_fds(self._pending_fds)
        self._pending_fds = []

    def _break(self, events: list[FrameEvent], hdr: Header, fds: Sequence[int]) -> list[FrameEvent]:
        """The stream is lost: report it, close every fd held or just received."""
        self._broken = True
        close_fds(fds)
        self.close()
        events.append(BrokenStream(f"msg_size {hdr.msg_size} is below the header size", hdr))
        return events


_PENDING = -1
