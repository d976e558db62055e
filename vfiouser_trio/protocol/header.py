"""The 16-byte header that precedes every vfio-user message."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import (
    FLAG_ERROR,
    FLAG_NO_REPLY,
    FLAG_TYPE_COMMAND,
    FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY,
    HEADER_SIZE,
)
from .errors import ProtocolError

# msg_id u16, command u16, msg_size u32, flags u32, error u32; host byte order.
HEADER_STRUCT = struct.Struct("=HHIII")
assert HEADER_STRUCT.size == HEADER_SIZE


# Not frozen: a frozen dataclass takes three times as long to build, and the decoder builds
# one per received message. Treat a header as immutable (``dataclasses.replace`` for another).
@dataclass(slots=True, unsafe_hash=True)
class Header:
    """A decoded message header. ``command`` stays a plain int: it may be unknown."""

    msg_id: int
    command: int
    msg_size: int
    flags: int = FLAG_TYPE_COMMAND
    error: int = 0

    @property
    def is_reply(self) -> bool:
        return self.flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY

    @property
    def is_command(self) -> bool:
        return self.flags & FLAG_TYPE_MASK == FLAG_TYPE_COMMAND

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)

    @property
    def payload_size(self) -> int:
        return self.msg_size - HEADER_SIZE

    def pack(self) -> bytes:
        return HEADER_STRUCT.pack(self.msg_id, self.command, self.msg_size, self.flags, self.error)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Header:
        """Decode a header; raises ProtocolError (EINVAL) for a size below 16."""
        if len(buf) - offset < HEADER_SIZE:
            raise ProtocolError("truncated header")
        hdr = cls(*HEADER_STRUCT.unpack_from(buf, offset))
        if hdr.msg_size < HEADER_SIZE:
            raise ProtocolError(f"msg_size {hdr.msg_size} is below the header size")
        return hdr


def command_header(
    msg_id: int, command: int, payload_size: int, *, no_reply: bool = False
) -> Header:
    """Header of a command message."""
    flags = FLAG_TYPE_COMMAND | (FLAG_NO_REPLY if no_reply else 0)
    return Header(msg_id, command, HEADER_SIZE + payload_size, flags, 0)


def reply_header(msg_id: int, command: int, payload_size: int) -> Header:
    """Header of a successful reply."""
    return Header(msg_id, command, HEADER_SIZE + payload_size, FLAG_TYPE_REPLY, 0)


def error_header(msg_id: int, command: int, errno: int) -> Header:
    """Header of an error reply: the header alone, Error flag set, errno in ``error``."""
    return Header(msg_id, command, HEADER_SIZE, FLAG_TYPE_REPLY | FLAG_ERROR, errno)
