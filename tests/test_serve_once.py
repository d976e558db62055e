"""serve(once=True) and ``vfio-user-trio serve --once``: one client is served, then the
listener closes, the socket file goes and serve returns (libvfio-user's samples' mode)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.cli_process import cli_server
from vfiouser_trio.client import VfioUserError, connect
from vfiouser_trio.examples.null import NullDevice
from vfiouser_trio.protocol import PciRegion
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.serve import DeviceServer, serve

pytestmark = pytest.mark.usefixtures("no_fd_leak")


async def _serve_once(
    source: Device | Callable[[], Device],
    returned: trio.Event,
    *,
    path: Path | None = None,
    fd: int | None = None,
    task_status: trio.TaskStatus[DeviceServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(source, path, fd=fd, once=True, task_status=task_status)
    returned.set()


@pytest.mark.parametrize("shared", [True, False], ids=["device", "factory"])
async def test_one_client_is_served_then_serve_returns_and_the_path_is_gone(
    tmp_path: Path, shared: bool
) -> None:
    path = tmp_path / "once.sock"
    device = NullDevice()
    returned = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            source = device if shared else NullDevice
            await nursery.start(partial(_serve_once, source, returned, path=path))
            assert path.exists()
            async with connect(str(path)) as client:
                assert await client.read(PciRegion.BAR0, 0, 4) == bytes(4)
                assert not returned.is_set()  # still serving while the client is there
            await returned.wait()  # returns by itself once the client has gone
    assert not path.exists()
    with pytest.raises(FileNotFoundError):
        socket.socket(socket.AF_UNIX).connect(str(path))
    device.close()


async def test_a_client_connecting_meanwhile_is_refused_with_ebusy(tmp_path: Path) -> None:
    path = tmp_path / "once.sock"
    device = NullDevice()
    returned = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(_serve_once, device, returned, path=path))
            async with connect(str(path)) as first:
                with pytest.raises(VfioUserError) as refused:
                    async with connect(str(path)):
                        pass
                assert refused.value.errno == errno.EBUSY
                assert await first.read(PciRegion.BAR0, 0, 4) == bytes(4)  # unaffected
            await returned.wait()
    assert not path.exists()
    device.close()


async def test_once_on_an_inherited_listening_fd(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "inherited.sock"))
    listener.listen()
    device = NullDevice()
    returned = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(_serve_once, device, returned, fd=listener.detach()))
            async with connect(str(tmp_path / "inherited.sock")) as client:
                assert await client.read(PciRegion.BAR0, 0, 4) == bytes(4)
            await returned.wait()
    device.close()


async def test_the_cli_serves_once_and_exits_zero(tmp_path: Path) -> None:
    path = tmp_path / "cli-once.sock"
    async with cli_server("serve", "null", "--once", f"--socket-path={path}") as proc:
        with trio.fail_after(30):
            async with connect(str(path)) as client:
                assert await client.read(PciRegion.BAR0, 0, 4) == bytes(4)
            await proc.wait()  # no signal: it leaves when its client has
        assert proc.returncode == 0
    assert not path.exists()
