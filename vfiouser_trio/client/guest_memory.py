"""Guest memory: client RAM that a server reaches by DMA.

A :class:`GuestMemory` is a memfd mapped into this process. ``dma_map`` either hands its fd to
the server (which then maps it and accesses it directly) or keeps it private, in which case
the server reaches it with DMA_READ / DMA_WRITE messages that the client serves from
``view``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from ..memory import Mapping, MemFd

__all__ = ["GuestMemory"]


class GuestMemory:
    """``size`` bytes of shareable memory (a sealed memfd) with a writable ``view``.

    The memfd's size is sealed, so a server that receives the fd cannot shrink it under our
    mapping, and our server gives its device zero-copy views of it (it refuses them on memory
    the client could still shrink). ``close()`` unmaps it and closes the fd; it raises
    ``BufferError`` while views derived from ``view`` (slices, casts) are still alive.
    """

    def __init__(self, size: int, *, name: str = "vfio-user-guest-memory") -> None:
        if size <= 0:
            raise ValueError(f"guest memory size must be positive, got {size}")
        self.size = size
        self._memfd = MemFd.create(name, size, seal=True)
        try:
            self._mapping: Mapping = self._memfd.map(size)
        except BaseException:
            self._memfd.close()
            raise
        #: The whole memory, writable.
        self.view: memoryview = self._mapping.view

    @property
    def closed(self) -> bool:
        return self._memfd.closed

    def fileno(self) -> int:
        """The memfd (still owned by this object; DMA_MAP sends a copy of it)."""
        return self._memfd.fileno()

    def read(self, offset: int, count: int) -> bytes:
        """A copy of ``count`` bytes at ``offset``."""
        self._check(offset, count)
        return bytes(self.view[offset : offset + count])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset``."""
        self._check(offset, len(data))
        self.view[offset : offset + len(data)] = data

    def _check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise ValueError(f"range {offset:#x}+{count:#x} is outside {self.size:#x} bytes")

    def close(self) -> None:
        """Unmap and close the memfd (idempotent)."""
        if self._memfd.closed:
            return
        self.view.release()
        self._mapping.close()
        self._memfd.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._memfd.fileno()}"
        return f"<GuestMemory {self.size:#x} bytes {state}>"
