"""Errors of device code explain themselves: a WARNING with device, command, region, offset
and traceback; EIO to the client; the bug raised into the test by nested_device/vfio_pair.
A DMA fault inside a callback is a WARNING and the client's EFAULT, not a device bug."""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio

from vfiouser_trio.cli_errors import leaves
from vfiouser_trio.client import Client, VfioUserError, connect
from vfiouser_trio.protocol import PciRegion
from vfiouser_trio.server import MigState
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.device_errors import DeviceCodeError
from vfiouser_trio.server.pci import PciIdentity
from vfiouser_trio.server.serve import serve
from vfiouser_trio.testing import NestedDeviceFactory, nested_device

pytestmark = pytest.mark.usefixtures("no_fd_leak")

LOGGER = "vfiouser_trio.server.device_errors"
ID = PciIdentity(vendor_id=0x1234, device_id=0x7111)


class Buggy(Device):
    """BAR0: reads at 0x10 divide by zero, at 0x20 return 2 bytes; writes at 0x8 fail;
    a write at 0x30 makes the device DMA from an address the client never mapped."""

    def __init__(self) -> None:
        super().__init__(ID, name="buggy0")
        self.add_bar(0, 0x100, read=self.read0, write=self.write0)
        self.resets = 0

    async def read0(self, offset: int, size: int) -> bytes:
        if offset == 0x10:
            return bytes(size // 0)
        if offset == 0x20:
            return b"\1\2"
        return bytes(size)

    async def write0(self, offset: int, data: bytes) -> None:
        if offset == 0x8:
            raise KeyError("no register 0x8")
        if offset == 0x30:
            await self.dma.read(0xDEAD0000, 4)

    async def reset(self) -> None:
        self.resets += 1
        raise RuntimeError("reset forgot a register")


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


async def test_a_raising_read_is_eio_a_warning_with_traceback_and_raised_into_the_test(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = Buggy()
    with trio.fail_after(5), pytest.raises(DeviceCodeError) as raised:
        async with nested_device(device) as pair:
            with pytest.raises(VfioUserError) as client_error:
                await pair.client.read(PciRegion.BAR0, 0x10, 4)
            assert client_error.value.errno == errno.EIO
            assert await pair.client.read(PciRegion.BAR0, 0, 4) == bytes(4)  # still served
    error = raised.value
    assert isinstance(error.__cause__, ZeroDivisionError)
    assert (error.device, error.command) == ("buggy0", "REGION_READ")
    assert error.where == "BAR0 at 0x10+0x4"
    assert "ZeroDivisionError" in error.reason
    [record] = warnings(caplog)
    assert "buggy0: REGION_READ BAR0 at 0x10+0x4: the read callback raised" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is error.__cause__
    assert "read0" in caplog.text  # the traceback reaches the device's own code
    device.close()


async def test_a_read_of_the_wrong_length_names_what_it_returned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = Buggy()
    with trio.fail_after(5), pytest.raises(DeviceCodeError, match="returned 2 bytes, not the 4"):
        async with nested_device(device) as pair:
            with pytest.raises(VfioUserError) as client_error:
                await pair.client.read(PciRegion.BAR0, 0x20, 4)
            assert client_error.value.errno == errno.EIO
    [record] = warnings(caplog)
    assert "buggy0: REGION_READ BAR0 at 0x20+0x4" in record.getMessage()
    device.close()


async def test_a_raising_write_is_eio_and_the_body_error_is_noted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = Buggy()
    with trio.fail_after(5), pytest.raises(DeviceCodeError) as raised:
        async with nested_device(device) as pair:
            # The body does not catch the client's EIO: the device's bug is what the test sees.
            await pair.client.write(PciRegion.BAR0, 0x8, b"\0\0\0\0")
    assert isinstance(raised.value.__cause__, KeyError)
    assert raised.value.where == "BAR0 at 0x8+0x4"
    notes = getattr(raised.value, "__notes__", [])
    assert any("the test body then raised VfioUserError" in note for note in notes)
    assert len(warnings(caplog)) == 1
    device.close()


async def test_a_raising_reset_is_eio_and_a_device_error(caplog: pytest.LogCaptureFixture) -> None:
    device = Buggy()
    with trio.fail_after(5), pytest.raises(DeviceCodeError, match="reset forgot") as raised:
        async with nested_device(device) as pair:
            with pytest.raises(VfioUserError) as client_error:
                await pair.client.reset()
            assert client_error.value.errno == errno.EIO
    assert raised.value.command == "DEVICE_RESET"
    assert device.resets == 1 and len(warnings(caplog)) == 1
    device.close()


async def test_a_dma_fault_in_a_callback_is_a_warning_and_efault_not_a_device_bug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = Buggy()
    with trio.fail_after(5):
        async with nested_device(device) as pair:
            with pytest.raises(VfioUserError) as client_error:
                await pair.client.write(PciRegion.BAR0, 0x30, b"\0\0\0\0")
            assert client_error.value.errno == errno.EFAULT
            assert pair.device_errors == []
    [record] = warnings(caplog)
    message = record.getMessage()
    assert "buggy0: REGION_WRITE BAR0 at 0x30+0x4: the device's DMA failed" in message
    assert "0xdead0000 is not mapped" in message
    device.close()


async def test_expected_device_errors_can_be_cleared_or_kept() -> None:
    device = Buggy()
    with trio.fail_after(5):
        async with nested_device(device) as pair:
            with pytest.raises(VfioUserError):
                await pair.client.read(PciRegion.BAR0, 0x10, 4)
            [error] = pair.device_errors
            assert error.where == "BAR0 at 0x10+0x4"
            pair.device_errors.clear()  # provoked on purpose: checked, so not raised
        async with nested_device(device, raise_device_errors=False) as pair:
            with pytest.raises(VfioUserError):
                await pair.client.read(PciRegion.BAR0, 0x20, 4)
        assert len(pair.device_errors) == 1
    device.close()


async def test_vfio_pair_raises_device_errors_when_the_pair_closes() -> None:
    device = Buggy()
    with trio.fail_after(5), pytest.raises(ExceptionGroup) as raised:
        async with trio.open_nursery() as nursery:
            factory = NestedDeviceFactory(nursery)
            pair = await factory(device)
            with pytest.raises(VfioUserError):
                await pair.client.read(PciRegion.BAR0, 0x10, 4)
            await factory.aclose()
    [error] = list(leaves(raised.value))
    assert isinstance(error, DeviceCodeError) and isinstance(error.__cause__, ZeroDivisionError)
    device.close()


class Plain(Device):
    """Plain (non-async) callbacks: accepted, called, and must not block."""

    def __init__(self) -> None:
        super().__init__(ID)
        self.regs = bytearray(0x10)
        self.add_bar(0, 0x10, read=self.read0, write=self.write0)

    def read0(self, offset: int, size: int) -> bytes:
        return bytes(self.regs[offset : offset + size])

    def write0(self, offset: int, data: bytes) -> None:
        self.regs[offset : offset + len(data)] = data


async def test_plain_callbacks_are_run() -> None:
    device = Plain()
    with trio.fail_after(5):
        async with nested_device(device) as pair:
            await pair.client.write(PciRegion.BAR0, 4, b"\1\2\3\4")
            assert await pair.client.read(PciRegion.BAR0, 4, 4) == b"\1\2\3\4"
    assert device.regs[4:8] == b"\1\2\3\4"
    device.close()


def test_a_callback_that_is_not_callable_is_refused_at_declaration() -> None:
    class Wrong(Device):
        def __init__(self) -> None:
            super().__init__(ID, name="wrong0")
            self.add_bar(0, 0x10, read=b"\0" * 16)  # type: ignore[call-overload]  # not callable

    with pytest.raises(ValueError, match=r"wrong0: region 0: read=b'.*' is not callable; pass"):
        Wrong()


# --- the device's own task and its attach/detach hooks ---------------------------------------


class Runner(Device):
    """run() raises once a write to BAR0 asks it to; attached()/detached() raise on demand."""

    def __init__(self, *, fail_attach: bool = False, fail_detach: bool = False) -> None:
        super().__init__(ID, name="runner0")
        self.add_bar(0, 0x100, read=self.read0, write=self.write0)
        self.crash = trio.Event()
        self.fail_attach, self.fail_detach = fail_attach, fail_detach

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def write0(self, offset: int, data: bytes) -> None:
        self.crash.set()

    async def run(self) -> None:
        await self.crash.wait()
        raise ValueError("the engine's state machine lost its place")

    async def attached(self) -> None:
        if self.fail_attach:
            raise RuntimeError("attach forgot to open the backing file")

    async def detached(self) -> None:
        if self.fail_detach:
            raise RuntimeError("detach closed the backing file twice")


def run_warnings(caplog: pytest.LogCaptureFixture, where: str) -> list[logging.LogRecord]:
    return [r for r in warnings(caplog) if where in r.getMessage()]


async def test_a_per_connection_device_whose_run_raises_ends_that_connection_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made: list[Runner] = []

    def factory() -> Runner:
        made.append(Runner())
        return made[-1]

    path = tmp_path / "runner.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, factory, path))
        with trio.fail_after(30):
            async with connect(str(path)) as other, connect(str(path)) as doomed:
                await doomed.write(PciRegion.BAR0, 0, b"\1\0\0\0")
                with pytest.raises((ConnectionError, VfioUserError)):
                    while True:  # the server closes this connection once run() has failed
                        await doomed.read(PciRegion.BAR0, 0, 4)
                assert await other.read(PciRegion.BAR0, 0, 4) == bytes(4)
        nursery.cancel_scope.cancel()
    [record] = run_warnings(caplog, "in run()")
    assert "runner0" in record.getMessage() and "lost its place" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError


async def test_a_shared_device_whose_run_raises_ends_serve_with_the_device_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    device = Runner()
    path = tmp_path / "runner.sock"
    with pytest.RaisesGroup(DeviceCodeError, flatten_subgroups=True) as raised:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve, device, path))
            with trio.fail_after(30):
                async with connect(str(path)) as client:
                    await client.write(PciRegion.BAR0, 0, b"\1\0\0\0")
                    await trio.sleep_forever()  # ended by serve() failing
    device.close()
    [error] = list(leaves(raised.value))
    assert isinstance(error, DeviceCodeError) and error.where == "in run()"
    assert isinstance(error.__cause__, ValueError)
    assert len(run_warnings(caplog, "in run()")) == 1


