"""The conformance checker: every example passes, its report, the CLI, the catalogue page."""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conformance_devices import (
    EXPECTATIONS,
    NO_DMA_TRIGGER,
    NO_EXTENDED_CONFIG,
    NO_MIGRATION,
)
from vfiouser_trio import cli
from vfiouser_trio.examples import EXAMPLES
from vfiouser_trio.examples.nvme import MemoryBacking, NvmeController
from vfiouser_trio.server import Device
from vfiouser_trio.server.serve import serve
from vfiouser_trio.server.session import DEFAULT_SERVER_CAPABILITIES
from vfiouser_trio.testing.conformance import (
    CATALOGUE,
    DmaWindow,
    Expectations,
    FdTarget,
    Level,
    Outcome,
    PathTarget,
    assert_conforms,
    catalogue_markdown,
    run_checks,
    select,
    served,
)

pytestmark = pytest.mark.usefixtures("no_fd_leak")

PAGE = Path(__file__).parent.parent / "docs" / "conformance.md"
BEGIN, END = "<!-- catalogue: begin -->\n", "<!-- catalogue: end -->\n"


#: What does not apply to each example: 256-byte config spaces (no extended capabilities),
#: only dmaengine has a DMA trigger, null and vendorcap do not migrate.
SKIPPED = {
    "nvme": NO_EXTENDED_CONFIG | NO_DMA_TRIGGER,
    "gpio": NO_EXTENDED_CONFIG | NO_DMA_TRIGGER,
    "dmaengine": NO_EXTENDED_CONFIG,
    "vendorcap": NO_EXTENDED_CONFIG | NO_DMA_TRIGGER | NO_MIGRATION,
    "null": NO_EXTENDED_CONFIG | NO_DMA_TRIGGER | NO_MIGRATION,
}


def test_every_example_is_checked() -> None:
    assert set(SKIPPED) == set(EXAMPLES) == set(EXPECTATIONS)


def example(name: str) -> Device:
    """The example as served by the CLI, but nvme with a 1 MiB namespace: its namespace
    travels in the migration stream, and the default 64 MiB is above what the checker reads
    back (MIG_STREAM_MAX), so mig-08/09 would only time out reading it."""
    if name == "nvme":
        return NvmeController(MemoryBacking(1 << 20))
    return EXAMPLES[name]()


@pytest.mark.parametrize("name", sorted(SKIPPED))
async def test_every_example_passes_every_must_and_should(name: str, tmp_path: Path) -> None:
    device = example(name)
    try:
        async with served(device, tmp_path / "dev.sock") as target:
            report = await assert_conforms(target, expectations=EXPECTATIONS[name], strict=True)
    finally:
        device.close()
    skipped = {r.check.id for r in report.results if r.outcome is Outcome.SKIP}
    assert skipped == SKIPPED[name]
    assert len(report.results) == len(CATALOGUE)


async def test_write_multiple_when_offered(tmp_path: Path) -> None:
    device = EXAMPLES["gpio"]()
    offer = replace(DEFAULT_SERVER_CAPABILITIES, write_multiple=True)
    try:
        async with served(device, tmp_path / "dev.sock", capabilities=offer) as target:
            report = await run_checks(target, checks=select(["rio-07"]))
    finally:
        device.close()
    [result] = report.results
    assert (result.outcome, result.message) == (Outcome.PASS, "write_multiple offered and working")


async def test_a_trigger_that_raises_is_one_fail(tmp_path: Path) -> None:
    async def broken_trigger(window: DmaWindow) -> None:
        raise RuntimeError("no such register")

    device = EXAMPLES["dmaengine"]()
    try:
        async with served(device, tmp_path / "dev.sock") as target:
            report = await run_checks(
                target,
                checks=select(["dma-07", "dma-10"]),
                expectations=Expectations(dma_trigger=broken_trigger),
            )
    finally:
        device.close()
    outcomes = [(r.outcome, r.message) for r in report.results]
    assert outcomes == [
        (Outcome.FAIL, "the check raised RuntimeError: no such register"),
        (Outcome.PASS, ""),
    ]


