"""The migration data stream: the device's own state wrapped with the framework's part.

A device produces its state as chunks (``save_chunks`` / ``precopy_chunks``); the
framework wraps them so that what the server keeps for the device travels too: the PCI
config space, the MSI-X table and PBA, and each IRQ vector's masked / pending bits.
Eventfds do not travel: the destination's client assigns its own.

The stream (all integers little-endian) is one header, then records::

    header, 24 bytes
      0  magic        4s   b"VUTM"
      4  version      u16  1
      6  header_size  u16  24
      8  vendor_id    u16  \\
     10  device_id    u16   | the source device's identity; the destination refuses
     12  subsys_vid   u16   | a stream from a device that is not its twin
     14  subsys_id    u16   |
     16  class_rev    u32  /  revision | class_code << 8 (config space 0x08)
     20  flags        u32  0 (reserved)

    record: type u32, length u32, then ``length`` bytes
      1 DATA       a piece of the device's own stream (any number, in order, pre-copy
                   and stop-copy alike); the device's chunk boundaries are not kept
      2 FRAMEWORK  the framework's state, once, after the last DATA record
      3 END        u64 bytes of the stream before this record, u32 CRC-32 (zlib) of them;
                   the last record: nothing may follow

    FRAMEWORK payload
      config_size u32, msix_table_size u32, msix_pba_size u32, irq_indexes u32, flags u32
        (flags bit 0: the client drives MSI-X through our table)
      config space image (config_size bytes)
      MSI-X table (msix_table_size), PBA (msix_pba_size); both 0 without MSI-X
      per IRQ index: index u32, count u32, then one byte per vector
        (bit 0 masked, bit 1 pending)

The stream is one, from PRE_COPY into STOP_COPY: a client must forward all of it (one
that drops the PRE_COPY part is refused at its first write; devices for such clients use
raw mode, ``enable_migration(raw=True)``, which sends the device's bytes alone). The
framework's state is taken when the device's stop-copy stream ends, so config writes
made in STOP / STOP_COPY are included. The destination checks everything as it arrives
(header, identity, record order and sizes, the framework state against its own layout,
the checksum): invalid data fails the MIG_DATA_WRITE that carries it and, after it, the
SET that leaves RESUMING, with EINVAL; a stream without its END record fails that SET
with EIO.
"""

from __future__ import annotations

import errno
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..protocol.errors import VfioUserError

if TYPE_CHECKING:
    from .irqs import IrqTable
    from .pci import PciConfigSpace, PciIdentity

__all__ = [
    "STREAM_MAGIC",
    "STREAM_VERSION",
    "FrameworkState",
    "StreamDecoder",
    "StreamEncoder",
    "build_stream",
    "split_stream",
]

STREAM_MAGIC = b"VUTM"
STREAM_VERSION = 1

HEADER = struct.Struct("<4sHHHHHHII")
RECORD = struct.Struct("<II")
END = struct.Struct("<QI")
FRAMEWORK_HEADER = struct.Struct("<5I")
IRQ_HEADER = struct.Struct("<II")

RECORD_DATA = 1
RECORD_FRAMEWORK = 2
RECORD_END = 3

#: FRAMEWORK flags.
FLAG_MSIX_TABLE_DRIVEN = 0x1

#: The largest DATA record we write; bigger device chunks are split.
MAX_DATA_RECORD = 1 << 30
#: The largest FRAMEWORK record we accept (config space, a 2048-vector table, IRQ bits).
MAX_FRAMEWORK_RECORD = 1 << 20


def _identity_fields(identity: PciIdentity) -> tuple[int, int, int, int, int]:
    return (
        identity.vendor_id,
        identity.device_id,
        identity.subsystem_vendor_id,
        identity.subsystem_id,
        identity.revision | identity.class_code << 8,
    )


def _invalid(message: str) -> VfioUserError:
    return VfioUserError(errno.EINVAL, f"invalid migration data: {message}")


