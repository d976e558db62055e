"""A victim device served beside a hostile client, and the check that it survived."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_victim(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (tests/ on its path); it should print 'survived'."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def assert_survived(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"victim exited with {result.returncode} "
        f"({'SIGBUS' if result.returncode == -signal.SIGBUS else 'error'})\n{result.stderr}"
    )
    assert result.stdout.strip().endswith("survived"), result.stdout
