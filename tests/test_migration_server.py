"""Live migration served over real sockets: features, the state machine, data streams, quiesce.

The client is the engine used raw: every feature GET/SET/PROBE with the reply sizes deployed
peers use, a full migration between two in-process servers, refused
transitions and commands, ERROR and DEVICE_RESET, and what "stopped" means for IRQs and DMA.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from tests.fd_leaks import fd_count
from tests.raw_client import expect_errno, raw_payload, session
from vfiouser_trio.engine import Connection
from vfiouser_trio.protocol import (
    DeviceFeatureReply,
    DeviceFeatureRequest,
    DeviceGetInfoRequest,
    DeviceResetRequest,
    DmaMapRequest,
    DmaUnmapRequest,
    Feature,
    MigDataReadRequest,
    MigDataWriteRequest,
    MigDeviceState,
    MigrationInfo,
    MigState,
    RegionReadRequest,
    RegionWriteRequest,
    SetIrqsRequest,
)
from vfiouser_trio.protocol.constants import (
    DEVICE_FEATURE_GET,
    DEVICE_FEATURE_PROBE,
    DEVICE_FEATURE_SET,
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    PciIrq,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.migration import MigrationRefused
from vfiouser_trio.server.migration_stream import (
    HEADER,
    RECORD,
    FrameworkState,
    StreamDecoder,
    build_stream,
    split_stream,
)
from vfiouser_trio.server.pci import PciIdentity

RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
PAGE = mmap.PAGESIZE
IOVA = 0x100000
SCRATCH = 0x10000  # bytes of device state besides the counter
S = MigState


class Counter(Device):
    """BAR0 0x0: a counter (a write adds, a read returns it); 0x8: write -> DMA to IOVA.

    Migrates its counter and 64 KiB of scratch memory as a stream in uneven chunks, and
    records the hooks the arcs call. ``failures`` makes a hook raise.
    """

    def __init__(self, *, pre_copy: bool = False, migrate: bool = True) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10F0, class_code=0xFF0000))
        self.count = 0
        self.scratch = bytearray(SCRATCH)
        self.add_bar(0, 0x100, read=self.read0, write=self.write0)
        self.add_bar(2, 0x1000)
        self.add_msix(2, bar=2)
        if migrate:
            self.enable_migration(pre_copy=pre_copy)
        self.calls: list[str] = []
        self.failures: dict[str, BaseException] = {}
        self.incoming = bytearray()
        self.precopy: list[bytes] = []
        self.resets = 0

    async def read0(self, offset: int, size: int) -> bytes:
        return self.count.to_bytes(8, "little")[:size]

    async def write0(self, offset: int, data: bytes) -> None:
        if offset == 0x8:
            await self.dma.write(IOVA, b"from-handler")
        else:
            self.count += int.from_bytes(data, "little")

    async def reset(self) -> None:
        self.resets += 1

    def _hook(self, name: str) -> None:
        self.calls.append(name)
        failure = self.failures.get(name)
        if failure is not None:
            raise failure

    async def on_stop(self) -> None:
        self._hook("stop")

    async def on_run(self) -> None:
        self._hook("run")

    async def on_begin_save(self) -> None:
        self._hook("begin_save")

    async def on_end_save(self) -> None:
        self._hook("end_save")

    async def on_begin_resume(self) -> None:
        self.incoming.clear()
        self._hook("begin_resume")

    async def precopy_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self.precopy:
            yield chunk

    async def save_chunks(self) -> AsyncIterator[bytes]:
        yield struct.pack("<QI", self.count, len(self.scratch))
        for pos in range(0, len(self.scratch), 1000):  # uneven on purpose
            yield bytes(self.scratch[pos : pos + 1000])

    async def load_chunk(self, data: bytes) -> None:
        self.incoming += data

    async def on_end_resume(self) -> None:
        self._hook("end_resume")
        count, size = struct.unpack_from("<QI", self.incoming)
        if len(self.incoming) != 12 + size:
            raise ValueError(f"state of {len(self.incoming)} bytes, expected {12 + size}")
        self.count = count
        self.scratch[:] = self.incoming[12:]


class Register(Device):
    """The simple API: one register, saved and loaded as bytes."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10F1))
        self.value = 0
        self.enable_migration()

    async def save_state(self) -> bytes:
        return self.value.to_bytes(4, "little")

    async def load_state(self, data: bytes) -> None:
        if len(data) != 4:
            raise ValueError("a register state is 4 bytes")
        self.value = int.from_bytes(data, "little")


