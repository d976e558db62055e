"""Issue 9, engine side: bounded memory per connection, fairness between connections,
a VERSION handler that holds no fd and changes nothing when it fails, a bounded tracer."""

from __future__ import annotations

import errno
import gc
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
from fd_leaks import fd_count
from raw_client import GuestRam

from vfiouser_trio.engine import open_connection
from vfiouser_trio.protocol import Capabilities, TwinSocket, VersionReply, VersionRequest
from vfiouser_trio.protocol.errors import VfioUserError
from vfiouser_trio.server import session as session_module
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.serve import serve_connection

pytestmark = pytest.mark.usefixtures("no_fd_leak")

TWIN_CAPS = Capabilities(max_msg_fds=8, twin_socket=TwinSocket(True))


class Counter(Device):
    """BAR0 of 4 KiB whose reads are counted; ``attached()`` calls are counted too."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1AF4, device_id=0x10FE, class_code=0xFF0000))
        self.add_bar(0, 0x1000, read=self.read0, write=self.write0)
        self.reads = 0
        self.attach_count = 0

    async def read0(self, offset: int, size: int) -> bytes:
        self.reads += 1
        return bytes(size)

    async def write0(self, offset: int, data: bytes) -> None:
        pass

    async def attached(self) -> None:
        self.attach_count += 1


@contextmanager
def gc_disabled() -> Iterator[None]:
    """Count fds as the process holds them: nothing is closed behind our back by the GC."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# --- VERSION: the twin socket is set up before anything is committed ---------------------


async def _version_fails_then_succeeds(monkeypatch: pytest.MonkeyPatch, fail: object) -> None:
    device = Counter()
    client_sock, server_sock = socket.socketpair()
    real_socketpair = socket.socketpair
    calls = 0

    def socketpair(*args: object) -> tuple[socket.socket, socket.socket]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return fail()  # type: ignore[operator, no-any-return]
        return real_socketpair(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(session_module.socket, "socketpair", socketpair)
    with gc_disabled():
        before = fd_count()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connection, device, server_sock)
            async with open_connection(client_sock, handler=GuestRam(0, 0).handle) as conn:
                with pytest.raises(VfioUserError) as failed:
                    await conn.request(VersionRequest(0, 2, TWIN_CAPS))
                # Nothing was committed, no fd is left over: the client may try again.
                assert fd_count() == before
                assert device.attach_count == 0
                reply = await conn.request(VersionRequest(0, 2, TWIN_CAPS))
                assert isinstance(reply, VersionReply) and len(reply.fds) == 1
                conn.attach_twin(reply.fds[0], requests_on_twin=False)
                assert device.attach_count == 1
        device.close()
        assert fd_count() == before - 2  # the initial pair is gone, nothing else
    return failed.value.errno  # type: ignore[return-value]


async def test_version_socketpair_failure_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def emfile() -> tuple[socket.socket, socket.socket]:
        raise OSError(errno.EMFILE, "Too many open files")

    code = await _version_fails_then_succeeds(monkeypatch, emfile)
    assert code == errno.EMFILE


async def test_version_attach_twin_failure_closes_both_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unusable_pair() -> tuple[socket.socket, socket.socket]:
        # Our end is a datagram socket: the engine refuses it (and closes it).
        ours, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        _.close()
        __, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        __.close()
        return ours, theirs

    code = await _version_fails_then_succeeds(monkeypatch, unusable_pair)
    assert code == errno.EINVAL