@dataclass(frozen=True)
class FrameworkState:
    """What the framework keeps for a device: config space, MSI-X, IRQ mask/pending bits."""

    config: bytes
    msix_table: bytes
    msix_pba: bytes
    #: (index, one byte per vector) for every IRQ index, in index order.
    irqs: tuple[tuple[int, bytes], ...]
    msix_table_driven: bool

    @classmethod
    def capture(
        cls, config: PciConfigSpace, irqs: IrqTable, *, msix_table_driven: bool
    ) -> FrameworkState:
        """The state as it is now (the device is stopped, so it holds still)."""
        table, pba = config.msix.save_state() if config.msix is not None else (b"", b"")
        return cls(
            config=config.save_image(),
            msix_table=table,
            msix_pba=pba,
            irqs=tuple((irq.index, irq.save_state()) for irq in irqs),
            msix_table_driven=msix_table_driven,
        )

    def pack(self) -> bytes:
        flags = FLAG_MSIX_TABLE_DRIVEN if self.msix_table_driven else 0
        parts = [
            FRAMEWORK_HEADER.pack(
                len(self.config), len(self.msix_table), len(self.msix_pba), len(self.irqs), flags
            ),
            self.config,
            self.msix_table,
            self.msix_pba,
        ]
        for index, bits in self.irqs:
            parts += [IRQ_HEADER.pack(index, len(bits)), bits]
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes) -> FrameworkState:
        """Parse a FRAMEWORK payload; ValueError if it is malformed."""
        if len(data) < FRAMEWORK_HEADER.size:
            raise ValueError("framework state shorter than its header")
        config_size, table_size, pba_size, irq_count, flags = FRAMEWORK_HEADER.unpack_from(data)
        if flags & ~FLAG_MSIX_TABLE_DRIVEN:
            raise ValueError(f"unknown framework flags {flags:#x}")
        pos = FRAMEWORK_HEADER.size
        sections = []
        for size in (config_size, table_size, pba_size):
            if pos + size > len(data):
                raise ValueError("framework state truncated")
            sections.append(bytes(data[pos : pos + size]))
            pos += size
        irqs = []
        for _ in range(irq_count):
            if pos + IRQ_HEADER.size > len(data):
                raise ValueError("framework state truncated in the IRQ section")
            index, count = IRQ_HEADER.unpack_from(data, pos)
            pos += IRQ_HEADER.size
            if pos + count > len(data):
                raise ValueError(f"framework state truncated in IRQ index {index}")
            irqs.append((index, bytes(data[pos : pos + count])))
            pos += count
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} stray bytes after the framework state")
        config, table, pba = sections
        return cls(config, table, pba, tuple(irqs), bool(flags & FLAG_MSIX_TABLE_DRIVEN))

    def check(self, config: PciConfigSpace, irqs: IrqTable) -> None:
        """ValueError unless this state fits a device with ``config`` and ``irqs``."""
        config.check_image(self.config)
        if config.msix is not None:
            config.msix.check_state(self.msix_table, self.msix_pba)
        elif self.msix_table or self.msix_pba:
            raise ValueError("MSI-X state for a device without MSI-X")
        ours = {irq.index: irq for irq in irqs}
        theirs = dict(self.irqs)
        if len(theirs) != len(self.irqs) or set(theirs) != set(ours):
            raise ValueError(f"IRQ indexes {sorted(theirs)}, this device has {sorted(ours)}")
        for index, bits in theirs.items():
            ours[index].check_state(bits)

    def restore(self, config: PciConfigSpace, irqs: IrqTable) -> int:
        """Load into the device's structures, delivering nothing; returns the old command.

        Follow with ``config.announce_restored(old_command)``. ValueError (before any
        change) when the state does not fit.
        """
        self.check(config, irqs)
        previous = config.restore_image(
            self.config, msix_table=self.msix_table, msix_pba=self.msix_pba
        )
        for index, bits in self.irqs:
            irqs[index].restore_state(bits)
        return previous