def set_state(state: int) -> DeviceFeatureRequest:
    return DeviceFeatureRequest.set(Feature.MIG_DEVICE_STATE, MigDeviceState(state))


async def to_state(conn: Connection, state: int) -> None:
    reply = await conn.request(set_state(state))
    assert isinstance(reply, DeviceFeatureReply)


async def get_state(conn: Connection) -> MigState:
    reply = await conn.request(DeviceFeatureRequest.get(Feature.MIG_DEVICE_STATE))
    assert isinstance(reply, DeviceFeatureReply) and isinstance(reply.data, MigDeviceState)
    return MigState(reply.data.device_state)


async def read_stream(conn: Connection, step: int) -> bytes:
    """MIG_DATA_READ until a short read; checks each reply's layout."""
    data = bytearray()
    while True:
        payload = await raw_payload(conn, MigDataReadRequest(step))
        assert len(payload) == 8 + step  # always padded to the requested size
        argsz, size = struct.unpack_from("=II", payload)
        assert argsz == 8 + size and size <= step
        assert payload[8 + size :] == bytes(step - size)
        data += payload[8 : 8 + size]
        if size < step:
            return bytes(data)


def wrap(device: Device, payload: bytes) -> bytes:
    """A whole migration stream for ``device`` carrying ``payload`` as its own state."""
    framework = FrameworkState.capture(device.config, device.irqs, msix_table_driven=False)
    return build_stream(device.identity, payload, framework)


def payload_of(stream: bytes) -> bytes:
    """The device's own bytes in a whole stream."""
    return split_stream(stream)[0]


async def write_stream(conn: Connection, data: bytes, step: int) -> None:
    for pos in range(0, len(data), step):
        assert await raw_payload(conn, MigDataWriteRequest(data[pos : pos + step])) == b""


def memfd_map(size: int) -> tuple[DmaMapRequest, mmap.mmap]:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    guest = mmap.mmap(fd, size)
    return DmaMapRequest(IOVA, size, RW, fds=(fd,)), guest


# --- features: GET / SET / PROBE ----------------------------------------------------------


async def test_device_without_migration_answers_every_feature_with_einval() -> None:
    device = Counter(migrate=False)
    async with session(device) as conn:
        for request in (
            DeviceFeatureRequest.get(Feature.MIGRATION),
            DeviceFeatureRequest.probe(Feature.MIGRATION),
            DeviceFeatureRequest.get(Feature.MIG_DEVICE_STATE),
            DeviceFeatureRequest.probe(Feature.DMA_LOGGING_START, set=True),
            set_state(S.STOP),
        ):
            await expect_errno(conn, request, errno.EINVAL)
        await expect_errno(conn, MigDataReadRequest(16), errno.EINVAL)
        await expect_errno(conn, MigDataWriteRequest(b"x"), errno.EINVAL)
        # Nothing is gated either: the device just runs.
        assert await raw_payload(conn, DeviceGetInfoRequest()) != b""
    device.close()


