"""The framework's part of a migration: config space, MSI-X and IRQ bits travel with the
device's state, in a checked stream, between two in-process servers over real sockets.

The clients are `vfiouser_trio.client.connect`; the migration commands go raw over each
client's `connection`.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fd_leaks import fd_count
from vfiouser_trio.client import Client, connect
from vfiouser_trio.engine import Connection
from vfiouser_trio.protocol import (
    DeviceFeatureReply,
    DeviceFeatureRequest,
    Feature,
    MigDataReadReply,
    MigDataReadRequest,
    MigDataWriteRequest,
    MigDeviceState,
    MigState,
)
from vfiouser_trio.protocol.constants import PciIrq, PciRegion
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.irqs import IrqIndex
from vfiouser_trio.server.migration_stream import (
    HEADER,
    STREAM_MAGIC,
    STREAM_VERSION,
    FrameworkState,
    StreamDecoder,
    build_stream,
    split_stream,
)
from vfiouser_trio.server.msix import MsiState, MsixState
from vfiouser_trio.server.pci import (
    BAR0,
    COMMAND,
    COMMAND_BUS_MASTER,
    COMMAND_MEMORY,
    INTERRUPT_LINE,
    PciIdentity,
)
from vfiouser_trio.server.pci_caps import (
    MSIX_CONTROL_ENABLE,
    MsiCapability,
    MsixCapability,
)
from vfiouser_trio.server.serve import serve_connection

S = MigState
CONFIG = PciRegion.CONFIG
MSIX = PciIrq.MSIX
PBA_OFFSET = 0x800
BAR0_ADDRESS = 0xFE00_0000
BAR2_ADDRESS = 0xFD00_0000
MSI_ADDRESS = 0xFEE0_1000


class Card(Device):
    """BAR0 callbacks, MSI-X in BAR2 and MSI; its own state is one 64-bit value.

    Records what the config hooks report, with the value it had then, to show the hooks
    fire after the device's state was loaded.
    """

    def __init__(
        self, *, device_id: int = 0x10F2, vectors: int = 4, pre_copy: bool = False
    ) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=device_id, class_code=0xFF0000))
        self.value = 0
        self.loaded = b""
        self.precopy: list[bytes] = []
        self.add_bar(0, 0x100, read=self._read0, write=self._write0)
        self.add_bar(2, 0x1000)
        self.add_msix(vectors, bar=2, pba_offset=PBA_OFFSET)
        self.add_msi(4, per_vector_masking=True)
        self.enable_migration(pre_copy=pre_copy)
        self.events: list[tuple[object, ...]] = []
        config = self.config
        config.command_changed.connect(lambda old, new: self._event("command", old, new))
        config.bar_changed.connect(lambda index, address: self._event("bar", index, address))
        config.msix_changed.connect(lambda on, masked: self._event("msix", on, masked))
        config.msi_changed.connect(lambda msi: self._event("msi", msi.address))

    def _event(self, *what: object) -> None:
        self.events.append((*what, self.value))

    async def _read0(self, offset: int, size: int) -> bytes:
        return self.value.to_bytes(8, "little")[:size]

    async def _write0(self, offset: int, data: bytes) -> None:
        self.value = int.from_bytes(data, "little")

    async def precopy_chunks(self) -> AsyncIterator[bytes]:
        for chunk in self.precopy:
            yield chunk

    async def save_state(self) -> bytes:
        return self.value.to_bytes(8, "little")

    async def load_state(self, data: bytes) -> None:
        if len(data) < 8:
            raise ValueError("a card state ends with 8 bytes of value")
        self.loaded = data
        self.value = int.from_bytes(data[-8:], "little")


@asynccontextmanager
async def served(device: Device) -> AsyncIterator[Client]:
    """A client connected to ``device``, served in-process over a socketpair."""
    client_sock, server_sock = socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, device, server_sock)
        async with connect(client_sock) as client:
            yield client


async def to_state(conn: Connection, state: int) -> None:
    request = DeviceFeatureRequest.set(Feature.MIG_DEVICE_STATE, MigDeviceState(state))
    assert isinstance(await conn.request(request), DeviceFeatureReply)


async def get_state(conn: Connection) -> MigState:
    reply = await conn.request(DeviceFeatureRequest.get(Feature.MIG_DEVICE_STATE))
    assert isinstance(reply, DeviceFeatureReply) and isinstance(reply.data, MigDeviceState)
    return MigState(reply.data.device_state)


async def read_stream(conn: Connection, step: int = 4096) -> bytes:
    """MIG_DATA_READ until a short read."""
    data = bytearray()
    while True:
        reply = await conn.request(MigDataReadRequest(step))
        assert isinstance(reply, MigDataReadReply)
        data += reply.data
        if len(reply.data) < step:
            return bytes(data)


async def write_stream(conn: Connection, data: bytes, step: int = 4096) -> None:
    for pos in range(0, len(data), step):
        await conn.request(MigDataWriteRequest(data[pos : pos + step]))


async def expect_errno(call: Awaitable[object], code: int) -> None:
    with pytest.raises(VfioUserError) as exc:
        await call
    assert exc.value.errno == code


def msix_control(device: Device) -> int:
    placed = device.config.find_capability(MsixCapability)
    assert placed is not None
    return placed.offset + MsixCapability.CONTROL


def msi_address(device: Device) -> int:
    placed = device.config.find_capability(MsiCapability)
    assert placed is not None
    return placed.offset + MsiCapability.ADDRESS


def table_entry(vector: int, *, masked: bool) -> bytes:
    return struct.pack("<QII", 0xFEE0_0000 + 16 * vector, 0x40 + vector, int(masked))


async def program(client: Client, device: Device) -> None:
    """What a guest driver does: decode, BARs, an interrupt line, MSI registers, MSI-X on
    with vectors 1 and 3 masked in the table."""
    command = COMMAND_MEMORY | COMMAND_BUS_MASTER
    await client.write(CONFIG, COMMAND, command.to_bytes(2, "little"))
    await client.write(CONFIG, BAR0, BAR0_ADDRESS.to_bytes(4, "little"))
    await client.write(CONFIG, BAR0 + 8, BAR2_ADDRESS.to_bytes(4, "little"))
    await client.write(CONFIG, INTERRUPT_LINE, b"\x0b")
    await client.write(CONFIG, msi_address(device), MSI_ADDRESS.to_bytes(4, "little"))
    for vector in range(4):
        await client.write(2, 16 * vector, table_entry(vector, masked=vector in (1, 3)))
    await client.write(CONFIG, msix_control(device), MSIX_CONTROL_ENABLE.to_bytes(2, "little"))


async def source_stream(device: Card, *, value: int = 0x1234) -> bytes:
    """Serve ``device``, program it, and read its whole stream in STOP_COPY."""
    async with served(device) as client:
        await program(client, device)
        await client.write(0, 0, value.to_bytes(8, "little"))
        await to_state(client.connection, S.STOP_COPY)
        return await read_stream(client.connection, 100)


# --- a whole migration --------------------------------------------------------------------


async def test_framework_state_and_held_interrupts_move_to_the_destination() -> None:
    before = fd_count()
    source, target = Card(), Card()
    async with served(source) as src, served(target) as dst:
        await program(src, source)
        await src.write(0, 0, (0x1234).to_bytes(8, "little"))
        src_irqs = await src.enable_irqs(MSIX)
        await src.mask_irqs(MSIX, 2)  # masked at the vfio level
        assert source.trigger(0)  # delivered now
        assert not source.trigger(1)  # masked in the table: PBA bit 1
        assert not source.trigger(2)  # vfio-masked: pending
        assert src_irqs[0].try_read() == 1
        await to_state(src.connection, S.STOP)
        assert not source.trigger(0)  # stopped: held, although nothing masks it
        assert src_irqs[0].try_read() is None
        await to_state(src.connection, S.STOP_COPY)
        stream = await read_stream(src.connection, 1000)
        await to_state(src.connection, S.STOP)

        await to_state(dst.connection, S.RESUMING)
        await write_stream(dst.connection, stream, 333)  # any split
        # The client sets up its interrupts while resuming: eventfds are not state.
        dst_vector0 = (await dst.enable_irqs(MSIX, 1))[0]
        assert target.value == 0 and target.config.command == 0  # applied when leaving
        await to_state(dst.connection, S.RUNNING)

        # Vector 0, held by the stop, went out as soon as the destination ran.
        assert dst_vector0.try_read() == 1
        assert target.value == 0x1234
        assert target.config.save_image() == source.config.save_image()
        assert await dst.read(CONFIG, 0, 256) == await src.read(CONFIG, 0, 256)
        assert target.config.bar_addresses() == {0: BAR0_ADDRESS, 2: BAR2_ADDRESS}
        assert target.config.msix_enabled and not target.config.msix_function_masked
        assert target.config.msi_message(0) == (MSI_ADDRESS, 0)
        assert await dst.read(2, 0, 64) == await src.read(2, 0, 64)  # the MSI-X table
        assert await dst.read(2, PBA_OFFSET, 8) == (1 << 1).to_bytes(8, "little")
        irq = target.irqs[MSIX]
        assert irq.is_masked(2) and irq.is_pending(2) and not irq.is_masked(1)

        # The hooks fired once each, after the device's own state was in place.
        assert target.events == [
            ("command", 0, COMMAND_MEMORY | COMMAND_BUS_MASTER, 0x1234),
            ("bar", 0, BAR0_ADDRESS, 0x1234),
            ("bar", 2, BAR2_ADDRESS, 0x1234),
            ("msi", MSI_ADDRESS, 0x1234),
            ("msix", True, False, 0x1234),
        ]

        # The other held interrupts go out once the client unmasks them.
        dst_irqs = await dst.enable_irqs(MSIX, 3, start=1)
        await trio.testing.wait_all_tasks_blocked()
        assert [i.try_read() for i in dst_irqs] == [None, None, None]
        # The destination drives MSI-X through its table, as the source did: vector 3 is
        # masked there, so it is held in the PBA although its eventfd is ready.
        assert not target.trigger(3)
        assert dst_irqs[2].try_read() is None
        assert await dst.read(2, PBA_OFFSET, 8) == (1 << 1 | 1 << 3).to_bytes(8, "little")
        await dst.unmask_irqs(MSIX, 2)
        assert dst_irqs[1].try_read() == 1
        await dst.write(2, 16, table_entry(1, masked=False))
        assert dst_irqs[0].try_read() == 1
        assert await dst.read(2, PBA_OFFSET, 8) == (1 << 3).to_bytes(8, "little")
        # The source still holds what it had (it is stopped).
        assert source.irqs[MSIX].is_pending(0)
    source.close()
    target.close()
    assert fd_count() == before


async def test_the_stream_is_header_device_data_framework_end() -> None:
    source = Card()
    stream = await source_stream(source, value=0xABCDEF)
    magic, version, size, vendor, device, *_ = HEADER.unpack_from(stream)
    assert (magic, version, size, vendor, device) == (STREAM_MAGIC, 1, 24, 0x1AF4, 0x10F2)
    device_data, framework = split_stream(stream)
    assert device_data == (0xABCDEF).to_bytes(8, "little")
    assert framework.config == source.config.save_image()
    msix_bar = source.region(2)
    assert msix_bar is not None
    assert framework.msix_table == await msix_bar.do_read(0, 64)
    assert framework.msix_table_driven
    assert dict(framework.irqs)[MSIX] == bytes(4)
    source.close()


async def test_pre_copy_data_and_stop_copy_data_are_one_stream() -> None:
    source, target = Card(pre_copy=True), Card(pre_copy=True)
    source.precopy = [b"early|", b"", b"later|"]
    async with served(source) as src, served(target) as dst:
        await program(src, source)
        await src.write(0, 0, (7).to_bytes(8, "little"))
        await to_state(src.connection, S.PRE_COPY)
        first = await read_stream(src.connection, 64)
        assert first.startswith(STREAM_MAGIC) and first.endswith(b"early|")
        second = await read_stream(src.connection, 64)
        assert second.endswith(b"later|")
        # Config writes in pre-copy count: the framework's part is taken at the end.
        await src.write(CONFIG, INTERRUPT_LINE, b"\x05")
        await to_state(src.connection, S.STOP_COPY)
        rest = await read_stream(src.connection, 64)
        await to_state(dst.connection, S.RESUMING)
        await write_stream(dst.connection, first + second + rest, 7)
        await to_state(dst.connection, S.RUNNING)
        assert target.loaded == b"early|later|" + (7).to_bytes(8, "little")
        assert target.config.interrupt_line == 5
    source.close()
    target.close()


# --- streams that must be refused -----------------------------------------------------------


def _flip(stream: bytes, offset: int) -> bytes:
    return stream[:offset] + bytes([stream[offset] ^ 0x40]) + stream[offset + 1 :]


def _config_offset(stream: bytes) -> int:
    """Where the config image's COMMAND register sits in a stream from a Card."""
    return stream.index(STREAM_MAGIC) + HEADER.size + 8 + 8 + 8 + 20 + COMMAND


