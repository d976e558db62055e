"""Helpers shared by the message modules: error raising and size checks."""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence
from typing import NoReturn

from .errors import ProtocolError
from .message import Buffer, Message


def fail(cls: type[Message], message: str, *, errno: int = _errno.EINVAL) -> NoReturn:
    """Raise the ProtocolError for a malformed ``cls`` message."""
    raise ProtocolError(f"{cls.__name__}: {message}", errno=errno, command=cls.COMMAND)


def expect_min_size(cls: type[Message], payload: Buffer, size: int) -> None:
    """The payload must be at least ``size`` bytes; any bytes past ``size`` are ignored.

    This is kernel VFIO's argsz rule, which libvfio-user follows: a peer may send (and
    answer with) a buffer larger than the structure, e.g. libvfio-user's client re-sends
    its whole GET_REGION_INFO buffer once it has learnt the size with the caps. Every
    fixed-layout message is read through here. Messages whose length carries meaning
    (data that must match a count) check the length themselves, or use
    :func:`expect_exact_size`.
    """
    n = len(payload)
    if n < size:
        fail(cls, f"truncated payload: {n} bytes, expected at least {size}")


def expect_exact_size(cls: type[Message], payload: Buffer, size: int) -> None:
    """The payload must be exactly ``size`` bytes (only where its length carries meaning)."""
    n = len(payload)
    if n != size:
        what = "truncated" if n < size else "oversized"
        fail(cls, f"{what} payload: {n} bytes, expected {size}")


def expect_argsz(cls: type[Message], argsz: int, minimum: int) -> None:
    """``argsz`` must be at least ``minimum`` (the fixed struct or reply size)."""
    if argsz < minimum:
        fail(cls, f"argsz {argsz} is below {minimum}")


def expect_no_fds(cls: type[Message], fds: Sequence[int]) -> None:
    if fds:
        fail(cls, f"carries no file descriptors, got {len(fds)}")


def sat_add(a: int, b: int, limit: int = (1 << 64) - 1) -> int:
    """Saturating addition, as C servers compute bounds (offset + count)."""
    return min(a + b, limit)