@pytest.mark.parametrize("pre_copy", [False, True])
async def test_get_migration_and_device_state_sizes(pre_copy: bool) -> None:
    device = Counter(pre_copy=pre_copy)
    async with session(device) as conn:
        get = DeviceFeatureRequest.get(Feature.MIGRATION)
        payload = await raw_payload(conn, get)
        assert len(payload) == 8 + 8
        assert struct.unpack("=IIQ", payload) == (
            16,
            get.flags,
            MIGRATION_STOP_COPY | (MIGRATION_PRE_COPY if pre_copy else 0),
        )
        reply = await conn.request(get)
        assert isinstance(reply, DeviceFeatureReply) and reply.data == MigrationInfo(
            device.migration.flags if device.migration else 0
        )

        get_state_req = DeviceFeatureRequest.get(Feature.MIG_DEVICE_STATE)
        payload = await raw_payload(conn, get_state_req)
        assert len(payload) == 8 + 8
        assert struct.unpack("=IIIi", payload) == (
            16,
            get_state_req.flags,
            S.RUNNING,
            -1,
        )

        request = set_state(S.STOP)
        payload = await raw_payload(conn, request)
        assert payload == request.pack() and len(payload) == 16  # echo
        assert await get_state(conn) == S.STOP
        await to_state(conn, S.RUNNING)

        # A GET whose argsz cannot hold the reply is refused.
        for feature in (Feature.MIGRATION, Feature.MIG_DEVICE_STATE):
            short = DeviceFeatureRequest(feature | DEVICE_FEATURE_GET, b"", argsz=15)
            await expect_errno(conn, short, errno.EINVAL)
    device.close()


async def test_probe_echoes_supported_operations_only() -> None:
    device = Counter()
    get, set_, probe = DEVICE_FEATURE_GET, DEVICE_FEATURE_SET, DEVICE_FEATURE_PROBE
    supported = {
        Feature.MIGRATION: get,
        Feature.MIG_DEVICE_STATE: get | set_,
        Feature.DMA_LOGGING_START: set_,
        Feature.DMA_LOGGING_STOP: set_,
        Feature.DMA_LOGGING_REPORT: get,
    }
    async with session(device) as conn:
        for feature, ops in supported.items():
            for wanted in (0, get, set_, get | set_):
                request = DeviceFeatureRequest(feature | probe | wanted)
                if wanted & ~ops:
                    await expect_errno(conn, request, errno.EINVAL)
                else:
                    assert await raw_payload(conn, request) == request.pack()
        # A probe with data (unused) is echoed whole, argsz included.
        padded = DeviceFeatureRequest(Feature.MIGRATION | probe, b"\xaa" * 8, argsz=64)
        assert await raw_payload(conn, padded) == padded.pack()
        # Operations a feature does not have are refused outright.
        await expect_errno(conn, DeviceFeatureRequest(Feature.MIGRATION | set_), errno.EINVAL)
    device.close()


# --- the state machine --------------------------------------------------------------------


async def test_transitions_run_the_arcs_and_their_hooks() -> None:
    device = Counter()
    async with session(device) as conn:
        await to_state(conn, S.STOP_COPY)  # RUNNING -> STOP -> STOP_COPY
        assert device.calls == ["stop", "begin_save"] and await get_state(conn) == S.STOP_COPY
        device.calls.clear()
        await to_state(conn, S.RUNNING)  # STOP_COPY -> STOP -> RUNNING
        assert device.calls == ["end_save", "run"]
        device.calls.clear()
        await to_state(conn, S.RESUMING)  # RUNNING -> STOP -> RESUMING
        assert device.calls == ["stop", "begin_resume"]
        device.calls.clear()
        await write_stream(conn, wrap(device, struct.pack("<QI", 5, 0)), 64)
        await to_state(conn, S.RUNNING)  # RESUMING -> STOP -> RUNNING
        assert device.calls == ["end_resume", "run"] and device.count == 5
        device.calls.clear()
        await to_state(conn, S.RUNNING)  # no arc at all
        assert device.calls == []
    device.close()


