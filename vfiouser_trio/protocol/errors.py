"""Errors of the protocol layer: every one carries the errno a peer would see."""

from __future__ import annotations

import errno as _errno
import os

from .constants import Command


def command_name(command: int) -> str:
    """``MIG_DATA_WRITE`` for 18: the spec's name of a command number (``command 99`` if none)."""
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


class VfioUserError(Exception):
    """A vfio-user operation failed with a UNIX errno.

    Raised for an error reply from the peer, and by handlers to make the engine
    send an error reply. ``command`` is the command number involved, when known.
    """

    def __init__(self, errno: int, message: str = "", *, command: int | None = None) -> None:
        self.errno = errno
        self.command = command
        self.message = message or os.strerror(errno)
        super().__init__(errno, self.message)

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        where = f" ({command_name(self.command)})" if self.command is not None else ""
        return f"[{name}] {self.message}{where}"


class ProtocolError(VfioUserError):
    """A message broke the protocol's rules: malformed, wrong size, wrong fds.

    The receiving side answers it with an error reply carrying ``errno``
    (EINVAL unless the spec says otherwise) and closes any fds that came with it.
    """

    def __init__(
        self, message: str, *, errno: int = _errno.EINVAL, command: int | None = None
    ) -> None:
        super().__init__(errno, message, command=command)
