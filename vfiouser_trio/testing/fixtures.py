"""pytest fixtures: ``vfio_pair`` (nested devices) and ``vfio_tracer``.

They are registered by the package's pytest plugin (``vfiouser_trio.testing.plugin``, loaded
automatically once vfiouser_trio is installed) and need pytest-trio::

    async def test_reads_zero(vfio_pair: NestedDeviceFactory) -> None:
        pair = await vfio_pair(NullDevice())
        assert await pair.client.read(0, 0, 4) == bytes(4)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio

from .nested import NestedDeviceFactory
from .tracer import Tracer

__all__ = ["NestedDeviceFactory", "register_tracer", "vfio_pair", "vfio_tracer"]

#: Where the plugin finds the tracers of a test, to print them when it fails.
TRACERS_KEY = pytest.StashKey[list[tuple[str, Tracer]]]()


def register_tracer(node: pytest.Item | pytest.Collector, label: str, tracer: Tracer) -> None:
    """Have the plugin print ``tracer`` in the report if the test fails (once per tracer)."""
    tracers = node.stash.setdefault(TRACERS_KEY, [])
    if all(known is not tracer for _, known in tracers):
        tracers.append((label, tracer))


@pytest.fixture
async def vfio_pair(request: pytest.FixtureRequest) -> AsyncIterator[NestedDeviceFactory]:
    """A factory of nested devices: ``pair = await vfio_pair(MyDevice())``.

    When the test ends every pair is closed; a pair's failure then (a leak, a bug of the
    device's code) fails the test as itself, not inside this fixture's nursery's group.
    """
    try:
        async with trio.open_nursery() as nursery:
            factory = NestedDeviceFactory(nursery, on_tracer=partial(register_tracer, request.node))
            yield factory
            await factory.aclose()
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        # Its own cause (the device's exception) is what the report should show, not the group.
        raise group.exceptions[0] from group.exceptions[0].__cause__


@pytest.fixture
def vfio_tracer(request: pytest.FixtureRequest) -> Tracer:
    """A fresh :class:`Tracer`, printed in the report if the test fails."""
    tracer = Tracer()
    register_tracer(request.node, "vfio_tracer", tracer)
    return tracer
