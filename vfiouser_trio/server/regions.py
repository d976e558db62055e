"""Device regions: BARs, ROM, config space, VGA and device-specific regions.

A region is served by callbacks (``async def`` or plain functions), by memory the client
may mmap (a memfd), or by both: memory for the sparse-mmap areas the client maps directly,
callbacks for the trapped rest. Overlays claim sub-ranges of a region for the framework
itself (an MSI-X table and PBA living in a BAR) ahead of the device's callbacks.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from inspect import isawaitable
from types import CoroutineType
from typing import TYPE_CHECKING, Any, NoReturn

from ..memory import MemFd
from ..protocol.constants import (
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
)
from ..protocol.errors import VfioUserError
from .device_errors import DeviceErrors, region_name
from .dma import DmaError
from .doorbells import Doorbell

#: ``read(offset, count) -> bytes``, exactly ``count`` bytes: an ``async def`` (awaited) or a
#: plain function (called; it runs on the event loop, so it must not block).
ReadHandler = Callable[[int, int], Awaitable[bytes] | bytes]
#: ``write(offset, data)``: an ``async def`` or a plain function, as for ReadHandler.
WriteHandler = Callable[[int, bytes], Awaitable[None] | None]
#: Synchronous handlers used by framework overlays (MSI-X table, PBA).
SyncRead = Callable[[int, int], bytes]
SyncWrite = Callable[[int, bytes], None]


@dataclass(frozen=True, slots=True)
class SparseArea:
    """A sub-range of a memory-backed region that the client may mmap."""

    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class RegionType:
    """VFIO_REGION_INFO_CAP_TYPE of a device-specific region."""

    type: int
    subtype: int


@dataclass(slots=True)
class Overlay:
    """A sub-range of a region handled by the framework before the device's callbacks."""

    offset: int
    size: int
    read: SyncRead
    write: SyncWrite

    def covers(self, offset: int, count: int) -> bool:
        return self.offset <= offset and offset + count <= self.offset + self.size

    def touches(self, offset: int, count: int) -> bool:
        return offset < self.offset + self.size and self.offset < offset + count


class RegionMemory:
    """A memfd of ``size`` bytes mapped into this process; the client may map it too.

    The memfd is sealed (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``) before its
    fd can be handed out: a client that receives it cannot truncate it under our
    mapping, which would make the next REGION_READ/WRITE a SIGBUS.
    """

    def __init__(self, name: str, size: int) -> None:
        self.size = size
        self._memfd = MemFd.create(name, size, seal=True)
        try:
            self._mapping = self._memfd.map(size)
        except BaseException:
            self._memfd.close()
            raise
        #: The fd handed to clients in REGION_INFO (still owned here).
        self.fd = self._memfd.fileno()
        self.view = self._mapping.view

    def close(self) -> None:
        if self.fd < 0:
            return
        self.view.release()
        self._mapping.close()
        self._memfd.close()
        self.fd = -1


