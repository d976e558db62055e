"""Shared fixtures of the test suite."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.fd_leaks import fd_count


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """Fail the test if it leaves more or fewer fds open than it found.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("no_fd_leak")``.
    Garbage is collected on both sides, so objects awaiting collection are not counted.
    """
    gc.collect()
    before = fd_count()
    yield
    gc.collect()
    assert fd_count() == before
