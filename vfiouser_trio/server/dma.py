"""The device's view of guest memory: the table built from DMA_MAP / DMA_UNMAP.

Maps that came with a file descriptor are mmap'd and accessed directly (zero-copy
views are possible); maps without one are reached through DMA_READ / DMA_WRITE
messages to the client, split at the client's ``max_data_xfer_size``. Every access
is checked against the maps and their permissions, and an unmap waits until the
accesses and views using that map are finished before the reply goes out. An access
inside one fd-backed map (``read``, ``read_into``, ``write``) is one bisect and one
slice copy, with no view or pin (see ``_direct`` for why that is safe). An access
may span adjacent maps (``sgl`` lists the pieces, as libvfio-user's
``vfu_addr_to_sgl`` does); a byte outside every map is EFAULT. ``prefer_messages`` (or
``read``/``write``'s ``messages=True``) sends DMA_READ / DMA_WRITE even for a map we
hold the fd of, as libvfio-user's samples/server does on one map.

The device hears of the client's maps through its ``dma_mapped`` / ``dma_unmapped``
hooks (``server/dma_hooks.py``; libvfio-user's ``vfu_setup_device_dma`` callbacks).
Removing a map (DMA_UNMAP, the client leaving) runs in this order: ``dma_unmapped``
while the map is still usable; then no new access starts on it; then the unmap waits
for the accesses, views and pins using it to finish; then its memory is unmapped and
the reply goes out, after which the server never touches it (spec: "DMA_UNMAP",
https://www.qemu.org/docs/master/interop/vfio-user.html).

While the device is stopped (migration STOP, STOP_COPY, RESUMING, ERROR) the table's
quiesce gate holds device DMA: ``read``/``write`` from a device task wait until the
device runs again; from a task handling client commands (see ``mark_command_task``)
they fail at once with EBUSY, because the command that would restart the device is
queued behind that handler. Opening a ``view`` while stopped fails with EBUSY (it
cannot wait); device tasks ``await dma.wait_running()`` right before opening one.

Memory the client can shrink. A client may ``ftruncate`` the file behind a map at
any time, and the next access to a page past the new end would be a SIGBUS, fatal
to the whole process. So every fd that comes with DMA_MAP is checked when it
arrives (``fdcheck.require_memory_fd``: a memfd or regular file holding the whole
window, else EINVAL), and then:

* a file that cannot shrink (``F_SEAL_SHRINK``, as QEMU's memory-backend-memfd and
  our client's ``GuestMemory`` set) is accessed directly, views included;
* a memfd that still takes seals gets ``F_SEAL_SHRINK`` from us. The seal is
  permanent on the client's file (it can still grow it); a client that must shrink
  its memory later should send a sealed or frozen memfd instead;
* a file that can still shrink (a plain tmpfs or hugetlbfs file, or a memfd whose
  seals are frozen by ``F_SEAL_SEAL`` without ``F_SEAL_SHRINK``) is read and
  written only through a guarded native copy (``memory.Mapping.load``/``store``)
  that turns a SIGBUS into DmaError(EFAULT). Zero-copy ``view`` of such a map is
  refused with EFAULT unless the table's ``trust_client_memory`` is set (from
  ``ServerLimits.trust_client_memory``), because a view is touched by device code
  where no guard can catch the fault.

No fd is kept per map: the window is mapped with the native layer and the fd is
closed once mapped, so the number of maps is bounded by ``max_maps`` and the
kernel's map count, not by the process's fd limit. Each map records the file's
identity (st_dev, st_ino), offset and protection.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

import trio

from ..fdcheck import require_memory_fd
from ..memory import Mapping, Prot, forbid_shrinking, page_size
from ..protocol.constants import DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE
from ..protocol.errors import VfioUserError
from ..protocol.message import byte_buffer

log = logging.getLogger(__name__)

_bisect_right = bisect.bisect_right  # a global, not a module attribute, on the fast path


class DmaMessenger(Protocol):
    """Carries DMA for maps without an fd: DMA_READ / DMA_WRITE to the client."""

    @property
    def max_data_xfer_size(self) -> int: ...

    async def dma_read(self, address: int, count: int) -> bytes | memoryview: ...

    async def dma_write(self, address: int, data: bytes | memoryview) -> None: ...


class DmaError(VfioUserError):
    """A device DMA access the maps do not allow (EFAULT), or that failed in transit."""


def _wrong_read_size(got: int, wanted: int) -> NoReturn:
    raise DmaError(errno.EIO, f"DMA_READ returned {got} bytes, wanted {wanted}")


#: Called for every device write to guest memory: (iova, length). Dirty-page logging hooks in here.
WriteObserver = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class DmaWindow:
    """A client's DMA map as the device sees it (read-only): what its hooks are given."""

    iova: int
    size: int
    readable: bool
    writable: bool
    #: True when the client sent a file descriptor and the device reaches the memory
    #: directly; False when every access is a DMA_READ/DMA_WRITE message. Not every
    #: fd-backed window gives views (``DmaTable.can_view``): one whose file the client can
    #: still shrink does not, unless the table trusts the client's memory.
    fd_backed: bool

    @property
    def end(self) -> int:
        return self.iova + self.size


