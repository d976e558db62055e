"""DEVICE_FEATURE (16) with typed feature payloads.

Payload: argsz u32, flags u32 (feature index in bits 0-15, GET/SET/PROBE in
16-18), then feature data. The data's shape depends on feature and operation:

==========================  ==================  ===========================
feature                     request data        reply data (GET)
==========================  ==================  ===========================
MIGRATION (GET)             none                ``MigrationInfo`` (8)
MIG_DEVICE_STATE (GET)      none                ``MigDeviceState`` (8)
MIG_DEVICE_STATE (SET)      ``MigDeviceState``  echo
DMA_LOGGING_START (SET)     ``DmaLoggingControl``  echo (page_size may change)
DMA_LOGGING_STOP (SET)      none or control     echo
DMA_LOGGING_REPORT (GET)    ``DmaLoggingReport``   ``DmaLoggingBitmap`` (24 + bitmap)
any, PROBE                  raw bytes (unused)  echo
==========================  ==================  ===========================

Other feature/operation pairs, unknown feature indexes, unknown flag bits,
GET and SET together without PROBE, or no operation at all: EINVAL.
A GET request with unexpected data keeps it as raw ``bytes``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from ._util import expect_argsz, expect_min_size, expect_no_fds, fail
from .constants import (
    DEVICE_FEATURE_GET,
    DEVICE_FEATURE_MASK,
    DEVICE_FEATURE_PROBE,
    DEVICE_FEATURE_SET,
    MIGRATION_P2P,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    Command,
    Feature,
)
from .message import Buffer, Message, Reply, Request

_FEATURE = struct.Struct("=II")  # argsz, flags
FEATURE_HEADER_SIZE = _FEATURE.size  # 8
_MIGRATION = struct.Struct("=Q")  # flags
_MIG_STATE = struct.Struct("=Ii")  # device_state, data_fd (s32, unused in vfio-user)
_LOG_CONTROL = struct.Struct("=QII")  # page_size, num_ranges, reserved
_LOG_RANGE = struct.Struct("=QQ")  # iova, length
_LOG_REPORT = struct.Struct("=QQQ")  # iova, length, page_size
FEATURE_OPS = DEVICE_FEATURE_GET | DEVICE_FEATURE_SET | DEVICE_FEATURE_PROBE
FEATURE_FLAGS_KNOWN = DEVICE_FEATURE_MASK | FEATURE_OPS
_FEATURES = frozenset(int(f) for f in Feature)


@dataclass(frozen=True, slots=True)
class MigrationInfo:
    """VFIO_DEVICE_FEATURE_MIGRATION GET data: supported migration flags."""

    flags: int

    @property
    def stop_copy(self) -> bool:
        return bool(self.flags & MIGRATION_STOP_COPY)

    @property
    def p2p(self) -> bool:
        return bool(self.flags & MIGRATION_P2P)

    @property
    def pre_copy(self) -> bool:
        return bool(self.flags & MIGRATION_PRE_COPY)

    def pack(self) -> bytes:
        return _MIGRATION.pack(self.flags)


@dataclass(frozen=True, slots=True)
class MigDeviceState:
    """VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE data: a ``MigState`` value (and unused data_fd)."""

    device_state: int
    data_fd: int = 0

    def pack(self) -> bytes:
        return _MIG_STATE.pack(self.device_state, self.data_fd)


@dataclass(frozen=True, slots=True)
class DmaLoggingRange:
    """An IOVA range whose DMA writes are logged."""

    iova: int
    length: int


@dataclass(frozen=True, slots=True)
class DmaLoggingControl:
    """DMA_LOGGING_START/STOP data: tracking page size and ranges (none = all memory)."""

    page_size: int
    ranges: tuple[DmaLoggingRange, ...] = ()

    def pack(self) -> bytes:
        out = [_LOG_CONTROL.pack(self.page_size, len(self.ranges), 0)]
        out += [_LOG_RANGE.pack(r.iova, r.length) for r in self.ranges]
        return b"".join(out)


@dataclass(frozen=True, slots=True)
class DmaLoggingReport:
    """DMA_LOGGING_REPORT GET request data: which range, at what bitmap granularity."""

    iova: int
    length: int
    page_size: int

    @property
    def bitmap_size(self) -> int:
        """Bytes of the u64 bitmap covering ``length`` at ``page_size`` (0 if page_size is 0)."""
        if self.page_size == 0:
            return 0
        pages = -(-self.length // self.page_size)
        return -(-pages // 64) * 8

    def pack(self) -> bytes:
        return _LOG_REPORT.pack(self.iova, self.length, self.page_size)


@dataclass(frozen=True, slots=True)
class DmaLoggingBitmap:
    """DMA_LOGGING_REPORT GET reply data: the request's fields plus the dirty bitmap."""

    iova: int
    length: int
    page_size: int
    bitmap: bytes

    def pack(self) -> bytes:
        return _LOG_REPORT.pack(self.iova, self.length, self.page_size) + self.bitmap


