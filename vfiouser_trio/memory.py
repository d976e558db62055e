"""Shared memory: owned memfds, and shared mappings with guarded copies.

``MemFd`` wraps ``os.memfd_create`` and the ``fcntl`` sealing calls (the stdlib
does both well). ``Mapping`` uses the native module because its guarded copies
(below) work on the mapping's address, which Python's ``mmap`` does not give.

Lifetime of a ``Mapping``: ``view`` hands out memoryviews of the mapped range.
``close()`` refuses (``BufferError``, like ``mmap.close``) while any of them, or
anything derived from them (slices, casts, ``ffi.from_buffer``), is still alive,
because unmapping under a live view would turn its next access into a crash. A
mapping that is garbage-collected without ``close()``, or whose ``with`` block is
left by an exception while views exist, is unmapped once its object and every
view of it are gone.

Memory a peer can shrink: a shared mapping of a file that the other side of a
connection can ``ftruncate`` faults (SIGBUS, fatal to the process) on the first
touch of a page past the new end. ``forbid_shrinking`` seals such a file where the
file allows it; for the rest, ``Mapping.load``/``Mapping.store`` copy through a
native guarded ``memcpy`` that turns the fault into ``OSError(EFAULT)``. The
guard is a process-wide SIGBUS handler installed on the first guarded copy; a
SIGBUS outside a guarded copy goes to the handler that was there before it (or
the default action), so real crashes still crash. A handler installed later
(``faulthandler.enable()``) sees a guarded fault first: it reports it and hands
the signal back, and the copy still fails with EFAULT.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import functools
import mmap
import os
import stat
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from ._native import ffi, lib

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ._native import CBuffer, CData
    from .fdcheck import MemoryFile

__all__ = [
    "Mapping",
    "MemFd",
    "Prot",
    "Seal",
    "create_memfd",
    "forbid_shrinking",
    "page_size",
]


def page_size() -> int:
    """The system page size in bytes (the unit of mapping offsets and fixed addresses)."""
    return mmap.PAGESIZE


class HasFileno(Protocol):
    """Anything with a ``fileno()``, such as ``MemFd``."""

    def fileno(self) -> int: ...


#: What ``Mapping`` accepts as the file to map.
FileDescriptorLike = int | HasFileno


def _fd_of(fd: FileDescriptorLike) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


class Seal(enum.IntFlag):
    """memfd seals (``fcntl(F_ADD_SEALS)``)."""

    SEAL = fcntl.F_SEAL_SEAL  # no further seals may be added
    SHRINK = fcntl.F_SEAL_SHRINK
    GROW = fcntl.F_SEAL_GROW
    WRITE = fcntl.F_SEAL_WRITE  # fails with EBUSY while writable shared mappings exist
    FUTURE_WRITE = 0x0010  # Linux 5.1+: no new writable mappings or writes; existing ones stay


class Prot(enum.IntFlag):
    """Memory protection of a mapping."""

    NONE = lib.PROT_NONE
    READ = lib.PROT_READ
    WRITE = lib.PROT_WRITE
    EXEC = lib.PROT_EXEC


def _check_errno(result: int) -> int:
    if result < 0:
        raise OSError(-result, os.strerror(-result))
    return result


class MemFd:
    """An owned memfd file descriptor.

    Create one with ``MemFd.create`` / ``create_memfd``; adopt a received fd with
    ``MemFd.from_fd``. Closing is idempotent; ``detach()`` gives up ownership.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        """Take ownership of ``fd`` (prefer ``create`` or ``from_fd``)."""
        if fd < 0:
            raise ValueError(f"invalid file descriptor {fd}")
        self._fd = fd

    @classmethod
    def create(
        cls,
        name: str,
        size: int,
        *,
        seal: bool = False,
        allow_sealing: bool = True,
        cloexec: bool = True,
    ) -> MemFd:
        """Create a memfd of ``size`` bytes (zero-filled).

        ``seal=True`` fixes the size (``SHRINK | GROW``) and forbids further seals
        (``SEAL``), so a peer that receives the fd cannot truncate it under a
        mapping (which would make accesses raise SIGBUS); the contents stay
        writable. ``allow_sealing=False`` creates it with all sealing refused.
        """
        if size < 0:
            raise ValueError(f"negative memfd size {size}")
        if seal and not allow_sealing:
            raise ValueError("seal=True needs allow_sealing=True")
        flags = os.MFD_CLOEXEC if cloexec else 0
        if allow_sealing:
            flags |= os.MFD_ALLOW_SEALING
        memfd = cls(os.memfd_create(name, flags))
        try:
            os.ftruncate(memfd._fd, size)
            if seal:
                memfd.add_seals(Seal.SHRINK | Seal.GROW | Seal.SEAL)
        except BaseException:
            memfd.close()
            raise
        return memfd

    @classmethod
    def from_fd(cls, fd: int) -> MemFd:
        """Adopt ``fd`` (e.g. one received with SCM_RIGHTS); the MemFd now owns it."""
        return cls(fd)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The fd number; ``ValueError`` once closed or detached."""
        if self._fd < 0:
            raise ValueError("MemFd is closed")
        return self._fd

    @property
    def size(self) -> int:
        """Current size in bytes."""
        return os.fstat(self.fileno()).st_size

    def resize(self, size: int) -> None:
        """Set the size (``ftruncate``); ``PermissionError`` if a seal forbids it."""
        os.ftruncate(self.fileno(), size)

    @property
    def seals(self) -> Seal:
        """The seals currently set."""
        return Seal(fcntl.fcntl(self.fileno(), fcntl.F_GET_SEALS))

    def add_seals(self, seals: Seal) -> None:
        """Add seals; ``PermissionError`` once ``Seal.SEAL`` is set."""
        fcntl.fcntl(self.fileno(), fcntl.F_ADD_SEALS, int(seals))

    def map(
        self,
        length: int | None = None,
        *,
        offset: int = 0,
        prot: Prot = Prot.READ | Prot.WRITE,
    ) -> Mapping:
        """Map ``length`` bytes (default: to the end of the file) from ``offset``."""
        if length is None:
            length = self.size - offset
        return Mapping(self, length, offset=offset, prot=prot)

    def detach(self) -> int:
        """Give up ownership and return the fd; the MemFd is then closed."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the fd (idempotent). Existing mappings stay valid."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        return f"<MemFd fd={self._fd}>" if self._fd >= 0 else "<MemFd closed>"


