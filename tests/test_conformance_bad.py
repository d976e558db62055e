"""Each conformance check FAILs (MUST) or WARNs (SHOULD) on a server broken in exactly the
way it is about (tests/conformance_bad.py), and passes on the same server unbroken."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing

from tests.conformance_bad import BROKEN, Breakage, broken_server, setup_of
from vfiouser_trio import cli
from vfiouser_trio.engine import Connection
from vfiouser_trio.protocol.constants import Command
from vfiouser_trio.protocol.framing import Frame
from vfiouser_trio.protocol.header import command_header
from vfiouser_trio.testing.conformance import CATALOGUE, Level, Outcome, run_checks, select

pytestmark = pytest.mark.usefixtures("no_fd_leak")


def test_every_check_that_can_fail_has_a_broken_server() -> None:
    failable = {c.id for c in select() if c.level is not Level.INFO}
    assert failable == set(BROKEN)


@pytest.mark.parametrize("check_id", sorted(BROKEN))
async def test_check_catches_its_broken_server(
    check_id: str, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    check = CATALOGUE[check_id]
    setup = setup_of(BROKEN[check_id]())
    async with broken_server(tmp_path, setup) as target:
        report = await run_checks(
            target, checks=[check], expectations=setup.expectations, timeout=5
        )
    [result] = report.results
    want = Outcome.FAIL if check.level is Level.MUST else Outcome.WARN
    assert result.outcome is want, "\n".join(report.lines())
    assert result.message


def test_the_repeated_map_breakage_takes_a_payload_received_in_place() -> None:
    """dma-02's server tells a repeated DMA_MAP apart when its payload is the bytearray a
    frame that did not arrive in one read was received into (Frame.payload), which a set
    cannot hold as it is."""
    breakage = BROKEN["dma-02"]()
    assert isinstance(breakage, Breakage) and breakage.receive is not None
    payload = struct.pack("=IIQQQ", 32, 3, 0, 0x1000, 0x1000)  # argsz, flags, offset, addr, size
    conn = cast(Connection, object())  # a stand-in: the breakage only tells connections apart
    frames = [
        Frame(command_header(i, Command.DMA_MAP, len(payload)), bytearray(payload)) for i in (1, 2)
    ]
    first, again = (breakage.receive(conn, frame) for frame in frames)
    assert first is not None and first.payload == payload
    assert again is not None and struct.unpack_from("=Q", again.payload, 16) == (0x1000 + 4096,)


def _cli(args: list[str]) -> int:
    return cli.main(args)


@pytest.mark.parametrize(("check_id", "plain", "strict"), [("cmd-01", 1, 1), ("cmd-02", 0, 1)])
async def test_cli_exit_status(check_id: str, plain: int, strict: int, tmp_path: Path) -> None:
    """Exit 1 on a FAIL (cmd-01, a MUST); on a WARN (cmd-02, a SHOULD) only with --strict."""
    async with broken_server(tmp_path, BROKEN[check_id]()) as target:
        args = ["conform", target.path, "--only", check_id]
        assert await trio.to_thread.run_sync(_cli, args) == plain
        assert await trio.to_thread.run_sync(_cli, [*args, "--strict"]) == strict
