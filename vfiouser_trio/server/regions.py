"""Device regions: BARs, ROM, config space, VGA and device-specific regions.

A region is served by callbacks (``async def`` or plain functions), by memory the client
may mmap (a memfd), or by both: memory for the sparse-mmap areas the client maps directly,
callbacks for the trapped rest. Overlays claim sub-ranges of a region for the framework
itself (an MSI-X table and PBA living in a BAR) ahead of the device's callbacks.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from inspect import isawaitable
from types import CoroutineType
from typing import TYPE_CHECKING

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

    async def do_read(self, offset: int, count: int) -> bytes:
        """Serve a REGION_READ (after ``check_access``)."""
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
            # An async def's coroutine first: the common case, and the cheapest test.
            if type(data) is not bytes and (type(data) is CoroutineType or isawaitable(data)):
                data = await data
        except VfioUserError as exc:
            self._refused("REGION_READ", offset, count, exc)
            raise
        except Exception as exc:
            raise self._bug("REGION_READ", offset, count, "the read callback", exc) from exc
        if type(data) is bytes and len(data) == count:
            return data  # the common case: nothing to check or copy
        is_bytes = isinstance(data, bytes | bytearray | memoryview)
        if not is_bytes or len(data) != count:
            what = f"{len(data)} bytes" if isinstance(data, bytes | bytearray) else repr(data)
            where = self._where(offset, count)
            reason = f"the read callback returned {what[:60]}, not the {count} bytes asked for"
            raise self.errors.bug("REGION_READ", where, reason)
        return bytes(data)

    async def do_write(self, offset: int, data: bytes) -> None:
        """Serve a REGION_WRITE (after ``check_access``); rings doorbells it covers."""
        count = len(data)
        if count == 0:
            return
        for ov in self.overlays:
            if ov.touches(offset, count):
                if not ov.covers(offset, count):
                    raise VfioUserError(errno.EINVAL, "access straddles a framework area")
                ov.write(offset - ov.offset, data)
                return
        memory = self.memory
        if memory is not None and self._memory_serves(offset, count, self.write):
            memory.view[offset : offset + count] = data
        elif self.write is not None:
            try:
                done = self.write(offset, data)
                if type(done) is CoroutineType or isawaitable(done):
                    await done
            except VfioUserError as exc:
                self._refused("REGION_WRITE", offset, count, exc)
                raise
            except Exception as exc:
                raise self._bug("REGION_WRITE", offset, count, "the write callback", exc) from exc
        elif not self.doorbells:
            raise VfioUserError(errno.EINVAL, f"region {self.index} has no write handler")
        for bell in self.doorbells:
            bell.ring_on_write(offset, data)

    def _where(self, offset: int, count: int) -> str:
        return f"{region_name(self.index)} at {offset:#x}+{count:#x}"

    def _refused(self, command: str, offset: int, count: int, exc: VfioUserError) -> None:
        """A callback answered with an errno: its own choice, unless its DMA failed (logged)."""
        if isinstance(exc, DmaError):
            self.errors.dma_failed(command, self._where(offset, count), exc)

    def _bug(
        self, command: str, offset: int, count: int, callback: str, exc: Exception
    ) -> VfioUserError:
        """Report a callback that raised ``exc``; the client's EIO."""
        reason = f"{callback} raised {type(exc).__name__}: {exc}"
        return self.errors.bug(command, self._where(offset, count), reason, exc)

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