def create_memfd(name: str, size: int, *, seal: bool = False) -> MemFd:
    """Create an owned memfd of ``size`` bytes; see ``MemFd.create``."""
    return MemFd.create(name, size, seal=seal)


def forbid_shrinking(fd: int, file: MemoryFile) -> bool:
    """Make the file under ``fd`` unable to shrink, if it allows that; whether it now cannot.

    A memfd that still takes seals gets ``F_SEAL_SHRINK`` (permanent, for every
    holder of the file: growing stays allowed). A file whose seals are frozen
    (``F_SEAL_SEAL`` without ``F_SEAL_SHRINK``) or that cannot be sealed at all
    (a plain tmpfs or hugetlbfs file) can still shrink: False. ``file`` is what
    ``fdcheck.require_memory_fd`` learnt about ``fd``; its seals are updated.
    """
    if file.cannot_shrink:
        return True
    if file.seals & Seal.SEAL:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, Seal.SHRINK)
    except OSError:  # EINVAL: not sealable; EPERM: sealed meanwhile
        return False
    file.seals |= Seal.SHRINK
    return True


@functools.cache
def _install_guard() -> None:
    _check_errno(lib.vfu_guard_install())


def _guarded_copy(dst: CData, src: CData, length: int) -> None:
    _install_guard()
    if lib.vfu_guarded_copy(dst, src, length):
        raise OSError(errno.EFAULT, "the mapped file was truncated under the access (SIGBUS)")


def _unmapper(address: int, length: int) -> Callable[[CData], None]:
    # Must not reference the Mapping: it runs when the last reference to the
    # pointer goes, which views may keep alive after the Mapping itself.
    def unmap(_: CData) -> None:
        lib.vfu_munmap(address, length)

    return unmap