async def _other_device() -> bytes:
    return await source_stream(Card(device_id=0x10F3))


async def _other_layout() -> bytes:
    return await source_stream(Card(vectors=8))  # same identity, a bigger MSI-X table


Mutation = Callable[[bytes], Awaitable[bytes] | bytes]

# name: (mutation, errno of the first failing write or None, errno of the SET)
REFUSED: dict[str, tuple[Mutation, int | None, int]] = {
    "wrong magic": (lambda s: b"XXXX" + s[4:], errno.EINVAL, errno.EINVAL),
    "wrong version": (
        lambda s: s[:4] + struct.pack("<H", STREAM_VERSION + 1) + s[6:],
        errno.EINVAL,
        errno.EINVAL,
    ),
    "another device": (lambda s: _other_device(), errno.EINVAL, errno.EINVAL),
    "another layout": (lambda s: _other_layout(), errno.EINVAL, errno.EINVAL),
    "corrupt device data": (lambda s: _flip(s, HEADER.size + 8 + 3), errno.EINVAL, errno.EINVAL),
    "corrupt config image": (lambda s: _flip(s, _config_offset(s)), errno.EINVAL, errno.EINVAL),
    "bytes after the end": (lambda s: s + b"\0", errno.EINVAL, errno.EINVAL),
    "truncated": (lambda s: s[:-1], None, errno.EIO),
    "without its end": (lambda s: s[:-20], None, errno.EIO),
    "header only": (lambda s: s[: HEADER.size], None, errno.EIO),
    "empty": (lambda s: b"", None, errno.EIO),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_invalid_or_incomplete_streams_are_refused(case: str) -> None:
    mutate, write_errno, set_errno = REFUSED[case]
    good = await source_stream(Card(), value=0x55)
    bad = mutate(good)
    if not isinstance(bad, bytes):
        bad = await bad
    target = Card()
    async with served(target) as dst:
        conn = dst.connection
        await to_state(conn, S.RESUMING)
        failed: list[int] = []
        for pos in range(0, len(bad), 50):
            try:
                await conn.request(MigDataWriteRequest(bad[pos : pos + 50]))
            except VfioUserError as exc:
                failed.append(exc.errno)
            else:
                assert not failed, "a write after a refused one succeeded"
        assert (failed[0] if failed else None) == write_errno
        assert set(failed) <= {errno.EINVAL}
        await expect_errno(to_state(conn, S.RUNNING), set_errno)
        assert await get_state(conn) == S.ERROR
        # Nothing of the stream reached the device or the framework.
        assert target.value == 0 and target.config.command == 0
        assert not target.config.msix_enabled
        # DEVICE_RESET recovers it, and a good stream then loads.
        await dst.reset()
        assert await get_state(conn) == S.RUNNING
        await to_state(conn, S.RESUMING)
        await write_stream(conn, good)
        await to_state(conn, S.RUNNING)
        assert target.value == 0x55 and target.config.msix_enabled
    target.close()


# --- the stream codec ---------------------------------------------------------------------

_CARD = Card()
_FRAMEWORK = FrameworkState.capture(_CARD.config, _CARD.irqs, msix_table_driven=True)
_PAYLOAD = bytes(range(256)) * 3
_STREAM = build_stream(_CARD.identity, _PAYLOAD, _FRAMEWORK)


def _decoder() -> StreamDecoder:
    return StreamDecoder(_CARD.identity, _CARD.config, _CARD.irqs)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(_STREAM)), max_size=12))