async def test_device_expectations_and_waivers(tmp_path: Path) -> None:
    device = EXAMPLES["gpio"]()
    wrong = Expectations(num_irqs=7, waive={"dma": "this device does no DMA"})
    try:
        async with served(device, tmp_path / "dev.sock") as target:
            report = await run_checks(target, checks=select(["cmd-01", "dma"]), expectations=wrong)
            with pytest.raises(AssertionError, match="num_irqs is 5, the device declares 7"):
                await assert_conforms(target, only=["cmd-01"], expectations=wrong)
    finally:
        device.close()
    outcomes = {r.check.id: (r.outcome, r.message) for r in report.results}
    assert outcomes["cmd-01"][0] is Outcome.FAIL
    assert outcomes["dma-01"] == (Outcome.SKIP, "waived: this device does no DMA")


async def test_a_silent_server_fails_each_check_in_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A server that accepts and never answers: every check ends at its timeout."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "silent.sock"))
    listener.listen(64)
    accepted: list[socket.socket] = []

    async def accept_forever() -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            accepted.append(listener.accept()[0])

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_forever)
            report = await run_checks(
                PathTarget(tmp_path / "silent.sock"), checks=select(["neg-01"]), timeout=2
            )
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        for sock in accepted:
            sock.close()
    [result] = report.results
    assert (result.outcome, result.message) == (Outcome.FAIL, "no answer within 2 s")
    assert result.sent.startswith("→ VERSION command id=1")


async def test_fd_target_gives_its_one_connection_to_the_first_check() -> None:
    device = EXAMPLES["null"]()
    ours, theirs = socket.socketpair()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve(device, fd=theirs.detach()))
            report = await run_checks(FdTarget(ours.detach()), checks=select(["neg-01", "cmd-01"]))
            nursery.cancel_scope.cancel()
    finally:
        device.close()
    assert [r.outcome for r in report.results] == [Outcome.PASS, Outcome.SKIP]
    assert "--fd gives one" in report.results[1].message


def test_select_by_id_and_group() -> None:
    assert [c.id for c in select(["neg-02", "framing"], ["frm-01"])][:2] == ["neg-02", "frm-02"]
    with pytest.raises(ValueError, match="no check or group named 'nope'"):
        select(["nope"])


def test_every_check_names_a_spec_section_and_level() -> None:
    spec = Path(__file__).parent.parent.parent / "shared" / "spec" / "vfio-user.rst"
    text = spec.read_text() if spec.exists() else None
    for check in select():
        assert isinstance(check.level, Level)
        if text is not None:
            assert check.section in text, check.id


def test_docs_page_carries_the_generated_catalogue() -> None:
    page = PAGE.read_text()
    assert BEGIN in page and END in page
    table = page.split(BEGIN, 1)[1].split(END, 1)[0]
    assert table == catalogue_markdown(), (
        "docs/conformance.md is stale: replace its catalogue with `vfio-user-trio conform --list`"
    )


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(args)
    return code, capsys.readouterr().out


async def test_cli_conform(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``conform SOCK``: one line per check and exit 0; --json; a FAIL exits 1; --strict."""
    device = EXAMPLES["gpio"]()
    path = str(tmp_path / "dev.sock")
    try:
        async with served(device, path):
            code, out = await trio.to_thread.run_sync(_run_cli, ["conform", path], capsys)
            assert code == 0
            lines = out.splitlines()
            verdicts = [line for line in lines if line.startswith(("PASS ", "SKIP "))]
            assert len(verdicts) == len(CATALOGUE)
            skips = len(SKIPPED["gpio"])
            assert lines[-1].endswith(
                f"{len(CATALOGUE)} checks: {len(CATALOGUE) - skips} PASS, 0 FAIL, 0 WARN, "
                f"{skips} SKIP"
            )
            assert lines[0].startswith("PASS  neg-01  MUST    [VFIO_USER_VERSION]")
            code, out = await trio.to_thread.run_sync(
                _run_cli,
                ["conform", path, "--json", "--only", "commands", "--skip", "cmd-09"],
                capsys,
            )
            doc = json.loads(out)
            assert code == 0 and doc["summary"]["PASS"] == len(select(["commands"])) - 1
    finally:
        device.close()


def test_cli_conform_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["conform"]) == 2
    assert cli.main(["conform", "x.sock", "--only", "nope"]) == 2
    assert cli.main(["conform", "--list"]) == 0
    assert capsys.readouterr().out == catalogue_markdown()
    assert cli.main(["conform", "/nonexistent/vfio.sock"]) == 1
    assert "No such file or directory" in capsys.readouterr().err