FeatureData = (
    MigrationInfo | MigDeviceState | DmaLoggingControl | DmaLoggingReport | DmaLoggingBitmap | bytes
)


def _pack_data(data: FeatureData) -> bytes:
    return data if isinstance(data, bytes) else data.pack()


def _check_flags(cls: type[Message], flags: int) -> None:
    if flags & ~FEATURE_FLAGS_KNOWN:
        fail(cls, f"unknown flags {flags:#x}")
    feature = flags & DEVICE_FEATURE_MASK
    if feature not in _FEATURES:
        fail(cls, f"unknown feature index {feature}")
    ops = flags & FEATURE_OPS
    if not ops:
        fail(cls, "none of GET, SET, PROBE set")
    both = DEVICE_FEATURE_GET | DEVICE_FEATURE_SET
    if not ops & DEVICE_FEATURE_PROBE and ops & both == both:
        fail(cls, "GET and SET together need PROBE")


def _decode_data(cls: type[Message], flags: int, data: Buffer, *, reply: bool) -> FeatureData:
    """Decode feature data per the table in the module docstring; flags already checked."""
    feature = flags & DEVICE_FEATURE_MASK
    if flags & DEVICE_FEATURE_PROBE:
        return bytes(data)
    if flags & DEVICE_FEATURE_GET:
        if feature == Feature.DMA_LOGGING_REPORT:
            if reply:
                if len(data) < _LOG_REPORT.size:
                    fail(cls, "DMA_LOGGING_REPORT reply shorter than 24 bytes")
                iova, length, page_size = _LOG_REPORT.unpack_from(data)
                return DmaLoggingBitmap(iova, length, page_size, bytes(data[_LOG_REPORT.size :]))
            _exact(cls, data, _LOG_REPORT.size, "DMA_LOGGING_REPORT")
            return DmaLoggingReport(*_LOG_REPORT.unpack_from(data))
        if feature == Feature.MIGRATION:
            if not reply:
                return bytes(data)
            _exact(cls, data, _MIGRATION.size, "MIGRATION")
            return MigrationInfo(_MIGRATION.unpack_from(data)[0])
        if feature == Feature.MIG_DEVICE_STATE:
            if not reply:
                return bytes(data)
            _exact(cls, data, _MIG_STATE.size, "MIG_DEVICE_STATE")
            return MigDeviceState(*_MIG_STATE.unpack_from(data))
        fail(cls, f"feature {feature} does not support GET")
    # SET
    if feature == Feature.MIG_DEVICE_STATE:
        _exact(cls, data, _MIG_STATE.size, "MIG_DEVICE_STATE")
        return MigDeviceState(*_MIG_STATE.unpack_from(data))
    if feature == Feature.DMA_LOGGING_START or (
        feature == Feature.DMA_LOGGING_STOP and len(data) > 0
    ):
        return _decode_control(cls, data)
    if feature == Feature.DMA_LOGGING_STOP:
        return b""
    fail(cls, f"feature {feature} does not support SET")


def _exact(cls: type[Message], data: Buffer, size: int, what: str) -> None:
    if len(data) != size:
        fail(cls, f"{what} data is {len(data)} bytes, expected {size}")


def _decode_control(cls: type[Message], data: Buffer) -> DmaLoggingControl:
    if len(data) < _LOG_CONTROL.size:
        fail(cls, "DMA logging control shorter than 16 bytes")
    page_size, num_ranges, _reserved = _LOG_CONTROL.unpack_from(data)
    _exact(cls, data, _LOG_CONTROL.size + num_ranges * _LOG_RANGE.size, "DMA logging control")
    ranges = tuple(
        DmaLoggingRange(*_LOG_RANGE.unpack_from(data, _LOG_CONTROL.size + i * _LOG_RANGE.size))
        for i in range(num_ranges)
    )
    return DmaLoggingControl(page_size, ranges)


_U32_MAX = 0xFFFFFFFF


def _expected_get_size(feature: int, data: FeatureData) -> int:
    """Feature data size of a GET reply (used for a request's default argsz)."""
    if feature in (Feature.MIGRATION, Feature.MIG_DEVICE_STATE):
        return 8
    if isinstance(data, DmaLoggingReport):
        return _LOG_REPORT.size + data.bitmap_size
    return len(_pack_data(data))


