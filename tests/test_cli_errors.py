"""The command line fails in one line on stderr with a non-zero status, and has --version."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import trio

import vfiouser_trio
from vfiouser_trio.cli import main
from vfiouser_trio.cli_errors import INTERRUPTED, run_command
from vfiouser_trio.server.device import Device
from vfiouser_trio.server.pci import PciIdentity

PROG = "vfio-user-trio serve"


class HidesItsRegisters(Device):
    """Served by ``serve tests.test_cli_errors:HidesItsRegisters``: refused at declaration."""

    def __init__(self) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7112), name="hides0")
        self.add_bar(0, 0x1000, read=self.read0)
        self.add_msix(2, bar=0)

    async def read0(self, offset: int, size: int) -> bytes:
        return bytes(size)


def broken_factory() -> Device:
    """A device factory with a bug of its own."""
    return {}["missing"]  # type: ignore[index]  # the bug: a KeyError


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"vfio-user-trio {vfiouser_trio.__version__}\n"


def test_a_refused_declaration_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: os.PathLike[str]
) -> None:
    status = main(
        ["serve", "tests.test_cli_errors:HidesItsRegisters", "--socket-path", f"{tmp_path}/s"]
    )
    assert status == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{PROG}: hides0: MSI-X table at BAR 0 0x0+0x20: ")


def test_a_bug_is_one_line_naming_its_type_and_verbose_shows_the_traceback(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: os.PathLike[str],
) -> None:
    argv = ["serve", "tests.test_cli_errors:broken_factory", "--socket-path", f"{tmp_path}/s"]
    with caplog.at_level(logging.DEBUG, logger="vfiouser_trio"):
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"{PROG}: KeyError: 'missing' (-v shows the traceback)\n"
    assert "broken_factory" in caplog.text  # the traceback, at DEBUG


def test_exception_groups_are_flattened_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def fails() -> int:
        async def body() -> None:
            async def missing() -> None:
                raise FileNotFoundError(2, "No such file or directory", "/x.sock")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(missing)
                nursery.start_soon(missing)

        trio.run(body)
        return 0

    assert run_command(fails, "prog") == 1
    assert capsys.readouterr().err == (
        "prog: No such file or directory: '/x.sock' (and 1 more errors)\n"
    )


def test_ctrl_c_is_one_line_and_status_130(capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_command(interrupted, "prog") == INTERRUPTED
    assert capsys.readouterr().err == "prog: interrupted\n"


def test_the_installed_command_prints_no_traceback(tmp_path: os.PathLike[str]) -> None:
    """The console script, end to end: stderr is the one line, whatever logging does."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vfiouser_trio.cli",
            "serve",
            "tests.test_cli_errors:broken_factory",
            "--socket-path",
            f"{tmp_path}/s",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == f"{PROG}: KeyError: 'missing' (-v shows the traceback)\n"
