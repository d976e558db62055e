"""Serving devices: on a socket path, an inherited fd, or one connected socket.

One process serves many devices and many clients at once, each connection in
its own nursery, so one bad client never disturbs another. A device serves one
client at a time: a second client connecting while the first is attached gets
EBUSY in answer to its first command and is disconnected (at once if it hangs up
first, else after ``ServerLimits.busy_answer_timeout``). A client that connects
while the previous one has hung up but its session is still being torn down is
not refused: it waits for the teardown (at most ``ServerLimits.detach_wait``), then
is served. A reconnecting client finds the device as the last one left it, back in
RUNNING if it was stopped for migration (spec: Client Disconnection,
https://www.qemu.org/docs/master/interop/vfio-user.html; see ``DeviceRuntime.client_gone`` in
server/device_runtime.py).
Pass a zero-argument factory instead of a device to give every connection a fresh one.

Several devices in one process are several ``serve`` calls in one nursery::

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, GpioDevice(), "/run/gpio.sock")
        nursery.start_soon(serve, DmaEngine(), "/run/dma.sock")
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import weakref
from collections.abc import Callable

import trio

from ..engine import Connection, ConnectionHooks, HandlerResult, open_connection
from ..limits import DEFAULT_LIMITS, ServerLimits
from ..ordering import OrderingPolicy
from ..protocol.capabilities import Capabilities
from ..protocol.errors import VfioUserError
from ..protocol.framing import Frame
from .device import Device
from .listener import Listener, accept, adopt_socket, create_listener
from .session import DEFAULT_SERVER_CAPABILITIES, ServerSession

log = logging.getLogger(__name__)


class _Attachment:
    """The client a shared device serves now, seen by the servers that bring it others."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        #: Set once that client's session is over, teardown included.
        self.ended = trio.Event()

    def leaving(self) -> bool:
        """Whether that client has hung up (or its socket is closed): only teardown is left."""
        fd = self._sock.fileno()  # -1 once the session has closed the socket
        if fd < 0:
            return True
        poller = select.poll()
        poller.register(fd, select.POLLRDHUP)  # POLLHUP and POLLERR are always reported
        return bool(poller.poll(0))


#: Devices with a client attached, whichever server (path, fd) that client came through.
_ATTACHED: weakref.WeakKeyDictionary[Device, _Attachment] = weakref.WeakKeyDictionary()

#: A device instance (shared by successive clients) or a factory (one device per connection).
DeviceSource = Device | Callable[[], Device]


