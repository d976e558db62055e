"""The NVMe controller example driven over a real socket by the framework's client, as
Linux's nvme driver drives it: admin and I/O queues in guest memory, doorbells, MSI-X
(or INTx), PRP lists, and a completion status for every kind of bad command."""

from __future__ import annotations

import json
import logging
import os
import random
import struct
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.cli_process import CLI, cli_server, env
from vfiouser_trio.client import Client, GuestMemory, connect, migrate
from vfiouser_trio.client.irqs import Interrupt
from vfiouser_trio.examples.nvme import FileBacking, MemoryBacking, NvmeController, migration
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
    cq_entries: int = 0
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
            q.cq_head = (q.cq_head + 1) % (q.cq_entries or q.entries)
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

    async def create_io_queues(
        self, qid: int, sq: int, cq: int, entries: int = 16, cq_entries: int | None = None
    ) -> None:
        vector = min(qid, len(self.irqs) - 1)
        cq_entries = cq_entries or entries
        done = await self.admin(nv.AdminOpcode.CREATE_IO_CQ, prp1=cq,
                                cdw=((cq_entries - 1) << 16 | qid, vector << 16 | 0x3))  # fmt: skip
        assert done.status == nv.SUCCESS
        done = await self.admin(nv.AdminOpcode.CREATE_IO_SQ, prp1=sq,
                                cdw=((entries - 1) << 16 | qid, qid << 16 | 0x1))  # fmt: skip
        assert done.status == nv.SUCCESS
        self.queues[qid] = Queue(sq, cq, entries, vector, cq_entries)

    async def read_blocks(self, qid: int, slba: int, count: int, buffer: int = DATA) -> Completion:
        return await self.rw(nv.IoOpcode.READ, qid, slba, count, buffer)

    async def write_blocks(
        self, qid: int, slba: int, data: bytes, buffer: int = DATA
    ) -> Completion:
        self.mem_write(buffer, data)
        return await self.rw(nv.IoOpcode.WRITE, qid, slba, len(data) // BLOCK, buffer)

    async def rw(self, opcode: int, qid: int, slba: int, count: int, buffer: int) -> Completion:
        """A Read or Write of ``count`` blocks at ``buffer``, with PRP2 or a PRP list."""
        length = count * BLOCK
        first = PAGE - buffer % PAGE
        pages = [
            buffer - buffer % PAGE + PAGE * i for i in range(1, -(-(length - first) // PAGE) + 1)
        ]
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
        for lid, size in (
            (nv.LogPage.SMART, 512),
            (nv.LogPage.ERROR, 64),
            (nv.LogPage.FIRMWARE_SLOT, 512),
        ):
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


def prp_chain(host: Host, buffer: int, length: int, list_at: int) -> int:
    """Write the PRP list for ``length`` bytes at ``buffer`` from ``list_at`` on, chaining
    to the next page when the list reaches a page's end; returns PRP2."""
    first = PAGE - buffer % PAGE
    pages = [buffer - buffer % PAGE + PAGE * i for i in range(1, -(-(length - first) // PAGE) + 1)]
    if len(pages) == 1:
        return pages[0]
    at = list_at
    while pages:
        room = (PAGE - at % PAGE) // 8
        if len(pages) <= room:
            host.mem_write(at, struct.pack(f"<{len(pages)}Q", *pages))
            break
        chunk, pages = pages[: room - 1], pages[room - 1 :]
        following = at - at % PAGE + PAGE
        host.mem_write(at, struct.pack(f"<{room}Q", *chunk, following))
        at = following
    return list_at


@pytest.mark.parametrize("share_fd", [True, False], ids=["fd-map", "messages"])
async def test_prp_lists_that_cross_pages_and_chain(tmp_path: Path, share_fd: bool) -> None:
    device = NvmeController(MemoryBacking(1 << 20))
    async with nvme_host(device, tmp_path / "nvme.sock", share_fd=share_fd) as host:
        await host.create_io_queues(1, SQ1, CQ1)
        blocks = 200  # 100 KiB from an offset in its first page: 26 pages, list of 25
        data = os.urandom(blocks * BLOCK)
        buffer = DATA + 0x200
        host.mem_write(buffer, data)
        # The list starts 2 entries before a page's end: one entry, then the chain pointer.
        prp2 = prp_chain(host, buffer, len(data), PRP_LIST + PAGE - 16)
        done = await host.run(1, nv.IoOpcode.WRITE, prp1=buffer, prp2=prp2,
                              cdw=(7, 0, blocks - 1))  # fmt: skip
        assert done.status == nv.SUCCESS
        assert await device.backing.read(7 * BLOCK, len(data)) == data
        host.mem_write(buffer, bytes(len(data)))
        done = await host.run(1, nv.IoOpcode.READ, prp1=buffer, prp2=prp2,
                              cdw=(7, 0, blocks - 1))  # fmt: skip
        assert done.status == nv.SUCCESS
        assert host.mem_read(buffer, len(data)) == data
        # Two pages: PRP2 is the second page itself.
        assert (await host.write_blocks(1, 0, data[: 2 * PAGE], DATA + PAGE)).status == 0
        assert await device.backing.read(0, 2 * PAGE) == data[: 2 * PAGE]


UNMAPPED = 0x4000_0000


async def test_every_bad_command_completes_with_its_status(tmp_path: Path) -> None:
    device = NvmeController(MemoryBacking(1 << 20), io_queues=2)
    blocks = (1 << 20) // BLOCK
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.create_io_queues(1, SQ1, CQ1)
        A, IO = nv.AdminOpcode, nv.IoOpcode
        cases: list[tuple[str, int, int, int, dict[str, object]]] = [
            ("unknown admin opcode", 0, 0x7F, nv.INVALID_OPCODE,
             {}),
            ("unknown I/O opcode", 1, 0x7E, nv.INVALID_OPCODE,
             {}),
            ("SGL data pointer", 1, IO.READ, nv.INVALID_FIELD,
             {"psdt": 1, "prp1": DATA}),
            ("Identify CNS 0x10", 0, A.IDENTIFY, nv.INVALID_FIELD,
             {"prp1": DATA, "cdw": (0x10,)}),
            ("Identify of namespace 2", 0, A.IDENTIFY, nv.INVALID_NAMESPACE,
             {"nsid": 2, "prp1": DATA}),
            ("read of namespace 2", 1, IO.READ, nv.INVALID_NAMESPACE,
             {"nsid": 2, "prp1": DATA}),
            ("read past the end", 1, IO.READ, nv.LBA_OUT_OF_RANGE,
             {"prp1": DATA, "cdw": (blocks, 0, 0)}),
            ("read across the end", 1, IO.READ, nv.LBA_OUT_OF_RANGE,
             {"prp1": DATA, "cdw": (blocks - 1, 0, 1)}),
            ("write zeroes past the end", 1, IO.WRITE_ZEROES, nv.LBA_OUT_OF_RANGE,
             {"cdw": (0, 1, 0)}),
            ("a read beyond MDTS", 1, IO.READ, nv.INVALID_FIELD,
             {"prp1": DATA, "cdw": (0, 0, 511)}),
            ("PRP1 not dword aligned", 1, IO.READ, nv.INVALID_PRP_OFFSET,
             {"prp1": DATA + 2}),
            ("PRP2 with an offset", 1, IO.READ, nv.INVALID_PRP_OFFSET,
             {"prp1": DATA, "prp2": DATA + PAGE + 8, "cdw": (0, 0, 15)}),
            ("PRP list entry with an offset", 1, IO.READ, nv.INVALID_PRP_OFFSET,
             {"prp1": DATA, "prp2": PRP_LIST + PAGE, "cdw": (0, 0, 23)}),
            ("PRP1 unmapped", 1, IO.READ, nv.DATA_TRANSFER_ERROR,
             {"prp1": UNMAPPED}),
            ("PRP list unmapped", 1, IO.WRITE, nv.DATA_TRANSFER_ERROR,
             {"prp1": DATA, "prp2": UNMAPPED, "cdw": (0, 0, 23)}),
            ("DSM range past the end", 1, IO.DATASET_MANAGEMENT, nv.LBA_OUT_OF_RANGE,
             {"prp1": PRP_LIST}),
            ("create CQ 0", 0, A.CREATE_IO_CQ, nv.INVALID_QUEUE_IDENTIFIER,
             {"prp1": CQ2, "cdw": (15 << 16, 3)}),
            ("create CQ beyond the queues", 0, A.CREATE_IO_CQ, nv.INVALID_QUEUE_IDENTIFIER,
             {"prp1": CQ2, "cdw": (15 << 16 | 3, 3)}),
            ("create CQ 1 twice", 0, A.CREATE_IO_CQ, nv.INVALID_QUEUE_IDENTIFIER,
             {"prp1": CQ2, "cdw": (15 << 16 | 1, 3)}),
            ("create a CQ of one entry", 0, A.CREATE_IO_CQ, nv.INVALID_QUEUE_SIZE,
             {"prp1": CQ2, "cdw": (2, 3)}),
            ("create a CQ above MQES", 0, A.CREATE_IO_CQ, nv.INVALID_QUEUE_SIZE,
             {"prp1": CQ2, "cdw": (1024 << 16 | 2, 3)}),
            ("create a CQ with vector 3", 0, A.CREATE_IO_CQ, nv.INVALID_INTERRUPT_VECTOR,
             {"prp1": CQ2, "cdw": (15 << 16 | 2, 3 << 16 | 3)}),
            ("create a CQ not contiguous", 0, A.CREATE_IO_CQ, nv.INVALID_FIELD,
             {"prp1": CQ2, "cdw": (15 << 16 | 2, 2)}),
            ("create a CQ off a page", 0, A.CREATE_IO_CQ, nv.INVALID_FIELD,
             {"prp1": CQ2 + 64, "cdw": (15 << 16 | 2, 3)}),
            ("create an SQ on no CQ", 0, A.CREATE_IO_SQ, nv.COMPLETION_QUEUE_INVALID,
             {"prp1": SQ2, "cdw": (15 << 16 | 2, 2 << 16 | 1)}),
            ("create an SQ on the admin CQ", 0, A.CREATE_IO_SQ, nv.COMPLETION_QUEUE_INVALID,
             {"prp1": SQ2, "cdw": (15 << 16 | 2, 1)}),
            ("delete SQ 0", 0, A.DELETE_IO_SQ, nv.INVALID_QUEUE_IDENTIFIER,
             {"cdw": (0,)}),
            ("delete SQ 2, never created", 0, A.DELETE_IO_SQ, nv.INVALID_QUEUE_IDENTIFIER,
             {"cdw": (2,)}),
            ("delete CQ 1 under SQ 1", 0, A.DELETE_IO_CQ, nv.INVALID_QUEUE_DELETION,
             {"cdw": (1,)}),
            ("log page 0x7F", 0, A.GET_LOG_PAGE, nv.INVALID_LOG_PAGE,
             {"prp1": DATA, "cdw": (0x7F | 127 << 16,)}),
            ("log page offset past it", 0, A.GET_LOG_PAGE, nv.INVALID_FIELD,
             {"prp1": DATA, "cdw": (2 | 127 << 16, 0, 512)}),
            ("log page beyond MDTS", 0, A.GET_LOG_PAGE, nv.INVALID_FIELD,
             {"prp1": DATA, "cdw": (2 | 0xFFFF << 16, 1)}),
            ("unknown feature", 0, A.GET_FEATURES, nv.INVALID_FIELD,
             {"cdw": (0x7F,)}),
            ("save a feature", 0, A.SET_FEATURES, nv.FEATURE_NOT_SAVEABLE,
             {"cdw": (1 << 31 | 6, 1)}),
            ("65536 queues", 0, A.SET_FEATURES, nv.INVALID_FIELD,
             {"cdw": (7, 0xFFFF)}),
        ]  # fmt: skip
        host.mem_write(PRP_LIST, struct.pack("<IIQ", 0, 8, blocks - 4))  # a DSM range
        host.mem_write(PRP_LIST + PAGE, struct.pack("<Q", DATA + 8))
        statuses = {}
        for what, qid, opcode, _, fields in cases:
            statuses[what] = (await host.run(qid, opcode, **fields)).status
        assert statuses == {what: expected for what, _, _, expected, _ in cases}
        # Four AERs are held (AERL 3); a fifth completes with the limit exceeded.
        for _ in range(4):
            await host.submit(0, sqe(nv.AdminOpcode.ASYNC_EVENT_REQUEST, 0x100))
        await trio.testing.wait_all_tasks_blocked()
        assert host.peek(0) is None
        done = await host.admin(nv.AdminOpcode.ASYNC_EVENT_REQUEST)
        assert done.status == nv.ASYNC_EVENT_LIMIT_EXCEEDED
        # Abort: the command ran already ("not aborted"); the controller still works.
        assert (await host.admin(nv.AdminOpcode.ABORT, cdw=(1 << 16 | 1,))).result & 1
        data = os.urandom(BLOCK)
        assert (await host.write_blocks(1, 3, data)).status == nv.SUCCESS
        assert await device.backing.read(3 * BLOCK, BLOCK) == data


class GatedBacking(MemoryBacking):
    """Memory whose reads wait for ``gate``: a slow disk under one queue."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = trio.Event()
        self.waiting = 0

    async def read(self, offset: int, count: int) -> bytes:
        self.waiting += 1
        await self.gate.wait()
        return await super().read(offset, count)


async def test_each_queue_is_served_by_its_own_task(tmp_path: Path) -> None:
    backing = GatedBacking(1 << 20)
    device = NvmeController(backing, io_queues=2)
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.create_io_queues(1, SQ1, CQ1)
        await host.create_io_queues(2, SQ2, CQ2)
        await host.submit(1, sqe(nv.IoOpcode.READ, 1, prp1=DATA))
        await trio.testing.wait_all_tasks_blocked()
        assert backing.waiting == 1
        # Queue 1 waits for its disk; queue 2 and the admin queue go on.
        data = os.urandom(BLOCK)
        assert (await host.write_blocks(2, 9, data, DATA + PAGE)).status == nv.SUCCESS
        assert (await host.admin(nv.AdminOpcode.GET_FEATURES, cdw=(7,))).status == nv.SUCCESS
        assert host.peek(1) is None
        backing.gate.set()
        assert (await host.completion(1)).status == nv.SUCCESS


async def test_completion_queue_phase_sq_head_and_a_full_queue(tmp_path: Path) -> None:
    device = NvmeController(MemoryBacking(1 << 20))
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.create_io_queues(1, SQ1, CQ1, entries=4)
        # Laps round the 4-entry queues: the phase tag flips at each wrap of the CQ and
        # the SQ head each completion reports is the entry after the command's.
        heads = []
        for i in range(10):
            heads.append((await host.run(1, nv.IoOpcode.FLUSH)).sq_head)
            assert host.queues[1].phase == (1 if (i + 1) // 4 % 2 == 0 else 0)
        assert heads == [(i + 1) % 4 for i in range(10)]
        # The host consumes nothing: three completions fill the CQ (one slot stays
        # free), the fourth command waits for the CQ head doorbell.
        for cid in range(20, 23):
            await host.submit(1, sqe(nv.IoOpcode.FLUSH, cid))
        await trio.testing.wait_all_tasks_blocked()
        queue = host.queues[1]
        posted = []
        for _ in range(3):
            done = await host.completion(1, consume=False)
            posted.append(done.cid)
            queue.cq_head = (queue.cq_head + 1) % queue.entries
            queue.phase ^= queue.cq_head == 0
        assert posted == [20, 21, 22]
        await host.submit(1, sqe(nv.IoOpcode.FLUSH, 23))
        await trio.testing.wait_all_tasks_blocked()
        assert host.peek(1) is None  # the CQ is full until the host says otherwise
        await host.set_reg(nv.DOORBELLS + 12, queue.cq_head)
        assert (await host.completion(1)).cid == 23


async def wait_csts(host: Host, mask: int, value: int) -> int:
    """Poll CSTS as a driver does until ``CSTS & mask == value``."""
    with trio.fail_after(TIMEOUT):
        while (csts := await host.reg(nv.CSTS)) & mask != value:
            await trio.testing.wait_all_tasks_blocked()
    return csts


async def test_shutdown_controller_reset_and_device_reset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk = tmp_path / "disk.img"
    device = NvmeController(FileBacking(disk, 1 << 20))
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.create_io_queues(1, SQ1, CQ1)
        data = os.urandom(4 * BLOCK)
        assert (await host.write_blocks(1, 2, data)).status == nv.SUCCESS
        assert (await host.run(1, nv.IoOpcode.FLUSH)).status == nv.SUCCESS
        assert disk.read_bytes()[2 * BLOCK : 6 * BLOCK] == data
        # Shutdown notification: CSTS.SHST reports it complete once the file is synced.
        await host.set_reg(nv.CC, CC_ENABLE | 1 << nv.CC_SHN_SHIFT)
        await wait_csts(host, 0x3 << nv.CSTS_SHST_SHIFT, nv.SHST_COMPLETE << nv.CSTS_SHST_SHIFT)
        # Controller reset (CC.EN 1 to 0): not ready, the I/O queues are gone.
        await host.set_reg(nv.CC, 0)
        assert await host.reg(nv.CSTS) == 0
        with caplog.at_level(logging.WARNING):
            await host.set_reg(nv.DOORBELLS + 8, 1)
        assert "SQ tail doorbell of queue 1 written while the controller is not ready" in (
            caplog.text
        )
        assert await host.reg(nv.AQA) != 0  # the admin queue registers stay
        # Enabled again: a fresh admin queue (phase 1 from slot 0).
        host.mem_write(ACQ, bytes(PAGE))
        await host.enable()
        done = await host.admin(nv.AdminOpcode.CREATE_IO_SQ, prp1=SQ1,
                                cdw=(15 << 16 | 1, 1 << 16 | 1))  # fmt: skip
        assert done.status == nv.COMPLETION_QUEUE_INVALID  # CQ 1 went with the reset
        # DEVICE_RESET: every register to power-on.
        await host.client.reset()
        assert [await host.reg(r) for r in (nv.CC, nv.CSTS, nv.AQA, nv.ASQ, nv.ACQ)] == [0] * 5


async def test_bad_doorbells_and_configurations_are_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = NvmeController(MemoryBacking(1 << 20))
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.create_io_queues(1, SQ1, CQ1)
        with caplog.at_level(logging.WARNING):
            await host.set_reg(nv.DOORBELLS + 8 * 5, 1)  # no SQ 5
            await host.set_reg(nv.DOORBELLS + 8, 16)  # beyond SQ 1's 16 entries
            await host.set_reg(nv.DOORBELLS + 12, 200)  # beyond CQ 1
            await host.set_reg(nv.DOORBELLS + 8, 1, size=2)  # half a doorbell
            await host.client.write(0, nv.DOORBELLS + 2, b"\x01\x00\x00\x00")  # misaligned
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 5 and all(w.startswith("nvme:") for w in warnings), warnings
        assert (await host.run(1, nv.IoOpcode.FLUSH)).status == nv.SUCCESS
        # An admin queue of one entry cannot be enabled: Controller Fatal Status.
        await host.set_reg(nv.CC, 0)
        await host.set_reg(nv.AQA, 0)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            await host.set_reg(nv.CC, CC_ENABLE)
        assert await host.reg(nv.CSTS) == nv.CSTS_CFS
        assert "controller fatal status: cannot enable: an admin queue of one entry" in caplog.text
        # Register writes of any size and to read-only registers change nothing else.
        await host.set_reg(nv.CAP, 0, 8)
        await host.set_reg(nv.VS, 0)
        assert await host.reg(nv.VS) == 0x0001_0400


async def test_an_unreadable_queue_is_controller_fatal_until_reset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = NvmeController(MemoryBacking(1 << 20))
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        # A queue the guest placed outside its memory: the first fetch fails.
        done = await host.admin(nv.AdminOpcode.CREATE_IO_CQ, prp1=CQ1, cdw=(15 << 16 | 1, 3))
        assert done.status == nv.SUCCESS
        done = await host.admin(nv.AdminOpcode.CREATE_IO_SQ, prp1=UNMAPPED,
                                cdw=(15 << 16 | 1, 1 << 16 | 1))  # fmt: skip
        assert done.status == nv.SUCCESS
        with caplog.at_level(logging.WARNING):
            await host.set_reg(nv.DOORBELLS + 8, 1)
            await wait_csts(host, nv.CSTS_CFS, nv.CSTS_CFS)
        assert "SQ 1 entry at 0x40000000 unreadable" in caplog.text
        # The host resets the controller, and it works again.
        await host.set_reg(nv.CC, 0)
        host.mem_write(ACQ, bytes(PAGE))
        await host.enable()
        assert (await host.admin(nv.AdminOpcode.GET_FEATURES, cdw=(7,))).status == nv.SUCCESS


async def test_intx_when_the_driver_has_no_msix(tmp_path: Path) -> None:
    device = NvmeController(MemoryBacking(1 << 20))
    async with nvme_host(device, tmp_path / "nvme.sock", interrupts=PciIrq.INTX) as host:
        [intx] = host.irqs
        await host.submit(0, sqe(nv.AdminOpcode.GET_FEATURES, 7, cdw=(7,)))
        assert await intx.wait() == 1
        assert (await host.completion(0)).cid == 7
        await host.client.unmask_irqs(PciIrq.INTX)
        # INTMS masks it; INTMC lets the held interrupt through.
        await host.set_reg(nv.INTMS, 1)
        await host.submit(0, sqe(nv.AdminOpcode.GET_FEATURES, 8, cdw=(7,)))
        await trio.testing.wait_all_tasks_blocked()
        assert host.peek(0) is not None and intx.try_read() is None
        await host.set_reg(nv.INTMC, 1)
        assert await intx.wait() == 1
        assert (await host.completion(0)).cid == 8


async def test_msi_when_the_driver_leaves_msix_off(tmp_path: Path) -> None:
    """With MSI-X off (QEMU emulates MSI and gives eventfds) each CQ raises its MSI
    vector; INTMS masks a vector (a bit each) and INTMC lets what it held through."""
    device = NvmeController(MemoryBacking(1 << 20), io_queues=2)
    async with nvme_host(device, tmp_path / "nvme.sock", interrupts=PciIrq.MSI) as host:
        assert await host.client.config.find_capability(0x05) is not None  # MSI
        assert len(host.irqs) == 4  # three vectors (admin + 2 I/O queues), a power of two
        await host.create_io_queues(1, SQ1, CQ1)
        assert (await host.write_blocks(1, 3, b"m" * BLOCK)).status == nv.SUCCESS
        assert host.irqs[1].try_read() is None  # consumed by the completion's wait
        await host.set_reg(nv.INTMS, 1 << 1)
        await host.submit(1, sqe(nv.IoOpcode.FLUSH, 0x77))
        await trio.testing.wait_all_tasks_blocked()
        assert host.peek(1) is not None and host.irqs[1].try_read() is None
        # The admin vector is not masked meanwhile.
        assert (await host.admin(nv.AdminOpcode.GET_FEATURES, cdw=(7,))).status == 0
        await host.set_reg(nv.INTMC, 1 << 1)
        assert await host.irqs[1].wait() == 1
        assert (await host.completion(1)).cid == 0x77


async def test_abort_never_aborts_a_command_being_executed(tmp_path: Path) -> None:
    """Abort is best effort (NVMe 1.4 section 5.1): for a read waiting for its disk it
    completes at once with DW0 bit 0 set (not aborted), and the read completes as usual."""
    backing = GatedBacking(1 << 20)
    device = NvmeController(backing)
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.create_io_queues(1, SQ1, CQ1)
        await host.submit(1, sqe(nv.IoOpcode.READ, 0x66, prp1=DATA))
        await trio.testing.wait_all_tasks_blocked()
        assert backing.waiting == 1
        for target in (1 | 0x66 << 16, 1 | 0x99 << 16, 7 | 0x66 << 16):  # the read, no such
            done = await host.admin(nv.AdminOpcode.ABORT, cdw=(target,))  # cid, no such SQ
            assert (done.status, done.result & 1) == (nv.SUCCESS, 1)
        backing.gate.set()
        done = await host.completion(1)
        assert (done.cid, done.status) == (0x66, nv.SUCCESS)


async def test_guest_garbage_never_escapes_the_controller(tmp_path: Path) -> None:
    """Random entries on the admin and an I/O queue: each completes with a status."""
    rng = random.Random(14)
    device = NvmeController(MemoryBacking(1 << 20))
    addresses = [DATA, DATA + 0x10, DATA + 3, DATA + PAGE, UNMAPPED, 0, 1 << 63, PRP_LIST]
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.create_io_queues(1, SQ1, CQ1)
        host.mem_write(PRP_LIST, struct.pack("<4Q", DATA, 0x123, UNMAPPED, 1 << 63))
        admin_opcodes = [0x02, 0x06, 0x08, 0x09, 0x0A, 0x10, 0x18, 0x7F, 0xC0]
        for i in range(300):
            qid = i % 2
            opcode = rng.choice(admin_opcodes) if qid == 0 else rng.randrange(0x100)
            words = tuple(
                rng.choice([0, 1, 7, 0xFF, 0xFFFF, rng.getrandbits(32)]) for _ in range(6)
            )
            entry = sqe(opcode, i, nsid=rng.choice([0, 1, 2, 0xFFFF_FFFF]),
                        prp1=rng.choice(addresses), prp2=rng.choice(addresses), cdw=words,
                        psdt=rng.choice([0, 0, 0, 1]))  # fmt: skip
            await host.submit(qid, entry)
            done = await host.completion(qid)
            assert done.cid == i
        assert await host.reg(nv.CSTS) == nv.CSTS_RDY
        assert (await host.run(1, nv.IoOpcode.FLUSH)).status == nv.SUCCESS


async def test_cli_serves_a_file_backed_namespace(tmp_path: Path) -> None:
    disk, path = tmp_path / "disk.img", tmp_path / "nvme.sock"
    async with nvme_server(disk, path, size="2M"):
        assert disk.stat().st_size == 2 << 20
        with GuestMemory(MEMORY) as memory:
            async with connect(path) as client:
                await client.dma_map(memory, IOVA)
                host = Host(client, memory)
                await host.enable()
                await host.admin(nv.AdminOpcode.IDENTIFY, prp1=DATA, cdw=(nv.Cns.NAMESPACE,))
                assert struct.unpack_from("<Q", host.mem_read(DATA, 8))[0] == (2 << 20) // BLOCK
                await host.create_io_queues(1, SQ1, CQ1)
                data = os.urandom(2 * BLOCK)
                assert (await host.write_blocks(1, 4095 - 1, data)).status == nv.SUCCESS
                assert disk.read_bytes()[-2 * BLOCK :] == data
    bad = subprocess.run([*CLI, "serve", "nvme", "--size=1000", f"--socket-path={path}"],
                         capture_output=True, text=True, env=env(), check=False)  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "vfio-user-trio serve nvme: a namespace is a whole number of 512-byte blocks"
    )


async def _host_on_a_small_cq(source: Client, destination: Client, memory: GuestMemory) -> Host:
    """``memory`` mapped on both, a host enabled on ``source`` with I/O queue 1 (8 entries,
    a CQ of 4)."""
    await source.dma_map(memory, IOVA)
    await destination.dma_map(memory, IOVA)
    host = Host(source, memory)
    await host.enable()
    await host.create_io_queues(1, SQ1, CQ1, entries=8, cq_entries=4)
    return host


async def _write_five_blocks(
    host: Host, *, first_cid: int, lba_step: int, ring_at: int
) -> list[bytes]:
    """Five random blocks written at LBAs 0, ``lba_step``, ...; the doorbell rung only
    after the ``ring_at``-th submission (0-based). Returns the blocks."""
    blocks = [os.urandom(BLOCK) for _ in range(5)]
    for i, data in enumerate(blocks):
        host.mem_write(DATA + i * PAGE, data)
        await host.submit(1, sqe(nv.IoOpcode.WRITE, first_cid + i, prp1=DATA + i * PAGE,
                                 cdw=(lba_step * i, 0, 0)), ring=i == ring_at)  # fmt: skip
    return blocks


async def _go_on_with(
    host: Host, destination: Client, blocks: list[bytes], *, first_cid: int, lba_step: int
) -> None:
    """The host switched to ``destination``: the five writes complete in order there and
    read back what was written."""
    host.client = destination
    host.irqs = await destination.enable_irqs(PciIrq.MSIX)
    cids = [(await host.completion(1)).cid for _ in range(5)]
    assert cids == list(range(first_cid, first_cid + 5))
    for i, data in enumerate(blocks):
        assert (await host.read_blocks(1, lba_step * i, 1)).status == nv.SUCCESS
        assert host.mem_read(DATA, BLOCK) == data


async def test_migrates_with_completions_the_host_had_no_room_for(tmp_path: Path) -> None:
    """Five writes on the source with a 4-entry CQ nobody drains: three complete there,
    two wait for room; the destination, given the same guest memory, posts those two once
    the host consumes, and holds the data the source wrote (a namespace in memory)."""
    source_device = NvmeController(MemoryBacking(1 << 20))
    destination_device = NvmeController(MemoryBacking(1 << 20))
    try:
        with trio.fail_after(TIMEOUT), GuestMemory(MEMORY) as memory:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, source_device, tmp_path / "src.sock")
                await nursery.start(serve, destination_device, tmp_path / "dst.sock")
                async with (
                    connect(tmp_path / "src.sock") as source,
                    connect(tmp_path / "dst.sock") as destination,
                ):
                    host = await _host_on_a_small_cq(source, destination, memory)
                    blocks = await _write_five_blocks(host, first_cid=100, lba_step=10, ring_at=3)
                    await host.set_reg(nv.DOORBELLS + 8, host.queues[1].sq_tail)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(source_device.cqs[1].pending) == 2
                    await migrate(source, destination, track_dirty=False)
                    # The host goes on with the destination.
                    await _go_on_with(host, destination, blocks, first_cid=100, lba_step=10)
                    assert await host.reg(nv.CSTS) == nv.CSTS_RDY
                nursery.cancel_scope.cancel()
    finally:
        source_device.close()
        destination_device.close()


async def test_keep_alive_coalescing_and_events_migrate(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """KATO, the coalescing settings, the thresholds and a masked SMART event travel; the
    Keep Alive Timer rests while stopped and runs on the destination once it runs."""
    source_device = NvmeController(MemoryBacking(1 << 20))
    destination_device = NvmeController(MemoryBacking(1 << 20))
    A, F = nv.AdminOpcode, nv.Feature
    try:
        with GuestMemory(MEMORY) as memory:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, source_device, tmp_path / "src.sock")
                await nursery.start(serve, destination_device, tmp_path / "dst.sock")
                async with (
                    connect(tmp_path / "src.sock") as source,
                    connect(tmp_path / "dst.sock") as destination,
                ):
                    host = await _host_on_a_small_cq(source, destination, memory)
                    settings = {
                        F.INTERRUPT_COALESCING: 5 << 8 | 2,
                        F.ASYNC_EVENT_CONFIGURATION: nv.CRITICAL_TEMPERATURE,
                        F.TEMPERATURE_THRESHOLD: 300,  # a warning; no AER held: pending
                        F.KEEP_ALIVE_TIMER: 500,
                    }
                    for fid, value in settings.items():
                        assert (await host.admin(A.SET_FEATURES, cdw=(fid, value))).status == 0
                    await trio.sleep(0.4)
                    assert (await host.admin(A.KEEP_ALIVE)).status == nv.SUCCESS
                    await migrate(source, destination, track_dirty=False)
                    await trio.sleep(0.4)  # the destination's timer started afresh
                    host.client = destination
                    host.irqs = await destination.enable_irqs(PciIrq.MSIX)
                    for fid, value in settings.items():
                        done = await host.admin(A.GET_FEATURES, cdw=(fid,))
                        assert (done.status, done.result) == (nv.SUCCESS, value)
                    # The SMART event waited for an AER: the destination completes it.
                    await host.submit(0, sqe(A.ASYNC_EVENT_REQUEST, 0x601))
                    event = await host.completion(0)
                    assert (event.cid, event.result) == (0x601, 0x02_01_01)
                    assert await host.reg(nv.CSTS) == nv.CSTS_RDY
                    await trio.sleep(0.6)  # no Keep Alive: expired on the destination
                    assert await host.reg(nv.CSTS) == nv.CSTS_RDY | nv.CSTS_CFS
                nursery.cancel_scope.cancel()
    finally:
        source_device.close()
        destination_device.close()


async def test_a_migration_state_the_controller_could_not_have_saved_is_refused() -> None:
    device = NvmeController(MemoryBacking(1 << 20))
    try:
        saved = b"".join([chunk async for chunk in migration.save_chunks(device)])
        (length,) = struct.unpack_from("<I", saved)
        state = json.loads(saved[4 : 4 + length])
        contents = saved[4 + length :]

        def stream(**changes: object) -> bytes:
            header = json.dumps({**state, **changes}).encode()
            return struct.pack("<I", len(header)) + header + contents

        await device.load_state(stream())  # what it saved loads
        bad = {
            "another size": stream(blocks=1),
            "a file namespace's state": stream(memory=False),
            "a CQ of 1 entry": stream(cqs=[[1, 0, 1, 0, True, 0, 0, 1, []]]),
            "a head past the queue": stream(cqs=[[1, 0, 4, 0, True, 4, 0, 1, []]]),
            "a vector it lacks": stream(cqs=[[1, 0, 4, 9, True, 0, 0, 1, []]]),
            "an SQ on no CQ": stream(sqs=[[1, 0, 4, 1, 0, 0]]),
            "too many completions": stream(cqs=[[1, 0, 2, 0, True, 0, 0, 1, [[0] * 5] * 3]]),
            "too many AERs": stream(async_events=[1, 2, 3, 4, 5]),
            "an unknown feature": stream(features={"99": 1}),
            "a string for a register": stream(registers=["0", 0, 0, 0, 0, 0]),
            "a boolean for a number": stream(allocated=[True, 1]),
            "a held MSI vector it lacks": stream(msi_held=1 << 8),
            "a SMART event flag not a boolean": stream(smart_events=[1, False]),
            "no SMART event flags": stream(smart_events=None),
        }
        outcomes = {}
        for what, data in bad.items():
            try:
                await device.load_state(data)
                outcomes[what] = "loaded"
            except ValueError:
                outcomes[what] = "refused"
        assert outcomes == dict.fromkeys(bad, "refused")
        for cut in (b"", saved[:3], saved[:-1], saved + b"x", b"\xff\xff\xff\xff" + saved[4:]):
            with pytest.raises(ValueError):
                await device.load_state(cut)
    finally:
        device.close()


SHADOW, EVENTS = IOVA + 0x6000, IOVA + 0x7000


def need_event(event: int, new: int, old: int) -> bool:
    """Linux's nvme_dbbuf_need_event: ring when the event index is in [old, new)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


async def test_shadow_doorbells_spare_the_host_its_doorbell_writes(tmp_path: Path) -> None:
    """Doorbell Buffer Config, driven as Linux drives it: the host writes its doorbells
    to memory and writes the register only when the event index asks for it. A command
    submitted while the controller is busy needs no doorbell write at all."""
    backing = GatedBacking(1 << 20)
    device = NvmeController(backing)
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        done = await host.admin(nv.AdminOpcode.IDENTIFY, prp1=DATA, cdw=(nv.Cns.CONTROLLER,))
        assert struct.unpack_from("<H", host.mem_read(DATA, 258), 256)[0] & 1 << 8  # OACS
        done = await host.admin(nv.AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=SHADOW, prp2=EVENTS)
        assert done.status == nv.SUCCESS
        await host.create_io_queues(1, SQ1, CQ1, entries=8, cq_entries=2)
        q = host.queues[1]
        rings = []

        async def submit(entry: bytes) -> None:
            old = q.sq_tail
            await host.submit(1, entry, ring=False)
            host.mem_write(SHADOW + 8, struct.pack("<I", q.sq_tail))
            if need_event(struct.unpack("<I", host.mem_read(EVENTS + 8, 4))[0], q.sq_tail, old):
                rings.append("sq")
                await host.set_reg(nv.DOORBELLS + 8, q.sq_tail)

        async def consume() -> Completion:
            done = await host.completion(1, consume=False)
            old = q.cq_head
            q.cq_head = (q.cq_head + 1) % q.cq_entries
            q.phase ^= q.cq_head == 0
            host.mem_write(SHADOW + 12, struct.pack("<I", q.cq_head))
            if need_event(struct.unpack("<I", host.mem_read(EVENTS + 12, 4))[0], q.cq_head, old):
                rings.append("cq")
                await host.set_reg(nv.DOORBELLS + 12, q.cq_head)
            return done

        await submit(sqe(nv.IoOpcode.READ, 1, prp1=DATA))
        await trio.testing.wait_all_tasks_blocked()
        assert backing.waiting == 1 and rings == ["sq"]
        # Busy with command 1: command 2 goes in the shadow doorbell only.
        await submit(sqe(nv.IoOpcode.FLUSH, 2))
        assert rings == ["sq"]
        backing.gate.set()
        # Command 1 fills the 2-entry CQ; command 2 waits for room, which the host gives
        # in memory and, asked by the event index, by one doorbell write.
        assert (await consume()).cid == 1
        assert (await consume()).cid == 2
        assert rings == ["sq", "cq"]
        # Idle again: the event index asks for the next submission's doorbell.
        await trio.testing.wait_all_tasks_blocked()
        assert struct.unpack("<I", host.mem_read(EVENTS + 8, 4))[0] == q.sq_tail
        await submit(sqe(nv.IoOpcode.FLUSH, 3))
        assert rings == ["sq", "cq", "sq"]
        assert (await consume()).cid == 3
        # Buffers off a page are refused.
        done = await host.admin(nv.AdminOpcode.DOORBELL_BUFFER_CONFIG, prp1=SHADOW + 8,
                                prp2=EVENTS)  # fmt: skip
        assert done.status == nv.INVALID_FIELD


@asynccontextmanager
async def nvme_server(disk: Path, path: Path, *, size: str = "1M") -> AsyncIterator[None]:
    """``vfio-user-trio serve nvme --backing DISK --size SIZE`` in its own process, until
    SIGTERM."""
    async with cli_server(
        "serve", "nvme", f"--backing={disk}", f"--size={size}", f"--socket-path={path}"
    ):
        yield


async def test_migrates_between_two_server_processes_on_one_file(tmp_path: Path) -> None:
    """Two ``serve nvme`` processes on the same backing file (shared storage): writes on
    the source, completions left waiting in a full CQ, ``migrate()``, and the host goes on
    with the destination, which posts what the source could not."""
    disk = tmp_path / "disk.img"
    with trio.fail_after(TIMEOUT * 3), GuestMemory(MEMORY) as memory:
        async with (
            nvme_server(disk, tmp_path / "src.sock"),
            nvme_server(disk, tmp_path / "dst.sock"),
            connect(tmp_path / "src.sock") as source,
            connect(tmp_path / "dst.sock") as destination,
        ):
            host = await _host_on_a_small_cq(source, destination, memory)
            blocks = await _write_five_blocks(host, first_cid=200, lba_step=20, ring_at=4)
            # The CQ holds three; the other two completions wait on the source.
            while nv.CQE.unpack(host.mem_read(CQ1 + 2 * 16, 16))[5] & 1 == 0:
                await host.irqs[1].wait()
            await migrate(source, destination, track_dirty=False)
            await _go_on_with(host, destination, blocks, first_cid=200, lba_step=20)
    image = disk.read_bytes()
    assert all(image[20 * i * BLOCK : (20 * i + 1) * BLOCK] == d for i, d in enumerate(blocks))


async def test_invalid_doorbell_writes_are_error_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A held AER completes with an Error event (Invalid Doorbell Register or Write
    Value, log page 01h); the next waits until the host has read the error log."""
    device = NvmeController(MemoryBacking(1 << 20))
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.create_io_queues(1, SQ1, CQ1, entries=4)
        for cid in (0x301, 0x302):
            await host.submit(0, sqe(nv.AdminOpcode.ASYNC_EVENT_REQUEST, cid))
        await trio.testing.wait_all_tasks_blocked()
        with caplog.at_level(logging.WARNING):
            await host.set_reg(nv.DOORBELLS + 8 * 3, 1)  # no SQ 3: Invalid Doorbell Register
            event = await host.completion(0)
            assert (event.cid, event.status, event.result) == (0x301, nv.SUCCESS, 0x01_01_00)
            # Masked until the error log is read: this one is only a warning.
            await host.set_reg(nv.DOORBELLS + 12, 2)  # CQ 1 head past its tail (0)
            await trio.testing.wait_all_tasks_blocked()
            assert host.peek(0) is None
            done = await host.admin(nv.AdminOpcode.GET_LOG_PAGE, prp1=DATA,
                                    cdw=(nv.LogPage.ERROR | 15 << 16,))  # fmt: skip
            assert done.status == nv.SUCCESS
            await host.set_reg(nv.DOORBELLS + 12, 2)  # Invalid Doorbell Write Value
            event = await host.completion(0)
            assert (event.cid, event.result) == (0x302, 0x01_02_00)
        assert "CQ head doorbell of queue 1 written 2: ignored" in caplog.text
        assert (await host.run(1, nv.IoOpcode.FLUSH)).status == nv.SUCCESS


async def admin_pair(host: Host, entry: bytes) -> dict[int, Completion]:
    """Submit an admin command that also completes a held AER: both completions, by cid."""
    await host.submit(0, entry)
    first = await host.completion(0)
    second = await host.completion(0)
    return {first.cid: first, second.cid: second}


async def test_keep_alive_restarts_the_timer_and_its_expiry_is_controller_fatal(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """KAS is advertised (100 ms); KATO 250 ms rounds up to 300 ms; each Keep Alive starts
    the timer over; without one the controller stops with CSTS.CFS until it is reset."""
    device = NvmeController(MemoryBacking(1 << 20))
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.admin(nv.AdminOpcode.IDENTIFY, prp1=DATA, cdw=(nv.Cns.CONTROLLER,))
        assert struct.unpack_from("<H", host.mem_read(DATA, 4096), 320)[0] == 1  # KAS
        done = await host.admin(nv.AdminOpcode.SET_FEATURES, cdw=(nv.Feature.KEEP_ALIVE_TIMER, 250))
        assert done.status == nv.SUCCESS
        done = await host.admin(nv.AdminOpcode.GET_FEATURES, cdw=(nv.Feature.KEEP_ALIVE_TIMER,))
        assert done.result == 250
        for _ in range(5):  # 1.4 s in all, well past KATO: each Keep Alive in time
            await trio.sleep(0.28)
            assert (await host.admin(nv.AdminOpcode.KEEP_ALIVE)).status == nv.SUCCESS
        assert await host.reg(nv.CSTS) == nv.CSTS_RDY
        with caplog.at_level(logging.WARNING):
            await trio.sleep(0.31)
            assert await host.reg(nv.CSTS) == nv.CSTS_RDY | nv.CSTS_CFS
        assert "keep alive timer expired: no Keep Alive within 250 ms" in caplog.text
        # A controller reset recovers, with the timer off (KATO back to 0).
        await host.set_reg(nv.CC, 0)
        await host.enable()
        await trio.sleep(1)
        assert await host.reg(nv.CSTS) == nv.CSTS_RDY


async def test_interrupt_coalescing_threshold_time_and_per_vector_disable(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Feature 08h: an I/O vector raises its interrupt after THR + 1 entries, or TIME after
    the first; feature 09h's Coalescing Disable turns it off for one vector; the admin
    vector is never coalesced."""
    device = NvmeController(MemoryBacking(1 << 20), io_queues=2)
    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.create_io_queues(1, SQ1, CQ1)
        irq = host.irqs[1]
        done = await host.admin(nv.AdminOpcode.SET_FEATURES,
                                cdw=(nv.Feature.INTERRUPT_COALESCING, 10 << 8 | 3))  # fmt: skip
        assert done.status == nv.SUCCESS  # 4 entries or 1 ms

        async def flushes(count: int) -> float:
            """Post ``count`` flushes; the time their completions were all visible."""
            for _ in range(count):
                await host.submit(1, sqe(nv.IoOpcode.FLUSH, host.next_cid()))
            await trio.testing.wait_all_tasks_blocked()
            return trio.current_time()

        posted = await flushes(2)
        assert irq.try_read() is None  # two entries: held back
        await irq.wait()
        assert trio.current_time() - posted == pytest.approx(0.001, abs=1e-6)
        for _ in range(2):
            assert (await host.completion(1)).status == nv.SUCCESS
        posted = await flushes(4)  # the threshold: at once
        assert irq.try_read() == 1 and trio.current_time() == posted
        for _ in range(4):
            await host.completion(1)
        # Coalescing disabled for vector 1: every completion interrupts at once.
        vector_config = nv.Feature.INTERRUPT_VECTOR_CONFIGURATION
        done = await host.admin(nv.AdminOpcode.SET_FEATURES, cdw=(vector_config, 1 << 16 | 1))
        assert done.status == nv.SUCCESS
        posted = await flushes(1)
        assert irq.try_read() == 1 and trio.current_time() == posted
        await host.completion(1)
        for vector, expected in ((1, 1 << 16 | 1), (2, 2), (0, 1 << 16)):
            done = await host.admin(nv.AdminOpcode.GET_FEATURES, cdw=(vector_config, vector))
            assert (done.status, done.result) == (nv.SUCCESS, expected)
        for opcode in (nv.AdminOpcode.GET_FEATURES, nv.AdminOpcode.SET_FEATURES):
            done = await host.admin(opcode, cdw=(vector_config, 3))
            assert done.status == nv.INVALID_FIELD  # no vector 3 (two I/O queues + admin)
        done = await host.admin(nv.AdminOpcode.SET_FEATURES, cdw=(vector_config, 1 << 16))
        assert done.status == nv.INVALID_FIELD  # the admin vector
        # Back on for vector 1; a controller reset forgets what was being held back.
        await host.admin(nv.AdminOpcode.SET_FEATURES, cdw=(vector_config, 1))
        await flushes(1)
        await host.set_reg(nv.CC, 0)
        await trio.sleep(0.01)
        assert irq.try_read() is None


async def test_a_temperature_threshold_crossed_is_a_smart_event(tmp_path: Path) -> None:
    """Set Features 04h moving the over-temperature threshold to or below the controller's
    313 K sets Critical Warning bit 1 and, when Async Event Configuration bit 1 is set,
    completes a held AER with a SMART / Health event (log page 02h); another waits until
    the host reads the SMART log with RAE clear. Abort never aborts: the AER stays held."""
    device = NvmeController(MemoryBacking(1 << 20))
    A, F = nv.AdminOpcode, nv.Feature
    smart_event = 0x02_01_01  # log page 02h, Temperature Threshold, SMART / Health

    async def threshold(value: int, cid: int = 0x500) -> bytes:
        return sqe(A.SET_FEATURES, cid, cdw=(F.TEMPERATURE_THRESHOLD, value))

    async def warning() -> int:
        await host.admin(A.GET_LOG_PAGE, prp1=DATA, cdw=(nv.LogPage.SMART | 1 << 15 | 127 << 16,))
        return host.mem_read(DATA, 1)[0]

    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.submit(0, sqe(A.ASYNC_EVENT_REQUEST, 0x401))
        # Not enabled in Async Event Configuration: the warning, no event.
        assert (await host.admin(A.SET_FEATURES, cdw=(F.TEMPERATURE_THRESHOLD, 300))).status == 0
        assert await warning() == nv.CRITICAL_TEMPERATURE
        await host.admin(A.SET_FEATURES, cdw=(F.TEMPERATURE_THRESHOLD, 343))
        assert await warning() == 0
        await host.admin(A.SET_FEATURES, cdw=(F.ASYNC_EVENT_CONFIGURATION, nv.CRITICAL_TEMPERATURE))
        done = await host.admin(A.ABORT, cdw=(0x401 << 16,))  # SQ 0, the held AER
        assert (done.status, done.result & 1) == (nv.SUCCESS, 1)  # not aborted
        # Under-temperature threshold above 313 K: the event completes the AER.
        both = await admin_pair(host, await threshold(1 << 20 | 320))
        assert both[0x500].status == nv.SUCCESS
        assert (both[0x401].status, both[0x401].result) == (nv.SUCCESS, smart_event)
        for select, expected in ((0, 343), (1 << 20, 320 | 1 << 20)):
            done = await host.admin(A.GET_FEATURES, cdw=(F.TEMPERATURE_THRESHOLD, select))
            assert done.result == expected
        await host.admin(A.SET_FEATURES, cdw=(F.TEMPERATURE_THRESHOLD, 1 << 20))
        # Masked until the SMART log is read with RAE clear: the next event waits.
        await host.submit(0, sqe(A.ASYNC_EVENT_REQUEST, 0x402))
        assert (await host.run(0, A.SET_FEATURES, cdw=(F.TEMPERATURE_THRESHOLD, 310))).status == 0
        assert await warning() == nv.CRITICAL_TEMPERATURE  # RAE set: still masked
        await trio.testing.wait_all_tasks_blocked()
        assert host.peek(0) is None
        both = await admin_pair(
            host, sqe(A.GET_LOG_PAGE, 0x501, prp1=DATA, cdw=(nv.LogPage.SMART | 127 << 16,))
        )
        assert both[0x501].status == nv.SUCCESS
        assert (both[0x402].status, both[0x402].result) == (nv.SUCCESS, smart_event)
        for bad in (1 << 16 | 300, 2 << 20 | 300):  # a sensor we lack; no such THSEL
            done = await host.admin(A.SET_FEATURES, cdw=(F.TEMPERATURE_THRESHOLD, bad))
            assert done.status == nv.INVALID_FIELD


async def test_a_grown_namespace_is_a_namespace_attribute_notice(tmp_path: Path) -> None:
    """OAES bit 8; with Async Event Configuration bit 8 set, ``grow`` completes a held AER
    with a Notice (Namespace Attribute Changed, log page 04h), Identify Namespace reports
    the new size, log page 04h lists namespace 1 until read; the next notice waits until
    the host has read it with RAE clear (as Linux does), and goes to the next AER."""
    device = NvmeController(FileBacking(tmp_path / "disk.img", 1 << 20))
    A = nv.AdminOpcode
    notice = 0x04_00_02  # log page 04h, Namespace Attribute Changed, Notice

    async def changed_list(retain: bool) -> int:
        cdw10 = nv.LogPage.CHANGED_NAMESPACES | retain << 15 | 1023 << 16
        assert (await host.admin(A.GET_LOG_PAGE, prp1=DATA, cdw=(cdw10,))).status == 0
        return int(struct.unpack_from("<I", host.mem_read(DATA, 4))[0])

    async with nvme_host(device, tmp_path / "nvme.sock") as host:
        await host.create_io_queues(1, SQ1, CQ1)
        await host.admin(A.IDENTIFY, prp1=DATA, cdw=(nv.Cns.CONTROLLER,))
        assert struct.unpack_from("<I", host.mem_read(DATA, 4096), 92)[0] == 1 << 8  # OAES
        await host.admin(A.SET_FEATURES, cdw=(nv.Feature.ASYNC_EVENT_CONFIGURATION, 1 << 8))
        await host.submit(0, sqe(A.ASYNC_EVENT_REQUEST, 0x701))
        await trio.testing.wait_all_tasks_blocked()
        await device.grow(2 << 20)
        event = await host.completion(0)
        assert (event.cid, event.status, event.result) == (0x701, nv.SUCCESS, notice)
        await host.admin(A.IDENTIFY, prp1=DATA, cdw=(nv.Cns.NAMESPACE,))
        assert struct.unpack_from("<Q", host.mem_read(DATA, 8))[0] == (2 << 20) // BLOCK
        assert os.path.getsize(tmp_path / "disk.img") == 2 << 20
        block = (1 << 20) // BLOCK  # the first block past the old size
        assert (await host.write_blocks(1, block, b"g" * BLOCK)).status == nv.SUCCESS
        # Another while masked waits for the log to be read with RAE clear.
        await host.submit(0, sqe(A.ASYNC_EVENT_REQUEST, 0x702))
        await device.grow(3 << 20)
        await trio.testing.wait_all_tasks_blocked()
        assert host.peek(0) is None
        assert await changed_list(retain=True) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert host.peek(0) is None
        await host.submit(0, sqe(A.GET_LOG_PAGE, 0x703, prp1=DATA,
                                 cdw=(nv.LogPage.CHANGED_NAMESPACES | 1023 << 16,)))  # fmt: skip
        both = {(done := await host.completion(0)).cid: done for _ in range(2)}
        assert both[0x703].status == nv.SUCCESS
        assert (both[0x702].status, both[0x702].result) == (nv.SUCCESS, notice)
        assert await changed_list(retain=False) == 1  # the second notice is unread
        assert await changed_list(retain=False) == 0
        with pytest.raises(ValueError, match="cannot grow"):
            await device.grow(1 << 20)
