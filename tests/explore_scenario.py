"""The exploration scenario the ordering-policy tests share."""

from __future__ import annotations

from vfiouser_trio.client import Client
from vfiouser_trio.ordering import (
    OrderingPolicy,
)
from vfiouser_trio.server import Device, PciIdentity
from vfiouser_trio.testing import explore

IDENTITY = PciIdentity(vendor_id=0x1234, device_id=0x7199, class_code=0xFF0000)


class Registers(Device):
    """Two BARs of plain registers; every access is a latency choice point."""

    def __init__(self, run: explore.Run) -> None:
        super().__init__(IDENTITY, name="registers")
        self.run_ = run
        self.memory = [bytearray(16), bytearray(16)]
        for bar in (0, 1):
            self.add_bar(bar, 16, read=self._reader(bar), write=self._writer(bar))

    def _reader(self, bar: int):  # type: ignore[no-untyped-def]
        async def read(offset: int, size: int) -> bytes:
            await self.run_.latency(f"read bar{bar}")
            return bytes(self.memory[bar][offset : offset + size])

        return read

    def _writer(self, bar: int):  # type: ignore[no-untyped-def]
        async def write(offset: int, data: bytes) -> None:
            await self.run_.latency(f"write bar{bar}")
            self.memory[bar][offset : offset + len(data)] = data

        return write


async def workload(client: Client, run: explore.Run) -> None:
    for i in range(1, 4):
        await client.write(1, 0, bytes([i]) * 4, posted=True)
        await client.write(0, 0, bytes([i]) * 4, posted=True)
        await client.read(1, 0, 4, use_mmap=False)
        await client.read(0, 0, 4, use_mmap=False)


def scenario(policy: type[OrderingPolicy] | None = None, **kwargs: object) -> explore.Scenario:
    return explore.Scenario(
        device=Registers,
        workload=workload,
        policy=(lambda: None) if policy is None else (lambda: policy(**kwargs)),
        memory_regions=frozenset({0, 1}),
    )