async def test_raising_attached_fails_version_with_eio_and_a_device_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = Runner(fail_attach=True)
    with pytest.raises(DeviceCodeError, match="in attached"):
        async with nested_device(device):
            pass
    device.close()
    assert len(run_warnings(caplog, "in attached()")) == 1


async def test_raising_detached_is_a_device_error(caplog: pytest.LogCaptureFixture) -> None:
    device = Runner(fail_detach=True)
    with pytest.raises(DeviceCodeError, match="in detached"):
        async with nested_device(device) as pair:
            await pair.client.read(PciRegion.BAR0, 0, 4)
    device.close()
    assert len(run_warnings(caplog, "in detached()")) == 1


class BrokenMigration(Device):
    """Migrates; ``fail`` names the hook that raises: begin_save, save_chunks or load_chunk."""

    def __init__(self, fail: str) -> None:
        super().__init__(ID, name="broken-mig0")
        self.add_bar(0, 0x100)
        self.enable_migration()
        self.fail = fail

    def _maybe_fail(self, hook: str) -> None:
        if self.fail == hook:
            raise RuntimeError(f"{hook} lost the state")

    async def on_begin_save(self) -> None:
        self._maybe_fail("begin_save")

    async def save_chunks(self) -> AsyncIterator[bytes]:
        self._maybe_fail("save_chunks")
        yield b"state"

    async def load_chunk(self, data: bytes) -> None:
        self._maybe_fail("load_chunk")


