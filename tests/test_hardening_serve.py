"""Hardening of serving: a clean detach, reconnects, busy refusals, the socket file, accept().

Each test is the regression test of one finding of issue 9 (see the section comments):
a client that leaves mid-migration, an immediate reconnect refused with EBUSY, a refused
client held for the whole busy timeout, a live server's path taken over, long socket
paths, a cancelled accept() dropping a connection, and accept() failing with EMFILE.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import resource
import secrets
import socket
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.cli_process import cli_server
from tests.raw_client import GuestRam, expect_errno, raw_payload, session
from vfiouser_trio.engine import Connection, open_connection
from vfiouser_trio.limits import ServerLimits
from vfiouser_trio.protocol import (
    DeviceFeatureReply,
    DeviceFeatureRequest,
    DeviceGetInfoReply,
    DeviceGetInfoRequest,
    DeviceResetRequest,
    DmaLoggingControl,
    DmaLoggingRange,
    DmaMapRequest,
    Feature,
    MigDataReadRequest,
    MigDataWriteRequest,
    MigDeviceState,
    MigState,
    RegionInfoReply,
    RegionInfoRequest,
    RegionReadReply,
    RegionReadRequest,
    RegionWriteRequest,
    SetIrqsRequest,
    VersionReply,
    VersionRequest,
)
from vfiouser_trio.protocol.constants import (
    DMA_MAP_FLAG_READ,
    DMA_MAP_FLAG_WRITE,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    PciIrq,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.listener import ListenerError, accept, create_listener
from vfiouser_trio.server.migration_stream import FrameworkState, build_stream
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.serve import DeviceServer, serve, serve_connection

pytestmark = pytest.mark.usefixtures("no_fd_leak")

RW = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE
PAGE = mmap.PAGESIZE
IOVA = 0x100000
S = MigState


class Saver(Device):
    """BAR0 0x0: an 8-byte register, migrated with the simple API; records the arc hooks."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10F1, class_code=0xFF0000))
        self.value = 0
        self.add_bar(0, 0x100, read=self.read0, write=self.write0)
        self.add_bar(2, 0x1000)
        self.add_msix(2, bar=2)
        self.enable_migration(pre_copy=True)
        self.calls: list[str] = []
        self.resets = 0
        self.fail_stop = False
        #: While set (not None), ``detached()`` waits for it: a slow teardown.
        self.teardown: trio.Event | None = None
        self.tearing_down = trio.Event()

    async def read0(self, offset: int, size: int) -> bytes:
        return self.value.to_bytes(8, "little")[:size]

    async def write0(self, offset: int, data: bytes) -> None:
        self.value = int.from_bytes(data, "little")

    async def save_state(self) -> bytes:
        return self.value.to_bytes(8, "little")

    async def load_state(self, data: bytes) -> None:
        self.value = int.from_bytes(data, "little")

    async def reset(self) -> None:
        self.resets += 1

    async def on_stop(self) -> None:
        self.calls.append("stop")
        if self.fail_stop:
            raise RuntimeError("on_stop broke")

    async def on_run(self) -> None:
        self.calls.append("run")

    async def on_end_save(self) -> None:
        self.calls.append("end_save")

    async def detached(self) -> None:
        self.tearing_down.set()
        if self.teardown is not None:
            await self.teardown.wait()


async def to_state(conn: Connection, state: int) -> None:
    request = DeviceFeatureRequest.set(Feature.MIG_DEVICE_STATE, MigDeviceState(state))
    assert isinstance(await conn.request(request), DeviceFeatureReply)


def memfd_map() -> tuple[DmaMapRequest, mmap.mmap]:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGE)
    return DmaMapRequest(IOVA, PAGE, RW, fds=(fd,)), mmap.mmap(fd, PAGE)


async def use_fully(conn: Connection) -> None:
    """What a new client does first; each of these was EINVAL on a device left stopped."""
    info = await conn.request(DeviceGetInfoRequest())
    assert isinstance(info, DeviceGetInfoReply)
    assert isinstance(await conn.request(RegionInfoRequest(0)), RegionInfoReply)
    map_request, guest = memfd_map()
    await conn.request(map_request)
    os.close(map_request.fds[0])
    guest.close()
    assert await raw_payload(conn, DeviceResetRequest()) == b""


