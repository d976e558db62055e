"""Serving devices: on a socket path, an inherited fd, or one connected socket.

One process serves many devices and many clients at once, each connection in
its own nursery, so one bad client never disturbs another. A device serves one
client at a time: a second client connecting while the first is attached gets
EBUSY in answer to its VERSION and is disconnected. A reconnecting client finds
the device as the last one left it (spec: Client Disconnection). Pass a
zero-argument factory instead of a device to give every connection a fresh one.

Several devices in one process are several ``serve`` calls in one nursery::

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, GpioDevice(), "/run/gpio.sock")
        nursery.start_soon(serve, DmaEngine(), "/run/dma.sock")
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import weakref
from collections.abc import Callable

import trio

from ..engine import ConnectionHooks, HandlerResult, open_connection
from ..limits import DEFAULT_LIMITS, ServerLimits
from ..ordering import OrderingPolicy
from ..protocol.capabilities import Capabilities
from ..protocol.errors import VfioUserError
from ..protocol.framing import Frame
from .device import Device
from .listener import Listener, accept, adopt_socket, create_listener
from .session import DEFAULT_SERVER_CAPABILITIES, ServerSession

log = logging.getLogger(__name__)

#: Devices with a client attached, whichever server (path, fd) that client came through.
_ATTACHED: weakref.WeakSet[Device] = weakref.WeakSet()

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
                        nursery.start_soon(device.run)
                        await self._session(device, sock)
                        nursery.cancel_scope.cancel()
                finally:
                    device.close()
            elif source in _ATTACHED:
                await _reject_busy(sock, source.name)
            else:
                _ATTACHED.add(source)
                try:
                    await self._session(source, sock)
                finally:
                    _ATTACHED.discard(source)
        except Exception:
            log.exception("connection failed")

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
        self, sock: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept clients on a listening socket forever, each in its own task."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                conn = await accept(sock)
                nursery.start_soon(self.serve_connection, conn)


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


async def _reject_busy(sock: socket.socket, name: str) -> None:
    """Answer the client's first command with EBUSY, then hang up."""
    asked = trio.Event()

    async def refuse(frame: Frame) -> HandlerResult:
        asked.set()
        raise VfioUserError(errno.EBUSY, f"{name} already has a client")

    log.warning("%s: refusing a second client", name)
    async with open_connection(sock, handler=refuse) as conn:
        with trio.move_on_after(BUSY_ANSWER_TIMEOUT):
            await asked.wait()
        # The error reply is queued by the time the handler's task yields; send it, then close.
        await conn.aclose()


#: How long a refused client gets to send its first command before we hang up.
BUSY_ANSWER_TIMEOUT = 10.0


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
    task_status: trio.TaskStatus[DeviceServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a device on a UNIX socket ``path`` or an inherited socket ``fd`` until cancelled.

    The socket file appears only once it is listening (mode 0600); it is removed
    when serving ends. An inherited ``fd`` may be a listening socket (clients are
    accepted on it) or one connected client (served until it leaves, then we return).
    A device instance's ``run()`` task runs for as long as it is served.
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
        listener = create_listener(path)
        sock, listening = listener.sock, True
    else:
        assert fd is not None
        sock, listening = adopt_socket(fd)
    try:
        async with trio.open_nursery() as nursery:
            shared = server.shared_device
            if shared is not None:
                nursery.start_soon(shared.run)
            if listening:
                await nursery.start(server.serve_listener, sock)
                task_status.started(server)
            else:
                task_status.started(server)
                await server.serve_connection(sock)
                nursery.cancel_scope.cancel()
    finally:
        if listener is not None:
            listener.close()
        elif listening:
            sock.close()
