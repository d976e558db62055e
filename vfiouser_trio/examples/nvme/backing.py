"""Where a namespace's blocks live: memory, or a file reached off the event loop.

A backing is a flat byte store of ``size`` bytes, which only `grow` changes; the
namespace checks every LBA range against it before calling, so a backing only ever sees
ranges inside its size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import trio


class Backing(Protocol):
    """A namespace's storage: ``size`` bytes."""

    size: int

    async def read(self, offset: int, count: int) -> bytes: ...

    async def write(self, offset: int, data: bytes) -> None: ...

    async def write_zeroes(self, offset: int, count: int) -> None: ...

    async def flush(self) -> None: ...

    async def grow(self, size: int) -> None:
        """Hold ``size`` bytes (at least the current size), the new ones zeroes."""
        ...

    def close(self) -> None: ...


class MemoryBacking:
    """``size`` bytes of process memory, zeroed; gone with the process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data = bytearray(size)

    async def read(self, offset: int, count: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return bytes(self._data[offset : offset + count])

    async def write(self, offset: int, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._data[offset : offset + len(data)] = data

    async def write_zeroes(self, offset: int, count: int) -> None:
        await trio.lowlevel.checkpoint()
        self._data[offset : offset + count] = bytes(count)

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()

    async def grow(self, size: int) -> None:
        await trio.lowlevel.checkpoint()
        self._data.extend(bytes(size - self.size))
        self.size = size

    def close(self) -> None:
        self._data = bytearray()


#: Write Zeroes writes a file in pieces of this many bytes (one thread call each).
ZERO_CHUNK = 1 << 20


class FileBacking:
    """A regular file of ``size`` bytes (extended with zeroes if shorter, never shrunk:
    a longer file keeps its tail, which the namespace does not reach).

    Every read, write and fsync runs in a worker thread (``trio.to_thread``), so a slow
    disk stalls the command, not the event loop.
    """

    def __init__(self, path: str | Path, size: int) -> None:
        self.path = Path(path)
        self.size = size
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(self._fd).st_size < size:
                os.ftruncate(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise

    async def read(self, offset: int, count: int) -> bytes:
        data = await trio.to_thread.run_sync(os.pread, self._fd, count, offset)
        # A file someone else truncated reads short: the rest reads as zeroes.
        return data + bytes(count - len(data))

    async def write(self, offset: int, data: bytes) -> None:
        await trio.to_thread.run_sync(_pwrite_all, self._fd, data, offset)

    async def write_zeroes(self, offset: int, count: int) -> None:
        zeroes = bytes(min(count, ZERO_CHUNK))
        end = offset + count
        while offset < end:
            piece = zeroes[: end - offset]
            await trio.to_thread.run_sync(_pwrite_all, self._fd, piece, offset)
            offset += len(piece)

    async def flush(self) -> None:
        await trio.to_thread.run_sync(os.fsync, self._fd)

    async def grow(self, size: int) -> None:
        if (await trio.to_thread.run_sync(os.fstat, self._fd)).st_size < size:
            await trio.to_thread.run_sync(os.ftruncate, self._fd, size)
        self.size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
