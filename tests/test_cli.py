"""The vfio-user-trio command: demo, serve (SIGTERM, socket file), lspci decoded by pciutils."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.cli_process import CLI, cli_server, env
from vfiouser_trio import inspector
from vfiouser_trio.client import NegotiationTimeout, connect


def run_cli_text(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run to its end (within a minute), its output as text; any exit status."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env=env(), check=False
    )


def test_demo_prints_the_tour_and_exits_zero() -> None:
    result = subprocess.run(
        [*CLI, "demo"], capture_output=True, text=True, timeout=120, env=env(), check=False
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in (
        "negotiated",
        "vendor 494f device 0dc8",
        "BAR2: I/O ports, 256 bytes",
        "read back 0xa5",
        "INTx delivered",
        "device read 'hello, device'",
        "'HELLO, DEVICE'",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"


async def stopped_by_sigterm(proc: trio.Process) -> None:
    """SIGTERM ends the server with status 0 (the spec's backend conventions)."""
    proc.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        await proc.wait()
    assert proc.returncode == 0


async def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*CLI, *args], capture_stdout=True, capture_stderr=True, env=env()
    )


@pytest.mark.parametrize("example", ["gpio", "dmaengine", "null", "vendorcap"])
async def test_serve_then_lspci_decodes_identity_and_capabilities(
    tmp_path: Path, example: str
) -> None:
    path = tmp_path / f"{example}.sock"
    async with cli_server("serve", example, f"--socket-path={path}") as proc:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        result = await run_cli("lspci", str(path))
        dump = result.stdout.decode()
        await stopped_by_sigterm(proc)
    assert not path.exists()  # removed on SIGTERM
    assert dump.startswith("00:00.0 ")
    assert "# region 7 CONFIG" in dump
    lspci = shutil.which("lspci")
    if lspci is None:
        pytest.skip("pciutils' lspci is not installed (CI installs it)")
    dump_file = tmp_path / "dump.txt"
    dump_file.write_text(dump)
    decoded = subprocess.run(
        [lspci, "-vvv", "-nn", "-F", str(dump_file)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    if example == "gpio":
        assert "[494f:0dc8]" in decoded
        assert "Interrupt: pin A" in decoded
    elif example == "dmaengine":
        assert "MSI-X: Enable- Count=" in decoded
        assert "Vector table: BAR=" in decoded
    elif example == "vendorcap":
        assert "Capabilities: [4c] Vendor Specific Information: Len=0c" in decoded
    else:
        assert "Control:" in decoded


def test_serve_refuses_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("precious")
    result = run_cli_text("serve", "null", f"--socket-path={path}")
    assert result.returncode != 0
    assert "not a socket" in result.stderr
    assert path.read_text() == "precious"


@pytest.mark.parametrize("where", ["missing-dir/dev.sock", "x" * 120])
def test_serve_on_an_unusable_path_is_one_line(tmp_path: Path, where: str) -> None:
    result = run_cli_text("serve", "null", f"--socket-path={tmp_path / where}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vfio-user-trio serve: ") and str(tmp_path) in last, result.stderr


async def test_serve_on_an_inherited_connected_fd() -> None:
    ours, theirs = socket.socketpair()
    with ours:
        async with trio.open_nursery() as nursery:
            proc: trio.Process = await nursery.start(
                lambda task_status: trio.run_process(
                    [*CLI, "serve", "gpio", f"--fd={theirs.fileno()}"],
                    env=env(),
                    pass_fds=(theirs.fileno(),),
                    check=False,
                    task_status=task_status,
                )
            )
            theirs.close()
            with trio.fail_after(30):
                async with connect(ours.dup()) as client:
                    assert client.info.num_regions == 9
                    assert (await client.config.header()).vendor_id == 0x494F
            with trio.fail_after(30):
                await proc.wait()  # one connected client: the server ends when it leaves
            assert proc.returncode == 0


def test_unknown_device_is_a_clear_error() -> None:
    result = run_cli_text("serve", "nosuch", "--socket-path=/tmp/x.sock")
    assert result.returncode != 0
    assert "unknown device 'nosuch'" in result.stderr


# --- lspci against servers that are not there or do not answer ----------------------------


async def run_cli_status(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Like run_cli, but a non-zero exit is returned, not raised."""
    with trio.fail_after(60):
        return await trio.run_process(
            [*CLI, *args], capture_stdout=True, capture_stderr=True, env=env(), check=False
        )


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The stderr line that is not a log line (those start with a timestamp); no traceback."""
    text = result.stderr.decode()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("vfio-user-trio lspci:")]
    assert len(lines) == 1, text
    return lines[0]


async def test_lspci_on_a_missing_socket_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nobody.sock"
    result = await run_cli_status("lspci", str(path))
    assert result.returncode == 1
    assert one_error_line(result) == f"vfio-user-trio lspci: {path}: No such file or directory"
    assert result.stdout == b""


async def test_lspci_gives_up_on_a_server_that_never_negotiates(tmp_path: Path) -> None:
    # It accepts (the kernel's backlog does) and never answers VERSION: a hung or busy server.
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        result = await run_cli_status("lspci", "--timeout", "0.5", str(path))
    assert result.returncode == 1
    line = one_error_line(result)
    assert line.startswith(f"vfio-user-trio lspci: {path}: [ETIMEDOUT] no answer to VERSION")
    assert result.stdout == b""


async def test_lspci_passes_its_timeout_to_connect(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    path = tmp_path / "mute.sock"
    printed: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        with pytest.raises(NegotiationTimeout) as info:
            await inspector.lspci(path, out=printed.append, negotiation_timeout=300)
    assert info.value.step == "VERSION" and printed == []
    assert trio.current_time() >= 300


@pytest.mark.parametrize("example", ["gpio", "vendorcap"])
async def test_describe_names_a_command_that_serves_the_device_and_honours_sigterm(
    tmp_path: Path, example: str
) -> None:
    """The spec's backend conventions: the JSON description (vhost-user's fields and args)
    launches the device with --socket-path; SIGTERM ends it with status 0, socket removed."""
    result = await run_cli("describe", example)
    description = json.loads(result.stdout)
    assert set(description) == {"description", "type", "binary", "args", "tags"}
    assert description["type"] == "pci" and example in description["description"]
    binary = description["binary"]
    assert os.path.isabs(binary) and os.access(binary, os.X_OK)
    assert description["args"][-2:] == ["serve", example]
    path = tmp_path / "described.sock"
    args = [*description["args"], f"--socket-path={path}"]
    async with cli_server(*args, program=[binary]) as proc:
        async with connect(str(path)) as client:
            vendor = await client.config.read(0, 2)
        assert f"vendor-id={vendor:#06x}" in description["tags"]
        await stopped_by_sigterm(proc)
    assert not path.exists()
