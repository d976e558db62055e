"""The NVMe controller example driven over a real socket by the framework's client, as
Linux's nvme driver drives it: admin and I/O queues in guest memory, doorbells, MSI-X
(or INTx), PRP lists, and a completion status for every kind of bad command."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from vfiouser_trio.client import Client, GuestMemory, connect
from vfiouser_trio.client.irqs import Interrupt
from vfiouser_trio.examples import EXAMPLES
from vfiouser_trio.examples.nvme import FileBacking, MemoryBacking, NvmeController
from vfiouser_trio.examples.nvme import spec as nv
from vfiouser_trio.protocol.constants import PciIrq
from vfiouser_trio.server.pci import COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY
from vfiouser_trio.server.serve import serve

pytestmark = pytest.mark.usefixtures("no_fd_leak")

TIMEOUT = 10
PAGE = 4096
IOVA = 0x10_0000
MEMORY = 0x10_0000  # 1 MiB of guest memory at IOVA
ASQ, ACQ = IOVA, IOVA + 0x1000
SQ1, CQ1, SQ2, CQ2 = IOVA + 0x2000, IOVA + 0x3000, IOVA + 0x4000, IOVA + 0x5000
PRP_LIST = IOVA + 0x8000
DATA = IOVA + 0x1_0000  # 64 KiB of buffers
ADMIN_ENTRIES = 16
BLOCK = 512

CC_ENABLE = nv.CC_EN | nv.SQES_LOG2 << nv.CC_IOSQES_SHIFT | nv.CQES_LOG2 << nv.CC_IOCQES_SHIFT


def sqe(opcode: int, cid: int = 0, *, nsid: int = 1, prp1: int = 0, prp2: int = 0,
        cdw: tuple[int, ...] = (), psdt: int = 0) -> bytes:  # fmt: skip
    """A submission queue entry as a driver writes it (CDW10 on in ``cdw``)."""
    words = (*cdw, *(0,) * (6 - len(cdw)))
    return nv.SQE.pack(opcode | psdt << 14 | cid << 16, nsid, 0, 0, prp1, prp2, *words)


@dataclass
class Completion:
    result: int
    sq_head: int
    sqid: int
    cid: int
    status: int


@dataclass
class Queue:
    sq: int
    cq: int
    entries: int
    vector: int
    sq_tail: int = 0
    cq_head: int = 0
    phase: int = 1


class Host:
    """Plays the nvme driver: queues in guest memory, doorbells by region writes."""

    def __init__(self, client: Client, memory: GuestMemory) -> None:
        self.client = client
        self.memory = memory
        self.queues: dict[int, Queue] = {}
        self.irqs: list[Interrupt] = []
        self._cid = 0

    def mem_write(self, iova: int, data: bytes) -> None:
        self.memory.write(iova - IOVA, data)

    def mem_read(self, iova: int, count: int) -> bytes:
        return self.memory.read(iova - IOVA, count)

    async def reg(self, offset: int, size: int = 4) -> int:
        return int.from_bytes(await self.client.read(0, offset, size), "little")

    async def set_reg(self, offset: int, value: int, size: int = 4) -> None:
        await self.client.write(0, offset, value.to_bytes(size, "little"))

    async def enable(self, *, interrupts: int = PciIrq.MSIX) -> None:
        await self.client.config.write(COMMAND, COMMAND_MEMORY | COMMAND_BUS_MASTER, 2)
        self.irqs = await self.client.enable_irqs(interrupts)
        await self.set_reg(nv.AQA, (ADMIN_ENTRIES - 1) << 16 | (ADMIN_ENTRIES - 1))
        await self.set_reg(nv.ASQ, ASQ, 8)
        await self.set_reg(nv.ACQ, ACQ, 8)
        await self.set_reg(nv.CC, CC_ENABLE)
        assert await self.reg(nv.CSTS) & nv.CSTS_RDY
        self.queues[0] = Queue(ASQ, ACQ, ADMIN_ENTRIES, 0)

    def next_cid(self) -> int:
        self._cid = (self._cid + 1) & 0xFFFF
        return self._cid

    async def submit(self, qid: int, entry: bytes, *, ring: bool = True) -> None:
        q = self.queues[qid]
        self.mem_write(q.sq + q.sq_tail * 64, entry)
        q.sq_tail = (q.sq_tail + 1) % q.entries
        if ring:
            await self.set_reg(nv.DOORBELLS + 8 * qid, q.sq_tail)

    def peek(self, qid: int) -> Completion | None:
        q = self.queues[qid]
        result, _, head, sqid, cid, tail = nv.CQE.unpack(self.mem_read(q.cq + 16 * q.cq_head, 16))
        if tail & 1 != q.phase:
            return None
        return Completion(result, head, sqid, cid, tail >> 1)

    async def completion(self, qid: int, *, consume: bool = True) -> Completion:
        q = self.queues[qid]
        with trio.fail_after(TIMEOUT):
            while (done := self.peek(qid)) is None:
                await self.irqs[min(q.vector, len(self.irqs) - 1)].wait()
        if consume:
            q.cq_head = (q.cq_head + 1) % q.entries
            q.phase ^= q.cq_head == 0
            await self.set_reg(nv.DOORBELLS + 8 * qid + 4, q.cq_head)
        return done

    async def run(self, qid: int, opcode: int, **fields: object) -> Completion:
        cid = self.next_cid()
        await self.submit(qid, sqe(opcode, cid, **fields))  # type: ignore[arg-type]
        done = await self.completion(qid)
        assert done.cid == cid and done.sqid == qid
        return done

    async def admin(self, opcode: int, **fields: object) -> Completion:
        return await self.run(0, opcode, **fields)

    async def create_io_queues(self, qid: int, sq: int, cq: int, entries: int = 16) -> None:
        vector = min(qid, len(self.irqs) - 1)
        done = await self.admin(nv.AdminOpcode.CREATE_IO_CQ, prp1=cq,
                                cdw=((entries - 1) << 16 | qid, vector << 16 | 0x3))  # fmt: skip
        assert done.status == nv.SUCCESS
        done = await self.admin(nv.AdminOpcode.CREATE_IO_SQ, prp1=sq,
                                cdw=((entries - 1) << 16 | qid, qid << 16 | 0x1))  # fmt: skip
        assert done.status == nv.SUCCESS
        self.queues[qid] = Queue(sq, cq, entries, vector)

    async def read_blocks(self, qid: int, slba: int, count: int, buffer: int = DATA) -> Completion:
        return await self.rw(nv.IoOpcode.READ, qid, slba, count, buffer)

    async def write_blocks(self, qid: int, slba: int, data: bytes, buffer: int = DATA) -> Completion:
        self.mem_write(buffer, data)
        return await self.rw(nv.IoOpcode.WRITE, qid, slba, len(data) // BLOCK, buffer)

    async def rw(self, opcode: int, qid: int, slba: int, count: int, buffer: int) -> Completion:
        """A Read or Write of ``count`` blocks at ``buffer``, with PRP2 or a PRP list."""
        length = count * BLOCK
        first = PAGE - buffer % PAGE
        pages = [buffer - buffer % PAGE + PAGE * i for i in range(1, -(-(length - first) // PAGE) + 1)]
        prp2 = 0
        if len(pages) == 1:
            prp2 = pages[0]
        elif pages:
            self.mem_write(PRP_LIST, struct.pack(f"<{len(pages)}Q", *pages))
            prp2 = PRP_LIST
        return await self.run(qid, opcode, prp1=buffer, prp2=prp2,
                              cdw=(slba & 0xFFFF_FFFF, slba >> 32, count - 1))  # fmt: skip


@asynccontextmanager
async def nvme_host(
    device: NvmeController, path: Path, *, share_fd: bool = True, interrupts: int = PciIrq.MSIX
) -> AsyncIterator[Host]:
    """``device`` served at ``path``, a client with 1 MiB of guest memory, enabled."""
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, device, path)
                async with connect(path) as client:
                    with GuestMemory(MEMORY) as memory:
                        await client.dma_map(memory, IOVA, share_fd=share_fd)
                        host = Host(client, memory)
                        await host.enable(interrupts=interrupts)
                        yield host
                nursery.cancel_scope.cancel()
    finally:
        device.close()


async def test_identify_and_queues_as_linux_brings_the_controller_up(tmp_path: Path) -> None:
    device = NvmeController(MemoryBacking(8 << 20))
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        cap = await host.reg(nv.CAP, 8)
        assert cap & 0xFFFF == 1023 and (cap >> 32) & 0xF == 0  # MQES, DSTRD
        assert cap >> 37 & 1  # the NVM command set
        assert await host.reg(nv.VS) == 0x0001_0400
        header = await host.client.config.header()
        assert header.class_code == 0x010802
        done = await host.admin(nv.AdminOpcode.IDENTIFY, prp1=DATA, cdw=(nv.Cns.CONTROLLER,))
        assert done.status == nv.SUCCESS
        ident = host.mem_read(DATA, 4096)
        assert ident[24:64].decode().strip() == "vfiouser_trio NVMe example"
        assert struct.unpack_from("<I", ident, 516)[0] == 1  # NN
        assert (ident[512], ident[513]) == (0x66, 0x44)  # SQES, CQES
        done = await host.admin(nv.AdminOpcode.IDENTIFY, prp1=DATA, cdw=(nv.Cns.NAMESPACE,))
        nsze, ncap, _ = struct.unpack_from("<QQQ", host.mem_read(DATA, 24))
        assert done.status == nv.SUCCESS and nsze == ncap == (8 << 20) // BLOCK
        done = await host.admin(
            nv.AdminOpcode.IDENTIFY, nsid=0, prp1=DATA, cdw=(nv.Cns.ACTIVE_NAMESPACES,)
        )
        assert struct.unpack_from("<II", host.mem_read(DATA, 8)) == (1, 0)
        done = await host.admin(
            nv.AdminOpcode.IDENTIFY, prp1=DATA, cdw=(nv.Cns.NAMESPACE_DESCRIPTORS,)
        )
        assert host.mem_read(DATA, 4)[:2] == b"\x01\x08"  # EUI-64 first
        # Linux asks for as many queues as CPUs; it gets at most io_queues.
        done = await host.admin(
            nv.AdminOpcode.SET_FEATURES, cdw=(nv.Feature.NUMBER_OF_QUEUES, 15 << 16 | 15)
        )
        assert done.result == 3 << 16 | 3
        done = await host.admin(nv.AdminOpcode.GET_FEATURES, cdw=(nv.Feature.VOLATILE_WRITE_CACHE,))
        assert done.result == 1
        for lid, size in ((nv.LogPage.SMART, 512), (nv.LogPage.ERROR, 64), (nv.LogPage.FIRMWARE_SLOT, 512)):
            done = await host.admin(nv.AdminOpcode.GET_LOG_PAGE, nsid=0xFFFF_FFFF, prp1=DATA,
                                    cdw=(lid | (size // 4 - 1) << 16,))  # fmt: skip
            assert done.status == nv.SUCCESS, lid
        await host.create_io_queues(1, SQ1, CQ1)
        data = os.urandom(8 * BLOCK)
        assert (await host.write_blocks(1, 100, data)).status == nv.SUCCESS
        assert await device.backing.read(100 * BLOCK, len(data)) == data
        host.mem_write(DATA, bytes(len(data)))
        assert (await host.read_blocks(1, 100, 8)).status == nv.SUCCESS
        assert host.mem_read(DATA, len(data)) == data
