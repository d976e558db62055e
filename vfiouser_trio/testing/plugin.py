"""The pytest plugin of vfiouser_trio (entry point ``pytest11: vfiouser_trio``).

Provides the ``vfio_pair`` and ``vfio_tracer`` fixtures (see :mod:`.fixtures`) and, when a
test fails, adds the messages its tracers recorded to the failure report.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from .fixtures import TRACERS_KEY, vfio_pair, vfio_tracer

__all__ = ["pytest_runtest_makereport", "vfio_pair", "vfio_tracer"]

#: A failure report shows at most this many trace lines per tracer (the last ones).
MAX_REPORTED_LINES = 400


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        for label, tracer in item.stash.get(TRACERS_KEY, []):
            lines = tracer.lines()
            if len(lines) > MAX_REPORTED_LINES:
                skipped = len(lines) - MAX_REPORTED_LINES
                lines = [f"... {skipped} earlier messages", *lines[-MAX_REPORTED_LINES:]]
            report.sections.append((f"vfio-user trace: {label}", "\n".join(lines) or "(empty)"))
    return report
