"""A server process in miniature for the fuzzer: two devices served on real sockets.

A :class:`World` runs one trio loop in a thread of its own. In it, ``serve()`` serves the
*target* device (the one the fuzzer drives) and a *sentinel* device, each on a UNIX socket
path of a temporary directory, exactly as ``vfio-user-trio serve`` would. The synchronous
caller (a hypothesis state machine) runs coroutines in that loop with :meth:`World.run`,
which fails with :class:`ServerHung` when the loop does not answer in time (a blocking
syscall in the loop freezes every device) and with :class:`ServerCrashed` when an exception
escaped a server task (which would end the whole process).

The sentinel's persistent connection is the "is every other device still served?" probe.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
import trio.testing

from vfiouser_trio.engine import Connection, HandlerResult, open_connection
from vfiouser_trio.examples import DmaEngine, GpioDevice, NullDevice
from vfiouser_trio.protocol import (
    Capabilities,
    DmaReadReply,
    DmaReadRequest,
    DmaWriteReply,
    DmaWriteRequest,
    RegionReadReply,
    RegionReadRequest,
    TwinSocket,
    VersionReply,
    VersionRequest,
    decode_request,
)
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.server import Device, serve

T = TypeVar("T")

#: The example devices the fuzzer drives, by the CLI's names.
DEVICES: dict[str, Callable[[], Device]] = {
    "gpio": GpioDevice,
    "null": NullDevice,
    "dmaengine": DmaEngine,
}
#: Seconds one step may take before the loop counts as hung.
STEP_TIMEOUT = 10.0
#: Seconds a coroutine may await inside the loop (a reply that never comes).
AWAIT_TIMEOUT = 5.0


class ServerCrashed(AssertionError):
    """An exception escaped a server task: in a real server process, every device is gone."""


class ServerHung(AssertionError):
    """The server's trio loop stopped answering (it blocked in a syscall)."""