async def test_pre_copy_paths() -> None:
    device = Counter(pre_copy=True)
    async with session(device) as conn:
        await to_state(conn, S.PRE_COPY)
        assert device.calls == ["begin_save"]
        device.calls.clear()
        await to_state(conn, S.STOP)  # PRE_COPY -> RUNNING -> STOP
        assert device.calls == ["end_save", "stop"]
        device.calls.clear()
        await to_state(conn, S.PRE_COPY)  # STOP -> RUNNING -> PRE_COPY
        await to_state(conn, S.STOP_COPY)  # PRE_COPY -> STOP_COPY directly
        assert device.calls == ["run", "begin_save", "stop"]
        assert await get_state(conn) == S.STOP_COPY
    device.close()


async def test_illegal_transitions_are_refused_with_einval() -> None:
    device = Counter(pre_copy=True)
    plain = Counter()
    async with session(device) as conn, session(plain) as plain_conn:
        await to_state(conn, S.STOP_COPY)
        device.calls.clear()
        for target in (S.PRE_COPY, S.ERROR, S.RUNNING_P2P, S.PRE_COPY_P2P, 8, 0xABCD):
            await expect_errno(conn, set_state(target), errno.EINVAL)
            assert await get_state(conn) == S.STOP_COPY
        assert device.calls == []  # refused before any arc ran
        # A device without PRE_COPY has no such state.
        await expect_errno(plain_conn, set_state(S.PRE_COPY), errno.EINVAL)
        assert await get_state(plain_conn) == S.RUNNING
    device.close()
    plain.close()


async def test_failing_arc_enters_error_and_device_reset_recovers() -> None:
    device = Counter()
    device.failures["begin_save"] = RuntimeError("cannot snapshot")
    async with session(device) as conn:
        await expect_errno(conn, set_state(S.STOP_COPY), errno.EIO)
        assert await get_state(conn) == S.ERROR
        assert device.dma.stopped  # ERROR is held like STOP
        for target in (S.RUNNING, S.STOP, S.ERROR):
            await expect_errno(conn, set_state(target), errno.EINVAL)
        await expect_errno(conn, MigDataReadRequest(8), errno.EINVAL)
        assert await raw_payload(conn, DeviceResetRequest()) == b""
        assert device.resets == 1
        assert await get_state(conn) == S.RUNNING and not device.dma.stopped
        # A VfioUserError from a hook keeps its errno.
        device.failures["begin_save"] = VfioUserError(errno.ENOSPC)
        await expect_errno(conn, set_state(S.STOP_COPY), errno.ENOSPC)
        assert await get_state(conn) == S.ERROR
    device.close()


async def test_refused_arc_leaves_the_device_in_the_arc_start_state() -> None:
    device = Counter()
    async with session(device) as conn:
        device.failures["stop"] = MigrationRefused("busy", errno=errno.EAGAIN)
        await expect_errno(conn, set_state(S.STOP), errno.EAGAIN)
        assert await get_state(conn) == S.RUNNING and not device.dma.stopped
        del device.failures["stop"]
        # Second arc of RUNNING -> STOP -> STOP_COPY refused: the first one stands.
        device.failures["begin_save"] = MigrationRefused()
        await expect_errno(conn, set_state(S.STOP_COPY), errno.EINVAL)
        assert await get_state(conn) == S.STOP and device.dma.stopped
        del device.failures["begin_save"]
        device.failures["run"] = MigrationRefused()
        await expect_errno(conn, set_state(S.RUNNING), errno.EINVAL)
        assert await get_state(conn) == S.STOP and device.dma.stopped
    device.close()


async def test_invalid_incoming_state_fails_the_end_of_resume() -> None:
    device = Counter()
    async with session(device) as conn:
        await to_state(conn, S.RESUMING)
        await write_stream(conn, wrap(device, struct.pack("<QI", 1, 100) + b"short"), 64)
        await expect_errno(conn, set_state(S.RUNNING), errno.EIO)
        assert await get_state(conn) == S.ERROR and device.count == 0
    device.close()


# --- commands refused by state ------------------------------------------------------------