class DeviceServer:
    """Serves one device source to the clients handed to ``serve_connection``."""

    def __init__(
        self,
        source: DeviceSource,
        *,
        capabilities: Capabilities = DEFAULT_SERVER_CAPABILITIES,
        offer_twin_socket: bool = True,
        policy: OrderingPolicy | None = None,
        hooks: ConnectionHooks | None = None,
        limits: ServerLimits = DEFAULT_LIMITS,
    ) -> None:
        self.source = source
        if isinstance(source, Device):
            # Declaration errors (naming device, region and fix) before any client comes.
            source._vfu.build()
        self.limits = limits
        self.capabilities = capabilities
        self.offer_twin_socket = offer_twin_socket
        self.policy = policy
        self.hooks = hooks
        #: Connections served so far (all outcomes), for logs and tests.
        self.connections = 0

    @property
    def shared_device(self) -> Device | None:
        return self.source if isinstance(self.source, Device) else None

    async def serve_connection(self, sock: socket.socket) -> None:
        """Serve one client on ``sock`` (taking ownership) until it disconnects.

        Never raises for what the client does; a failure is logged and ends only
        this connection.
        """
        self.connections += 1
        source = self.source
        try:
            if not isinstance(source, Device):
                device = source()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(device._vfu.run, nursery.cancel_scope)
                        await self._session(device, sock)
                        nursery.cancel_scope.cancel()
                finally:
                    device.close()
            else:
                try:
                    free = await self._wait_detached(source)
                except BaseException:
                    sock.close()  # cancelled while waiting: the socket is still ours
                    raise
                if not free:
                    await _reject_busy(sock, source.name, self.limits.busy_answer_timeout)
                    return
                attachment = _ATTACHED[source] = _Attachment(sock)
                try:
                    await self._session(source, sock)
                finally:
                    del _ATTACHED[source]
                    attachment.ended.set()
        except Exception:
            log.exception("connection failed")

    async def _wait_detached(self, device: Device) -> bool:
        """True once ``device`` is free: at once, or after a departing client's teardown.

        False (refuse with EBUSY) while a client that has not hung up is attached, or
        when a departing one's teardown outlasts ``limits.detach_wait``.
        """
        with trio.move_on_after(self.limits.detach_wait):
            while (attachment := _ATTACHED.get(device)) is not None and attachment.leaving():
                log.info("%s: a new client waits for the previous one's teardown", device.name)
                await attachment.ended.wait()
        return device not in _ATTACHED

    async def _session(self, device: Device, sock: socket.socket) -> None:
        log.info("%s: client connected", device.name)
        await serve_connection(
            device,
            sock,
            capabilities=self.capabilities,
            offer_twin_socket=self.offer_twin_socket,
            policy=self.policy,
            hooks=self.hooks,
            limits=self.limits,
        )
        log.info("%s: client disconnected", device.name)

    async def serve_listener(
        self,
        sock: socket.socket,
        *,
        once: bool = False,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients on a listening socket forever, each in its own task.

        ``once``: serve the first client only and return when it leaves; clients that
        connect meanwhile are refused with EBUSY, as a second client of a device is.
        """
        async with trio.open_nursery() as nursery:
            task_status.started()
            if once:
                first = await accept(sock, backoff=self.limits.accept_backoff)
                nursery.start_soon(self._refuse_all, sock)
                await self.serve_connection(first)
                nursery.cancel_scope.cancel()
                return
            while True:
                conn = await accept(sock, backoff=self.limits.accept_backoff)
                nursery.start_soon(self.serve_connection, conn)

    async def _refuse_all(self, sock: socket.socket) -> None:
        """Answer every client accepted on ``sock`` with EBUSY (serving once, one is served)."""
        shared = self.shared_device
        name = shared.name if shared is not None else "device"
        async with trio.open_nursery() as nursery:
            while True:
                conn = await accept(sock, backoff=self.limits.accept_backoff)
                nursery.start_soon(_reject_busy, conn, name, self.limits.busy_answer_timeout)


async def serve_connection(
    device: Device,
    sock: socket.socket,
    *,
    capabilities: Capabilities = DEFAULT_SERVER_CAPABILITIES,
    offer_twin_socket: bool = True,
    policy: OrderingPolicy | None = None,
    hooks: ConnectionHooks | None = None,
    limits: ServerLimits = DEFAULT_LIMITS,
) -> None:
    """Serve ``device`` to the one client on the connected ``sock`` until it leaves.

    Takes ownership of ``sock``. Errors the client causes end the session and are
    reported as close reasons, never raised. The device's ``run()`` task is not
    started here (``serve`` runs it for a device's whole served life).
    """
    session = ServerSession(
        device,
        capabilities=capabilities,
        offer_twin_socket=offer_twin_socket,
        policy=policy,
        hooks=hooks,
        limits=limits,
    )
    await session.run(sock)


async def _reject_busy(sock: socket.socket, name: str, timeout: float) -> None:
    """Answer the client's first command with EBUSY, then hang up.

    The connection is held until that answer is sent, the client hangs up, or
    ``timeout`` seconds pass, whichever comes first.
    """
    done = trio.Event()

    async def refuse(frame: Frame) -> HandlerResult:
        done.set()
        raise VfioUserError(errno.EBUSY, f"{name} already has a client")

    log.warning("%s: refusing a second client", name)
    async with open_connection(sock, handler=refuse) as conn:
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_set_when_closed, conn, done)
                await done.wait()
                nursery.cancel_scope.cancel()
            # The error reply is queued by the time the handler's task yields; send it, then close.
            await conn.aclose()


async def _set_when_closed(conn: Connection, event: trio.Event) -> None:
    await conn.wait_closed()
    event.set()


async def serve(
    source: DeviceSource,
    path: str | os.PathLike[str] | None = None,
    *,
    fd: int | None = None,
    capabilities: Capabilities = DEFAULT_SERVER_CAPABILITIES,
    offer_twin_socket: bool = True,
    policy: OrderingPolicy | None = None,
    hooks: ConnectionHooks | None = None,
    limits: ServerLimits = DEFAULT_LIMITS,
    once: bool = False,
    task_status: trio.TaskStatus[DeviceServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a device on a UNIX socket ``path`` or an inherited socket ``fd`` until cancelled.

    The socket file appears only once it is listening (mode 0600); it is removed
    when serving ends. An inherited ``fd`` may be a listening socket (clients are
    accepted on it) or one connected client (served until it leaves, then we return).
    A device instance's ``run()`` task runs for as long as it is served.

    ``once=True`` serves one client and returns when it leaves, as libvfio-user's
    samples do: the first client is served (others connecting meanwhile get EBUSY), then
    the listener closes and the socket file is removed.
    """
    if (path is None) == (fd is None):
        raise ValueError("give exactly one of path and fd")
    server = DeviceServer(
        source,
        capabilities=capabilities,
        offer_twin_socket=offer_twin_socket,
        policy=policy,
        hooks=hooks,
        limits=limits,
    )
    listener: Listener | None = None
    if path is not None:
        listener = create_listener(path)  # ListenerError names the path and the reason
        sock, listening = listener.sock, True
    else:
        assert fd is not None
        sock, listening = adopt_socket(fd)
    try:
        async with trio.open_nursery() as nursery:
            shared = server.shared_device
            if shared is not None:
                nursery.start_soon(shared._vfu.run)
            if listening and not once:
                await nursery.start(server.serve_listener, sock)
                task_status.started(server)
            else:
                task_status.started(server)
                if listening:
                    await server.serve_listener(sock, once=True)
                else:
                    await server.serve_connection(sock)
                nursery.cancel_scope.cancel()
    finally:
        if listener is not None:
            listener.close()
        elif listening:
            sock.close()