def test_any_split_of_a_stream_decodes_to_the_same_state(cuts: list[int]) -> None:
    decoder = _decoder()
    points = [0, *sorted(cuts), len(_STREAM)]
    data = b"".join(b"".join(decoder.feed(_STREAM[a:b])) for a, b in itertools.pairwise(points))
    assert data == _PAYLOAD
    assert decoder.finish() == _FRAMEWORK


@settings(max_examples=60, deadline=None)
@given(st.integers(0, len(_STREAM) - 1), st.integers(1, 255))
def test_any_corrupted_byte_is_caught(offset: int, xor: int) -> None:
    bad = _STREAM[:offset] + bytes([_STREAM[offset] ^ xor]) + _STREAM[offset + 1 :]
    decoder = _decoder()
    with pytest.raises(VfioUserError) as exc:
        decoder.feed(bad)
        decoder.finish()
    assert exc.value.errno in (errno.EINVAL, errno.EIO)
    # A broken decoder stays broken.
    with pytest.raises(VfioUserError):
        decoder.finish()


def test_framework_state_packs_and_unpacks() -> None:
    assert FrameworkState.unpack(_FRAMEWORK.pack()) == _FRAMEWORK
    packed = _FRAMEWORK.pack()
    for bad in (packed[:-1], packed + b"\0", packed[:10]):
        with pytest.raises(ValueError):
            FrameworkState.unpack(bad)


