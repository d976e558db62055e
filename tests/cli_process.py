"""The vfio-user-trio command in a process of its own, for the tests that run it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

CLI = [sys.executable, "-m", "vfiouser_trio.cli"]
ROOT = Path(__file__).resolve().parent.parent


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def wait_until_serving(proc: trio.Process) -> str:
    """Read the server's stderr until it says it is serving (it listens before saying so)."""
    assert proc.stderr is not None
    seen = b""
    with trio.fail_after(30):
        while b"serving " not in seen:
            chunk = await proc.stderr.receive_some()
            assert chunk, f"server exited early: {seen.decode()}"
            seen += chunk
    return seen.decode()


@asynccontextmanager
async def cli_server(*args: str, program: Sequence[str] = CLI) -> AsyncIterator[trio.Process]:
    """``vfio-user-trio ARGS`` (or ``PROGRAM ARGS``) in its own process, yielded once it
    says it is serving.

    On leaving, a server still running gets SIGTERM (then SIGKILL after 30 s), and its
    stderr pipe is closed. The body may end it itself and check its status.
    """
    proc = await trio.lowlevel.open_process([*program, *args], env=env(), stderr=subprocess.PIPE)
    try:
        await wait_until_serving(proc)
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(30):
                    await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            assert proc.stderr is not None
            await proc.stderr.aclose()
