"""Client memory the checker holds for a DMA map without an fd, served to the server's
DMA_READ / DMA_WRITE in whichever layout it uses (spec: "Client memory access",
"VFIO_USER_DMA_READ"; QEMU lays DMA_WRITE out as {address u64, count u32, data, 4 pad}
and answers it with no payload)."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ...protocol.constants import Command
from ...protocol.framing import Frame
from ...protocol.header import error_header, reply_header
from .layouts import DMA_RW as _SPEC
from .layouts import QEMU_DMA_RW as _QEMU
from .layouts import REGION_ACCESS as _ACCESS
from .model import Violation
from .wire import Wire, describe


@dataclass
class DmaWindow:
    """The window a check mapped without an fd, the memory behind it, and the device.

    A trigger puts what the device should read into ``memory``, makes the device DMA
    (through ``region_read`` / ``region_write``), waits until it is done, and undoes any
    register it changed.
    """

    wire: Wire
    address: int
    memory: bytearray
    #: The client's max_data_xfer_size: no DMA message may move more.
    max_count: int
    #: What the server sent, for the report: "DMA_READ" / "DMA_WRITE spec" / "... QEMU".
    seen: list[str] = field(default_factory=list)
    #: Requests outside the window or above max_count (answered EFAULT / EINVAL).
    violations: list[str] = field(default_factory=list)
    #: Answer as QEMU's vfio-user-pci does: DMA_READ replies in its layout, DMA_WRITE read
    #: as QEMU reads it (count u32 at 8, data from 12) and answered with no payload.
    qemu: bool = False

    async def region_read(self, region: int, offset: int, count: int) -> bytes:
        _header, reply = await self.wire.call(
            Command.REGION_READ, _ACCESS.pack(offset, region, count)
        )
        if reply is None or reply.header.is_error or len(reply.payload) != _ACCESS.size + count:
            raise Violation(f"REGION_READ {region}:{offset:#x}+{count}: {describe(reply)}")
        return bytes(reply.payload[_ACCESS.size :])

    async def region_write(self, region: int, offset: int, data: bytes) -> None:
        payload = _ACCESS.pack(offset, region, len(data)) + data
        _header, reply = await self.wire.call(Command.REGION_WRITE, payload)
        if reply is None or reply.header.is_error:
            raise Violation(f"REGION_WRITE {region}:{offset:#x}+{len(data)}: {describe(reply)}")

    def _span(self, address: int, count: int, what: str) -> slice | None:
        start = address - self.address
        if count > self.max_count:
            self.violations.append(
                f"{what} of {count} bytes, above max_data_xfer_size {self.max_count}"
            )
            return None
        if start < 0 or start + count > len(self.memory):
            self.violations.append(f"{what} {address:#x}+{count:#x} outside the window")
            return None
        return slice(start, start + count)

    async def serve(self, wire: Wire, frame: Frame) -> None:
        """The wire's handler for the server's commands."""
        frame.close_fds()
        h, p = frame.header, frame.payload
        answer = b""
        code = 0
        if h.command == Command.DMA_READ and len(p) >= _SPEC.size:
            address, count = _SPEC.unpack_from(p)
            span = self._span(address, count, "DMA_READ")
            self.seen.append("DMA_READ")
            if span is None:
                code = errno.EFAULT
            elif self.qemu:
                answer = _QEMU.pack(address, count) + bytes(self.memory[span]) + bytes(4)
            else:
                answer = _SPEC.pack(address, count) + bytes(self.memory[span])
        elif h.command == Command.DMA_WRITE and len(p) >= _SPEC.size:
            address, count = _SPEC.unpack_from(p)
            layout = "spec"
            if self.qemu or count != len(p) - _SPEC.size:
                address, count = _QEMU.unpack_from(p)
                layout, start = "QEMU", _QEMU.size
            else:
                start = _SPEC.size
            if count != len(p) - _SPEC.size and not (self.qemu and count <= len(p) - _SPEC.size):
                self.violations.append(
                    f"DMA_WRITE whose count fits neither layout: {describe(frame)}"
                )
                code = errno.EINVAL
            else:
                self.seen.append(f"DMA_WRITE {layout}" + (" (empty)" if not count else ""))
                span = self._span(address, count, "DMA_WRITE")
                if span is None:
                    code = errno.EFAULT
                else:
                    self.memory[span] = p[start : start + count]
                    answer = b"" if self.qemu or layout == "QEMU" else _SPEC.pack(address, count)
        else:
            self.violations.append(f"an unexpected command from the server: {describe(frame)}")
            code = errno.EINVAL
        if h.no_reply:
            return
        if code:
            await wire.send_header(error_header(h.msg_id, h.command, code))
        else:
            await wire.send_header(reply_header(h.msg_id, h.command, len(answer)), answer)


#: What a device author gives ``Expectations.dma_trigger``.
DmaTrigger = Callable[[DmaWindow], Awaitable[None]]
