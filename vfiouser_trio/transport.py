"""vfio-user frames over an AF_UNIX stream socket, with file descriptors (SCM_RIGHTS).

The transport does its own non-blocking syscalls on a stdlib ``socket.socket``: it tries
``recvmsg``/``sendmsg`` first and waits for readiness only when the kernel says EAGAIN.

Receiving: one ``recvmsg`` reads as much as is buffered (up to ``RECV_BUFFER_SIZE``, less for
a peer whose messages are tiny: ``FRAMES_PER_READ``) and every complete frame in it is
returned at once. On Linux a read never continues past a chunk of
data that carried file descriptors, so descriptors that arrive with a read belong to the last
message that begins in it (the peer sends a message's fds with its first byte, as libvfio-user
and QEMU do); :class:`~vfiouser_trio.protocol.framing.FrameDecoder` attaches them so.
Truncated control data (``MSG_CTRUNC``: more fds than ``max_recv_fds``) is fatal.

Sending: frames are queued in order. ``write`` pushes the queue to the kernel at once when
it can; whatever the kernel does not take is sent by :meth:`Transport.run_writer`, a task the
owner runs (or has started in ``writer_nursery`` when first needed). Consecutive frames without fds
share one ``sendmsg``; a frame with fds starts a ``sendmsg`` of its own (so the fds travel
with its first byte) and nothing follows it there. Between :meth:`Transport.cork` and
:meth:`Transport.uncork` writes only queue: a task that answers a batch of commands without
yielding corks the transport, so their replies leave in one ``sendmsg`` and the writer task is
not woken for them (a wake-up is a scheduler pass of its own).
"""

from __future__ import annotations

import array
import errno
import mmap
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice

import trio

from .idle_watch import IdleWatch
from .protocol.constants import DEFAULT_MAX_MSG_FDS, HEADER_SIZE
from .protocol.errors import ProtocolError
from .protocol.framing import DEFAULT_MAX_MSG_SIZE, FrameDecoder, FrameEvent, close_fds
from .protocol.header import Header
from .protocol.message import Buffer, byte_buffer

#: Bytes asked of one ``recvmsg``.
RECV_BUFFER_SIZE = 256 * 1024
#: Frames one read should complete at most. A peer sending tiny messages gets smaller reads
#: (down to ``_MIN_READ`` bytes), so parsing one read never holds up the process for long;
#: reads grow back as messages grow.
FRAMES_PER_READ = 64
#: The smallest read the transport makes (unless its caller asks for less).
MIN_READ = 4096
#: A frame missing at least this many bytes receives them straight into its own buffer
#: (``FrameDecoder.receive_space``); less is read through the receive buffer with what follows.
DIRECT_READ_MIN = 16 * 1024
#: Reads in a row that found nothing after the yield (see :meth:`Transport.receive`) from
#: which the peer counts as slower than a scheduler pass: the yield then only costs a pass
#: (and the read after it a system call).
#: A fast peer misses about half the time (a C client answering a REGION_READ on another
#: core does), so the run must be long to tell them apart.
SLOW_PEER_MISSES = 32
#: Receives of a slow peer's link that wait on the socket at once instead; the next yields
#: first again, which finds out whether the peer has sped up.
SLOW_PEER_READS = 8
#: Buffers gathered into one ``sendmsg`` (Linux allows 1024).
_MAX_IOV = 512
#: A payload up to this size is joined to its header in one chunk (copying it is cheaper
#: than queueing and gathering a second buffer); larger ones are queued as they are.
_JOIN_MAX = 1024
#: Small frames queued back to back share one buffer up to this size.
_COALESCE_MAX = 64 * 1024
#: The kernel send buffer asked for each socket (``SO_SNDBUF``; Linux doubles it for its
#: bookkeeping, within ``net.core.wmem_max``). Linux's default (``wmem_default``, 208 KiB)
#: takes a 256 KiB frame in two ``sendmsg`` calls with a wake-up of the writer between
#: them (and the reader woken for half a frame); this fits a frame of 512 KiB at once, and
#: bounds what the kernel holds for a peer that does not read (what we hold is
#: ``SEND_HIGH_WATER`` and the owner's backlog limit). A socket whose buffer was already
#: larger keeps it.
SEND_BUFFER_SIZE = 512 * 1024
#: Queued outgoing bytes above which :meth:`Transport.send` waits for the peer to read.
SEND_HIGH_WATER = 4 * 1024 * 1024
#: What one queued chunk costs in memory beyond its data (the chunk object, the bytes
#: object's header, the deque slot): :attr:`Transport.backlog` counts it, so that a backlog
#: of many tiny replies is measured by the memory it holds, not only its bytes.
CHUNK_OVERHEAD = 128
_INT_SIZE = array.array("i").itemsize
# Plain ints: the socket module's IntFlag members make every `&` a slow enum operation.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_SO_SNDBUF = int(socket.SO_SNDBUF)
# errnos that mean "the peer is gone", reported as an end of stream on receive.
_PEER_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})


