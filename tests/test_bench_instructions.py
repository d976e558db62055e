"""bench/instructions.py: callgrind's count of a server's instructions per request."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.instructions import REPO_ROOT, _counted, measure, measure_message_dma, total_instructions


def test_the_totals_line_of_a_dump_is_its_count() -> None:
    dump = "version: 1\nevents: Ir\nsummary: 0\nfn=(1) main\n3 10\ntotals: 123456\n"
    assert total_instructions(dump) == 123456
    assert total_instructions("events: Ir\n") == 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_the_bare_trio_responder_is_counted_per_request() -> None:
    """A real run, small: the bare trio responder under callgrind, 8 in flight. A request
    costs it thousands of instructions (a scheduler pass alone is ~30k, shared by a read's
    requests), not zero and not millions."""
    per_request = measure(REPO_ROOT, "trio-floor", depth=8, count=400)
    assert 2_000 < per_request < 500_000


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_message_dma_is_counted_per_round_in_both_processes() -> None:
    """A real run, small: a round is two messages each way plus a 4 KiB copy on each side,
    hundreds of thousands of instructions in each process (a scheduler pass alone is ~30k),
    not zero and not tens of millions."""
    server, client = measure_message_dma(REPO_ROOT, size=4096, rounds=20)
    assert 20_000 < server < 5_000_000
    assert 20_000 < client < 5_000_000


def test_the_dumps_of_one_process_are_told_from_another_s(tmp_path: Path) -> None:
    (tmp_path / "callgrind.out.12").write_text("totals: 5\n")
    (tmp_path / "callgrind.out.12.1").write_text("totals: 7\n")
    (tmp_path / "callgrind.out.123.1").write_text("totals: 1000\n")
    assert _counted(tmp_path, 12) == 12
    assert _counted(tmp_path, 123) == 1000
