"""The session fuzzer: a hypothesis state machine that drives one client of a served device.

Well-formed rules take the session into deep states (DMA maps with and without fds, IRQ
eventfds, region I/O, migration arcs and data, dirty logging, reset, unmap-all, a running
DMA engine); mutation rules then send what a buggy or hostile client would (bad argsz,
random payloads, truncated payloads, wrong fd counts and kinds, framing garbage,
disconnects at any point). Every rule named ``finding_*`` reproduces one finding of issue 9
(see :data:`FINDINGS`); a machine runs only the findings in its ``findings`` set, so one
whose fix has not landed can be left out without losing the rest.

After every step: no exception escaped the server, its loop still answers, and a second
device of the same process still answers a REGION_READ. After a hang-up, and at the end of
every case, the process's fds are back to their baseline.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import mmap
import os
import random
import select
import socket
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar, cast

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.fd_leaks import fd_count
from vfiouser_trio.engine import ConnectionClosedError
from vfiouser_trio.examples import dmaengine as de
from vfiouser_trio.protocol import (
    Capabilities,
    DeviceFeatureRequest,
    DeviceGetInfoRequest,
    DeviceResetRequest,
    DmaLoggingControl,
    DmaLoggingRange,
    DmaLoggingReport,
    DmaMapRequest,
    DmaUnmapRequest,
    Feature,
    Header,
    IrqInfoRequest,
    MigDataReadRequest,
    MigDataWriteRequest,
    MigDeviceState,
    MigState,
    PciIrq,
    PciRegion,
    RegionInfoRequest,
    RegionIoFdsRequest,
    RegionReadRequest,
    RegionWriteRequest,
    Request,
    SetIrqsRequest,
    VersionRequest,
)
from vfiouser_trio.protocol.constants import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    DMA_UNMAP_FLAG_ALL,
    HEADER_SIZE,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
    Command,
)
from vfiouser_trio.protocol.errors import VfioUserError

from .world import AWAIT_TIMEOUT, DEVICES, Client, World

PAGE = mmap.PAGESIZE
RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
#: DMA map slots: slot i is at IOVA (i + 1) * SLOT_STRIDE.
SLOTS = 6
SLOT_STRIDE = 1 << 24
MAX_MAP_PAGES = 4
#: Where the dirty-bitmap finding maps its huge message-only window, and how large.
HUGE_IOVA = 1 << 53
HUGE_SIZE = 1 << 52
#: The largest report it asks for (a 32 MiB bitmap: the reply must still fit a 32-bit argsz).
HUGE_REPORT = 1 << 40
#: RSS growth of the whole process (MiB) that counts as "memory not bounded" in one step.
STEP_RSS_GROWTH_MIB = 256
#: The unread-replies finding: how long a stalled socket waits before the client gives up.
UNREAD_STALL = 0.3
#: Most frames one mutated burst sends.
BURST_FRAMES = 64
#: Commands a client sends (and one number no command has).
CLIENT_COMMANDS = [c for c in Command if c not in (Command.DMA_READ, Command.DMA_WRITE)] + [99]

#: Each finding of issue 9 the fuzzer reproduces, by rule name: what it does.
FINDINGS: dict[str, str] = {
    "finding_irq_fd_not_an_eventfd": "SET_IRQS with a pipe, directory or socket, then a trigger",
    "finding_version_bad_max_data_xfer_size": "VERSION with max_data_xfer_size 0 (or absurd), "
    "then message DMA",
    "finding_dma_memfd_shrunk": "DMA_MAP a memfd, ftruncate it to 0, then device DMA (SIGBUS)",
    "finding_dirty_bitmap_huge_window": "DMA_LOGGING_START over a 2^52-byte message-only map",
    "finding_stop_survives_disconnect": "disconnect in STOP/STOP_COPY, then the next client",
    "finding_doorbell_fd_shared": "the doorbell eventfd made blocking or full, then rung",
    "finding_dma_maps_hold_fds": "every fd-backed DMA map keeps an fd open",
    "finding_unread_replies_then_hang_up": "pipeline reads, never read a reply, hang up; "
    "then the next client",
}
#: Findings that, while unfixed, kill the process running the fuzzer itself (a signal, which
#: no check can catch), so the long run leaves them out unless asked (``--findings all``).
#: None now: the shrunk-memfd SIGBUS is guarded since the hardening of issue 9.
PROCESS_KILLING: frozenset[str] = frozenset()


def rss_mib() -> float:
    """This process's resident set size (VmRSS), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@dataclass
class Stats:
    """What a run of the machine did, over all its cases."""

    cases: int = 0
    steps: int = 0
    frames: int = 0
    warnings: int = 0
    peak_rss_mib: float = 0.0
    #: Times each rule ran.
    rules: dict[str, int] = field(default_factory=dict)


F = TypeVar("F", bound=Callable[..., None])


def counted(rule_fn: F) -> F:
    """Count the rule's runs in the machine's :class:`Stats`."""

    @functools.wraps(rule_fn)
    def run(self: SessionMachine, *args: Any, **kwargs: Any) -> None:
        rules = self.stats.rules
        rules[rule_fn.__name__] = rules.get(rule_fn.__name__, 0) + 1
        try:
            rule_fn(self, *args, **kwargs)
        except BaseException:
            self.failed = True  # teardown's own checks must not hide this failure
            raise

    return cast(F, run)