@pytest.mark.parametrize("stopped", [S.STOP, S.STOP_COPY])
async def test_stopped_device_accepts_only_region_access_and_features(
    stopped: MigState,
) -> None:
    device = Counter()
    async with session(device) as conn:
        await to_state(conn, stopped)
        before = fd_count()
        map_request, guest = memfd_map(PAGE)
        eventfd = os.eventfd(0, os.EFD_CLOEXEC)
        irq = SetIrqsRequest(
            PciIrq.MSIX,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            fds=(eventfd,),
        )
        for request in (
            map_request,
            irq,
            DmaUnmapRequest(IOVA, PAGE),
            DeviceResetRequest(),
            DeviceGetInfoRequest(),
            MigDataWriteRequest(b"data"),
        ):
            await expect_errno(conn, request, errno.EINVAL)
        for fd in map_request.fds + irq.fds:
            os.close(fd)
        guest.close()
        assert fd_count() == before  # the refused messages' fds were closed by the server
        assert device.resets == 0
        await conn.request(RegionWriteRequest(0, 0, (7).to_bytes(8, "little")))
        payload = await raw_payload(conn, RegionReadRequest(0, 0, 8))
        assert payload[16:] == (7).to_bytes(8, "little")
        assert await get_state(conn) == stopped
    device.close()


async def test_mig_data_only_in_the_states_that_allow_it() -> None:
    device = Counter(pre_copy=True)
    async with session(device) as conn:
        for state in (S.RUNNING, S.STOP, S.RESUMING):
            await to_state(conn, state)
            await expect_errno(conn, MigDataReadRequest(16), errno.EINVAL)
        valid = wrap(device, struct.pack("<QI", 0, SCRATCH) + bytes(SCRATCH))
        await write_stream(conn, valid, 1 << 16)  # so that RESUMING can be left
        for state in (S.RUNNING, S.PRE_COPY, S.STOP_COPY, S.STOP):
            await to_state(conn, state)
            await expect_errno(conn, MigDataWriteRequest(b"x"), errno.EINVAL)
        # RESUMING accepts what restoring needs: region writes, IRQ setup, DMA maps.
        await to_state(conn, S.RESUMING)
        eventfd = os.eventfd(0, os.EFD_CLOEXEC)
        irq = SetIrqsRequest(
            PciIrq.MSIX,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            fds=(eventfd,),
        )
        assert await raw_payload(conn, irq) == b""
        os.close(eventfd)
        await conn.request(RegionWriteRequest(7, 0x4, b"\x06\x00"))
        # Beyond our max_data_xfer_size (1 MiB).
        await expect_errno(conn, MigDataWriteRequest(bytes((1 << 20) + 1)), errno.EINVAL)
        await write_stream(conn, valid, 1 << 16)
        await to_state(conn, S.STOP)
        await to_state(conn, S.STOP_COPY)
        await expect_errno(conn, MigDataReadRequest((1 << 20) + 1), errno.EINVAL)
    device.close()


# --- data streams and a whole migration ---------------------------------------------------


async def test_migration_between_two_servers() -> None:
    source, target = Counter(), Counter()
    source.count = 0x1122334455
    source.scratch[:] = os.urandom(SCRATCH)
    async with session(source) as src, session(target) as dst:
        await src.request(RegionWriteRequest(0, 0, (3).to_bytes(8, "little")))
        await to_state(src, S.STOP_COPY)
        await to_state(dst, S.RESUMING)
        stream = await read_stream(src, 4096)
        assert len(payload_of(stream)) == 12 + SCRATCH
        assert await raw_payload(src, MigDataReadRequest(64)) == struct.pack("=II", 8, 0) + bytes(
            64
        )  # drained: every further read is empty
        await write_stream(dst, stream, 3000)
        await to_state(dst, S.RUNNING)
        await to_state(src, S.STOP)
        payload = await raw_payload(dst, RegionReadRequest(0, 0, 8))
        assert int.from_bytes(payload[16:], "little") == 0x1122334455 + 3
        assert target.scratch == source.scratch
        assert source.calls == ["stop", "begin_save", "end_save"]
        assert target.calls == ["stop", "begin_resume", "end_resume", "run"]
    source.close()
    target.close()