# --- save / restore of the framework's structures -------------------------------------------


def test_config_restore_checks_the_image_and_fires_hooks_only_when_asked() -> None:
    source, target = Card(), Card()
    source.config.write(COMMAND, (COMMAND_MEMORY).to_bytes(2, "little"))
    source.config.write(BAR0, BAR0_ADDRESS.to_bytes(4, "little"))
    image = source.config.save_image()
    with pytest.raises(ValueError):
        target.config.restore_image(image[:-1])
    with pytest.raises(ValueError):  # another device ID
        target.config.restore_image(image[:2] + b"\xff\xff" + image[4:])
    placed = target.config.find_capability(MsixCapability)
    assert placed is not None
    with pytest.raises(ValueError):  # another capability chain
        target.config.restore_image(_flip(image, placed.offset + 1))
    with pytest.raises(ValueError):  # MSI-X state missing
        target.config.restore_image(image)
    assert target.config.command == 0  # refused: nothing changed
    table, pba = source.config.msix.save_state() if source.config.msix else (b"", b"")
    previous = target.config.restore_image(image, msix_table=table, msix_pba=pba)
    assert previous == 0 and target.config.command == COMMAND_MEMORY
    assert target.events == []  # no hooks until announced
    target.config.announce_restored(previous)
    assert ("command", 0, COMMAND_MEMORY, 0) in target.events
    assert ("bar", 0, BAR0_ADDRESS, 0) in target.events
    source.close()
    target.close()