class _Chunk:
    """A piece of queued outgoing data; ``fds`` go with its first byte."""

    __slots__ = ("data", "fds", "joins", "owns_fds", "starts_frame")

    def __init__(
        self,
        data: Buffer,
        fds: Sequence[int],
        owns_fds: bool,
        starts_frame: bool,
        joins: bool = False,
    ) -> None:
        self.data = data
        self.fds = fds
        self.owns_fds = owns_fds
        self.starts_frame = starts_frame
        #: ``data`` is a bytearray of ours, nothing of it sent yet, that the next small
        #: frames without fds are appended to.
        self.joins = joins


class _ReceiveBuffer:
    """The receive buffer of every transport in a thread (:func:`_thread_receive_buffer`).

    One is enough: a read is parsed before any other can start (nothing between ``recvmsg``
    and the decoder's return waits) and the decoder copies what it keeps. Anonymous memory:
    a page becomes resident only once a read reaches it, and stays so (at most
    ``RECV_BUFFER_SIZE`` per thread; handing the pages back after each large read made
    every large read fault them in again).
    """

    def __init__(self) -> None:
        self.buffer = mmap.mmap(-1, RECV_BUFFER_SIZE)
        self.view = memoryview(self.buffer)
        self._iov = [self.view]

    def iov(self, size: int) -> list[memoryview]:
        """The first ``size`` bytes of the buffer, as ``recvmsg_into`` takes them (the last
        one asked for is kept: transports mostly read alike)."""
        iov = self._iov
        if len(iov[0]) != size:
            iov = self._iov = [self.view[:size]]
        return iov


_per_thread = threading.local()


def _thread_receive_buffer() -> _ReceiveBuffer:
    # A plain object per thread: attribute access on the threading.local itself is slower.
    buffer: _ReceiveBuffer | None = getattr(_per_thread, "buffer", None)
    if buffer is None:
        buffer = _per_thread.buffer = _ReceiveBuffer()
    return buffer


#: A payload in pieces, sent as iovecs (``Transport.write``): e.g. a DMA header and the data.
#: Each piece is a buffer whose ``len`` counts bytes.
Pieces = tuple[Buffer, ...]


def byte_pieces(payload: Buffer | Pieces) -> tuple[Buffer | Pieces, int]:
    """``payload`` with every buffer as :func:`byte_buffer` makes it, and its size in bytes."""
    if isinstance(payload, tuple):
        pieces = tuple(byte_buffer(piece) for piece in payload)
        return pieces, sum(len(piece) for piece in pieces)
    payload = byte_buffer(payload)
    return payload, len(payload)


def _unsent(buffers: Sequence[Buffer], sent: int) -> list[Buffer]:
    """What is left of ``buffers`` (each's ``len`` in bytes) once ``sent`` bytes of them went:
    the rest of the one cut, as a view, then the whole ones after it."""
    left: list[Buffer] = []
    for buffer in buffers:
        size = len(buffer)
        if sent >= size:
            sent -= size
            continue
        left.append(memoryview(buffer)[sent:] if sent else buffer)
        sent = 0
    return left


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            usable = len(data) - len(data) % _INT_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