async def test_simple_api_save_state_and_load_state() -> None:
    source, target = Register(), Register()
    source.value = 0xCAFE
    async with session(source) as src, session(target) as dst:
        await to_state(src, S.STOP_COPY)
        stream = await read_stream(src, 3)
        assert payload_of(stream) == (0xCAFE).to_bytes(4, "little")
        await to_state(dst, S.RESUMING)
        await write_stream(dst, stream, 1)
        await to_state(dst, S.RUNNING)
        assert target.value == 0xCAFE
        # An empty state is invalid for this device: load_state refuses it.
        await to_state(dst, S.RESUMING)
        await write_stream(dst, wrap(target, b""), 64)
        await expect_errno(dst, set_state(S.STOP), errno.EIO)
        assert await get_state(dst) == S.ERROR
    source.close()
    target.close()


async def test_pre_copy_stream_then_stop_copy() -> None:
    device = Counter(pre_copy=True)
    device.precopy = [b"early-1|", b"", b"early-2|"]  # b"": nothing more for now
    device.scratch[:4] = b"last"
    async with session(device) as conn:
        decoder = StreamDecoder()  # the device's bytes out of the stream's pieces

        def device_bytes(data: bytes) -> bytes:
            return b"".join(decoder.feed(data))

        await to_state(conn, S.PRE_COPY)
        first = device_bytes(await read_stream(conn, 64))
        assert first == b"early-1|"
        # The device still runs in PRE_COPY: region writes count.
        await conn.request(RegionWriteRequest(0, 0, (9).to_bytes(8, "little")))
        second = device_bytes(await read_stream(conn, 5))
        assert second == b"early-2|"
        assert await read_stream(conn, 64) == b""  # pre-copy data exhausted
        await to_state(conn, S.STOP_COPY)
        rest = device_bytes(await read_stream(conn, 4096))
        assert rest[:12] == struct.pack("<QI", 9, SCRATCH) and rest[12:16] == b"last"
        await to_state(conn, S.STOP)
    device.close()


async def test_leftover_pre_copy_bytes_lead_the_stop_copy_stream() -> None:
    device = Counter(pre_copy=True)
    device.precopy = [b"0123456789"]
    async with session(device) as conn:
        await to_state(conn, S.PRE_COPY)
        size = HEADER.size + RECORD.size + 4  # the header, then 4 bytes of the device's
        payload = await raw_payload(conn, MigDataReadRequest(size))
        assert payload[:8] == struct.pack("=II", 8 + size, size) and payload.endswith(b"0123")
        await to_state(conn, S.STOP_COPY)
        rest = await read_stream(conn, 4096)
        assert rest[:6] == b"456789"  # the rest of the pre-copy record comes first
        device_bytes = payload_of(payload[8:] + rest)
        assert device_bytes[:22] == b"0123456789" + struct.pack("<QI", 0, SCRATCH)
    device.close()


async def test_a_failing_save_stream_breaks_reads_until_a_new_stream() -> None:
    class Broken(Counter):
        async def save_chunks(self) -> AsyncIterator[bytes]:
            yield b"ok"
            raise RuntimeError("device lost its state")

    device = Broken()
    async with session(device) as conn:
        ok = HEADER.size + RECORD.size + 2  # the stream's header, then the device's b"ok"
        await to_state(conn, S.STOP_COPY)
        assert (await raw_payload(conn, MigDataReadRequest(ok))).endswith(b"ok")
        await expect_errno(conn, MigDataReadRequest(2), errno.EIO)
        await expect_errno(conn, MigDataReadRequest(2), errno.EIO)
        await to_state(conn, S.STOP)  # abandons the stream
        await to_state(conn, S.STOP_COPY)  # a fresh one
        assert (await raw_payload(conn, MigDataReadRequest(ok))).endswith(b"ok")
    device.close()