class LogCapture(logging.Handler):
    """Keeps the server's log records: warnings are counted, errors are failures."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.warnings = 0
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            text = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                text += f": {record.exc_info[1]!r}"
            self.errors.append(text)
        elif record.levelno >= logging.WARNING:
            self.warnings += 1


class GuestRam:
    """Client memory reached by DMA_READ/DMA_WRITE, in disjoint windows keyed by IOVA.

    Accesses outside every window are answered with EFAULT, as a client would.
    """

    def __init__(self) -> None:
        self.windows: dict[int, bytearray] = {}

    def _find(self, address: int, count: int) -> tuple[bytearray, int]:
        for base, mem in self.windows.items():
            if base <= address and address + count <= base + len(mem):
                return mem, address - base
        raise VfioUserError(errno.EFAULT, f"no guest memory at {address:#x}+{count:#x}")

    async def handle(self, frame: Frame) -> HandlerResult:
        request = decode_request(frame.header.command, frame.payload, frame.fds)
        if isinstance(request, DmaReadRequest):
            mem, off = self._find(request.address, request.count)
            return DmaReadReply(request.address, bytes(mem[off : off + request.count]))
        if isinstance(request, DmaWriteRequest):
            mem, off = self._find(request.address, len(request.data))
            mem[off : off + len(request.data)] = request.data
            return DmaWriteReply(request.address, len(request.data))
        raise VfioUserError(errno.EINVAL)


class Client:
    """One client connection to a device of the world: the engine, plus a dup of its socket
    for writing raw (malformed) bytes straight onto the stream."""

    def __init__(
        self, conn: Connection, raw: socket.socket, ram: GuestRam, hangup: trio.Event
    ) -> None:
        self.conn = conn
        self.raw = raw
        self.ram = ram
        self.negotiated = False
        self._hangup = hangup

    def close(self) -> None:
        """Hang up (the engine closes its socket; the raw dup is closed here)."""
        self.raw.close()
        self._hangup.set()


class World:
    """Two devices served by one trio loop in a thread; see the module docstring."""

    def __init__(self, target: str) -> None:
        self.target_name = target
        self.target = DEVICES[target]()
        self.sentinel = NullDevice()
        self._dir = Path(tempfile.mkdtemp(prefix="vfu-fuzz-"))
        self.target_path = self._dir / "target.sock"
        self.sentinel_path = self._dir / "sentinel.sock"
        self.crash: BaseException | None = None
        self.frames = 0
        self.log = LogCapture()
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._sentinel: Client | None = None
        self._thread = threading.Thread(target=self._thread_main, name="fuzz-world", daemon=True)

    # --- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        logger = logging.getLogger("vfiouser_trio")
        logger.addHandler(self.log)
        logger.propagate = False  # the fuzzer's expected warnings stay off the terminal
        self._thread.start()
        if not self._ready.wait(STEP_TIMEOUT):
            raise ServerHung("the world did not start")
        self._raise_if_crashed()
        self._sentinel = self.run(self.connect, self.sentinel_path)

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # what would have ended a real server process
            self.crash = exc
        finally:
            self._ready.set()
            self._finished.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(serve, self.target, self.target_path)
            await nursery.start(serve, self.sentinel, self.sentinel_path)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _raise_if_crashed(self) -> None:
        if self.crash is not None:
            raise ServerCrashed(f"an exception escaped the server: {self.crash!r}") from self.crash

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` in the world's loop; its result, or its exception."""
        self._raise_if_crashed()
        if self._finished.is_set() or self._token is None or self._nursery is None:
            raise ServerCrashed("the world's loop has ended")
        box: dict[str, Any] = {}
        done = threading.Event()
        nursery = self._nursery

        async def wrapper() -> None:
            try:
                with trio.fail_after(AWAIT_TIMEOUT):
                    box["value"] = await fn(*args)
            except trio.TooSlowError:
                box["error"] = ServerHung(f"no answer within {AWAIT_TIMEOUT:g} s")
            except Exception as exc:  # handed to the caller's thread
                box["error"] = exc
            finally:
                done.set()

        try:
            self._token.run_sync_soon(lambda: nursery.start_soon(wrapper))
        except trio.RunFinishedError:
            self._finished.wait(STEP_TIMEOUT)
            self._raise_if_crashed()
            raise ServerCrashed("the world's loop has ended") from None
        if not done.wait(STEP_TIMEOUT):
            raise ServerHung(f"the server loop did not answer within {STEP_TIMEOUT:g} s")
        if "error" in box:
            raise box["error"]
        if "value" not in box:  # cancelled: the world's nursery is going down
            self._finished.wait(STEP_TIMEOUT)
            self._raise_if_crashed()
            raise ServerCrashed("the world's loop ended during a step")
        return box["value"]  # type: ignore[no-any-return]

    def stop(self) -> None:
        """Close every connection and the servers; wait for the loop to end."""
        if self._sentinel is not None:
            sentinel, self._sentinel = self._sentinel, None
            if not self._finished.is_set():
                with contextlib.suppress(ServerCrashed, ServerHung):
                    self.run(self.hang_up, sentinel)
        if self._token is not None and self._stop is not None and not self._finished.is_set():
            stop = self._stop
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(stop.set)
        hung = not self._finished.wait(STEP_TIMEOUT)
        logger = logging.getLogger("vfiouser_trio")
        logger.removeHandler(self.log)
        logger.propagate = True
        shutil.rmtree(self._dir, ignore_errors=True)
        if not hung:
            self.target.close()
            self.sentinel.close()
        if hung:
            raise ServerHung("the server loop did not stop")
        self._raise_if_crashed()

    # --- clients (coroutines: run them with run()) ------------------------------------------

    async def connect(self, path: Path) -> Client:
        """A raw engine client connected to ``path`` (not negotiated yet)."""
        assert self._nursery is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await trio.socket.from_stdlib_socket(sock.dup()).connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        ram = GuestRam()
        hangup = trio.Event()
        raw = sock.dup()
        client: Client = await self._nursery.start(self._client_task, sock, ram, hangup, raw)
        return client

    async def _client_task(
        self,
        sock: socket.socket,
        ram: GuestRam,
        hangup: trio.Event,
        raw: socket.socket,
        *,
        task_status: trio.TaskStatus[Client],
    ) -> None:
        try:
            async with open_connection(sock, handler=ram.handle, max_recv_fds=8) as conn:
                client = Client(conn, raw, ram, hangup)
                task_status.started(client)
                await hangup.wait()
        finally:
            raw.close()

    async def negotiate(
        self, client: Client, *, twin: bool, caps: Capabilities | None = None
    ) -> None:
        """VERSION as a well-behaved client: 8 fds a message, twin socket if asked."""
        caps = caps or Capabilities(max_msg_fds=8, twin_socket=TwinSocket(True) if twin else None)
        self.frames += 1
        reply = await client.conn.request(VersionRequest(0, 2, caps))
        assert isinstance(reply, VersionReply)
        client.conn.max_send_fds = reply.effective_capabilities.max_msg_fds
        if reply.fds:
            client.conn.attach_twin(reply.fds[0], requests_on_twin=False)
        client.negotiated = True

    async def sentinel_answers(self) -> None:
        """The other device still answers a REGION_READ on its open connection."""
        assert self._sentinel is not None
        conn = self._sentinel.conn
        if not self._sentinel.negotiated:
            await self.negotiate(self._sentinel, twin=False)
        reply = await conn.request(RegionReadRequest(0, 0, 4))
        assert isinstance(reply, RegionReadReply) and reply.data == bytes(4)

    async def fresh_sentinel_connection(self) -> None:
        """A new client of the sentinel device is accepted, negotiates and is answered."""
        client = await self.connect(self.sentinel_path)
        try:
            await self.negotiate(client, twin=False)
            reply = await client.conn.request(RegionReadRequest(0, 0, 4))
            assert isinstance(reply, RegionReadReply) and reply.data == bytes(4)
        finally:
            client.close()

    async def hang_up(self, client: Client) -> None:
        """Close ``client`` and wait until the server has seen it go."""
        client.close()
        await self.settle()

    async def settle(self) -> None:
        """Let every task of the loop run until all are blocked (teardowns finished)."""
        await trio.testing.wait_all_tasks_blocked(cushion=0.001)