class Transport:
    """Frames in and out of one connected AF_UNIX ``SOCK_STREAM`` socket.

    The transport owns ``sock`` (it is made non-blocking) and closes it in :meth:`close`.
    ``max_msg_size`` and ``max_recv_fds`` bound what is accepted from the peer and may be
    changed at any time (for example after VERSION negotiation).
    """

    __slots__ = (
        "_ancbufsize",
        "_at_eof",
        "_broken",
        "_closed",
        "_corked",
        "_decoder",
        "_drained_lot",
        "_drained_socket",
        "_fair_read_size",
        "_max_recv_fds",
        "_out",
        "_queued_bytes",
        "_read_size",
        "_recv",
        "_sock",
        "_waits_first",
        "_watch",
        "_writer_lot",
        "_yield_misses",
        "on_progress",
        "writer_nursery",
    )

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
        max_recv_fds: int = DEFAULT_MAX_MSG_FDS,
    ) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("vfio-user needs an AF_UNIX SOCK_STREAM socket")
        sock.setblocking(False)
        if sock.getsockopt(_SOL_SOCKET, _SO_SNDBUF) < 2 * SEND_BUFFER_SIZE:
            sock.setsockopt(_SOL_SOCKET, _SO_SNDBUF, SEND_BUFFER_SIZE)
        self._sock = sock
        self._decoder = FrameDecoder(max_msg_size=max_msg_size)
        # Shared by the thread's transports, so an idle connection holds no buffer of its own.
        self._recv = _thread_receive_buffer()
        self._read_size = RECV_BUFFER_SIZE
        # What FRAMES_PER_READ allows, from the last reads; a connection starts small.
        self._fair_read_size = FRAMES_PER_READ * HEADER_SIZE
        self._max_recv_fds = 0
        self._ancbufsize = 0
        self.max_recv_fds = max_recv_fds
        # Created when first needed: an empty deque costs more than the rest of an idle
        # transport's state.
        self._out: deque[_Chunk] | None = None
        self._queued_bytes = 0
        # Parking lots are created when first needed (an idle transport waits for nothing).
        self._writer_lot: trio.lowlevel.ParkingLot | None = None
        self._drained_lot: trio.lowlevel.ParkingLot | None = None
        self._closed = False
        self._corked = False
        self._broken: OSError | None = None
        self._at_eof = False
        self._drained_socket = False
        self._waits_first = 0
        self._yield_misses = 0
        self._watch: IdleWatch | None = None
        #: Called (synchronously) whenever the kernel took queued data; None for nobody.
        self.on_progress: Callable[[], None] | None = None
        #: Where :meth:`run_writer` is started the first time data stays queued, for an
        #: owner that starts it only when needed (None: the owner runs it, or it runs).
        self.writer_nursery: trio.Nursery | None = None

    # ----------------------------------------------------------------- limits

    @property
    def max_msg_size(self) -> int:
        """Largest message (header included) accepted from the peer."""
        return self._decoder.max_msg_size

    @max_msg_size.setter
    def max_msg_size(self, value: int) -> None:
        self._decoder.max_msg_size = value

    @property
    def max_recv_fds(self) -> int:
        """Most file descriptors accepted with one message; more is a fatal MSG_CTRUNC."""
        return self._max_recv_fds

    @max_recv_fds.setter
    def max_recv_fds(self, value: int) -> None:
        if value < 0:
            raise ValueError("max_recv_fds must not be negative")
        self._max_recv_fds = value
        self._ancbufsize = socket.CMSG_SPACE(value * _INT_SIZE) if value else 0

    # ----------------------------------------------------------------- state

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run (locally, or after a fatal error)."""
        return self._closed

    @property
    def send_error(self) -> OSError | None:
        """The error that broke sending (the transport closed itself), if any."""
        return self._broken

    @property
    def queued_bytes(self) -> int:
        """Outgoing bytes not yet handed to the kernel."""
        return self._queued_bytes

    @property
    def backlog(self) -> int:
        """The memory the send queue holds: its bytes plus ``CHUNK_OVERHEAD`` per chunk."""
        out = self._out
        return self._queued_bytes + (CHUNK_OVERHEAD * len(out) if out else 0)

    def fileno(self) -> int:
        return self._sock.fileno()

    # ----------------------------------------------------------------- receive

    async def receive(self, max_bytes: int = RECV_BUFFER_SIZE) -> list[FrameEvent]:
        """Wait for data and return the events of every frame completed by it, in order.

        One read takes at most ``max_bytes`` (at most ``RECV_BUFFER_SIZE``, and less while
        the peer's messages are tiny: ``FRAMES_PER_READ``): a caller that bounds what it
        holds reads less as it nears its limit.

        Events are :class:`Frame` (the caller owns its fds), ``OversizedFrame``, ``StrayFds``
        and ``BrokenStream`` (after which the caller must close the transport). Returns an
        empty list once the peer has closed the connection. Raises :class:`ProtocolError`
        (after closing the transport) when the peer sent more fds than ``max_recv_fds``, and
        ``trio.ClosedResourceError`` after :meth:`close`. A full checkpoint: it yields to the
        scheduler at least once, also when data was waiting (the engine's batches rely on it).
        """
        if self._closed:
            raise trio.ClosedResourceError("transport is closed")
        self._read_size = max(min(max_bytes, self._fair_read_size), 1)
        if self._waits_first:
            # A slow peer (SLOW_PEER_MISSES): wait on the socket at once, which yields only
            # once (its data is hardly ever in already: a read first would find nothing).
            self._waits_first -= 1
        else:
            # Yield first, then read: the scheduler pass gives the peer time to answer what
            # we just sent (a client with one request in flight does, within it), and data
            # found then needs no epoll registration. Waiting at once after a read that
            # emptied the socket re-armed the fd (an epoll_ctl) and parked the task on every
            # round trip.
            await trio.lowlevel.checkpoint()
            events = self._receive_nowait()
            if events is not None:
                self._yield_misses = 0
                return events
            self._yield_misses += 1
            if self._yield_misses >= SLOW_PEER_MISSES:
                self._waits_first = SLOW_PEER_READS
        await trio.lowlevel.wait_readable(self._sock)
        while True:
            events = self._receive_nowait()
            if events is not None:
                return events
            await trio.lowlevel.wait_readable(self._sock)

    def receive_nowait(self) -> list[FrameEvent] | None:
        """:meth:`receive` without waiting: None when the kernel has nothing now."""
        self._read_size = self._fair_read_size
        return self._receive_nowait()

    def _receive_nowait(self) -> list[FrameEvent] | None:
        """Read until some event is complete; None when the kernel has nothing (EAGAIN)."""
        if self._closed:
            raise trio.ClosedResourceError("transport is closed")
        if self._at_eof:
            return []
        decoder = self._decoder
        while True:
            # The rest of a large frame goes straight into its buffer (no copy out of ours).
            space = decoder.receive_space()
            direct = space is not None and len(space) >= DIRECT_READ_MIN
            iov = [space] if space is not None and direct else self._recv.iov(self._read_size)
            try:
                size, ancdata, msg_flags, _ = self._sock.recvmsg_into(
                    iov, self._ancbufsize, _MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                self._drained_socket = True
                return None
            except OSError as exc:
                if exc.errno not in _PEER_GONE:
                    raise
                size, ancdata, msg_flags = 0, [], 0
            # A short read without fds left the socket empty (a read with fds stops early).
            self._drained_socket = size < len(iov[0]) and not ancdata
            fds = _fds_from_ancillary(ancdata) if ancdata else []
            if msg_flags & _MSG_CTRUNC:
                close_fds(fds)
                self.close()
                raise ProtocolError(
                    f"peer sent more file descriptors than the limit of {self._max_recv_fds}"
                )
            if not size:
                close_fds(fds)
                self._at_eof = True
                return []
            if direct:
                events = decoder.received(size, fds)
                if events:
                    return events
                if self._drained_socket:
                    return None
                continue
            # The decoder copies what it keeps, so the receive buffer can be reused.
            events = decoder.feed(self._recv.view[:size], fds)
            if len(events) > FRAMES_PER_READ:
                self._fair_read_size = max(size * FRAMES_PER_READ // len(events), MIN_READ)
            elif size == self._read_size < RECV_BUFFER_SIZE and len(events) <= FRAMES_PER_READ // 2:
                self._fair_read_size = min(self._fair_read_size * 2, RECV_BUFFER_SIZE)
            if events:
                return events
            if self._drained_socket:
                return None

    def watch_idle(self, callback: Callable[[], None]) -> None:
        """While no task reads the socket: call ``callback`` whenever it has data or has hung
        up (from the run's :class:`~vfiouser_trio.idle_watch.IdleWatch` task; it consumes
        them with :meth:`receive_nowait`), and once when the transport closes.
        :meth:`unwatch_idle` before a task reads it."""
        watch = self._watch
        if watch is None:
            watch = self._watch = IdleWatch.acquire()  # released by close()
        watch.watch(self._sock.fileno(), callback)

    def unwatch_idle(self) -> None:
        """Stop :meth:`watch_idle` (nothing if not watched)."""
        if self._watch is not None:
            self._watch.forget(self._sock.fileno())

    async def wait_readable(self) -> None:
        """Wait until the socket has data or has hung up (a full checkpoint); read it then
        with :meth:`receive_nowait`. Raises ``trio.ClosedResourceError`` if the transport is
        closed, also while waiting."""
        if self._closed:
            raise trio.ClosedResourceError("transport is closed")
        await trio.lowlevel.wait_readable(self._sock)

    @property
    def at_frame_boundary(self) -> bool:
        """False while part of a frame has been received but not the rest."""
        return self._decoder.at_boundary

    # ----------------------------------------------------------------- send

    def write(
        self,
        header: Header | bytes,
        payload: Buffer | Pieces = b"",
        fds: Sequence[int] = (),
        *,
        transfer_fds: bool = False,
        flush: bool = True,
    ) -> None:
        """Queue one frame without blocking; with ``flush``, hand the queue to the kernel now.

        ``payload`` is one buffer, or a tuple of them (:data:`Pieces`: sent as iovecs of
        one ``sendmsg``, never joined, as long as the kernel takes them now; what it leaves
        is copied into the queue, so no piece is referenced once this returns). With
        ``transfer_fds`` the transport owns ``fds`` and closes them once sent (or on
        :meth:`close`); otherwise the caller keeps them and may close them when this returns.
        Raises ``trio.ClosedResourceError`` after :meth:`close` and ``trio.BrokenResourceError``
        once a send has failed.
        """
        if self._closed:
            if transfer_fds:
                close_fds(fds)
            raise self._closed_error()
        raw_header = header.pack() if isinstance(header, Header) else header
        if self._corked:
            flush = False
        if isinstance(payload, tuple):
            joined = self._write_pieces(raw_header, payload, flush and not self._out and not fds)
            if joined is None:
                return
            payload = joined
        elif type(payload) is memoryview:  # (bytes, the common case, skips the call)
            payload = byte_buffer(payload)
        out = self._out
        size = len(raw_header)
        payload_size = len(payload)
        if flush and not out and not fds:
            # Nothing queued ahead (the common case of a reply to one command): straight to
            # the kernel, header and payload as two iovecs, no chunk unless it takes less.
            self._send_now(raw_header, payload, size + payload_size)
            return
        # The writer needs waking only when the queue stops being empty: with data queued it
        # is awake already, or waits for the socket (it looks at the queue before it parks).
        wake = not out
        if out is None:
            out = self._queue()
        self._queued_bytes += size + payload_size
        if payload_size > _JOIN_MAX:
            first = _Chunk(raw_header, tuple(fds), transfer_fds, True)
            out.append(first)
            out.append(_Chunk(payload, (), False, False))
        elif fds:
            first = _Chunk(raw_header + payload, tuple(fds), transfer_fds, True)
            out.append(first)
        elif not wake and self._coalesce(out, raw_header, payload):
            if flush:
                self._flush()
            return
        else:
            batch = bytearray(raw_header)
            batch += payload
            first = _Chunk(batch, (), False, True, joins=True)
            out.append(first)
        if flush:
            self._flush()
        if first.fds and not first.owns_fds:
            # Not sent yet, and the caller may close its fds once we return: keep duplicates.
            first.fds = tuple(os.dup(fd) for fd in first.fds)
            first.owns_fds = True
        if out and wake and not self._corked:
            self._wake_writer()

    def write_bytes(self, header: bytes, payload: bytes) -> None:
        """:meth:`write` of a frame given as bytes, without fds, flushed as ``write`` would.

        The engine's reply to a command it ran inline, once per command: with fewer tests
        than ``write`` makes, it goes to the kernel at once when nothing is queued or corked,
        and while corked a small one joins the queued replies before it.
        """
        out = self._out  # (None once closed)
        if not self._corked:
            if not out and not self._closed:
                # write's case of nothing queued ahead (a read's one command).
                self._send_now(header, payload, len(header) + len(payload))
                return
        elif out and len(payload) <= _JOIN_MAX and self._coalesce(out, header, payload):
            self._queued_bytes += len(header) + len(payload)
            return
        self.write(header, payload)  # (raises once closed)

    @staticmethod
    def _coalesce(out: deque[_Chunk], header: bytes, payload: Buffer) -> bool:
        """Append a small frame without fds to the last queued chunk if that one takes more
        (replies to pipelined commands: one chunk and one iovec for them all); whether it
        did. The caller counts the bytes."""
        last = out[-1]
        if last.joins and len(last.data) < _COALESCE_MAX:
            batch: bytearray = last.data  # type: ignore[assignment]  # (joins: ours)
            batch += header
            batch += payload
            return True
        return False

    def cork(self) -> None:
        """Queue what :meth:`write` is given, without sending it or waking the writer task,
        until :meth:`uncork`. The caller must uncork before it next yields to the scheduler:
        nothing else sends corked data."""
        self._corked = True

    def uncork(self) -> None:
        """End :meth:`cork`: send what is queued now, and leave the writer task whatever the
        kernel does not take. Raises like :meth:`write` if the send fails."""
        self._corked = False
        if self._out and not self._flush():
            self._wake_writer()

    def _write_pieces(self, raw_header: bytes, pieces: Pieces, now: bool) -> bytes | None:
        """``write``'s pieces. With ``now`` (flushing, nothing queued ahead, no fds) header
        and pieces go to the kernel as the iovecs of one ``sendmsg`` and whatever it leaves
        is queued, joined; None then. Else the pieces joined, for ``write`` to queue as one
        payload. Joined means copied: no piece (maybe a view of memory the caller reuses or
        unmaps) is referenced once ``write`` returns."""
        if not now:
            return b"".join(pieces)
        buffers = [raw_header, *map(byte_buffer, pieces)]  # (len must count bytes below)
        sent = self._send_once(buffers)
        left = _unsent(buffers, sent)
        if left:
            self._queue_left([b"".join(left)], sent)
        return None

    def _send_now(self, raw_header: bytes, payload: Buffer, total: int) -> None:
        """``write`` with an empty queue: one ``sendmsg``; whatever the kernel leaves is queued."""
        buffers = (raw_header, payload) if payload else (raw_header,)
        sent = self._send_once(buffers)
        if sent != total:
            # Queued as it is, the payload not copied (it may be large).
            self._queue_left(_unsent(buffers, sent), sent)

    def _queue_left(self, left: list[Buffer], sent: int) -> None:
        """Queue ``left``, what the kernel did not take of a frame after ``sent`` bytes of it."""
        out = self._queue()
        for i, buffer in enumerate(left):
            out.append(_Chunk(buffer, (), False, not i and not sent))
            self._queued_bytes += len(buffer)
        self._wake_writer()

    def _send_once(self, buffers: Sequence[Buffer]) -> int:
        """One non-blocking ``sendmsg``: the bytes the kernel took (0 when it took none).

        A failed send breaks the transport (BrokenResourceError)."""
        try:
            sent = self._sock.sendmsg(buffers, (), _MSG_NOSIGNAL)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self._broken = exc
            self.close()
            raise trio.BrokenResourceError("send failed") from exc
        if sent and self.on_progress is not None:
            self.on_progress()
        return sent

    def _queue(self) -> deque[_Chunk]:
        out = self._out
        if out is None:
            out = self._out = deque()
        return out

    def _wake_writer(self) -> None:
        nursery = self.writer_nursery
        if nursery is not None:
            self.writer_nursery = None
            nursery.start_soon(self.run_writer)
        if self._writer_lot:
            self._writer_lot.unpark()

    async def send(
        self,
        header: Header | bytes,
        payload: Buffer = b"",
        fds: Sequence[int] = (),
        *,
        transfer_fds: bool = False,
    ) -> None:
        """Queue one frame and send it; waits only while too much data is queued."""
        await trio.lowlevel.checkpoint_if_cancelled()
        self.write(header, payload, fds, transfer_fds=transfer_fds)
        if self._queued_bytes > SEND_HIGH_WATER:
            await self.wait_send_capacity()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_capacity(self) -> None:
        """Wait until queued outgoing data is below the high-water mark."""
        await self.drain(SEND_HIGH_WATER)

    async def drain(self, limit: int = 0) -> None:
        """Wait until at most ``limit`` outgoing bytes are queued (by default: all sent).

        Raises ``trio.ClosedResourceError`` (or ``BrokenResourceError``) if the transport
        closes first: queued data is then lost.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise self._closed_error()
        if self._queued_bytes <= limit:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        while self._queued_bytes > limit:
            if self._drained_lot is None:
                self._drained_lot = trio.lowlevel.ParkingLot()
            await self._drained_lot.park()
            if self._closed:
                raise self._closed_error()

    async def run_writer(self) -> None:
        """Send queued data whenever the socket is writable; returns when the transport closes.

        Run exactly one per transport, in the owner's nursery (or set ``writer_nursery`` to
        have it started there when first needed).
        """
        try:
            while not self._closed:
                if not self._out:
                    if self._writer_lot is None:
                        self._writer_lot = trio.lowlevel.ParkingLot()
                    await self._writer_lot.park()
                    continue
                if self._flush():
                    continue
                await trio.lowlevel.wait_writable(self._sock)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _flush(self) -> bool:
        """Send queued chunks until done or EAGAIN; True if the queue is now empty."""
        out = self._out
        if not out:
            return True
        sock = self._sock
        progressed = False
        while out:
            head = out[0]
            buffers = [head.data]
            if head.fds:
                ancdata = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", head.fds))]
                for chunk in islice(out, 1, _MAX_IOV):
                    if chunk.starts_frame:
                        break
                    buffers.append(chunk.data)
            else:
                ancdata = []
                for chunk in islice(out, 1, _MAX_IOV):
                    if chunk.fds:
                        break
                    buffers.append(chunk.data)
            try:
                sent = sock.sendmsg(buffers, ancdata, _MSG_NOSIGNAL)
            except BlockingIOError:
                break
            except OSError as exc:
                self._broken = exc
                self.close()
                raise trio.BrokenResourceError("send failed") from exc
            if head.fds:
                if head.owns_fds:
                    close_fds(head.fds)
                head.fds = ()
            self._queued_bytes -= sent
            progressed = True
            while sent:
                chunk = out[0]
                size = len(chunk.data)
                if sent >= size:
                    out.popleft()
                    sent -= size
                else:
                    chunk.data = memoryview(chunk.data)[sent:]
                    chunk.starts_frame = False
                    chunk.joins = False  # (a bytearray with a view of it cannot grow)
                    sent = 0
        if not out:
            self._out = None  # an empty deque holds hundreds of bytes: drop it until needed
        if progressed:
            if self._drained_lot:
                self._drained_lot.unpark_all()
            if self.on_progress is not None:
                self.on_progress()
        return not out

    # ----------------------------------------------------------------- close

    def _closed_error(self) -> trio.ClosedResourceError | trio.BrokenResourceError:
        if self._broken is not None:
            return trio.BrokenResourceError(f"transport broke: {self._broken}")
        return trio.ClosedResourceError("transport is closed")

    def close(self) -> None:
        """Close the socket and every fd the transport owns. Idempotent; never blocks."""
        if self._closed:
            return
        self._closed = True
        for chunk in self._out or ():
            if chunk.owns_fds:
                close_fds(chunk.fds)
        self._out = None
        self._queued_bytes = 0
        self._decoder.close()
        watch, callback = self._watch, None
        if watch is not None:
            self._watch = None
            callback = watch.forget(self._sock.fileno())
            watch.release()
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        if callback is not None:
            callback()  # the watcher's owner learns of it as a waiting reader would
        if self._writer_lot:
            self._writer_lot.unpark_all()
        if self._drained_lot:
            self._drained_lot.unpark_all()
        if self.on_progress is not None:
            # A reader paused on the backlog must learn that it will never drain.
            self.on_progress()

    async def aclose(self) -> None:
        """Close, as a checkpoint."""
        self.close()
        await trio.lowlevel.checkpoint()