class Mapping:
    """A shared mapping (``MAP_SHARED``) of a file descriptor, where the kernel puts it.

    ``offset`` must be page-aligned. For regular files (memfds included) the range must lie within
    the file's current size, because touching a page past the end raises SIGBUS.
    The fd may be closed once mapped.
    """

    __slots__ = ("_cbuf", "_prot_bits", "_ptr", "address", "length", "offset", "prot")

    def __init__(
        self,
        fd: FileDescriptorLike,
        length: int,
        *,
        offset: int = 0,
        prot: Prot = Prot.READ | Prot.WRITE,
    ) -> None:
        raw_fd = _fd_of(fd)
        page = page_size()
        if length <= 0:
            raise ValueError(f"mapping length must be positive, got {length}")
        if offset < 0 or offset % page:
            raise ValueError(f"mapping offset {offset:#x} is not a page-aligned non-negative value")
        st = os.fstat(raw_fd)
        if stat.S_ISREG(st.st_mode) and offset + length > st.st_size:
            raise ValueError(
                f"range [{offset:#x}, {offset + length:#x}) extends past the end of the file "
                f"({st.st_size:#x} bytes)"
            )

        mapped = _check_errno(lib.vfu_mmap(0, length, int(prot), lib.MAP_SHARED, raw_fd, offset))

        self.address: int = mapped
        self.length: int = length
        self.offset: int = offset
        self.prot: Prot = prot
        self._prot_bits = int(prot)  # IntFlag operations cost microseconds on hot paths
        self._ptr: CData | None = ffi.gc(
            ffi.cast("char *", mapped), _unmapper(mapped, length), length
        )
        self._cbuf: weakref.ref[CBuffer] | None = None

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _require_open(self) -> CData:
        if self._ptr is None:
            raise ValueError("mapping is closed")
        return self._ptr

    def _live_buffer(self) -> CBuffer | None:
        return self._cbuf() if self._cbuf is not None else None

    @property
    def view(self) -> memoryview:
        """A memoryview of the whole range: writable with ``Prot.WRITE``, else read-only."""
        ptr = self._require_open()
        if not self.prot & (Prot.READ | Prot.WRITE):
            raise ValueError(f"mapping with protection {self.prot!r} cannot be viewed")
        cbuf = self._live_buffer()
        if cbuf is None:
            # One cffi buffer is shared by every view; it keeps the pointer (and so
            # the mapping) alive, and its weak reference tells close() about views.
            cbuf = ffi.buffer(ptr, self.length)
            self._cbuf = weakref.ref(cbuf)
        view = memoryview(cbuf)
        return view if self.prot & Prot.WRITE else view.toreadonly()

    @property
    def has_views(self) -> bool:
        """Whether a view (or anything derived from one) is still alive."""
        return self._live_buffer() is not None

    def _checked(self, offset: int, length: int, need: int) -> CData:
        ptr = self._require_open()
        if not self._prot_bits & need:  # the guard catches SIGBUS only, not SIGSEGV
            raise ValueError(f"mapping with protection {self.prot!r} lacks {Prot(need)!r}")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"range ({offset}, {length}) is outside the mapping")
        return ptr + offset

    def load(self, offset: int, length: int) -> bytes:
        """A copy of bytes ``[offset, offset + length)``, safe if the file shrinks meanwhile.

        ``OSError(EFAULT)`` instead of a SIGBUS when part of the range lies past the
        file's end. Needs ``Prot.READ``.
        """
        src = self._checked(offset, length, lib.PROT_READ)
        out = bytearray(length)
        _guarded_copy(ffi.from_buffer(out), src, length)
        return bytes(out)

    def load_into(self, offset: int, buffer: Buffer) -> None:
        """Copy ``len(buffer)`` bytes from ``offset`` into the writable ``buffer``, guarded
        as ``load`` is (no intermediate copy). Needs ``Prot.READ``."""
        dst = ffi.from_buffer(buffer, require_writable=True)
        _guarded_copy(dst, self._checked(offset, len(dst), lib.PROT_READ), len(dst))

    def store(self, offset: int, data: Buffer) -> None:
        """Copy ``data`` to ``offset``, safe if the file shrinks meanwhile (see ``load``).

        Needs ``Prot.WRITE``; on EFAULT part of ``data`` may have been stored.
        """
        src = ffi.from_buffer(data)
        _guarded_copy(self._checked(offset, len(src), lib.PROT_WRITE), src, len(src))

    def close(self) -> None:
        """Unmap now (idempotent); ``BufferError`` while views are alive."""
        if self._ptr is None:
            return
        if self.has_views:
            raise BufferError(
                "cannot close a Mapping while views of it exist: release them first "
                "(memoryview.release(), or drop every reference)"
            )
        ptr, self._ptr = self._ptr, None
        ffi.release(ptr)  # runs the unmapper now instead of at garbage collection

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self.has_views:
            # Do not mask the error in flight with a BufferError: the mapping is
            # unmapped once the views (likely held by its traceback) are gone.
            return
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else f"{self.prot!r}"
        return f"<Mapping {self.address:#x}+{self.length:#x} {state}>"
