"""Owned eventfds (interrupts and doorbells) that trio tasks can await, safe to share.

An eventfd we hand to a peer, or receive from one, is one open file description on
both sides: the peer can clear ``O_NONBLOCK`` on it at any time and can fill its
counter. Nothing here relies on the file status flags, so no peer can make us block:

* reads use ``preadv2(RWF_NOWAIT)``, which fails with EAGAIN on an empty counter
  whatever ``O_NONBLOCK`` says (``try_eventfd_read``; Linux 6.18 honours it, and on
  a kernel that answers EOPNOTSUPP we fall back to a plain read, which only the
  fd's ``O_NONBLOCK`` then protects);
* writes go through ``signal_eventfd``: a full counter is reported (the notification
  is already pending) instead of waited for, and a write the peer makes block by
  filling the counter at the wrong moment is interrupted by a watchdog within about
  2 ms (the native ``vfu_eventfd_signal``; ``_ffi_build.py`` explains the mechanism).
"""

from __future__ import annotations

import contextlib
import errno
import os
from types import TracebackType
from typing import Self

import trio

from ._native import ffi, lib

__all__ = ["COUNTER_FULL", "EVENTFD_MAX", "EventFd", "signal_eventfd", "try_eventfd_read"]

#: The largest value an eventfd counter can hold (a write that would pass it blocks).
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE

#: Errors of ``signal_eventfd`` that mean "the counter is full": already signalled.
COUNTER_FULL = frozenset({errno.EAGAIN, errno.EINTR})

_READ_FAILED = 0xFFFF_FFFF_FFFF_FFFF  # vfu_eventfd_read_nowait's error value


def signal_eventfd(fd: int, n: int = 1) -> int:
    """Add ``n`` (1 .. ``EVENTFD_MAX``) to eventfd ``fd`` without blocking.

    Returns 0, or the errno that stopped it: EAGAIN or EINTR (in ``COUNTER_FULL``)
    when the counter has no room, EBADF, EINVAL, ... Never raises OSError, never
    sleeps longer than the watchdog allows, whatever the peer does to the fd.
    """
    if not 1 <= n <= EVENTFD_MAX:
        raise ValueError(f"eventfd increment {n} is outside 1..{EVENTFD_MAX:#x}")
    return -lib.vfu_eventfd_signal(fd, n)


def try_eventfd_read(fd: int) -> int | None:
    """Consume eventfd ``fd``'s counter (1 of it in semaphore mode); ``None`` if zero.

    Never blocks, even on a description without ``O_NONBLOCK``. OSError for other
    failures (EBADF, or EINVAL if ``fd`` is not an eventfd).
    """
    value = lib.vfu_eventfd_read_nowait(fd)
    if value == _READ_FAILED:
        err = ffi.errno
        if err != errno.EOPNOTSUPP:
            raise OSError(err, os.strerror(err))
        # A kernel whose eventfd ignores RWF_NOWAIT: only O_NONBLOCK protects us there.
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return None
    return value or None


class EventFd:
    """An owned eventfd (created ``O_NONBLOCK``, though nothing here relies on it).

    In normal mode a read returns the whole counter and resets it to zero; in
    semaphore mode a read returns 1 and decrements the counter. Closing is
    idempotent and wakes any task blocked in ``wait()`` with
    ``trio.ClosedResourceError``; using a closed EventFd raises the same.
    """

    __slots__ = ("_fd",)

    def __init__(self, initval: int = 0, *, semaphore: bool = False, cloexec: bool = True) -> None:
        """Create an eventfd whose counter starts at ``initval`` (0 .. 2**32-1)."""
        if not 0 <= initval <= 0xFFFF_FFFF:
            raise ValueError(f"eventfd initial value {initval} is not a u32")
        flags = os.EFD_NONBLOCK
        if cloexec:
            flags |= os.EFD_CLOEXEC
        if semaphore:
            flags |= os.EFD_SEMAPHORE
        self._fd = os.eventfd(initval, flags)

    @classmethod
    def from_fd(cls, fd: int) -> EventFd:
        """Adopt ``fd`` (e.g. received with SCM_RIGHTS); the EventFd now owns it.

        The file status flags are left as the sender set them: ``O_NONBLOCK`` belongs
        to the open file description the sender shares, which could clear it again at
        any time, so EventFd never depends on it (see the module docstring).
        """
        if fd < 0:
            raise ValueError(f"invalid file descriptor {fd}")
        self = cls.__new__(cls)
        self._fd = fd
        return self

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The fd number; ``trio.ClosedResourceError`` once closed or detached."""
        if self._fd < 0:
            raise trio.ClosedResourceError("eventfd is closed")
        return self._fd

    def signal(self, n: int = 1) -> bool:
        """Add ``n`` to the counter, never blocking; True if added.

        False when the counter has no room for ``n`` (whoever reads it has a
        notification pending already); OSError for any other failure.
        """
        err = signal_eventfd(self.fileno(), n)
        if err == 0:
            return True
        if err in COUNTER_FULL:
            return False
        raise OSError(err, os.strerror(err))

    def try_read(self) -> int | None:
        """Consume the counter (or 1 of it, in semaphore mode); ``None`` if it is zero."""
        return try_eventfd_read(self.fileno())

    async def wait(self) -> int:
        """Wait until the counter is non-zero, then consume it like ``try_read``.

        One task at a time: a second concurrent ``wait`` raises ``trio.BusyResourceError``
        (trio's rule for an fd), unless the counter is already non-zero.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            value = self.try_read()
            if value is not None:
                if not waited:
                    # No schedule point yet: add one, without a cancellation point (the
                    # value is consumed). After wait_readable there was one already.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return value
            # Another reader may win the race after readability: loop and retry.
            await trio.lowlevel.wait_readable(self.fileno())
            waited = True

    def detach(self) -> int:
        """Give up ownership and return the fd; the EventFd is then closed."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the fd (idempotent), first waking trio tasks waiting on it."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        # Outside trio.run (RuntimeError) nobody can be waiting in this thread's loop.
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(fd)
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
        # Without notify_closing: a task waiting on it would hold a reference.
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"<EventFd fd={self._fd}>" if self._fd >= 0 else "<EventFd closed>"