@dataclass
class Map:
    """One DMA map of the session: its window, and the client's view of its memory."""

    iova: int
    size: int
    memory: mmap.mmap | bytearray
    fd_backed: bool


@dataclass
class Wrong:
    """An fd of the wrong kind for the fuzzer to send, and what else it had to open."""

    fd: int
    keep: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in (self.fd, *self.keep):
            os.close(fd)


def wrong_fd(kind: str) -> Wrong:
    """An fd that is not what the command wants: the harness closes it after sending."""
    if kind in ("pipe_read", "pipe_write", "full_pipe"):
        r, w = os.pipe2(os.O_CLOEXEC)
        if kind == "full_pipe":  # blocking, and no room left: a write to it would block
            os.set_blocking(w, False)
            try:
                while True:
                    os.write(w, b"\0" * 65536)
            except BlockingIOError:
                pass
            os.set_blocking(w, True)
        return Wrong(r, [w]) if kind == "pipe_read" else Wrong(w, [r])
    if kind == "directory":
        return Wrong(os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    if kind == "dead_socket":
        a, b = socket.socketpair()
        b.close()
        return Wrong(a.detach())
    if kind == "memfd":
        return Wrong(os.memfd_create("wrong", os.MFD_CLOEXEC))
    if kind == "eventfd":
        return Wrong(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
    raise ValueError(kind)


WRONG_KINDS = [
    "pipe_read",
    "pipe_write",
    "full_pipe",
    "directory",
    "dead_socket",
    "memfd",
    "eventfd",
]
NOT_EVENTFD = [k for k in WRONG_KINDS if k != "eventfd"]
NOT_MEMORY = [k for k in WRONG_KINDS if k != "memfd"]


async def _tolerate(client: Client, command: int, payload: bytes, fds: tuple[int, ...] = ()) -> int:
    """Send a raw command; its errno (0 for success). A lost connection is -1."""
    try:
        frame = await client.conn.request_raw(command, payload, fds)
    except ConnectionClosedError:
        return -1
    except VfioUserError as exc:
        return exc.errno or errno.EIO
    frame.close_fds()
    return 0


def connected(machine: SessionMachine) -> bool:
    """Precondition: a negotiated client is attached."""
    return machine.connected()


class SessionMachine(RuleBasedStateMachine):
    """One case: a fresh world (target + sentinel device), then rules until hypothesis stops."""

    #: The findings this machine reproduces (subclasses narrow it).
    findings: frozenset[str] = frozenset(FINDINGS)
    #: Bound on this process's RSS at the end of every case, in MiB.
    max_rss_mib: float = 1024.0
    #: Where the cases' counts go (one Stats per run; the CLI prints it).
    stats: Stats = Stats()

    def __init__(self) -> None:
        super().__init__()
        self.world: World | None = None
        self.client: Client | None = None
        self.maps: dict[int, Map] = {}
        self.idle_fds = 0
        self.idle_rss = 0.0
        self.process_fds = fd_count()
        #: A step failed: teardown still cleans up but leaves the verdict to that failure.
        self.failed = False

    # --- set-up and tear-down -----------------------------------------------------------------

    @initialize(device=st.sampled_from(list(DEVICES)))
    def start_world(self, device: str) -> None:
        world = World(device)
        self.world = world
        world.start()
        world.run(world.sentinel_answers)
        self.idle_fds = fd_count()
        self.idle_rss = rss_mib()
        dev = world.target
        self.regions = {
            i: region.size
            for i in range(dev._vfu.num_regions)
            if (region := dev.region(i)) is not None and region.size > 0
        }
        self.irqs = {i: dev.irqs.info(i).count for i in range(dev.irqs.num_irqs)}
        self.irqs = {i: n for i, n in self.irqs.items() if n > 0}
        self.migrates = dev.migration is not None

    def teardown(self) -> None:
        stats = self.stats
        try:
            if self.world is not None:
                try:
                    self._hang_up()
                    self.world.stop()
                except AssertionError:
                    if not self.failed:
                        raise
                stats.frames += self.world.frames
                stats.warnings += self.world.log.warnings
        finally:
            self._forget_maps()
        stats.cases += 1
        rss = rss_mib()
        stats.peak_rss_mib = max(stats.peak_rss_mib, rss)
        if self.failed:
            return
        assert fd_count() == self.process_fds, "fds leaked by the case"
        assert rss < self.max_rss_mib, f"RSS {rss:.0f} MiB after a case"

    @invariant()
    def other_device_still_answers(self) -> None:
        if self.world is not None:
            self.stats.steps += 1
            self.world.run(self.world.sentinel_answers)
            errors = self.world.log.errors
            assert not errors, f"the server logged an error: {errors[0]}"
            grown = rss_mib() - self.idle_rss
            assert grown < STEP_RSS_GROWTH_MIB, f"RSS grew by {grown:.0f} MiB"

    # --- helpers ------------------------------------------------------------------------------

    @property
    def w(self) -> World:
        assert self.world is not None
        return self.world

    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    def connected(self) -> bool:
        return self.client is not None and self.client.negotiated

    def send(self, request: Request) -> int:
        """Send a typed request; its errno (0 for success, -1 if the connection went)."""
        return self.send_raw(request.COMMAND, request.pack(), request.fds)

    def send_raw(self, command: int, payload: bytes, fds: tuple[int, ...] = ()) -> int:
        self.w.frames += 1
        code = self.w.run(_tolerate, self.c, command, payload, fds)
        if code == -1:
            self._lost()
        return code

    def well_formed(self, request: Request) -> int:
        """A well-formed request may fail, but it must not cost the connection."""
        code = self.send(request)
        assert code != -1, f"the server hung up on a well-formed {request!r}"
        return code

    def _forget_maps(self) -> None:
        for m in self.maps.values():
            if isinstance(m.memory, mmap.mmap):
                m.memory.close()
        self.maps.clear()

    def _lost(self) -> None:
        """The server closed the connection: clean up as a client would, check fds."""
        self._hang_up()

    def _hang_up(self) -> None:
        if self.client is None:
            return
        client, self.client = self.client, None
        self.w.run(self.w.hang_up, client)
        self._forget_maps()
        now = fd_count()
        assert now == self.idle_fds, f"{now - self.idle_fds:+d} fds after the connection closed"

    def _open(self, *, twin: bool, caps: Capabilities | None = None) -> None:
        self.w.run(self.w.settle)  # the previous session's teardown is over
        self.client = self.w.run(self.w.connect, self.w.target_path)
        self.w.run(partial(self.w.negotiate, self.client, twin=twin, caps=caps))

    # --- connecting ---------------------------------------------------------------------------

    @precondition(lambda self: self.world is not None and self.client is None)
    @rule(twin=st.booleans())
    @counted
    def connect(self, twin: bool) -> None:
        self._open(twin=twin)

    @precondition(lambda self: self.client is not None)
    @rule()
    @counted
    def disconnect(self) -> None:
        self._hang_up()

    @precondition(connected)
    @rule(writes=st.integers(1, 64))
    @counted
    def disconnect_with_requests_in_flight(self, writes: int) -> None:
        """Queue No_reply writes and a read, then hang up before any answer."""
        region, size = next(iter(self.regions.items()))

        async def burst() -> None:
            for i in range(writes):
                write = RegionWriteRequest(region, (i * 4) % max(size - 4, 1), bytes(4))
                await self.c.conn.post_raw(write.COMMAND, write.pack())

        self.w.frames += writes
        with contextlib.suppress(ConnectionClosedError):
            self.w.run(burst)
        self._hang_up()

    # --- well-formed session ------------------------------------------------------------------

    @precondition(connected)
    @rule(which=st.integers(0, 12))
    @counted
    def infos(self, which: int) -> None:
        self.well_formed(DeviceGetInfoRequest())
        self.well_formed(RegionInfoRequest(which))
        self.well_formed(IrqInfoRequest(which % 6))
        self.well_formed(RegionIoFdsRequest(which))

    @precondition(connected)
    @rule(data=st.data())
    @counted
    def region_access(self, data: st.DataObject) -> None:
        region = data.draw(st.sampled_from(sorted(self.regions)))
        size = self.regions[region]
        count = data.draw(st.sampled_from([1, 2, 4, 8, 64]))
        offset = data.draw(st.integers(0, size + 8))
        if data.draw(st.booleans()):
            self.well_formed(RegionReadRequest(region, offset, count))
        else:
            payload = data.draw(st.binary(min_size=count, max_size=count))
            self.well_formed(RegionWriteRequest(region, offset, payload))

    @precondition(lambda self: connected(self) and len(self.maps) < SLOTS)
    @rule(data=st.data(), fd_backed=st.booleans(), pages=st.integers(1, MAX_MAP_PAGES))
    @counted
    def dma_map(self, data: st.DataObject, fd_backed: bool, pages: int) -> None:
        slot = data.draw(st.sampled_from([s for s in range(SLOTS) if s not in self.maps]))
        iova, size = (slot + 1) * SLOT_STRIDE, pages * PAGE
        flags = data.draw(st.sampled_from([RW, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE]))
        memory: mmap.mmap | bytearray
        if fd_backed:
            fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                memory = mmap.mmap(fd, size)
                code = self.well_formed(DmaMapRequest(iova, size, flags, fds=(fd,)))
            finally:
                os.close(fd)
        else:
            memory = bytearray(size)
            self.c.ram.windows[iova] = memory
            code = self.well_formed(DmaMapRequest(iova, size, flags))
        if code == 0:
            self.maps[slot] = Map(iova, size, memory, fd_backed)
        else:
            self.c.ram.windows.pop(iova, None)
            if isinstance(memory, mmap.mmap):
                memory.close()

    @precondition(lambda self: connected(self) and bool(self.maps))
    @rule(data=st.data())
    @counted
    def dma_unmap(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.maps)))
        m = self.maps[slot]
        if self.well_formed(DmaUnmapRequest(m.iova, m.size)) == 0:
            del self.maps[slot]
            self.c.ram.windows.pop(m.iova, None)
            if isinstance(m.memory, mmap.mmap):
                m.memory.close()

    @precondition(connected)
    @rule()
    @counted
    def dma_unmap_all(self) -> None:
        if self.well_formed(DmaUnmapRequest(0, 0, DMA_UNMAP_FLAG_ALL)) == 0:
            self.c.ram.windows.clear()
            self._forget_maps()

    @precondition(lambda self: connected(self) and bool(self.irqs))
    @rule(data=st.data())
    @counted
    def set_irq_eventfds(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from(sorted(self.irqs)))
        count = data.draw(st.integers(1, self.irqs[index]))
        fds = tuple(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(count))
        try:
            flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
            self.well_formed(SetIrqsRequest(index, flags, 0, count, fds=fds))
        finally:
            for fd in fds:
                os.close(fd)

    @precondition(lambda self: connected(self) and bool(self.irqs))
    @rule(data=st.data())
    @counted
    def irq_action(self, data: st.DataObject) -> None:
        index = data.draw(st.sampled_from(sorted(self.irqs)))
        action = data.draw(
            st.sampled_from([IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_UNMASK])
        )
        count = data.draw(st.integers(0 if action == IRQ_SET_ACTION_TRIGGER else 1, 1))
        self.well_formed(SetIrqsRequest(index, action | IRQ_SET_DATA_NONE, 0, count))

    @precondition(connected)
    @rule()
    @counted
    def reset(self) -> None:
        self.well_formed(DeviceResetRequest())

    @precondition(lambda self: connected(self) and self.migrates)
    @rule(state=st.sampled_from(list(MigState)))
    @counted
    def migration_set_state(self, state: MigState) -> None:
        self.well_formed(DeviceFeatureRequest.set(Feature.MIG_DEVICE_STATE, MigDeviceState(state)))
        self.well_formed(DeviceFeatureRequest.get(Feature.MIG_DEVICE_STATE))

    @precondition(lambda self: connected(self) and self.migrates)
    @rule(size=st.sampled_from([1, 64, 4096]), payload=st.binary(max_size=64))
    @counted
    def migration_data(self, size: int, payload: bytes) -> None:
        self.well_formed(MigDataReadRequest(size))
        if payload:
            self.well_formed(MigDataWriteRequest(payload))

    @precondition(lambda self: connected(self) and self.migrates)
    @rule()
    @counted
    def migration_round_trip(self) -> None:
        """Save the device's whole state (STOP_COPY) and load it back (RESUMING)."""
        set_state = DeviceFeatureRequest.set
        if self.well_formed(set_state(Feature.MIG_DEVICE_STATE, MigDeviceState(MigState.STOP))):
            return  # not from this state: the other rules get it elsewhere
        self.well_formed(set_state(Feature.MIG_DEVICE_STATE, MigDeviceState(MigState.STOP_COPY)))
        stream = self.w.run(_read_stream, self.c)
        for state in (MigState.STOP, MigState.RESUMING):
            self.well_formed(set_state(Feature.MIG_DEVICE_STATE, MigDeviceState(state)))
        for pos in range(0, len(stream), 4096):
            self.well_formed(MigDataWriteRequest(stream[pos : pos + 4096]))
        for state in (MigState.STOP, MigState.RUNNING):
            self.well_formed(set_state(Feature.MIG_DEVICE_STATE, MigDeviceState(state)))

    @precondition(lambda self: connected(self) and self.migrates)
    @rule(page=st.sampled_from([PAGE, 2 * PAGE, 1 << 16]), whole=st.booleans())
    @counted
    def dirty_logging(self, page: int, whole: bool) -> None:
        ranges = tuple(DmaLoggingRange(m.iova, m.size) for m in self.maps.values())
        control = DmaLoggingControl(page, ranges if whole else ranges[:1])
        self.well_formed(DeviceFeatureRequest.set(Feature.DMA_LOGGING_START, control))
        for m in self.maps.values():
            report = DmaLoggingReport(m.iova, m.size, page)
            self.well_formed(DeviceFeatureRequest.get(Feature.DMA_LOGGING_REPORT, report))

    @precondition(lambda self: connected(self) and self.migrates)
    @rule()
    @counted
    def dirty_logging_stop(self) -> None:
        self.well_formed(DeviceFeatureRequest.set(Feature.DMA_LOGGING_STOP, DmaLoggingControl(0)))

    @precondition(
        lambda self: connected(self) and self.w.target_name == "dmaengine" and bool(self.maps)
    )
    @rule(data=st.data(), length=st.integers(1, 512))
    @counted
    def dmaengine_copy(self, data: st.DataObject, length: int) -> None:
        """Program a one-descriptor ring in a DMA map and ring the doorbell: the device DMAs
        (views for fd maps, DMA_READ/WRITE messages otherwise) and raises MSI-X vector 0."""
        m = self.maps[data.draw(st.sampled_from(sorted(self.maps)))]
        self.kick_engine(m, length)

    def kick_engine(self, m: Map, length: int) -> None:
        length = min(length, m.size // 2 - de.DESCRIPTOR_SIZE)
        src, dst = m.iova + de.DESCRIPTOR_SIZE, m.iova + m.size // 2
        m.memory[: de.DESCRIPTOR_SIZE] = de.DESCRIPTOR.pack(src, dst, length, 0, 0)
        m.memory[de.FLAGS_OFFSET : de.FLAGS_OFFSET + 4] = de.DESC_VALID.to_bytes(4, "little")
        command = (0x6).to_bytes(2, "little")  # memory space and bus mastering
        bar0 = de.REGISTER_BAR
        for region, offset, value in (
            (PciRegion.CONFIG, 0x04, command),
            (bar0, de.CONTROL, (0).to_bytes(4, "little")),
            (bar0, de.RING_BASE_LO, m.iova.to_bytes(8, "little")),
            (bar0, de.RING_SIZE, (1).to_bytes(4, "little")),
            (bar0, de.CONTROL, (de.CONTROL_ENABLE | de.CONTROL_IRQ_ENABLE).to_bytes(4, "little")),
            (bar0, de.TAIL, (1).to_bytes(4, "little")),
        ):
            self.well_formed(RegionWriteRequest(region, offset, value))
        self.w.run(self.w.settle)  # let the engine run the descriptor

    # --- mutations ----------------------------------------------------------------------------

    @precondition(connected)
    @rule(data=st.data(), frames=st.integers(1, BURST_FRAMES), seed=st.integers(0, 2**32 - 1))
    @counted
    def mutated_frames_burst(self, data: st.DataObject, frames: int, seed: int) -> None:
        """Many frames in one step: valid requests with bytes flipped, cut or added (a cheap
        frame-level mutator; the seed makes the burst reproducible)."""
        base = data.draw(st.lists(self.valid_requests(), min_size=1, max_size=4))
        rng = random.Random(seed)
        burst: list[tuple[int, bytes]] = []
        for _ in range(frames):
            request = rng.choice(base)
            payload = bytearray(request.pack())
            for _ in range(rng.randint(1, 3)):
                how = rng.randrange(3)
                if how == 0 and payload:
                    payload[rng.randrange(len(payload))] = rng.randrange(256)
                elif how == 1:
                    del payload[rng.randrange(len(payload) + 1) :]
                else:
                    payload += rng.randbytes(rng.randint(1, 16))
            burst.append((request.COMMAND, bytes(payload)))
        sent = self.w.run(_send_burst, self.c, burst)
        self.w.frames += sent
        if sent < len(burst):
            self._lost()

    @precondition(connected)
    @rule(
        command=st.sampled_from(CLIENT_COMMANDS),
        payload=st.binary(max_size=96),
    )
    @counted
    def random_payload(self, command: int, payload: bytes) -> None:
        self.send_raw(command, payload)

    @precondition(connected)
    @rule(data=st.data(), argsz=st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)))
    @counted
    def bad_argsz(self, data: st.DataObject, argsz: int) -> None:
        request = data.draw(self.valid_requests())
        payload = bytearray(request.pack())
        if len(payload) >= 4:
            payload[:4] = struct.pack("=I", argsz)
        self.send_raw(request.COMMAND, bytes(payload))

    @precondition(connected)
    @rule(data=st.data())
    @counted
    def truncated_payload(self, data: st.DataObject) -> None:
        request = data.draw(self.valid_requests())
        payload = request.pack()
        self.send_raw(
            request.COMMAND, payload[: data.draw(st.integers(0, max(len(payload) - 1, 0)))]
        )

    @precondition(connected)
    @rule(data=st.data(), kinds=st.lists(st.sampled_from(WRONG_KINDS), min_size=1, max_size=3))
    @counted
    def wrong_fd_count(self, data: st.DataObject, kinds: list[str]) -> None:
        """A valid command carrying fds it does not take, or too many of them."""
        request = data.draw(self.valid_requests())
        wrongs = [wrong_fd(k) for k in kinds]
        try:
            self.send_raw(request.COMMAND, request.pack(), tuple(w.fd for w in wrongs))
        finally:
            for w in wrongs:
                w.close()

    @precondition(connected)
    @rule(kind=st.sampled_from(NOT_MEMORY), pages=st.integers(1, 2))
    @counted
    def dma_map_wrong_fd(self, kind: str, pages: int) -> None:
        wrong = wrong_fd(kind)
        try:
            self.send(DmaMapRequest(SLOTS * 2 * SLOT_STRIDE, pages * PAGE, RW, fds=(wrong.fd,)))
        finally:
            wrong.close()
        # Whatever the server did with it, the window must not be left half-mapped.
        self.send(DmaUnmapRequest(SLOTS * 2 * SLOT_STRIDE, pages * PAGE))

    @precondition(connected)
    @rule(
        msg_size=st.one_of(st.integers(0, 15), st.integers(1 << 20, 2**32 - 1)),
        command=st.sampled_from(CLIENT_COMMANDS),
        flags=st.integers(0, 2**32 - 1),
    )
    @counted
    def oversized_or_undersized_header(self, msg_size: int, command: int, flags: int) -> None:
        header = struct.pack("=HHIII", 0xFFF0, command, msg_size, flags & 0xFF, 0)
        self.raw_and_settle(header + bytes(16))
        self._hang_up()  # the stream is out of step now, whatever the server made of it

    @precondition(connected)
    @rule(data=st.data())
    @counted
    def truncated_frame_then_hang_up(self, data: st.DataObject) -> None:
        request = data.draw(self.valid_requests())
        payload = request.pack()
        frame = Header(0xFFF1, request.COMMAND, HEADER_SIZE + len(payload)).pack() + payload
        self.raw_and_settle(frame[: data.draw(st.integers(1, len(frame) - 1))])
        self._hang_up()

    @precondition(connected)
    @rule(junk=st.binary(min_size=1, max_size=256))
    @counted
    def random_bytes_on_the_stream(self, junk: bytes) -> None:
        self.raw_and_settle(junk)
        self._hang_up()  # the stream is out of step now, whatever the server made of it

    @precondition(connected)
    @rule(kind=st.sampled_from(WRONG_KINDS), count=st.integers(0, 4))
    @counted
    def raw_frame_with_fds(self, kind: str, count: int) -> None:
        """A header-only REGION_READ frame with fds attached straight on the socket."""
        wrongs = [wrong_fd(kind) for _ in range(count)]
        try:
            header = struct.pack("=HHIII", 0xFFF2, Command.REGION_READ, HEADER_SIZE, 0, 0)
            self.raw_and_settle(header, tuple(w.fd for w in wrongs))
        finally:
            for w in wrongs:
                w.close()

    def raw_and_settle(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Write bytes straight on the client's socket; if the server hung up, clean up."""
        self.w.frames += 1
        with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
            if fds:
                socket.send_fds(self.c.raw, [data], list(fds))
            else:
                self.c.raw.send(data)
        self.w.run(self.w.settle)
        if self.c.conn.closed.is_set():
            self._lost()

    def valid_requests(self) -> st.SearchStrategy[Request]:
        region = st.sampled_from(sorted(self.regions))
        return st.one_of(
            st.builds(DeviceGetInfoRequest),
            st.builds(RegionInfoRequest, st.integers(0, 9)),
            st.builds(IrqInfoRequest, st.integers(0, 5)),
            st.builds(RegionReadRequest, region, st.integers(0, 16), st.just(4)),
            st.builds(RegionWriteRequest, region, st.integers(0, 16), st.just(bytes(4))),
            st.builds(DmaMapRequest, st.just(SLOTS * 3 * SLOT_STRIDE), st.just(PAGE)),
            st.builds(DmaUnmapRequest, st.just(SLOTS * 3 * SLOT_STRIDE), st.just(PAGE)),
            st.builds(
                SetIrqsRequest,
                st.just(PciIrq.MSIX),
                st.just(IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE),
                st.just(0),
                st.just(1),
            ),
            st.builds(MigDataReadRequest, st.sampled_from([1, 64])),
            st.just(DeviceFeatureRequest.get(Feature.MIG_DEVICE_STATE)),
            st.just(DeviceFeatureRequest.probe(Feature.MIGRATION, get=True)),
        )

    # --- the findings of issue 9, one rule each -----------------------------------------------

    @precondition(
        lambda self: (
            "finding_irq_fd_not_an_eventfd" in self.findings
            and connected(self)
            and PciIrq.MSIX in self.irqs
        )
    )
    @rule(kind=st.sampled_from(NOT_EVENTFD))
    @counted
    def finding_irq_fd_not_an_eventfd(self, kind: str) -> None:
        """SET_IRQS must refuse what is not an eventfd; a trigger must never fail the process."""
        wrong = wrong_fd(kind)
        try:
            flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
            self.send(SetIrqsRequest(PciIrq.MSIX, flags, 0, 1, fds=(wrong.fd,)))
        finally:
            wrong.close()
        if self.connected():
            self.send(SetIrqsRequest(PciIrq.MSIX, IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE, 0, 1))
        fd_maps = [m for m in self.maps.values() if m.fd_backed]
        if self.connected() and self.w.target_name == "dmaengine" and fd_maps:
            self.kick_engine(fd_maps[0], 16)  # the trigger from the device's own task

    @precondition(
        lambda self: (
            "finding_version_bad_max_data_xfer_size" in self.findings
            and self.world is not None
            and self.client is None
        )
    )
    @rule(value=st.sampled_from([0, -1, 1, 2**64, "4096", None, 1.5]))
    @counted
    def finding_version_bad_max_data_xfer_size(self, value: object) -> None:
        """VERSION with a bad max_data_xfer_size is refused (or harmless), then DMA by messages."""
        self.w.run(self.w.settle)
        self.client = self.w.run(self.w.connect, self.w.target_path)
        caps = {"max_msg_fds": 8, "max_data_xfer_size": value}
        payload = struct.pack("=HH", 0, 2) + json.dumps({"capabilities": caps}).encode() + b"\0"
        if self.send_raw(Command.VERSION, payload) != 0:
            if self.client is not None:
                self._hang_up()
            self._open(twin=False)  # refused: a well-behaved client goes on from here
            return
        self.c.negotiated = True
        if self.w.target_name == "dmaengine":
            memory = bytearray(2 * PAGE)
            self.c.ram.windows[SLOT_STRIDE] = memory
            if self.well_formed(DmaMapRequest(SLOT_STRIDE, 2 * PAGE, RW)) == 0:
                self.maps[0] = Map(SLOT_STRIDE, 2 * PAGE, memory, False)
                self.kick_engine(self.maps[0], 64)

    @precondition(
        lambda self: (
            "finding_dma_memfd_shrunk" in self.findings
            and connected(self)
            and self.w.target_name == "dmaengine"
            and 0 not in self.maps
        )
    )
    @rule()
    @counted
    def finding_dma_memfd_shrunk(self) -> None:
        """A DMA memfd shrunk after DMA_MAP: device DMA must fail cleanly, not SIGBUS."""
        fd = os.memfd_create("fuzz-shrink", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 2 * PAGE)
            if self.send(DmaMapRequest(SLOT_STRIDE, 2 * PAGE, RW, fds=(fd,))) != 0:
                return
            # The ring goes in before the shrink; after it, the file has no pages at all.
            os.pwrite(fd, de.DESCRIPTOR.pack(SLOT_STRIDE + 64, SLOT_STRIDE + PAGE, 64, 1, 0), 0)
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        for region, offset, value in (
            (PciRegion.CONFIG, 0x04, (0x6).to_bytes(2, "little")),
            (de.REGISTER_BAR, de.CONTROL, (0).to_bytes(4, "little")),
            (de.REGISTER_BAR, de.RING_BASE_LO, SLOT_STRIDE.to_bytes(8, "little")),
            (de.REGISTER_BAR, de.RING_SIZE, (1).to_bytes(4, "little")),
            (de.REGISTER_BAR, de.CONTROL, de.CONTROL_ENABLE.to_bytes(4, "little")),
            (de.REGISTER_BAR, de.TAIL, (1).to_bytes(4, "little")),
        ):
            self.send(RegionWriteRequest(region, offset, value))
        self.w.run(self.w.settle)
        self.send(DmaUnmapRequest(SLOT_STRIDE, 2 * PAGE))

    @precondition(
        lambda self: (
            "finding_dirty_bitmap_huge_window" in self.findings
            and connected(self)
            and self.migrates
        )
    )
    @rule()
    @counted
    def finding_dirty_bitmap_huge_window(self) -> None:
        """Logging over a huge message-only map: refused or lazy, never the whole bitmap, when
        the device writes into the map (the dmaengine) or the client asks for a report."""
        memory = bytearray(2 * PAGE)  # the client backs only the start of the window
        self.c.ram.windows[HUGE_IOVA] = memory
        if self.send(DmaMapRequest(HUGE_IOVA, HUGE_SIZE, RW)) != 0:
            self.c.ram.windows.pop(HUGE_IOVA, None)
            return
        control = DmaLoggingControl(PAGE, (DmaLoggingRange(HUGE_IOVA, HUGE_SIZE),))
        if self.send(DeviceFeatureRequest.set(Feature.DMA_LOGGING_START, control)) == 0:
            if self.w.target_name == "dmaengine":
                self.kick_engine(Map(HUGE_IOVA, 2 * PAGE, memory, False), 64)
            for length in (2 * PAGE, HUGE_REPORT):
                if self.connected():
                    report = DmaLoggingReport(HUGE_IOVA, length, PAGE)
                    self.send(DeviceFeatureRequest.get(Feature.DMA_LOGGING_REPORT, report))
        grown = rss_mib() - self.idle_rss
        assert grown < STEP_RSS_GROWTH_MIB, f"dirty logging grew RSS by {grown:.0f} MiB"
        if self.connected():
            self.send(DeviceFeatureRequest.set(Feature.DMA_LOGGING_STOP, DmaLoggingControl(0)))
        if self.connected():
            self.send(DmaUnmapRequest(HUGE_IOVA, HUGE_SIZE))
        if self.client is not None:
            self.c.ram.windows.pop(HUGE_IOVA, None)

    @precondition(
        lambda self: (
            "finding_stop_survives_disconnect" in self.findings
            and connected(self)
            and self.migrates
        )
    )
    @rule(stop_copy=st.booleans(), twin=st.booleans())
    @counted
    def finding_stop_survives_disconnect(self, stop_copy: bool, twin: bool) -> None:
        """A client that leaves a stopped device: the next one finds it RUNNING and usable."""
        set_state = DeviceFeatureRequest.set
        if self.send(set_state(Feature.MIG_DEVICE_STATE, MigDeviceState(MigState.STOP))):
            return
        if stop_copy:
            self.send(set_state(Feature.MIG_DEVICE_STATE, MigDeviceState(MigState.STOP_COPY)))
        self._hang_up()
        self._open(twin=twin)
        code = self.well_formed(DeviceGetInfoRequest())
        assert code == 0, f"GET_INFO refused after a detach: {errno.errorcode.get(code, code)}"
        assert self.well_formed(RegionInfoRequest(0)) in (0, errno.EINVAL)
        state = self.w.run(_device_state, self.c)
        assert state == MigState.RUNNING, f"the next client finds the device in {state!r}"

    @precondition(
        lambda self: (
            "finding_doorbell_fd_shared" in self.findings
            and connected(self)
            and self.w.target_name == "dmaengine"
        )
    )
    @rule(blocking=st.booleans())
    @counted
    def finding_doorbell_fd_shared(self, blocking: bool) -> None:
        """The client makes its doorbell eventfd blocking, or fills it; then rings via TAIL."""
        fds = self.w.run(_io_fds, self.c, de.REGISTER_BAR)
        try:
            for fd in fds:
                if blocking:
                    os.set_blocking(fd, True)
                else:
                    os.set_blocking(fd, False)
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
            for _ in range(2):
                self.send(RegionWriteRequest(de.REGISTER_BAR, de.TAIL, (1).to_bytes(4, "little")))
            self.w.run(self.w.settle)
        finally:
            for fd in fds:
                os.close(fd)

    @precondition(
        lambda self: (
            "finding_unread_replies_then_hang_up" in self.findings
            and self.world is not None
            and self.client is None
        )
    )
    @rule(requests=st.sampled_from([1000, 50_000]))
    @counted
    def finding_unread_replies_then_hang_up(self, requests: int) -> None:
        """A client that never reads its replies costs bounded memory, and once it hangs up
        the device takes its next client."""
        self.w.run(self.w.settle)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(AWAIT_TIMEOUT)
            sock.connect(str(self.w.target_path))
            version = VersionRequest(0, 2, Capabilities(max_msg_fds=8)).pack()
            sock.sendall(Header(0, Command.VERSION, HEADER_SIZE + len(version)).pack() + version)
            reply = Header.unpack(sock.recv(HEADER_SIZE, socket.MSG_WAITALL))
            sock.recv(reply.msg_size - HEADER_SIZE, socket.MSG_WAITALL)
            region, size = next(iter(self.regions.items()))
            read = RegionReadRequest(region, 0, min(size, 4)).pack()
            frames = memoryview(
                (Header(1, Command.REGION_READ, HEADER_SIZE + len(read)).pack() + read) * requests
            )
            sock.setblocking(False)
            sent = 0
            while sent < len(frames):
                try:
                    sent += sock.send(frames[sent : sent + 65536])
                except BlockingIOError:
                    if not select.select([], [sock], [], UNREAD_STALL)[1]:
                        break  # the server stopped reading us: what it should do
            self.w.frames += sent // (HEADER_SIZE + len(read))
            self.w.run(self.w.settle)
            grown = rss_mib() - self.idle_rss
            assert grown < STEP_RSS_GROWTH_MIB, f"unread replies grew RSS by {grown:.0f} MiB"
        finally:
            sock.close()
        self.w.run(self.w.settle)
        try:
            self._open(twin=False)
        except VfioUserError as exc:
            if self.client is not None:
                self._hang_up()
            code = errno.errorcode.get(exc.errno or 0, exc.errno)
            raise AssertionError(f"the next client is refused ({code}) after the hang-up") from exc

    @precondition(
        lambda self: (
            "finding_dma_maps_hold_fds" in self.findings and connected(self) and not self.maps
        )
    )
    @rule()
    @counted
    def finding_dma_maps_hold_fds(self) -> None:
        """Sixteen fd-backed maps must not hold sixteen fds in the server."""
        before = fd_count()
        mapped = []
        for i in range(16):
            fd = os.memfd_create("fuzz-many", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, PAGE)
                if self.send(DmaMapRequest((i + 1) * SLOT_STRIDE, PAGE, RW, fds=(fd,))) == 0:
                    mapped.append((i + 1) * SLOT_STRIDE)
            finally:
                os.close(fd)
        held = fd_count() - before
        for iova in mapped:
            if self.connected():
                self.send(DmaUnmapRequest(iova, PAGE))
        # No map taken (the device refuses DMA_MAP in this state): nothing to judge.
        assert not mapped or held < len(mapped), f"{len(mapped)} fd-backed maps hold {held} fds"


async def _send_burst(client: Client, burst: list[tuple[int, bytes]]) -> int:
    """Send each (command, payload), tolerating errors; how many were sent before the
    connection went (all of them if it stayed)."""
    for sent, (command, payload) in enumerate(burst):
        if await _tolerate(client, command, payload) == -1:
            return sent
    return len(burst)


async def _read_stream(client: Client) -> bytes:
    """MIG_DATA_READ until a short read (the whole stop-copy stream)."""
    data = bytearray()
    while True:
        frame = await client.conn.request_raw(
            Command.MIG_DATA_READ, MigDataReadRequest(4096).pack()
        )
        frame.close_fds()
        _, size = struct.unpack_from("=II", frame.payload)
        data += frame.payload[8 : 8 + size]
        if size < 4096:
            return bytes(data)


async def _device_state(client: Client) -> MigState:
    reply = await client.conn.request(DeviceFeatureRequest.get(Feature.MIG_DEVICE_STATE))
    data = getattr(reply, "data", None)
    assert isinstance(data, MigDeviceState)
    return MigState(data.device_state)


async def _io_fds(client: Client, region: int) -> list[int]:
    """The ioeventfds of ``region`` (the caller owns them); none if the server refuses."""
    try:
        frame = await client.conn.request_raw(
            Command.DEVICE_GET_REGION_IO_FDS, RegionIoFdsRequest(region, argsz=4096).pack()
        )
    except VfioUserError:
        return []
    return frame.take_fds()