@dataclass(frozen=True, slots=True)
class DmaSegment:
    """One piece of a guest range that lies in one DMA map (see ``DmaTable.sgl``)."""

    iova: int
    length: int
    window: DmaWindow


class DmaListener(Protocol):
    """Tells the device of maps added and removed (``dma_hooks.DmaHookRunner``)."""

    async def mapped(self, window: DmaWindow) -> None: ...

    async def unmapped(self, window: DmaWindow) -> None:
        """Must not raise (but may be cancelled): the window goes whatever the device says."""
        ...


@dataclass(eq=False)
class DmaMapping:
    """One DMA_MAP window."""

    iova: int
    size: int
    flags: int
    fd_offset: int = 0
    #: (st_dev, st_ino) of the mapped file; None for a message-only window.
    file: tuple[int, int] | None = None
    #: Protection the window is mapped with (``Prot.NONE`` for message-only windows).
    prot: Prot = Prot.NONE
    #: Whether the client can still shrink the file (accesses are guarded copies).
    can_shrink: bool = False
    _mapping: Mapping | None = field(default=None, repr=False)
    #: Bytes from the page-aligned start of ``_mapping`` to ``fd_offset``.
    _lead: int = field(default=0, repr=False)
    _view: memoryview | None = field(default=None, repr=False)
    #: Names the device in log lines (the table's ``name``).
    _owner: str = field(default="", repr=False)
    _fault_logged: bool = field(default=False, repr=False)
    _users: int = 0
    _removing: bool = False
    _idle: trio.Event | None = field(default=None, repr=False)
    #: Tasks holding a pin on this window, with their pin counts.
    _pinned_by: dict[object, int] = field(default_factory=dict, repr=False)
    _window: DmaWindow | None = field(default=None, repr=False)
    #: Who was told of this map (its ``unmapped`` is owed); None once told of the removal.
    _listener: DmaListener | None = field(default=None, repr=False)
    #: Set once the listener's ``mapped`` returned (or failed); None when never announced.
    _announced: trio.Event | None = field(default=None, repr=False)
    #: The DMA_MAP flags ``DmaTable._direct`` may serve with one plain copy: the map's
    #: flags while it is fd-backed, cannot shrink and no unmap has begun, else 0.
    _direct: int = field(default=0, repr=False)
    #: An unmap of this window has begun (a replayed DMA_MAP of it is no longer a no-op).
    _retiring: bool = False
    #: Set when the unmap under way ends (a second unmap of the window waits for it).
    _retired: trio.Event | None = field(default=None, repr=False)

    @property
    def window(self) -> DmaWindow:
        """The read-only description the device's hooks are given."""
        if self._window is None:
            self._window = DmaWindow(
                self.iova, self.size, self.readable, self.writable, self._mapping is not None
            )
        return self._window

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def readable(self) -> bool:
        return bool(self.flags & DMA_MAP_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & DMA_MAP_FLAG_WRITE)

    @property
    def mapped(self) -> bool:
        """True when the window is backed by memory we mapped (an fd came with it)."""
        return self._mapping is not None

    @property
    def busy(self) -> int:
        """Accesses and views currently using this map."""
        return self._users

    def _acquire(self) -> None:
        self._users += 1

    def _release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._idle is not None:
            self._idle.set()

    def _close(self) -> None:
        self._direct = 0
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                # A device kept a slice of a view past its context. Unmapping now would
                # make its next access a crash, so the memory stays mapped until the last
                # such slice is freed (the views hold the mapping, see memory.Mapping);
                # the table no longer reaches it.
                log.warning(
                    "%s: DMA map %#x+%#x still exported at unmap", self._owner, self.iova, self.size
                )
            self._mapping = None

    def _load(self, offset: int, length: int) -> bytes:
        assert self._mapping is not None
        if self._view is not None and not self.can_shrink:
            return bytes(self._view[offset : offset + length])
        try:
            return self._mapping.load(self._lead + offset, length)
        except OSError as exc:
            raise self._fault(exc) from None

    def _load_into(self, offset: int, dst: bytearray | memoryview) -> None:
        assert self._mapping is not None
        if self._view is not None and not self.can_shrink:
            dst[:] = self._view[offset : offset + len(dst)]
            return
        try:
            self._mapping.load_into(self._lead + offset, dst)
        except OSError as exc:
            raise self._fault(exc) from None

    def _store(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert self._mapping is not None
        if self._view is not None and not self.can_shrink:
            self._view[offset : offset + len(data)] = data
            return
        try:
            self._mapping.store(self._lead + offset, data)
        except OSError as exc:
            raise self._fault(exc) from None

    def _fault(self, exc: OSError) -> DmaError:
        if not self._fault_logged:  # once per map: a client must not flood the log
            self._fault_logged = True
            log.warning(
                "%s: DMA map %#x+%#x: the client shrank the file under it; "
                "device accesses past its end fail with EFAULT",
                self._owner,
                self.iova,
                self.size,
            )
        return DmaError(errno.EFAULT, f"DMA map {self.iova:#x}: {exc.strerror}")


def _current_task() -> object:
    try:
        return trio.lowlevel.current_task()
    except RuntimeError:  # not inside trio: pins are per thread of control, i.e. global
        return None


#: In a task that handles client commands: that task (see ``mark_command_task``). A task
#: started from it inherits the value, not the mark: the identity tells them apart.
_command_task: ContextVar[object | None] = ContextVar("vfiouser_command_task", default=None)


def mark_command_task(marked: bool = True) -> None:
    """Mark the current task as one that handles client commands, for the quiesce gate.

    Device DMA from such a task fails at once (EBUSY) while the device is stopped instead
    of waiting: waiting would deadlock the session, whose command that restarts the device
    is queued behind the handler. The mark lasts for the task (a connection's reader,
    dispatcher and policy tasks run nothing but commands), so it costs one check per
    command; ``mark_command_task(False)`` removes it (the session's task, once its
    connection has ended).
    """
    task = _trio_task() if marked else None  # (inside trio: a session's task)
    if marked_command_task() is not task:
        _command_task.set(task)


_trio_task = trio.lowlevel.current_task
#: The task marked by ``mark_command_task`` in this context (None if none): a caller on a hot
#: path tests it against ``trio.lowlevel.current_task()`` before it calls the marker.
marked_command_task = _command_task.get


def _same_map(
    existing: DmaMapping, iova: int, size: int, flags: int, fd: int | None, offset: int
) -> bool:
    """Whether a DMA_MAP asks again for exactly ``existing``: same window, protection,
    offset and file (compared by st_dev/st_ino), or both without a file."""
    if existing._retiring or (existing.iova, existing.size, existing.flags) != (iova, size, flags):
        return False
    if fd is None or existing.file is None:
        return fd is None and existing.file is None
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return existing.fd_offset == offset and existing.file == (st.st_dev, st.st_ino)


def _map_fd(mapping: DmaMapping, fd: int) -> None:
    """Check ``fd``, seal it against shrinking if we can, and map the window from it."""
    if mapping.fd_offset < 0:
        raise VfioUserError(errno.EINVAL, f"negative DMA_MAP offset {mapping.fd_offset:#x}")
    file = require_memory_fd(fd, "DMA_MAP", end=mapping.fd_offset + mapping.size)
    mapping.file = file.identity
    mapping.can_shrink = not forbid_shrinking(fd, file)
    prot = Prot.NONE
    if mapping.readable:
        prot |= Prot.READ
    if mapping.writable:
        prot |= Prot.READ | Prot.WRITE
    mapping.prot = prot
    mapping._lead = mapping.fd_offset % page_size()
    try:
        mapping._mapping = Mapping(
            fd, mapping.size + mapping._lead, offset=mapping.fd_offset - mapping._lead, prot=prot
        )
    except (OSError, ValueError, OverflowError) as exc:
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
        raise VfioUserError(code, f"cannot map DMA fd: {exc}") from exc
    if prot:
        lead = mapping._lead
        mapping._view = mapping._mapping.view[lead : lead + mapping.size]
        # A file the client can shrink is reached only by guarded copies (general path).
        mapping._direct = 0 if mapping.can_shrink else mapping.flags


#: What the fast paths find below the first window: no flags, so never a direct copy.
_NO_MAP = DmaMapping(0, 0, 0)


class DmaView:
    """An open zero-copy view of one DMA window (see ``DmaTable.view``).

    A plain class rather than a generator context manager: views are opened per
    descriptor on hot paths, and this halves their cost.
    """

    __slots__ = ("_iova", "_length", "_mapping", "_table", "_view", "_writable")

    def __init__(
        self, table: DmaTable, mapping: DmaMapping, offset: int, length: int, writable: bool
    ) -> None:
        assert mapping._view is not None
        self._table = table
        self._mapping = mapping
        self._iova = mapping.iova + offset
        self._length = length
        self._writable = writable
        view = mapping._view[offset : offset + length]
        self._view = view if writable else view.toreadonly()
        mapping._acquire()

    def __enter__(self) -> memoryview:
        return self._view

    def __exit__(self, *exc: object) -> None:
        self._view.release()
        self._mapping._release()
        if self._writable:
            self._table.note_written(self._iova, self._length)


class DmaTable:
    """DMA windows of one client, with checked device access."""

    def __init__(
        self, *, max_maps: int = 65535, messenger: DmaMessenger | None = None, name: str = "dma"
    ) -> None:
        self.max_maps = max_maps
        self.messenger = messenger
        #: Names the device in log lines.
        self.name = name
        #: Allow ``view`` on maps the client can shrink (see the module doc); the
        #: session sets it from ``ServerLimits.trust_client_memory``.
        self.trust_client_memory = False
        #: Reach every map through DMA_READ / DMA_WRITE messages, also maps we hold the
        #: fd of (``read``/``write`` take ``messages=`` per call). Views stay direct.
        self.prefer_messages = False
        self._starts: list[int] = []
        self._maps: list[DmaMapping] = []
        self._write_observers: list[WriteObserver] = []
        #: Set when the device runs again; None while it runs (the quiesce gate is open).
        self._resumed: trio.Event | None = None

    def __len__(self) -> int:
        return len(self._maps)

    def __iter__(self) -> Iterator[DmaMapping]:
        return iter(list(self._maps))

    def add_write_observer(self, observer: WriteObserver) -> None:
        self._write_observers.append(observer)

    def remove_write_observer(self, observer: WriteObserver) -> None:
        self._write_observers.remove(observer)

    # --- quiesce gate ---------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """Whether device DMA is held (the device is stopped for migration)."""
        return self._resumed is not None

    def stop(self) -> None:
        """Close the gate: from now on device DMA waits (or fails, see the module doc)."""
        if self._resumed is None:
            self._resumed = trio.Event()

    def resume(self) -> None:
        """Open the gate and wake every device task waiting on it."""
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None

    async def wait_running(self) -> None:
        """Return once device DMA is allowed; no checkpoint when it already is.

        Raises DmaError(EBUSY) instead of waiting in a task handling a client command.
        """
        while self._resumed is not None:
            task = _current_task()
            if task is not None and _command_task.get() is task:
                raise DmaError(errno.EBUSY, "the device is stopped: no DMA while it is")
            await self._resumed.wait()

    # --- DMA_MAP / DMA_UNMAP ------------------------------------------------------------

    def map(self, iova: int, size: int, flags: int, fd: int | None, offset: int = 0) -> DmaMapping:
        """Add a window. Takes ownership of ``fd`` (closed here in every case).

        A request for exactly a window already mapped (same IOVA, size, protection, file
        and offset) is a no-op that returns the existing map, as libvfio-user does for
        clients that replay their maps. Errors: EINVAL for size 0, unknown flags, or an
        fd that is not a memory file holding the window (see the module doc); EEXIST for
        any other overlap (as the spec asks), ENOSPC beyond ``max_maps``.
        """
        return self._map(iova, size, flags, fd, offset)[0]

    async def map_announced(
        self,
        iova: int,
        size: int,
        flags: int,
        fd: int | None,
        offset: int,
        listener: DmaListener,
    ) -> DmaMapping:
        """``map``, then tell ``listener`` of the new window (not of a replayed one).

        The window is usable while ``listener.mapped`` runs. If it raises (or is
        cancelled) the window is removed again, without ``unmapped``, and the error
        propagates: the client's DMA_MAP fails and the table is as it was.
        """
        mapping, new = self._map(iova, size, flags, fd, offset)
        if not new:
            return mapping
        announced = mapping._announced = trio.Event()
        try:
            await listener.mapped(mapping.window)
        except BaseException:
            announced.set()
            with trio.CancelScope(shield=True):
                await self._retire(mapping)
            raise
        mapping._listener = listener
        announced.set()
        return mapping

    def _map(
        self, iova: int, size: int, flags: int, fd: int | None, offset: int
    ) -> tuple[DmaMapping, bool]:
        """``map``'s work; the map and whether it is new (False: a replayed map)."""
        try:
            if size <= 0 or iova < 0 or iova + size > 1 << 64:
                raise VfioUserError(errno.EINVAL, f"bad DMA window {iova:#x}+{size:#x}")
            if flags & ~(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE):
                raise VfioUserError(errno.EINVAL, f"unknown DMA_MAP flags {flags:#x}")
            i = bisect.bisect_right(self._starts, iova)
            if i > 0 and self._maps[i - 1].end > iova:
                existing = self._maps[i - 1]
                if _same_map(existing, iova, size, flags, fd, offset):
                    # A client replaying its maps (libvfio-user's rule): nothing to do.
                    return existing, False
                raise VfioUserError(errno.EEXIST, f"DMA window {iova:#x}+{size:#x} overlaps a map")
            if i < len(self._maps) and self._maps[i].iova < iova + size:
                raise VfioUserError(errno.EEXIST, f"DMA window {iova:#x}+{size:#x} overlaps a map")
            if len(self._maps) >= self.max_maps:
                raise VfioUserError(errno.ENOSPC, f"more than {self.max_maps} DMA maps")
            mapping = DmaMapping(iova, size, flags, offset, _owner=self.name)
            if fd is not None:
                _map_fd(mapping, fd)
        finally:
            if fd is not None:
                os.close(fd)
        self._starts.insert(i, iova)
        self._maps.insert(i, mapping)
        return mapping, True

    async def unmap(self, iova: int, size: int) -> DmaMapping:
        """Remove the window that matches exactly (ENOENT otherwise), once it is idle."""
        i = bisect.bisect_left(self._starts, iova)
        if i == len(self._maps) or self._maps[i].iova != iova or self._maps[i].size != size:
            raise VfioUserError(errno.ENOENT, f"no DMA map {iova:#x}+{size:#x}")
        mapping = self._maps[i]
        await self._retire(mapping)
        return mapping

    async def unmap_all(self) -> None:
        """Remove every window (VFIO_DMA_UNMAP_FLAG_ALL, client disconnect)."""
        for mapping in list(self._maps):
            await self._retire(mapping)

    async def _retire(self, mapping: DmaMapping) -> None:
        while mapping._retired is not None:  # another unmap of it is under way: its turn
            await mapping._retired.wait()
            if mapping not in self._maps:
                return
        mapping._retiring = True
        done = mapping._retired = trio.Event()
        try:
            await self._remove(mapping)
        finally:
            mapping._retired = None
            done.set()

    async def _remove(self, mapping: DmaMapping) -> None:
        if mapping._announced is not None:
            await mapping._announced.wait()  # its dma_mapped first, then its dma_unmapped
        listener, mapping._listener = mapping._listener, None
        if listener is not None:
            # While the window is still usable: the device lets go of it here.
            await listener.unmapped(mapping.window)
        mapping._removing = True  # no new access starts on it from now on
        mapping._direct = 0
        if mapping._users:
            if mapping._idle is None:  # one event for every unmap waiting on this map
                mapping._idle = trio.Event()
            await mapping._idle.wait()
        if mapping in self._maps:
            i = self._maps.index(mapping)
            del self._maps[i]
            del self._starts[i]
        mapping._close()

    # --- device access ------------------------------------------------------------------

    def find(self, iova: int) -> DmaMapping:
        """The live window containing ``iova``; DmaError(EFAULT) if none.

        A window being unmapped takes no new work, except from a task that pinned
        it before the unmap began (its operation is what the unmap waits for).
        """
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0:
            m = self._maps[i]
            if iova < m.end and (not m._removing or _current_task() in m._pinned_by):
                return m
        raise DmaError(errno.EFAULT, f"DMA address {iova:#x} is not mapped")

    def windows(self, iova: int, length: int) -> list[DmaMapping]:
        """Every window overlapping [iova, iova+length), including ones being unmapped."""
        i = max(bisect.bisect_right(self._starts, iova) - 1, 0)
        end = iova + length
        found: list[DmaMapping] = []
        while i < len(self._maps) and self._maps[i].iova < end:
            if self._maps[i].end > iova:
                found.append(self._maps[i])
            i += 1
        return found

    def sgl(self, iova: int, length: int, *, write: bool = False) -> list[DmaSegment]:
        """The pieces of [iova, iova+length), one per map it crosses (``vfu_addr_to_sgl``).

        DmaError(EFAULT) if any byte is unmapped or its map forbids the access (``write``
        asks for writable maps, else readable). ``read``/``write`` take such ranges
        whole; ``view`` takes one segment at a time.
        """
        return [
            DmaSegment(m.iova + off, n, m.window)
            for m, off, n in self._segments(iova, length, write=write)
        ]

    def _segments(self, iova: int, length: int, write: bool) -> list[tuple[DmaMapping, int, int]]:
        """Split [iova, iova+length) over the windows; (map, offset in map, n) each."""
        if length < 0 or iova < 0:
            raise DmaError(errno.EINVAL, "negative DMA address or length")
        segs: list[tuple[DmaMapping, int, int]] = []
        pos, end = iova, iova + length
        while pos < end:
            m = self.find(pos)
            if write and not m.writable:
                raise DmaError(errno.EFAULT, f"DMA map {m.iova:#x} is not writable")
            if not write and not m.readable:
                raise DmaError(errno.EFAULT, f"DMA map {m.iova:#x} is not readable")
            n = min(end, m.end) - pos
            segs.append((m, pos - m.iova, n))
            pos += n
        return segs

    def _direct(
        self, iova: int, length: int, need: int, messages: bool | None
    ) -> memoryview | None:
        """Guest memory [iova, iova+length) as a slice to copy with, or None: the fast path.

        ``read`` copies through it (``try_read_into`` and ``try_write`` inline the same
        test) when the device runs, messages are not asked for, and the range lies inside one window
        whose ``_direct`` flags include ``need`` (fd-backed, unable to shrink, no unmap
        begun): one bisect, no segment list, no view object, no pin. It never decides an
        error: None sends the access down the general path, whose checks (``_segments``)
        give the answer, and which makes the guarded copies of memory the client can shrink.

        Why such a copy needs no ``_acquire`` (what an unmap waits for): it runs with no
        checkpoint between this lookup and its end, so in trio's single thread no unmap
        runs in between; an unmap clears ``_direct`` before it waits, so from then on the
        window's accesses take the general path (where pins are honoured), and its memory
        is unmapped only after that. The slice must not outlive the caller's statement.
        """
        if self._resumed is not None or (self.prefer_messages if messages is None else messages):
            return None
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0:
            return None
        m = self._maps[i]
        off = iova - m.iova
        if not m._direct & need or off + length > m.size:
            return None
        assert m._view is not None  # _direct is set only with the view
        return m._view[off : off + length]

    async def read(self, iova: int, length: int, *, messages: bool | None = None) -> bytes:
        """Read guest memory, across adjacent windows; message-only windows go through DMA_READ.

        ``messages=True`` uses DMA_READ for fd-backed windows too (default: the table's
        ``prefer_messages``). ``read_into`` saves the new ``bytes`` object.
        """
        fast = self._direct(iova, length, DMA_MAP_FLAG_READ, messages) if length >= 0 else None
        if fast is not None:
            return bytes(fast)
        await self.wait_running()
        direct = not (self.prefer_messages if messages is None else messages)
        segs = self._segments(iova, length, write=False)
        for m, _, _ in segs:
            m._acquire()
        try:
            parts: list[bytes] = []
            for m, off, n in segs:
                if direct and m._mapping is not None:
                    parts.append(m._load(off, n))
                else:
                    parts.append(await self._message_read(m.iova + off, n))
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            for m, _, _ in segs:
                m._release()

    def try_read_into(self, iova: int, buffer: bytearray | memoryview) -> bool:
        """Fill ``buffer`` from guest memory at ``iova`` now, if the fast path can: True when done.

        The synchronous copy for device code (no checkpoint, as ``view`` is synchronous):
        it copies only when the device runs (no quiesce), messages are not preferred, and
        ``[iova, iova + len(buffer))`` lies inside one fd-backed readable window that the
        client cannot shrink and no unmap has begun on; ``buffer`` must be a writable 1-D
        buffer of bytes (a ``bytearray`` or a byte ``memoryview``). Otherwise it copies
        nothing and returns False, and never raises: ``await read_into(iova, buffer)`` then
        serves the access or gives its error (DmaError). Typical use::

            if not dma.try_read_into(iova, buffer):
                await dma.read_into(iova, buffer)
        """
        # ``_direct``'s rule, inlined (here and in try_write): a call costs ~0.1 µs.
        if self._resumed is None and not self.prefer_messages:
            i = _bisect_right(self._starts, iova) - 1
            m = self._maps[i] if i >= 0 else _NO_MAP
            off = iova - m.iova
            end = off + len(buffer)
            if m._direct & DMA_MAP_FLAG_READ and end <= m.size:
                try:
                    buffer[:] = m._view[off:end]  # type: ignore[index]  # set with _direct
                except (TypeError, ValueError, NotImplementedError):
                    return False  # not a 1-D buffer of bytes (nothing was copied)
                return True
        return False

    def try_write(self, iova: int, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` in guest memory at ``iova`` now, if the fast path can: True when done.

        ``try_read_into``'s counterpart, under the same rules (a writable window; ``data``
        a 1-D buffer of bytes); the write observers (dirty logging) are told, as ``write``
        tells them. False: nothing was written, ``await write(iova, data)`` serves it.
        """
        if self._resumed is None and not self.prefer_messages:
            i = _bisect_right(self._starts, iova) - 1
            m = self._maps[i] if i >= 0 else _NO_MAP
            off = iova - m.iova
            length = len(data)
            if m._direct & DMA_MAP_FLAG_WRITE and off + length <= m.size:
                try:
                    m._view[off : off + length] = data  # type: ignore[index]  # set with _direct
                except (TypeError, ValueError, NotImplementedError):
                    return False  # not a 1-D buffer of bytes (nothing was written)
                if self._write_observers:
                    self.note_written(iova, length)
                return True
        return False

    async def read_into(
        self, iova: int, buffer: bytearray | memoryview, *, messages: bool | None = None
    ) -> None:
        """Fill the writable contiguous ``buffer`` (``len`` of its bytes) from guest memory.

        ``read`` without a new ``bytes`` object: inside one fd-backed window it is one
        checked copy, with no view or pin bookkeeping (``try_read_into``, which device code
        between checkpoints calls itself to save this coroutine). Same rules, errors and
        quiesce gate as ``read``; on an error part of ``buffer`` may have been written.
        """
        if not messages and self.try_read_into(iova, buffer):
            return
        await self.wait_running()
        out = byte_buffer(buffer)
        length = len(out)
        dst = memoryview(out)
        direct = not (self.prefer_messages if messages is None else messages)
        segs = self._segments(iova, length, write=False)
        for m, _, _ in segs:
            m._acquire()
        try:
            pos = 0
            for m, off, n in segs:
                if direct and m._mapping is not None:
                    m._load_into(off, dst[pos : pos + n])
                else:
                    await self._message_read_into(m.iova + off, dst[pos : pos + n])
                pos += n
        finally:
            for m, _, _ in segs:
                m._release()

    async def write(
        self, iova: int, data: bytes | bytearray | memoryview, *, messages: bool | None = None
    ) -> None:
        """Write guest memory, across adjacent windows; message-only windows go through DMA_WRITE.

        ``messages=True`` uses DMA_WRITE for fd-backed windows too (default: the table's
        ``prefer_messages``). Inside one fd-backed window it is one checked copy
        (``try_write``), as ``read_into`` is.
        """
        if not messages and self.try_write(iova, data):
            return
        await self.wait_running()
        src = memoryview(byte_buffer(data))
        direct = not (self.prefer_messages if messages is None else messages)
        segs = self._segments(iova, len(src), write=True)
        for m, _, _ in segs:
            m._acquire()
        try:
            pos = 0
            for m, off, n in segs:
                if direct and m._mapping is not None:
                    m._store(off, src[pos : pos + n])
                else:
                    await self._message_write(m.iova + off, src[pos : pos + n])
                pos += n
        finally:
            for m, _, _ in segs:
                m._release()
        self.note_written(iova, len(src))

    def note_written(self, iova: int, length: int) -> None:
        """Tell the observers (dirty logging) that the device wrote guest memory."""
        for observer in self._write_observers:
            observer(iova, length)

    @contextmanager
    def pin(self, iova: int, length: int, *, write: bool = False) -> Iterator[None]:
        """Hold the windows under [iova, iova+length) for a multi-step operation.

        Each read/write/view holds its windows only while it runs; a device whose
        operation spans several accesses (read a descriptor, then write a result)
        pins the ranges so an unmap waits for the whole operation.
        """
        segs = self._segments(iova, length, write=write)
        task = _current_task()
        for m, _, _ in segs:
            m._acquire()
            m._pinned_by[task] = m._pinned_by.get(task, 0) + 1
        try:
            yield
        finally:
            for m, _, _ in segs:
                left = m._pinned_by[task] - 1
                if left:
                    m._pinned_by[task] = left
                else:
                    del m._pinned_by[task]
                m._release()

    def view(self, iova: int, length: int, *, writable: bool = False) -> DmaView:
        """A zero-copy view of guest memory inside one fd-backed window (a context manager).

        The window cannot be unmapped while the view is open; a writable view is
        reported as written (dirty) when it closes. DmaError(EBUSY) while the device
        is stopped (``await wait_running()`` first); DmaError(EFAULT) on a map the
        client can shrink unless ``trust_client_memory`` (see the module doc).
        :meth:`can_view` tells beforehand.
        """
        mapping = self._viewable(iova, length, writable)
        if isinstance(mapping, DmaError):
            raise mapping
        return DmaView(self, mapping, iova - mapping.iova, length, writable)

    def can_view(self, iova: int, length: int, *, writable: bool = False) -> bool:
        """Whether :meth:`view` would give this view now instead of raising: a device that
        copies between several views checks them all first, so that it either copies with
        views or, having touched nothing, by ``read``/``write`` (which reach every map)."""
        return not isinstance(self._viewable(iova, length, writable), DmaError)

    def _viewable(self, iova: int, length: int, writable: bool) -> DmaMapping | DmaError:
        """The window a view of [iova, iova+length) lies in, or the error why there is none."""
        if self._resumed is not None:
            return DmaError(errno.EBUSY, "the device is stopped: no DMA while it is")
        if length < 0:
            return DmaError(errno.EINVAL, "negative DMA length")
        try:
            m = self.find(iova)
        except DmaError as exc:
            return exc
        if m._view is None or iova - m.iova + length > m.size:
            return DmaError(
                errno.EFAULT, f"{iova:#x}+{length:#x} is not inside one fd-backed DMA map"
            )
        if not (m.writable if writable else m.readable):
            what = "writable" if writable else "readable"
            return DmaError(errno.EFAULT, f"DMA map {m.iova:#x} is not {what}")
        if m.can_shrink and not self.trust_client_memory:
            return DmaError(
                errno.EFAULT,
                f"DMA map {m.iova:#x}: no zero-copy view of a file the client can still "
                "shrink (it is not sealed with F_SEAL_SHRINK); set "
                "ServerLimits.trust_client_memory for a trusted client",
            )
        return m

    async def _message_read(self, address: int, count: int) -> bytes:
        """``count`` bytes at ``address`` by DMA_READ (as many as the client's transfer size
        needs)."""
        if count <= self._need_messenger().max_data_xfer_size:
            return bytes(await self._message_chunk(address, count)) if count else b""
        data = bytearray(count)
        await self._message_read_into(address, memoryview(data))
        return bytes(data)

    async def _message_read_into(self, address: int, dst: memoryview) -> None:
        """``_message_read`` straight into ``dst`` (each reply's data copied once, there)."""
        messenger = self._need_messenger()
        step = messenger.max_data_xfer_size
        count = len(dst)
        for pos in range(0, count, step):
            n = min(step, count - pos)
            chunk = await messenger.dma_read(address + pos, n)
            if len(chunk) != n:  # (_message_chunk's test, without its call per message)
                _wrong_read_size(len(chunk), n)
            dst[pos : pos + n] = chunk

    async def _message_chunk(self, address: int, count: int) -> bytes | memoryview:
        """One DMA_READ of ``count`` bytes (at most the client's transfer size); EIO for a
        reply of another size."""
        chunk = await self._need_messenger().dma_read(address, count)
        if len(chunk) != count:
            _wrong_read_size(len(chunk), count)
        return chunk

    async def _message_write(self, address: int, data: memoryview) -> None:
        messenger = self._need_messenger()
        step = messenger.max_data_xfer_size
        for pos in range(0, len(data), step):
            await messenger.dma_write(address + pos, data[pos : pos + step])

    def _need_messenger(self) -> DmaMessenger:
        if self.messenger is None:
            raise DmaError(errno.EFAULT, "no client connection to carry DMA messages")
        return self.messenger
