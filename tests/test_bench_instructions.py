"""bench/instructions.py: callgrind's count of a server's instructions per request."""

from __future__ import annotations

import shutil

import pytest

from bench.instructions import REPO_ROOT, measure, total_instructions


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