def _connect(path: Path | str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(os.fspath(path))
    return sock


async def _no_commands(frame: object) -> None:
    raise VfioUserError(errno.EINVAL)


def _served(nursery: trio.Nursery, server: DeviceServer) -> AbstractAsyncContextManager[Connection]:
    """A connection to ``server``, which serves the other end of a socket pair in ``nursery``."""
    client, ours = socket.socketpair()
    nursery.start_soon(server.serve_connection, ours)
    return open_connection(client, handler=_no_commands)


# --- 1. a client that leaves mid-migration --------------------------------------------------


@pytest.mark.parametrize(
    ("states", "hooks"),
    [
        ([S.STOP], ["stop", "run"]),
        ([S.STOP, S.STOP_COPY], ["stop", "end_save", "run"]),
        ([S.PRE_COPY], ["end_save"]),
        ([S.PRE_COPY, S.STOP_COPY], ["stop", "end_save", "run"]),
    ],
    ids=["STOP", "STOP_COPY", "PRE_COPY", "PRE_COPY-STOP_COPY"],
)
async def test_a_client_leaving_mid_migration_leaves_the_device_running_and_free(
    states: list[MigState], hooks: list[str]
) -> None:
    device = Saver()
    async with session(device) as conn:
        await conn.request(RegionWriteRequest(0, 0, (7).to_bytes(8, "little")))
        map_request, guest = memfd_map()
        await conn.request(map_request)
        os.close(map_request.fds[0])
        eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
        await conn.request(SetIrqsRequest(PciIrq.MSIX, flags, 0, 1, fds=(eventfd,)))
        control = DmaLoggingControl(PAGE, (DmaLoggingRange(IOVA, PAGE),))
        await conn.request(DeviceFeatureRequest.set(Feature.DMA_LOGGING_START, control))
        for state in states:
            await to_state(conn, state)
        if states[-1] == S.STOP_COPY:
            await raw_payload(conn, MigDataReadRequest(8))  # a stream left half-read
        else:
            device.trigger(0, index=PciIrq.MSIX)  # held while stopped / delivered in PRE_COPY
            if states[-1] == S.PRE_COPY:
                assert os.eventfd_read(eventfd) == 1
    # The session (teardown included) is over: nothing of that client is left.
    assert device.migration is not None and device.migration.state == S.RUNNING
    assert not device.dma.stopped and len(device.dma) == 0
    assert not device.irqs[PciIrq.MSIX].has_eventfd(0)
    with pytest.raises(BlockingIOError):
        os.eventfd_read(eventfd)  # the held interrupt was not sent to the dead client
    os.close(eventfd)
    guest.close()
    assert device.calls == hooks  # the usual arcs back to RUNNING
    async with session(device) as conn:
        reply = await conn.request(RegionReadRequest(0, 0, 8))
        assert isinstance(reply, RegionReadReply) and reply.data == (7).to_bytes(8, "little")
        await use_fully(conn)
    device.close()


async def test_a_client_leaving_mid_resume_discards_the_partial_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = Saver()
    source.value = 0x1234
    framework = FrameworkState.capture(source.config, source.irqs, msix_table_driven=False)
    stream = build_stream(source.identity, await source.save_state(), framework)
    source.close()
    device = Saver()
    device.value = 7
    with caplog.at_level(logging.WARNING, logger="vfiouser_trio.server.migration"):
        async with session(device) as conn:
            await to_state(conn, S.STOP)
            await to_state(conn, S.RESUMING)
            half = stream[: len(stream) // 2]
            assert await raw_payload(conn, MigDataWriteRequest(half)) == b""
    assert device.migration is not None and device.migration.state == S.RUNNING
    assert device.value == 7 and not device.dma.stopped
    assert "RESUMING" in caplog.text and "discarded" in caplog.text
    async with session(device) as conn:
        await use_fully(conn)
        # A later, whole migration still works: no leftover of the partial stream.
        await to_state(conn, S.STOP)
        await to_state(conn, S.RESUMING)
        assert await raw_payload(conn, MigDataWriteRequest(stream)) == b""
        await to_state(conn, S.RUNNING)
    assert device.value == 0x1234
    device.close()


async def test_a_client_leaving_a_device_in_error_leaves_it_reset_and_running() -> None:
    device = Saver()
    device.fail_stop = True
    async with session(device) as conn:
        await expect_errno(
            conn,
            DeviceFeatureRequest.set(Feature.MIG_DEVICE_STATE, MigDeviceState(S.STOP)),
            errno.EIO,
        )
        assert device.migration is not None and device.migration.state == S.ERROR
    assert S(device.migration.state) == S.RUNNING and device.resets == 1  # S(): not narrowed
    assert not device.dma.stopped
    device.fail_stop = False
    async with session(device) as conn:
        await use_fully(conn)
    device.close()


async def test_teardown_releases_device_dma_held_at_the_gate() -> None:
    # A device task pinned a map and waits at the DMA gate of a stopped device: the unmap
    # at disconnect waits for it, so the gate must open first or the teardown never ends.
    device = Saver()
    done = trio.Event()
    map_request, guest = memfd_map()
    guest[:4] = b"data"

    async def device_task() -> None:
        with device.dma.pin(IOVA, 16):
            assert (await device.dma.read(IOVA, 4)) == b"data"
        done.set()

    async with trio.open_nursery() as nursery:
        client, ours = socket.socketpair()
        nursery.start_soon(serve_connection, device, ours)
        async with open_connection(client, handler=_no_commands) as conn:
            await conn.request(VersionRequest())
            await conn.request(map_request)
            os.close(map_request.fds[0])
            await to_state(conn, S.STOP)
            nursery.start_soon(device_task)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()
        await trio.testing.wait_all_tasks_blocked()
        finished = done.is_set() and len(device.dma) == 0
        device.dma.resume()  # (so that a teardown stuck there ends, and the test fails, not hangs)
        assert finished
    guest.close()
    device.close()


# --- 2. a reconnect while the old session tears down ----------------------------------------


async def test_an_immediate_reconnect_is_served_every_time(tmp_path: Path) -> None:
    # A server process of its own, so the old session's teardown races the reconnect
    # in real time as it does for a VMM (in one trio run the teardown always wins).
    path = tmp_path / "gpio.sock"
    async with cli_server("serve", "gpio", f"--socket-path={path}") as proc:
        assert proc.stderr is not None
        refused = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, proc.stderr)  # its log must never block the server
            for _ in range(50):
                sock = _connect(path)
                async with open_connection(sock, handler=GuestRam(0, 0).handle) as conn:
                    try:
                        await conn.request(VersionRequest())
                        await conn.request(RegionReadRequest(7, 0, 4))
                    except VfioUserError as exc:
                        assert exc.errno == errno.EBUSY
                        refused += 1
            nursery.cancel_scope.cancel()
        assert refused == 0


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


async def test_a_reconnect_waits_for_a_slow_teardown_then_is_served() -> None:
    device = Saver()
    release = device.teardown = trio.Event()
    server = DeviceServer(device)
    outcome: list[object] = []
    async with trio.open_nursery() as nursery:
        async with _served(nursery, server) as conn:
            await conn.request(VersionRequest())
        await device.tearing_down.wait()  # the first session is in its teardown

        async def second() -> None:
            async with _served(nursery, server) as conn:
                try:
                    outcome.append(await conn.request(VersionRequest()))
                except VfioUserError as exc:
                    outcome.append(exc)

        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        waiting = not outcome  # waiting, not refused
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert waiting and len(outcome) == 1 and isinstance(outcome[0], VersionReply)
    device.close()


async def test_a_reconnect_waits_for_teardown_at_most_detach_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Saver()
    release = device.teardown = trio.Event()
    server = DeviceServer(device, limits=ServerLimits(detach_wait=5.0))
    async with trio.open_nursery() as nursery:
        async with _served(nursery, server) as conn:
            await conn.request(VersionRequest())
        await device.tearing_down.wait()
        start = trio.current_time()
        async with _served(nursery, server) as conn:
            with pytest.raises(VfioUserError) as exc:
                await conn.request(VersionRequest())
        waited = trio.current_time() - start
        release.set()
        assert exc.value.errno == errno.EBUSY and 5.0 <= waited < 6.0
    device.close()


async def test_a_truly_concurrent_client_is_still_refused_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Saver()
    server = DeviceServer(device)
    async with trio.open_nursery() as nursery, _served(nursery, server) as first:
        await first.request(VersionRequest())
        start = trio.current_time()
        async with _served(nursery, server) as other:
            with pytest.raises(VfioUserError) as exc:
                await other.request(VersionRequest())
            assert exc.value.errno == errno.EBUSY
        assert trio.current_time() == start
        await first.request(RegionReadRequest(0, 0, 8))  # the first client is unaffected
    device.close()


# --- 3. a refused client is released as soon as it hangs up ---------------------------------


async def test_a_refused_client_that_hangs_up_is_released_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    device = Saver()
    server = DeviceServer(device)
    async with trio.open_nursery() as nursery, _served(nursery, server) as conn:
        await conn.request(VersionRequest())
        refused, ours = socket.socketpair()
        refused.close()  # hangs up without a word
        start = trio.current_time()
        await server.serve_connection(ours)
        assert trio.current_time() - start < server.limits.busy_answer_timeout
        assert trio.current_time() == start
    device.close()


# --- 4. a live server's socket path is not taken over ---------------------------------------


async def test_a_second_server_refuses_the_path_of_a_live_one(tmp_path: Path) -> None:
    path = tmp_path / "dev.sock"
    first = create_listener(path)
    identity = path.lstat().st_ino
    with pytest.raises(ListenerError, match=f"{path}.*already"):
        create_listener(path)
    other = Saver()
    with pytest.raises(ListenerError, match="already"):
        await serve(other, path)
    other.close()
    assert path.lstat().st_ino == identity  # still the first server's, still there
    client = _connect(path)
    first.sock.accept()[0].close()  # a probe's connection, then ours: both reach the first
    first.sock.accept()[0].close()
    client.close()
    first.close()
    assert not path.exists()


async def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "dev.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))
    stale.close()  # the file stays, nobody listens: what a crashed server leaves
    listener = create_listener(path)
    client = _connect(path)
    listener.sock.accept()[0].close()
    client.close()
    listener.close()
    assert not path.exists()


async def test_exit_removes_only_our_own_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "dev.sock"
    listener = create_listener(path)
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    successor.bind(os.fspath(tmp_path / "next.sock"))
    os.rename(tmp_path / "next.sock", path)  # replaced behind our back
    listener.close()
    assert path.exists()  # the successor's file stays
    successor.close()


# --- 5. long paths, temporary names, start-up errors ----------------------------------------


@pytest.mark.parametrize("length", [100, 104, 107])
async def test_socket_paths_up_to_107_bytes_work(tmp_path: Path, length: int) -> None:
    base = os.fspath(tmp_path) + "/"
    path = base + "s" * (length - len(base))
    assert len(os.fsencode(path)) == length
    listener = create_listener(path)
    client = _connect(path)
    listener.sock.accept()[0].close()
    client.close()
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary name left
    listener.close()
    assert not os.path.exists(path)


def test_a_path_too_long_for_sun_path_is_a_clear_error(tmp_path: Path) -> None:
    base = os.fspath(tmp_path) + "/"
    path = base + "s" * (108 - len(base))
    with pytest.raises(ListenerError, match=f"{path}.*108 bytes.*107"):
        create_listener(path)
    assert os.listdir(tmp_path) == []


async def test_a_directory_at_the_old_temporary_name_does_not_stop_start_up(tmp_path: Path) -> None:
    path = tmp_path / "dev.sock"
    (tmp_path / f".dev.sock.{os.getpid()}.tmp").mkdir()  # the name older versions used
    listener = create_listener(path)
    listener.close()


async def test_a_temporary_name_collision_draws_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = iter(["taken", "free"])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))  # the listener's draw
    (tmp_path / ".vfu-taken").mkdir()
    listener = create_listener(tmp_path / "dev.sock")
    assert sorted(os.listdir(tmp_path)) == [".vfu-taken", "dev.sock"]
    listener.close()


