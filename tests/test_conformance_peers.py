"""The checker against a real peer: libvfio-user's samples/server, one process per connection
(the sample serves one client, then exits). Skipped without libvfio-user's source (see
tests/libvfio_user.py). What it finds there is pinned here, so a change in either shows."""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from tests.conformance_devices import NO_DMA_TRIGGER, NO_EXTENDED_CONFIG, NO_MIGRATION
from tests.libvfio_user import Samples, connect_socket, sample_server, samples
from vfiouser_trio.testing.conformance import Expectations, FactoryTarget, Outcome, run_checks

pytestmark = pytest.mark.usefixtures("no_fd_leak")

#: libvfio-user's deviations, check id -> its outcome and the start of the message.
KNOWN = {
    # It parses the version data leniently: a JSON array is taken as "no capabilities".
    "neg-07": (Outcome.WARN, "VERSION with JSON not an object: accepted"),
    # A message that is not a command is refused before its payload is read
    # (lib/libvfio-user.c, is_valid_header): the payload is then read as the next header.
    "frm-09": (Outcome.WARN, "answered with a reply that echoes none of the messages sent"),
    # Its config space region info carries neither READ nor WRITE.
    "cmd-04": (Outcome.WARN, "GET_REGION_INFO 7: the config space region's flags"),
    # A zero-length REGION_READ is answered with an empty payload, without the echo.
    "rio-03": (Outcome.WARN, "the reply to a zero-length read is 0 bytes"),
    # BAR sizing answers ~size + 1 (lib/pci.c), and the sample's BAR1 is 3 pages: not a
    # power of two, as no PCI BAR can be.
    "cfg-05": (Outcome.WARN, "BAR1 sizes to 0x3000"),
    # A map over another one is refused with EINVAL (lib/dma.c), where the spec says EEXIST.
    "dma-03": (Outcome.FAIL, "an overlapping DMA_MAP: refused with another errno"),
    # handle_dma_map checks argsz and flags, not the size: a map of size 0 is taken.
    "dma-09": (Outcome.WARN, "DMA_MAP of size 0: accepted"),
}
#: Checks that do not apply to it: a 256-byte config space, no DMA trigger declared, no
#: DEVICE_FEATURE migration (this libvfio-user speaks protocol 0.1).
SKIPPED = NO_EXTENDED_CONFIG | NO_DMA_TRIGGER | NO_MIGRATION | {"dma-06", "dis-01", "dis-02"}


@pytest.fixture
def built() -> Samples:
    return samples()


async def test_libvfio_user_samples_server(built: Samples, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        count = 0

        async def new_server() -> socket.socket:
            nonlocal count
            count += 1
            where = tmp_path / f"s{count}"
            where.mkdir()
            proc = await stack.enter_async_context(sample_server(built, where))
            return await connect_socket(proc.socket)

        # A sample serves one client: what a departing client leaves is not for it to keep.
        one_client = {"disconnect": "a fresh process per connection", "dma-06": "likewise"}
        report = await run_checks(
            FactoryTarget(new_server, "samples/server"),
            expectations=Expectations(waive=one_client),
            timeout=10,
        )
    found: dict[str, tuple[Outcome, str]] = {
        r.check.id: (r.outcome, r.message)
        for r in report.results
        if r.outcome in (Outcome.FAIL, Outcome.WARN)
    }
    skipped = frozenset(r.check.id for r in report.results if r.outcome is Outcome.SKIP)
    assert (found.keys(), skipped) == (KNOWN.keys(), SKIPPED), "\n".join(report.lines())
    for check_id, (outcome, start) in KNOWN.items():
        assert found[check_id][0] is outcome, check_id
        assert found[check_id][1].startswith(start), check_id