class StreamEncoder:
    """Builds one outgoing stream: header, DATA records, then FRAMEWORK and END."""

    def __init__(self, identity: PciIdentity) -> None:
        self._identity = identity
        self._crc = 0
        self._size = 0
        self.started = False
        self.finished = False

    def _emit(self, data: bytes) -> bytes:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        return data

    def header(self) -> bytes:
        """The stream's first bytes."""
        self.started = True
        fields = _identity_fields(self._identity)
        return self._emit(HEADER.pack(STREAM_MAGIC, STREAM_VERSION, HEADER.size, *fields, 0))

    def data(self, chunk: bytes) -> bytes:
        """A device chunk as DATA record(s); b"" for an empty chunk."""
        records: list[bytes | memoryview] = []
        view = memoryview(chunk)
        for pos in range(0, len(view), MAX_DATA_RECORD):
            piece = view[pos : pos + MAX_DATA_RECORD]
            records += [RECORD.pack(RECORD_DATA, len(piece)), piece]
        return self._emit(b"".join(records))

    def finish(self, framework: FrameworkState) -> bytes:
        """The FRAMEWORK record and the END record that closes the stream."""
        payload = framework.pack()
        body = self._emit(RECORD.pack(RECORD_FRAMEWORK, len(payload)) + payload)
        self.finished = True
        end = RECORD.pack(RECORD_END, END.size) + END.pack(self._size, self._crc)
        return body + end


# Decoder phases.
_HEADER, _RECORD, _DATA, _FRAMEWORK, _END, _DONE = range(6)


