"""Server processes under measurement: started, awaited until listening, stopped with SIGTERM.

A server must exit cleanly (status 0) when asked to stop; anything else is a BenchError that
carries the end of its log. Logs go to a temporary file, never a pipe, so a chatty server can
never block on a full pipe in the middle of a measurement.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import trio

from bench.baselines import BenchToolError

from .common import BenchError

T = TypeVar("T")

#: The repository root: put on the servers' PYTHONPATH so that ``bench`` and the package import.
REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
#: A shared device refuses a second client with EBUSY until it has seen the first one leave;
#: a load generator started right after another may get there first. Retried this often.
BUSY_RETRIES = 20
_EBUSY = re.compile(r"errno 16\b")


def python_env() -> dict[str, str]:
    """The environment for a Python subprocess that imports ``bench`` and ``vfiouser_trio``."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    return env


class ServerProcess:
    """A running server; :meth:`stop` (or leaving :func:`running`) ends it and checks it."""

    def __init__(self, argv: Sequence[str], name: str) -> None:
        self.name = name
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=python_env(),
            cwd=REPO_ROOT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 15) -> str:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:]) or "(empty log)"

    def check_alive(self) -> None:
        status = self.process.poll()
        if status is not None:
            raise BenchError(f"{self.name} exited with status {status}:\n{self.log_tail()}")

    def wait_for_socket(self, path: Path, timeout: float = READY_TIMEOUT) -> None:
        """Return once ``path`` exists (servers create the socket file once listening)."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no socket at {path} after {timeout:g} s")
            time.sleep(0.01)

    def wait_for_line(self, expected: bytes, timeout: float = READY_TIMEOUT) -> None:
        """Return once the server printed ``expected`` as a line on stdout."""
        stdout = self.process.stdout
        assert stdout is not None
        os.set_blocking(stdout.fileno(), False)
        deadline = time.monotonic() + timeout
        buffered = b""
        while True:
            chunk = stdout.read()
            if chunk:
                buffered += chunk
                if expected in buffered.splitlines():
                    return
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: not ready after {timeout:g} s")
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM, then insist on a clean exit (status 0) within :data:`STOP_TIMEOUT`."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                    raise BenchError(
                        f"{self.name} ignored SIGTERM for {STOP_TIMEOUT:g} s:\n{self.log_tail()}"
                    ) from None
            status = self.process.returncode
            if status != 0:
                raise BenchError(f"{self.name} exited with status {status}:\n{self.log_tail()}")
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
            self._log.close()

    def kill(self) -> None:
        """End the process without judging how (cleanup after another failure)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


@contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """Stop ``server`` cleanly on a normal exit; kill it when the block failed."""
    try:
        yield server
    except BaseException:
        server.kill()
        raise
    server.stop()


@contextmanager
def cli_server(device: str, socket_path: Path) -> Iterator[ServerProcess]:
    """``python -m vfiouser_trio.cli serve DEVICE --socket-path=PATH``, listening."""
    argv = [sys.executable, "-m", "vfiouser_trio.cli", "serve", device]
    server = ServerProcess([*argv, f"--socket-path={socket_path}"], f"server ({device})")
    with running(server):
        server.wait_for_socket(socket_path)
        yield server


@contextmanager
def many_devices_server(
    device: str, count: int, directory: Path, *, timeout: float = READY_TIMEOUT
) -> Iterator[ServerProcess]:
    """``count`` devices in one server process (``python -m bench.devices serve``), listening
    on ``directory/dev-<i>.sock`` within ``timeout`` seconds."""
    argv = [sys.executable, "-m", "bench.devices", "serve", device, "--count", str(count)]
    server = ServerProcess([*argv, "--dir", str(directory)], f"server ({count} {device} devices)")
    with running(server):
        server.wait_for_line(b"ready", timeout)
        yield server


@contextmanager
def floor_server(kind: str, socket_path: Path) -> Iterator[ServerProcess]:
    """A bare reference responder (``python -m bench.figures.floors KIND``), listening."""
    argv = [sys.executable, "-m", "bench.figures.floors", kind, "--socket", str(socket_path)]
    server = ServerProcess(argv, f"{kind} floor responder")
    with running(server):
        server.wait_for_line(b"ready")
        yield server


def device_socket(directory: Path, index: int) -> Path:
    """Where :func:`many_devices_server` serves device ``index``."""
    return directory / f"dev-{index}.sock"


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of process ``pid``, in clock ticks (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid``, in KiB (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def retry_busy(run: Callable[[], T]) -> T:
    """``run()``, again after a moment while it fails with EBUSY (see :data:`BUSY_RETRIES`)."""
    for attempt in range(BUSY_RETRIES + 1):
        try:
            return run()
        except BenchToolError as exc:
            if not _EBUSY.search(str(exc)) or attempt == BUSY_RETRIES:
                raise
            time.sleep(0.01)
    raise AssertionError("unreachable")


async def reap(process: trio.Process, timeout: float) -> None:
    """Wait (shielded) up to ``timeout`` seconds for a peer process to exit, then kill it."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(timeout):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