async def test_state_survives_disconnection_and_a_stopped_device_runs_again() -> None:
    device = Counter()
    async with session(device) as conn:
        await conn.request(RegionWriteRequest(0, 0, (5).to_bytes(8, "little")))
        await to_state(conn, S.STOP)
    async with session(device) as conn:
        # The device state is kept; the migration a dead client left half-done is not.
        assert await get_state(conn) == S.RUNNING and not device.dma.stopped
        assert device.calls == ["stop", "run"] and device.count == 5
    device.close()


async def test_a_device_refusing_to_run_after_its_client_left_is_reset() -> None:
    # How a device that must not run again once migrated away says so (docs/migration.md).
    device = Counter()
    device.failures["run"] = MigrationRefused("migrated away")
    async with session(device) as conn:
        await to_state(conn, S.STOP)
    async with session(device) as conn:
        assert await get_state(conn) == S.RUNNING and not device.dma.stopped
        assert device.calls == ["stop", "run"] and device.resets == 1
    device.close()


# --- quiesce ------------------------------------------------------------------------------


async def test_stopped_device_raises_no_irq_and_its_dma_waits() -> None:
    device = Counter()
    before = fd_count()
    async with session(device) as conn:
        map_request, guest = memfd_map(PAGE)
        await conn.request(map_request)
        os.close(map_request.fds[0])
        eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
        await conn.request(SetIrqsRequest(PciIrq.MSIX, flags, 0, 1, fds=(eventfd,)))
        go, done = trio.Event(), trio.Event()

        async def device_task() -> None:
            await go.wait()
            device.trigger(0, index=PciIrq.MSIX)
            await device.dma.write(IOVA, b"device wrote this")
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(device_task)
            await to_state(conn, S.STOP)
            go.set()
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(BlockingIOError):
                os.eventfd_read(eventfd)  # held pending
            assert not done.is_set() and guest[:17] == bytes(17)  # DMA held
            await to_state(conn, S.RUNNING)
            with trio.fail_after(5):
                await done.wait()
        assert os.eventfd_read(eventfd) == 1
        assert guest[:17] == b"device wrote this"
        os.close(eventfd)
        guest.close()
    device.close()
    assert fd_count() == before


async def test_dma_from_a_command_handler_fails_fast_while_stopped() -> None:
    device = Counter()
    async with session(device) as conn:
        map_request, guest = memfd_map(PAGE)
        await conn.request(map_request)
        os.close(map_request.fds[0])
        await to_state(conn, S.STOP)
        with trio.fail_after(5):  # EBUSY, not a session waiting on itself
            await expect_errno(conn, RegionWriteRequest(0, 8, b"\x01"), errno.EBUSY)
        with pytest.raises(VfioUserError) as exc, device.dma.view(IOVA, 8):
            pass
        assert exc.value.errno == errno.EBUSY
        await to_state(conn, S.RUNNING)
        await conn.request(RegionWriteRequest(0, 8, b"\x01"))
        assert guest[:12] == b"from-handler"
        guest.close()
    device.close()


async def test_on_stop_finishes_in_flight_work_before_the_reply() -> None:
    class Draining(Counter):
        def __init__(self) -> None:
            super().__init__()
            self.release = trio.Event()
            self.idle = trio.Event()

        async def worker(self) -> None:
            # Half-way through an operation when the client stops the device.
            await self.release.wait()
            await self.dma.write(IOVA, b"completed")
            self.idle.set()

        async def on_stop(self) -> None:
            self.release.set()
            await self.idle.wait()
            self._hook("stop")

    device = Draining()
    async with session(device) as conn:
        map_request, guest = memfd_map(PAGE)
        await conn.request(map_request)
        os.close(map_request.fds[0])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.worker)
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(5):
                await to_state(conn, S.STOP)
        assert guest[:9] == b"completed" and device.calls == ["stop"]
        guest.close()
    device.close()