@dataclass(frozen=True, slots=True)
class DeviceFeatureReply(Reply):
    """DEVICE_FEATURE reply: the request echoed (SET/PROBE) or with the GET data.

    ``argsz`` defaults to 8 + the data size.
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_FEATURE

    flags: int
    data: FeatureData = b""
    argsz: int | None = None

    def __post_init__(self) -> None:
        if self.argsz is None:
            object.__setattr__(self, "argsz", FEATURE_HEADER_SIZE + len(_pack_data(self.data)))

    @property
    def feature(self) -> int:
        return self.flags & DEVICE_FEATURE_MASK

    def pack(self) -> bytes:
        assert self.argsz is not None
        return _FEATURE.pack(self.argsz, self.flags) + _pack_data(self.data)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        """Decode; the reply's own flags tell its data shape."""
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, FEATURE_HEADER_SIZE)
        argsz, flags = _FEATURE.unpack_from(payload)
        _check_flags(cls, flags)
        data = _decode_data(cls, flags, payload[FEATURE_HEADER_SIZE:], reply=True)
        return cls(flags, data, argsz)


@dataclass(frozen=True, slots=True)
class DeviceFeatureRequest(Request):
    """GET, SET or PROBE a device feature.

    ``argsz`` (the largest reply wanted) defaults to what the reply needs: the
    request size for SET/PROBE, 8 + the feature's data for GET.
    """

    COMMAND: ClassVar[Command] = Command.DEVICE_FEATURE
    REPLY: ClassVar[type[Message]] = DeviceFeatureReply

    flags: int
    data: FeatureData = b""
    argsz: int | None = None

    def __post_init__(self) -> None:
        if self.argsz is None:
            if self.is_get and not self.is_probe:
                size = _expected_get_size(self.feature, self.data)
            else:
                size = len(_pack_data(self.data))
            object.__setattr__(self, "argsz", FEATURE_HEADER_SIZE + size)
        assert self.argsz is not None
        if not 0 <= self.argsz <= _U32_MAX:
            # A DMA_LOGGING_REPORT over a huge range at a tiny page size needs a bitmap no
            # reply can describe: the caller must ask for smaller ranges.
            raise ValueError(f"argsz {self.argsz} does not fit the 32-bit field: ask for less")

    @classmethod
    def get(cls, feature: int, data: FeatureData = b"") -> DeviceFeatureRequest:
        return cls(feature | DEVICE_FEATURE_GET, data)

    @classmethod
    def set(cls, feature: int, data: FeatureData = b"") -> DeviceFeatureRequest:
        return cls(feature | DEVICE_FEATURE_SET, data)

    @classmethod
    def probe(cls, feature: int, *, get: bool = False, set: bool = False) -> DeviceFeatureRequest:
        ops = DEVICE_FEATURE_PROBE
        ops |= DEVICE_FEATURE_GET if get else 0
        ops |= DEVICE_FEATURE_SET if set else 0
        return cls(feature | ops)

    @property
    def feature(self) -> int:
        return self.flags & DEVICE_FEATURE_MASK

    @property
    def is_get(self) -> bool:
        return bool(self.flags & DEVICE_FEATURE_GET)

    @property
    def is_set(self) -> bool:
        return bool(self.flags & DEVICE_FEATURE_SET)

    @property
    def is_probe(self) -> bool:
        return bool(self.flags & DEVICE_FEATURE_PROBE)

    def echo_reply(self) -> DeviceFeatureReply:
        """The success reply to a SET or PROBE: the request payload echoed."""
        return DeviceFeatureReply(self.flags, self.data, self.argsz)

    def get_reply(self, data: FeatureData) -> DeviceFeatureReply:
        """The success reply to a GET carrying ``data``."""
        return DeviceFeatureReply(self.flags, data)

    def pack(self) -> bytes:
        assert self.argsz is not None
        return _FEATURE.pack(self.argsz, self.flags) + _pack_data(self.data)

    @classmethod
    def unpack(cls, payload: Buffer, fds: Sequence[int] = ()) -> Self:
        expect_no_fds(cls, fds)
        expect_min_size(cls, payload, FEATURE_HEADER_SIZE)
        argsz, flags = _FEATURE.unpack_from(payload)
        expect_argsz(cls, argsz, FEATURE_HEADER_SIZE)
        _check_flags(cls, flags)
        data = _decode_data(cls, flags, payload[FEATURE_HEADER_SIZE:], reply=False)
        return cls(flags, data, argsz)

    def parse_reply(self, payload: Buffer, fds: Sequence[int] = ()) -> DeviceFeatureReply:
        """Decode the reply; its flags must be this request's."""
        reply = DeviceFeatureReply.unpack(payload, fds)
        if reply.flags != self.flags:
            fail(DeviceFeatureReply, f"flags {reply.flags:#x} answer request {self.flags:#x}")
        return reply