def test_msix_restore_drops_reserved_bits_and_delivers_nothing() -> None:
    delivered: list[int] = []
    msix = MsixState(4, deliver=delivered.append)
    table = b"".join(
        struct.pack("<QII", 0xFEE0_0003, 0x40, 0xFFFF_FFFE if v == 0 else 1) for v in range(4)
    )
    with pytest.raises(ValueError):  # a pending bit beyond the last vector
        msix.restore_state(
            table, (1 << 4).to_bytes(8, "little"), enabled=True, function_masked=False
        )
    with pytest.raises(ValueError):
        msix.restore_state(table[:-1], bytes(8), enabled=True, function_masked=False)
    msix.restore_state(table, (0b11).to_bytes(8, "little"), enabled=True, function_masked=False)
    assert delivered == []  # vector 0 is pending and unmasked, yet nothing went out
    assert msix.message(0) == (0xFEE0_0000, 0x40)  # reserved address bits dropped
    assert not msix.masked(0) and msix.masked(1) and msix.pending(0) and msix.pending(1)
    assert msix.table_read(12, 4) == bytes(4)  # reserved vector control bits dropped
    assert msix.save_state() == (msix.table_read(0, 64), (0b11).to_bytes(8, "little"))


def test_irq_state_round_trips_without_delivering() -> None:
    source, target = IrqIndex(MSIX, 3), IrqIndex(MSIX, 3)
    source.mask(1)
    source.trigger(1)
    source.set_gate(lambda vector: False)
    source.trigger(2)
    state = source.save_state()
    assert state == bytes([0, 0b01 | 0b10, 0b10])
    target.restore_state(state)
    assert target.is_masked(1) and target.is_pending(1) and target.is_pending(2)
    assert target.delivered == 0
    for bad in (state[:2], state + b"\0", bytes([4, 0, 0])):
        with pytest.raises(ValueError):
            target.restore_state(bad)


def test_msi_pending_bits_live_in_the_image() -> None:
    source, target = Card(), Card()
    msi = source.config.msi
    assert isinstance(msi, MsiState)
    placed = source.config.find_capability(MsiCapability)
    assert placed is not None
    cap = placed.capability
    assert isinstance(cap, MsiCapability)
    source.config.write(placed.offset + cap.mask_offset, (0b10).to_bytes(4, "little"))
    control = placed.offset + MsiCapability.CONTROL
    source.config.write(control, (0x0001 | 2 << 4).to_bytes(2, "little"))  # on, 4 vectors
    assert not msi.trigger(1)
    framework = FrameworkState.capture(source.config, source.irqs, msix_table_driven=False)
    target.config.restore_image(
        framework.config, msix_table=framework.msix_table, msix_pba=framework.msix_pba
    )
    assert target.config.msi is not None
    assert target.config.msi_enabled and target.config.msi.pending(1)
    source.close()
    target.close()
