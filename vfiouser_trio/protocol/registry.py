"""Command number -> message class, and decoding of a frame's payload.

An unknown command is answered with EINVAL: libvfio-user does so, and it is the
errno the spec uses for every other malformed message (deployed servers answer
EINVAL or ENOSYS; we pick one and keep it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TypeVar

from .constants import Command
from .device_info import (
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DeviceResetReply,
    DeviceResetRequest,
)
from .dma import (
    DmaMapReply,
    DmaMapRequest,
    DmaReadReply,
    DmaReadRequest,
    DmaUnmapReply,
    DmaUnmapRequest,
    DmaWriteReply,
    DmaWriteRequest,
)
from .errors import ProtocolError
from .features import DeviceFeatureReply, DeviceFeatureRequest
from .irqs import IrqInfoReply, IrqInfoRequest, SetIrqsReply, SetIrqsRequest
from .message import Buffer, Reply, Request
from .migration_data import (
    MigDataReadReply,
    MigDataReadRequest,
    MigDataWriteReply,
    MigDataWriteRequest,
)
from .region_io import (
    RegionReadReply,
    RegionReadRequest,
    RegionWriteMultiReply,
    RegionWriteMultiRequest,
    RegionWriteReply,
    RegionWriteRequest,
)
from .regions import RegionInfoReply, RegionInfoRequest, RegionIoFdsReply, RegionIoFdsRequest
from .version import VersionReply, VersionRequest

_REQUESTS: tuple[type[Request], ...] = (
    VersionRequest,
    DmaMapRequest,
    DmaUnmapRequest,
    DeviceGetInfoRequest,
    RegionInfoRequest,
    RegionIoFdsRequest,
    IrqInfoRequest,
    SetIrqsRequest,
    RegionReadRequest,
    RegionWriteRequest,
    DmaReadRequest,
    DmaWriteRequest,
    DeviceResetRequest,
    RegionWriteMultiRequest,
    DeviceFeatureRequest,
    MigDataReadRequest,
    MigDataWriteRequest,
)
_REPLIES: tuple[type[Reply], ...] = (
    VersionReply,
    DmaMapReply,
    DmaUnmapReply,
    DeviceGetInfoReply,
    RegionInfoReply,
    RegionIoFdsReply,
    IrqInfoReply,
    SetIrqsReply,
    RegionReadReply,
    RegionWriteReply,
    DmaReadReply,
    DmaWriteReply,
    DeviceResetReply,
    RegionWriteMultiReply,
    DeviceFeatureReply,
    MigDataReadReply,
    MigDataWriteReply,
)

_T = TypeVar("_T")
_COMMANDS = frozenset(int(c) for c in Command)

#: Command number -> request class, for every command of the spec.
REQUEST_TYPES: Mapping[int, type[Request]] = MappingProxyType({c.COMMAND: c for c in _REQUESTS})
#: Command number -> reply class. Prefer ``Request.parse_reply``: some replies
#: can only be fully checked against their request.
REPLY_TYPES: Mapping[int, type[Reply]] = MappingProxyType({c.COMMAND: c for c in _REPLIES})


def _lookup(table: Mapping[int, _T], command: int, what: str) -> _T:
    try:
        return table[command]
    except KeyError:
        cmd = command if command in _COMMANDS else None
        raise ProtocolError(f"unknown {what} command {command}", command=cmd) from None


def decode_request(command: int, payload: Buffer, fds: Sequence[int] = ()) -> Request:
    """Decode a command message's payload; ProtocolError (EINVAL) for unknown or malformed.

    The caller still owns ``fds`` on error (close them); on success the message holds them.
    """
    return _lookup(REQUEST_TYPES, command, "request").unpack(payload, fds)


def decode_reply(command: int, payload: Buffer, fds: Sequence[int] = ()) -> Reply:
    """Decode a reply without its request (context-free checks only)."""
    return _lookup(REPLY_TYPES, command, "reply").unpack(payload, fds)