async def _migrate_until_it_fails(client: Client) -> None:
    """Save the device's state and load it back; the first hook that fails is EIO."""
    with pytest.raises(VfioUserError) as failed:
        await client.set_migration_state(MigState.STOP_COPY)
        stream = b""
        while chunk := await client.read_migration_data():
            stream += chunk
        await client.set_migration_state(MigState.STOP)
        await client.set_migration_state(MigState.RESUMING)
        await client.write_migration_data(stream)
    assert failed.value.errno == errno.EIO


@pytest.mark.parametrize(
    ("hook", "command", "where"),
    [
        ("begin_save", "MIG_DEVICE_STATE", "in the STOP -> STOP_COPY hook"),
        ("save_chunks", "MIG_DATA_READ", "in save_chunks()"),
        ("load_chunk", "MIG_DATA_WRITE", "in load_chunk()"),
    ],
)
async def test_a_raising_migration_hook_is_eio_and_a_device_error(
    hook: str, command: str, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    device = BrokenMigration(hook)
    with trio.fail_after(5), pytest.raises(DeviceCodeError, match="lost the state") as raised:
        async with nested_device(device) as pair:
            await _migrate_until_it_fails(pair.client)
    assert (raised.value.command, raised.value.where) == (command, where)
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert len(warnings(caplog)) == 1
    device.close()
