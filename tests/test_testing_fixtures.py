"""The pytest fixtures and plugin: vfio_pair, vfio_tracer, teardown, traces in failure reports.

What happens at teardown and in reports is checked by running small test files in an inner
pytest session (pytester).
"""

from __future__ import annotations

import importlib.metadata

import pytest
import trio

from vfiouser_trio.examples.null import NullDevice
from vfiouser_trio.protocol import Command, PciRegion
from vfiouser_trio.testing import NestedDeviceFactory, Tracer

# Not needed once vfiouser_trio is installed (its plugin provides the fixtures).
from vfiouser_trio.testing.fixtures import *  # noqa: F403

pytestmark = pytest.mark.usefixtures("no_fd_leak")

pytest_plugins = ["pytester"]


async def test_vfio_pair_starts_independent_pairs(vfio_pair: NestedDeviceFactory) -> None:
    with trio.fail_after(5):
        first = await vfio_pair(NullDevice())
        second = await vfio_pair(NullDevice(), twin_socket=False, path=True)
        assert first.client.twin_socket and not second.client.twin_socket
        assert await first.client.read(PciRegion.BAR0, 0, 4) == bytes(4)
        assert await second.client.read(PciRegion.BAR0, 0, 4) == bytes(4)
    assert first.device is not second.device and first.tracer is not second.tracer
    assert len(first.tracer.commands(Command.REGION_READ)) == 1
    assert len(second.tracer.commands(Command.REGION_READ)) == 1


async def test_vfio_tracer_is_a_fresh_tracer(
    vfio_pair: NestedDeviceFactory, vfio_tracer: Tracer
) -> None:

    assert len(vfio_tracer) == 0
    with trio.fail_after(5):
        pair = await vfio_pair(NullDevice(), tracer=vfio_tracer)
    assert pair.tracer is vfio_tracer and vfio_tracer.commands()[0].command == Command.VERSION


# --------------------------------------------------------------------------- inner sessions


def _plugin_args() -> list[str]:
    """Load the plugin in the inner session unless its entry point already does."""
    installed = any(
        ep.value == "vfiouser_trio.testing.plugin"
        for ep in importlib.metadata.entry_points(group="pytest11")
    )
    return [] if installed else ["-p", "vfiouser_trio.testing.plugin"]


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    return pytester


def test_pairs_close_when_the_test_ends(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        from vfiouser_trio.examples.null import NullDevice

        PAIRS = []

        async def test_open(vfio_pair):
            PAIRS.append(await vfio_pair(NullDevice()))
            PAIRS.append(await vfio_pair(NullDevice()))
            assert not PAIRS[0].client.closed

        def test_closed_afterwards():
            assert all(pair.client.closed for pair in PAIRS)
        """
    )
    result = inner.runpytest(*_plugin_args())
    result.assert_outcomes(passed=2)


def test_a_failing_test_reports_its_traces(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        from vfiouser_trio.examples.null import NullDevice

        async def test_fails(vfio_pair, vfio_tracer):
            pair = await vfio_pair(NullDevice())
            await pair.client.read(0, 0x10, 4)
            assert False, "on purpose"

        async def test_passes(vfio_pair):
            await vfio_pair(NullDevice())
        """
    )
    result = inner.runpytest(*_plugin_args())
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- vfio-user trace: vfio_tracer -*",
            "(empty)",
            "*- vfio-user trace: NullDevice #0 -*",
            "+0.* main → VERSION id=0 *",
            "+0.* main → REGION_READ id=* region=0 offset=0x10 count=4",
            "+0.* main ← REGION_READ reply id=* data=00000000",
        ]
    )
    assert result.stdout.str().count("vfio-user trace:") == 2  # none for the passing test


def test_a_leak_fails_the_test_at_teardown(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import os

        import pytest
        from vfiouser_trio.examples.null import NullDevice

        @pytest.fixture
        def closer():
            fds = []
            yield fds
            for fd in fds:
                os.close(fd)

        async def test_leaks(closer, vfio_pair):
            await vfio_pair(NullDevice())
            closer.append(os.memfd_create("leaked-on-purpose"))
        """
    )
    result = inner.runpytest(*_plugin_args())
    result.assert_outcomes(failed=1)  # pytest-trio reports a fixture crash as a failure
    result.stdout.fnmatch_lines(["*FdLeakError: 1 file descriptor(s) leaked: * -> /memfd:leaked*"])


def test_a_device_bug_fails_the_test_with_the_devices_traceback(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import pytest
        from vfiouser_trio.client import VfioUserError
        from vfiouser_trio.examples.null import NullDevice

        class Buggy(NullDevice):
            async def read_bar0(self, offset, size):
                return {}["register %d" % offset]

        async def test_caught_eio(vfio_pair):
            pair = await vfio_pair(Buggy())
            with pytest.raises(VfioUserError):
                await pair.client.read(0, 0x10, 4)

        async def test_expected(vfio_pair):
            pair = await vfio_pair(Buggy())
            with pytest.raises(VfioUserError):
                await pair.client.read(0, 0x10, 4)
            pair.device_errors.clear()
        """
    )
    result = inner.runpytest(*_plugin_args())
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*in read_bar0",
            "*KeyError: 'register 16'",
            "*The above exception was the direct cause of the following exception:*",
            "*DeviceCodeError: null: REGION_READ BAR0 at 0x10+0x4: the read callback "
            "raised KeyError: 'register 16'",
        ]
    )
    # One group only: pytest-trio's own around a fixture's failure, not one from vfio_pair too.
    assert result.stdout.str().count("ExceptionGroup: Exceptions from Trio nursery") == 1