@dataclass(eq=False)
class Region:
    """One region of a device, as DEVICE_GET_REGION_INFO reports it and REGION_READ/WRITE reach it.

    ``read``/``write`` callbacks serve accesses outside the sparse areas (or the
    whole region when it has no memory). A memory-backed region without callbacks
    serves every access from its memory. ``mmap`` regions report the MMAP flag and
    hand the memfd to the client; with ``sparse`` areas only those may be mapped.
    """

    index: int
    size: int
    read: ReadHandler | None = None
    write: WriteHandler | None = None
    readable: bool = True
    writable: bool = True
    memory: RegionMemory | None = None
    mmap: bool = False
    sparse: Sequence[SparseArea] = ()
    region_type: RegionType | None = None
    doorbells: list[Doorbell] = field(default_factory=list)
    overlays: list[Overlay] = field(default_factory=list)
    #: Where the region starts in the fd the client maps (REGION_INFO ``offset``).
    mmap_offset: int = 0
    #: Where failures of the callbacks are reported (the device's, set by Device).
    errors: DeviceErrors = field(default_factory=lambda: DeviceErrors("device"))

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError("region size must be >= 0")
        if self.mmap and self.memory is None:
            raise ValueError(f"region {self.index}: mmap needs memory backing")
        for area in self.sparse:
            if area.offset < 0 or area.offset + area.size > self.size:
                raise ValueError(f"region {self.index}: sparse area beyond the region")

    @property
    def info_flags(self) -> int:
        flags = 0
        if self.readable:
            flags |= REGION_INFO_FLAG_READ
        if self.writable:
            flags |= REGION_INFO_FLAG_WRITE
        if self.mmap:
            flags |= REGION_INFO_FLAG_MMAP
        return flags

    def check_access(self, offset: int, count: int, *, write: bool) -> None:
        """EINVAL for out-of-range or forbidden accesses, as libvfio-user answers them."""
        if write and not self.writable:
            raise VfioUserError(errno.EINVAL, f"region {self.index} is not writable")
        if not write and not self.readable:
            raise VfioUserError(errno.EINVAL, f"region {self.index} is not readable")
        if offset < 0 or count < 0 or offset + count > self.size:
            raise VfioUserError(
                errno.EINVAL,
                f"access {offset:#x}+{count:#x} beyond region {self.index} of size {self.size:#x}",
            )

    def _in_sparse(self, offset: int, count: int) -> bool:
        return any(a.offset <= offset and offset + count <= a.offset + a.size for a in self.sparse)

    def _memory_serves(self, offset: int, count: int, handler: object) -> bool:
        """Whether the memory (not ``handler``) serves an access; callers check ``memory``."""
        return handler is None or self._in_sparse(offset, count)

    def read_now(self, offset: int, count: int) -> bytes | Coroutine[Any, Any, bytes]:
        """Serve a REGION_READ (after ``check_access``): its data, or a coroutine giving it
        when the read callback returns an awaitable (an ``async def``).

        A plain-function callback (like overlays and memory) answers without any coroutine:
        the session's fast path replies at once.
        """
        if count == 0:
            return b""
        for ov in self.overlays:
            if ov.touches(offset, count):
                if not ov.covers(offset, count):
                    raise VfioUserError(errno.EINVAL, "access straddles a framework area")
                return ov.read(offset - ov.offset, count)
        memory = self.memory
        if memory is not None and self._memory_serves(offset, count, self.read):
            return bytes(memory.view[offset : offset + count])
        read = self.read
        if read is None:
            raise VfioUserError(errno.EINVAL, f"region {self.index} has no read handler")
        try:
            data = read(offset, count)
        except Exception as exc:
            self._fail("REGION_READ", offset, count, "the read callback", exc)
        if type(data) is bytes and len(data) == count:
            return data  # the common case: nothing to check or copy
        # An async def's coroutine first: the common case, and the cheapest test.
        if type(data) is CoroutineType or isawaitable(data):
            return self._read_awaited(offset, count, data)
        return self._read_result(offset, count, data)

    async def do_read(self, offset: int, count: int) -> bytes:
        """Serve a REGION_READ (after ``check_access``), awaiting the callback if it waits."""
        data = self.read_now(offset, count)
        return data if isinstance(data, bytes) else await data

    async def _read_awaited(self, offset: int, count: int, pending: Awaitable[bytes]) -> bytes:
        try:
            data = await pending
        except Exception as exc:
            self._fail("REGION_READ", offset, count, "the read callback", exc)
        return self._read_result(offset, count, data)

    def _read_result(self, offset: int, count: int, data: object) -> bytes:
        """The read callback's result, checked: exactly ``count`` bytes, as ``bytes``."""
        if type(data) is bytes and len(data) == count:
            return data
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) != count:
            what = f"{len(data)} bytes" if isinstance(data, bytes | bytearray) else repr(data)
            where = self._where(offset, count)
            reason = f"the read callback returned {what[:60]}, not the {count} bytes asked for"
            raise self.errors.bug("REGION_READ", where, reason)
        return bytes(data)

    def write_now(self, offset: int, data: bytes) -> Coroutine[Any, Any, None] | None:
        """Serve a REGION_WRITE (after ``check_access``), ringing the doorbells it covers:
        None once done, or a coroutine that finishes it when the write callback returns an
        awaitable (the callback's wait, then the doorbells)."""
        count = len(data)
        if count == 0:
            return None
        for ov in self.overlays:
            if ov.touches(offset, count):
                if not ov.covers(offset, count):
                    raise VfioUserError(errno.EINVAL, "access straddles a framework area")
                ov.write(offset - ov.offset, data)
                return None
        memory = self.memory
        if memory is not None and self._memory_serves(offset, count, self.write):
            memory.view[offset : offset + count] = data
        elif self.write is not None:
            try:
                done = self.write(offset, data)
            except Exception as exc:
                self._fail("REGION_WRITE", offset, count, "the write callback", exc)
            if type(done) is CoroutineType or isawaitable(done):
                return self._write_awaited(offset, data, done)
        elif not self.doorbells:
            raise VfioUserError(errno.EINVAL, f"region {self.index} has no write handler")
        for bell in self.doorbells:
            bell.ring_on_write(offset, data)
        return None

    async def do_write(self, offset: int, data: bytes) -> None:
        """Serve a REGION_WRITE (after ``check_access``), awaiting the callback if it waits."""
        pending = self.write_now(offset, data)
        if pending is not None:
            await pending

    async def _write_awaited(self, offset: int, data: bytes, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception as exc:
            self._fail("REGION_WRITE", offset, len(data), "the write callback", exc)
        for bell in self.doorbells:
            bell.ring_on_write(offset, data)

    def _where(self, offset: int, count: int) -> str:
        return f"{region_name(self.index)} at {offset:#x}+{count:#x}"

    def _fail(
        self, command: str, offset: int, count: int, callback: str, exc: Exception
    ) -> NoReturn:
        """Raise what a callback that raised ``exc`` answers: a VfioUserError is its own
        choice of errno (logged when its DMA failed); anything else is a device bug, the
        client's EIO."""
        if isinstance(exc, VfioUserError):
            if isinstance(exc, DmaError):
                self.errors.dma_failed(command, self._where(offset, count), exc)
            raise exc
        reason = f"{callback} raised {type(exc).__name__}: {exc}"
        raise self.errors.bug(command, self._where(offset, count), reason, exc) from exc

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
        for bell in self.doorbells:
            bell.close()


if TYPE_CHECKING:

    class MemoryRegion(Region):
        """A :class:`Region` declared with memory: ``memory`` is always there."""

        memory: RegionMemory

else:
    # At run time the same class: only the type checker knows the memory is there.
    MemoryRegion = Region
