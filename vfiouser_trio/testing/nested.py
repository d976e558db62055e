"""A device and a client in one trio program: the device served in the caller's nursery.

    async with nested_device(MyDevice()) as pair:
        assert await pair.client.read(PciRegion.BAR0, 0, 4) == b"\\x2a\\0\\0\\0"
        assert pair.device.reads == 1          # the device object itself, to poke at
        print(pair.tracer)                      # every message so far

The device is served over a socket pair (or, with ``path=True``, on a socket file in a
temporary directory that the client connects to by name; further clients connecting there
are refused with EBUSY, as ``serve()`` does). The client is connected and has
negotiated before the body runs. On exit the client closes, the device's session ends as it
would for a real disconnect (DMA maps and IRQ fds dropped, device state kept), and the number
of open file descriptors is compared with the number before: more is a leak, reported as
:class:`FdLeakError` (``check_fds=False`` turns this off). The device itself is not closed:
the test may still inspect it, and closes it when it wants its memory back.

A bug in the device's code (a region callback raising, a read returning the wrong length,
``reset()`` raising) answers the client EIO, as when served for real, and is also collected
in ``pair.device_errors``: on exit the first one is raised into the test as a
:class:`~vfiouser_trio.server.device_errors.DeviceCodeError` whose cause is the device's own
exception, even when the body caught the client's EIO. A test that provokes one on purpose
clears ``pair.device_errors`` after checking it (or passes ``raise_device_errors=False``).
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from ..client import Client, connect
from ..engine import ConnectionHooks
from ..ordering import OrderingPolicy
from ..server.device import Device
from ..server.device_errors import DeviceCodeError
from ..server.listener import accept, create_listener
from ..server.serve import DeviceServer
from .hooks import chain, close_hooks
from .tracer import Tracer
from .wait_for import WaitForGraph, wait_for_graph

__all__ = [
    "DeviceCodeError",
    "Faults",
    "FdLeakError",
    "NestedDevice",
    "NestedDeviceFactory",
    "fd_table",
    "nested_device",
]

#: One fault hook or several (applied in the order given, from the client outwards).
Faults = ConnectionHooks | Sequence[ConnectionHooks]


#: The type of the device a nested device serves.
D = TypeVar("D", bound=Device)


@dataclass(frozen=True, slots=True)
class NestedDevice(Generic[D]):
    """A device and the client connected to it."""

    #: The connected, negotiated client.
    client: Client
    #: The device object being served (the one passed in).
    device: D
    #: Records every message on the client's connection.
    tracer: Tracer
    #: The socket file the client connected to (``path=True``), else None.
    path: str | None = None
    #: Bugs of the device's code so far, oldest first; raised on exit unless cleared.
    device_errors: list[DeviceCodeError] = field(default_factory=list)
    #: Records the server's side of the connection (``server_tracer=``), else None.
    server_tracer: Tracer | None = None

    def wait_for_graph(self) -> WaitForGraph:
        """Which side awaits which request now, and what each is processing (both sides'
        pending requests; the server's side needs ``server_tracer``)."""
        sides = [self.tracer] if self.server_tracer is None else [self.tracer, self.server_tracer]
        return wait_for_graph(*sides)


class FdLeakError(AssertionError):
    """More file descriptors were open after the nested device closed than before it."""

    def __init__(self, before: Mapping[int, str], after: Mapping[int, str]) -> None:
        #: fd -> what it refers to, for the fds open now that were not open before.
        self.leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
        count = len(after) - len(before)
        listing = ", ".join(f"{fd} -> {target}" for fd, target in sorted(self.leaked.items()))
        super().__init__(f"{count} file descriptor(s) leaked: {listing}")


def fd_table() -> dict[int, str]:
    """The process's open fds and what each refers to (from /proc/self/fd)."""
    table = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            table[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory listing's own fd, closed by now
            continue
    return table


def _check_fds(before: Mapping[int, str]) -> None:
    after = fd_table()
    if len(after) > len(before):
        gc.collect()  # sockets only unreferenced in a cycle are not leaks
        after = fd_table()
    if len(after) > len(before):
        raise FdLeakError(before, after)


@asynccontextmanager
async def nested_device(
    device: D,
    *,
    twin_socket: bool = True,
    policy: OrderingPolicy | None = None,
    tracer: Tracer | None = None,
    faults: Faults | None = None,
    path: bool = False,
    check_fds: bool = True,
    raise_device_errors: bool = True,
    client_policy: OrderingPolicy | None = None,
    server_hooks: Faults | None = None,
    server_tracer: Tracer | None = None,
) -> AsyncIterator[NestedDevice[D]]:
    """Serve ``device`` and connect a client to it for the ``async with`` body.

    ``twin_socket``: the client proposes (and the server grants) a twin socket for the
    device's DMA requests. ``policy``: the device side's ordering policy (SpecOrder when
    None). ``tracer``: records the client's connection (a fresh one when None). ``faults``:
    fault hooks on the client's connection, between the client and the tracer, so the trace
    shows what really crossed the socket. ``path``: serve on a socket file instead of a
    socket pair. ``check_fds``: raise :class:`FdLeakError` on exit if fds leaked.
    ``raise_device_errors``: raise the first of ``pair.device_errors`` on exit.
    ``client_policy``: the client side's ordering policy (for the device's DMA requests).
    ``server_hooks``: hooks on the server's connection (faults, observers), from the device
    outwards; ``server_tracer``: records the server's connection next to its socket
    (``pair.server_tracer``), processing included, for
    :func:`~vfiouser_trio.testing.order_check.check_order` and ``pair.wait_for_graph()``.
    """
    before = fd_table() if check_fds else None
    device_errors: list[DeviceCodeError] = []
    listeners = device._vfu.errors.listeners
    listeners.append(device_errors.append)
    tracer = tracer if tracer is not None else Tracer(label="client")
    hooks = chain(*_as_list(faults), tracer)
    if server_tracer is not None and not server_tracer.label:
        server_tracer.label = "server"
    device_hooks = chain(*_as_list(server_hooks), server_tracer)
    # An exception from the body is re-raised outside the nursery, unwrapped.
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            server = DeviceServer(
                device, offer_twin_socket=twin_socket, policy=policy, hooks=device_hooks
            )
            session_over = trio.Event()

            async def serve_pair(sock: socket.socket) -> None:
                try:
                    await server.serve_connection(sock)
                finally:
                    session_over.set()

            socket_path: str | None = None
            target: str | socket.socket
            if path:
                socket_path = await nursery.start(_listen, server, serve_pair)
                target = socket_path
            else:
                target, server_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                nursery.start_soon(serve_pair, server_sock)
            nursery.start_soon(device.run)
            try:
                async with connect(
                    target, twin_socket=twin_socket, hooks=hooks, policy=client_policy
                ) as client:
                    yield NestedDevice(
                        client, device, tracer, socket_path, device_errors, server_tracer
                    )
            finally:
                close_hooks(hooks)
            # The client is gone: let the device see it go as it would a real disconnect.
            await session_over.wait()
            close_hooks(device_hooks)
        except BaseException as exc:
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
            listeners.remove(device_errors.append)
    if raise_device_errors and device_errors and not _interrupts(body_error):
        raise _first_device_error(device_errors, body_error)
    if body_error is not None:
        raise body_error
    if before is not None:
        _check_fds(before)


def _as_list(hooks: Faults | None) -> list[ConnectionHooks]:
    return [hooks] if isinstance(hooks, ConnectionHooks) else list(hooks or ())


def _interrupts(error: BaseException | None) -> bool:
    """Whether ``error`` is no failure of the test's own (a cancellation, Ctrl-C)."""
    return error is not None and not isinstance(error, Exception)


def _first_device_error(
    errors: Sequence[DeviceCodeError], body_error: BaseException | None
) -> DeviceCodeError:
    """The first device bug, noting the others and what the body then raised."""
    first = errors[0]
    for later in errors[1:]:
        first.add_note(f"then: {later}")
    if body_error is not None:
        first.add_note(f"the test body then raised {type(body_error).__name__}: {body_error}")
    return first


async def _listen(
    server: DeviceServer,
    serve_pair: Callable[[socket.socket], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on a fresh socket file until cancelled.

    The first client is the pair's; later ones are served as ``serve()`` would (refused with
    EBUSY while the first is attached).
    """
    directory = tempfile.mkdtemp(prefix="vfiouser-")
    try:
        listener = create_listener(os.path.join(directory, "device.sock"))
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(os.fspath(listener.path))
                nursery.start_soon(serve_pair, await accept(listener.sock))
                while True:
                    nursery.start_soon(server.serve_connection, await accept(listener.sock))
        finally:
            listener.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class NestedDeviceFactory:
    """Starts nested devices in a nursery: ``pair = await factory(device, **options)``.

    What the ``vfio_pair`` fixture yields. Takes the options of :func:`nested_device`. Every
    pair runs until :meth:`aclose` (the end of the test); pairs are closed in reverse order of
    creation, each checked for fd leaks and raising its device's bugs (a test error at
    teardown). ``on_tracer(label, tracer)`` is told of each pair's
    tracer.
    """

    def __init__(
        self, nursery: trio.Nursery, *, on_tracer: Callable[[str, Tracer], None] | None = None
    ) -> None:
        self._nursery = nursery
        self._on_tracer = on_tracer
        self._running: list[tuple[trio.Event, trio.Event]] = []

    async def __call__(
        self,
        device: D,
        *,
        twin_socket: bool = True,
        policy: OrderingPolicy | None = None,
        tracer: Tracer | None = None,
        faults: Faults | None = None,
        path: bool = False,
        check_fds: bool = True,
        raise_device_errors: bool = True,
        client_policy: OrderingPolicy | None = None,
        server_hooks: Faults | None = None,
        server_tracer: Tracer | None = None,
    ) -> NestedDevice[D]:
        tracer = tracer if tracer is not None else Tracer(label="client")
        if self._on_tracer is not None:
            label = f"{type(device).__name__} #{len(self._running)}"
            self._on_tracer(label, tracer)
            if server_tracer is not None:
                self._on_tracer(f"{label} (server)", server_tracer)
        stop, stopped = trio.Event(), trio.Event()

        async def run(*, task_status: trio.TaskStatus[NestedDevice[D]]) -> None:
            try:
                async with nested_device(
                    device,
                    twin_socket=twin_socket,
                    policy=policy,
                    tracer=tracer,
                    faults=faults,
                    path=path,
                    check_fds=check_fds,
                    raise_device_errors=raise_device_errors,
                    client_policy=client_policy,
                    server_hooks=server_hooks,
                    server_tracer=server_tracer,
                ) as pair:
                    task_status.started(pair)
                    await stop.wait()
            finally:
                stopped.set()

        pair: NestedDevice[D] = await self._nursery.start(run)
        self._running.append((stop, stopped))
        return pair

    async def aclose(self) -> None:
        """Close every pair, newest first (so each one's fd check sees only its own fds)."""
        while self._running:
            stop, stopped = self._running.pop()
            stop.set()
            await stopped.wait()
