"""A conformance checker for vfio-user servers: ``vfio-user-trio conform`` as a library.

Run the catalogue against a device in a test (see docs/conformance.md)::

    async def test_my_device_conforms(tmp_path):
        async with served(MyDevice, tmp_path / "dev.sock") as target:
            await assert_conforms(target, expectations=Expectations(num_irqs=5))

A check's result is PASS, FAIL (a MUST rule broken), WARN (a SHOULD rule broken) or SKIP,
with the spec section it tests and, when broken, what was sent, what came back and what was
expected. Spec: https://www.qemu.org/docs/master/interop/vfio-user.html.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from .context import Expectations, Probe, Survey
from .dma_window import DmaTrigger, DmaWindow
from .model import CATALOGUE, SPEC_URL, Check, Level, Outcome, Result, check, select
from .runner import DEFAULT_TIMEOUT, Report, catalogue_markdown, run_checks

if TYPE_CHECKING:
    from ...limits import ServerLimits
    from ...protocol.capabilities import Capabilities
    from ...server.serve import DeviceSource

from . import checks as _checks
from .wire import FactoryTarget, FdTarget, NoMoreConnections, PathTarget, Target, Wire

del _checks

__all__ = [
    "CATALOGUE",
    "DEFAULT_TIMEOUT",
    "SPEC_URL",
    "Check",
    "DmaTrigger",
    "DmaWindow",
    "Expectations",
    "FactoryTarget",
    "FdTarget",
    "Level",
    "NoMoreConnections",
    "Outcome",
    "PathTarget",
    "Probe",
    "Report",
    "Result",
    "Survey",
    "Target",
    "Wire",
    "assert_conforms",
    "catalogue_markdown",
    "check",
    "run_checks",
    "select",
    "served",
]


async def assert_conforms(
    target: Target | str | os.PathLike[str],
    *,
    expectations: Expectations | None = None,
    only: Sequence[str] | None = None,
    skip: Sequence[str] | None = None,
    strict: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
) -> Report:
    """Run the catalogue (or the ids/groups in ``only``, minus ``skip``) against ``target``
    and raise AssertionError listing every FAIL (and, with ``strict``, the default, every
    WARN). Returns the report."""
    if not hasattr(target, "open"):
        target = PathTarget(target)
    assert not isinstance(target, (str, os.PathLike))
    chosen = select(list(only) if only is not None else None, list(skip) if skip else None)
    report = await run_checks(target, checks=chosen, expectations=expectations, timeout=timeout)
    if report.failed(strict=strict):
        lines = [line for line in report.lines() if not line.startswith(("PASS", "SKIP"))]
        raise AssertionError("vfio-user conformance:\n" + "\n".join(lines))
    return report


@asynccontextmanager
async def served(
    source: DeviceSource,
    path: str | os.PathLike[str],
    *,
    capabilities: Capabilities | None = None,
    limits: ServerLimits | None = None,
) -> AsyncIterator[PathTarget]:
    """Serve ``source`` (a Device, or a factory of one per connection) on ``path`` in this
    program for the body, yielding the target to check. ``capabilities`` and ``limits`` go
    to ``serve()`` (its defaults when None)."""
    from ...server.serve import serve  # noqa: PLC0415 - the checker needs no server otherwise

    options: dict[str, Any] = {}
    if capabilities is not None:
        options["capabilities"] = capabilities
    if limits is not None:
        options["limits"] = limits
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, source, path, **options))
        try:
            yield PathTarget(path)
        finally:
            nursery.cancel_scope.cancel()