@pytest.mark.parametrize("where", ["missing/dev.sock", "file/dev.sock", "dir"])
def test_start_up_failures_are_listener_errors_naming_the_path(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    path = tmp_path / where
    with pytest.raises(ListenerError, match=str(path)):
        create_listener(path)


# --- 6. a cancelled accept() takes no connection --------------------------------------------


async def test_a_cancelled_accept_leaves_the_connection_in_the_backlog(tmp_path: Path) -> None:
    listener = create_listener(tmp_path / "dev.sock")
    client = _connect(listener.path)
    with trio.CancelScope() as scope:
        scope.cancel()
        await accept(listener.sock)
    assert scope.cancelled_caught
    conn, _ = listener.sock.accept()  # still pending, for the next accept
    client.sendall(b"x")
    assert conn.recv(1) == b"x"
    conn.close()
    client.close()
    listener.close()


# --- 7. accept() out of fds backs off and recovers ------------------------------------------


async def test_accept_out_of_fds_backs_off_and_serves_once_fds_are_free(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    device = Saver()
    listener = create_listener(tmp_path / "dev.sock")
    server = DeviceServer(device, limits=ServerLimits(accept_backoff=2.0))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    dups: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            async with open_connection(_connect(listener.path), handler=_no_commands) as conn:
                highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
                resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
                while True:  # every fd the lowered limit allows is taken
                    try:
                        dups.append(os.dup(filler))
                    except OSError as exc:
                        assert exc.errno == errno.EMFILE
                        break
                with caplog.at_level(logging.WARNING, logger="vfiouser_trio.server.listener"):
                    nursery.start_soon(server.serve_listener, listener.sock)
                    await trio.testing.wait_all_tasks_blocked()
                assert "Too many open files" in caplog.text and "retrying in 2 s" in caplog.text
                assert server.connections == 0
                for fd in dups:
                    os.close(fd)
                dups.clear()
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                mock_clock.jump(2.0)
                assert isinstance(await conn.request(VersionRequest()), VersionReply)
                assert server.connections == 1
            nursery.cancel_scope.cancel()
    finally:
        for fd in dups:
            os.close(fd)
        os.close(filler)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        listener.close()
    device.close()