class StreamDecoder:
    """Checks an incoming stream as it arrives and hands the device its own bytes.

    ``feed`` returns the device's pieces of what was fed; ``finish`` returns the framework
    state once the whole stream (END included) arrived. Invalid data raises
    VfioUserError(EINVAL) and breaks the decoder: every later call raises it again.
    Without ``identity`` (``config`` and ``irqs``) the stream's identity (framework
    state) is not checked against a device.
    """

    def __init__(
        self,
        identity: PciIdentity | None = None,
        config: PciConfigSpace | None = None,
        irqs: IrqTable | None = None,
    ) -> None:
        self._identity = identity
        self._config = config
        self._irqs = irqs
        self._phase = _HEADER
        self._need = HEADER.size
        self._buf = bytearray()
        self._remaining = 0
        self._crc = 0
        self._size = 0
        self._framework: FrameworkState | None = None
        self._broken: VfioUserError | None = None

    @property
    def received(self) -> int:
        """Bytes of the stream received so far."""
        return self._size + len(self._buf)

    def _check_broken(self) -> None:
        if self._broken is not None:
            raise VfioUserError(self._broken.errno, self._broken.message)

    def _consume(self, data: bytes | memoryview) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes of the stream; returns the device's data among them."""
        self._check_broken()
        try:
            return self._feed(memoryview(data))
        except VfioUserError as exc:
            self._broken = exc
            raise

    def _feed(self, view: memoryview) -> list[bytes]:
        out: list[bytes] = []
        pos = 0
        while pos < len(view):
            if self._phase == _DONE:
                raise _invalid("data after the end of the stream")
            if self._phase == _DATA:
                piece = view[pos : pos + self._remaining]
                self._consume(piece)
                out.append(bytes(piece))
                pos += len(piece)
                self._remaining -= len(piece)
                if not self._remaining:
                    self._expect(_RECORD, RECORD.size)
                continue
            take = min(self._need - len(self._buf), len(view) - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if len(self._buf) == self._need:
                block = bytes(self._buf)
                self._buf.clear()
                self._complete(block)
        return out

    def _expect(self, phase: int, need: int) -> None:
        self._phase = phase
        self._need = need

    def _complete(self, block: bytes) -> None:
        if self._phase == _HEADER:
            self._consume(block)
            self._check_header(block)
            self._expect(_RECORD, RECORD.size)
        elif self._phase == _RECORD:
            self._record(block)
        elif self._phase == _FRAMEWORK:
            self._consume(block)
            try:
                framework = FrameworkState.unpack(block)
                if self._config is not None and self._irqs is not None:
                    framework.check(self._config, self._irqs)
            except ValueError as exc:
                raise _invalid(f"framework state: {exc}") from None
            self._framework = framework
            self._expect(_RECORD, RECORD.size)
        else:  # _END
            size, crc = END.unpack(block)
            if size != self._size or crc != self._crc:
                raise _invalid(
                    f"the stream does not check out ({self._size} bytes, CRC {self._crc:#010x}; "
                    f"the source sent {size} bytes, CRC {crc:#010x})"
                )
            self._expect(_DONE, 0)

    def _check_header(self, block: bytes) -> None:
        magic, version, header_size, *identity, flags = HEADER.unpack(block)
        if magic != STREAM_MAGIC:
            kind, _ = RECORD.unpack_from(block)
            if kind in (RECORD_DATA, RECORD_FRAMEWORK):
                # What a client that dropped the PRE_COPY part sends: the stream's middle.
                raise _invalid(
                    "the stream does not begin with its header but with a record: was its "
                    "PRE_COPY part not forwarded? (a device for such clients migrates raw)"
                )
            raise _invalid(f"magic {magic!r}: not a vfiouser_trio migration stream")
        if version != STREAM_VERSION:
            raise _invalid(f"stream version {version}, this server reads {STREAM_VERSION}")
        if header_size != HEADER.size or flags:
            raise _invalid(f"header of {header_size} bytes with flags {flags:#x}")
        if self._identity is None:
            return
        ours = _identity_fields(self._identity)
        if tuple(identity) != ours:
            raise _invalid(
                f"state of device {identity[0]:04x}:{identity[1]:04x} (subsystem "
                f"{identity[2]:04x}:{identity[3]:04x}, class/rev {identity[4]:08x}) cannot "
                f"load into {ours[0]:04x}:{ours[1]:04x} (subsystem {ours[2]:04x}:{ours[3]:04x}, "
                f"class/rev {ours[4]:08x})"
            )

    def _record(self, block: bytes) -> None:
        kind, length = RECORD.unpack(block)
        if kind == RECORD_END:
            if self._framework is None:
                raise _invalid("END before the framework state")
            if length != END.size:
                raise _invalid(f"END record of {length} bytes")
            self._expect(_END, END.size)
            return
        self._consume(block)
        if kind == RECORD_DATA:
            if self._framework is not None:
                raise _invalid("device data after the framework state")
            if length:
                self._remaining = length
                self._expect(_DATA, 0)
        elif kind == RECORD_FRAMEWORK:
            if self._framework is not None:
                raise _invalid("a second framework state")
            if not FRAMEWORK_HEADER.size <= length <= MAX_FRAMEWORK_RECORD:
                raise _invalid(f"framework state of {length} bytes")
            self._expect(_FRAMEWORK, length)
        else:
            raise _invalid(f"unknown record type {kind}")

    def finish(self) -> FrameworkState:
        """The framework state of a complete stream; EIO if the stream ended early."""
        self._check_broken()
        if self._phase != _DONE:
            raise VfioUserError(
                errno.EIO,
                f"incomplete migration data: the stream stopped after {self.received} bytes",
            )
        assert self._framework is not None
        return self._framework


def build_stream(identity: PciIdentity, device_data: bytes, framework: FrameworkState) -> bytes:
    """A whole stream carrying ``device_data`` (one DATA record) and ``framework``."""
    encoder = StreamEncoder(identity)
    return encoder.header() + encoder.data(device_data) + encoder.finish(framework)


def split_stream(stream: bytes) -> tuple[bytes, FrameworkState]:
    """The device's bytes and the framework state of a whole stream (not checked against
    any device); VfioUserError as the decoder raises it for invalid or truncated data."""
    decoder = StreamDecoder()
    device_data = b"".join(decoder.feed(stream))
    return device_data, decoder.finish()
