"""Base classes of typed messages.

Every message is a frozen, slotted dataclass that knows its command, how to
``pack()`` its payload (the bytes after the header) and how to ``unpack()`` one,
validating sizes and the number of fds that came with it. File descriptors are
never part of the packed bytes: a message that carries fds exposes them as
``fds`` and receives them as the ``fds`` argument of ``unpack``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Self, overload

from .constants import Command
from .errors import ProtocolError

#: Anything ``unpack`` accepts: the payload bytes after the 16-byte header.
Buffer = bytes | bytearray | memoryview


@overload
def byte_buffer(data: bytearray | memoryview) -> bytearray | memoryview: ...
@overload
def byte_buffer(data: Buffer) -> Buffer: ...
def byte_buffer(data: Buffer) -> Buffer:
    """``data`` measured and sliced in bytes: itself for bytes, a bytearray or a 1-D view of
    unsigned bytes, else a byte view of it (its ``len`` then counts bytes, and its slices
    take bytes; any other buffer object, an ``mmap`` or an ``array``, is viewed too). A
    plain function: hot paths call it once per buffer."""
    if type(data) is bytes or type(data) is bytearray:
        return data
    view = data if isinstance(data, memoryview) else memoryview(data)
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


class Message:
    """A typed vfio-user message (command or reply payload)."""

    __slots__ = ()

    COMMAND: ClassVar[Command]
    IS_REPLY: ClassVar[bool] = False

    @property
    def fds(self) -> tuple[int, ...]:
        """File descriptors sent with this message (SCM_RIGHTS), in order."""
        return ()

    def pack(self) -> bytes:
        """The payload bytes (without header, without fds)."""
        raise NotImplementedError

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        """Decode a payload; raises ProtocolError carrying the errno to answer with."""
        raise NotImplementedError

    @classmethod
    def _expect_no_fds(cls, fds: Sequence[int]) -> None:
        if fds:
            raise ProtocolError(
                f"{cls.__name__} carries no file descriptors, got {len(fds)}",
                command=cls.COMMAND,
            )


class Request(Message):
    """A command message; knows how to decode its own reply."""

    __slots__ = ()

    REPLY: ClassVar[type[Message]]

    def parse_reply(self, payload: Buffer, fds: Sequence[int] = ()) -> Message:
        """Decode the reply to this request.

        Overridden where the reply's valid shape depends on the request (for
        example REGION_READ, whose reply must carry exactly ``count`` bytes).
        """
        return self.REPLY.unpack(payload, fds)


class Reply(Message):
    """A reply message payload."""

    __slots__ = ()

    IS_REPLY: ClassVar[bool] = True
