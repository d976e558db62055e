"""Smoke test of ``python -m bench``: a quick run prints a well-formed table with every figure.

Timings are never asserted: only the table's shape, that every figure produced its rows, and
that each cell says what its column promises.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.figures.common import COLUMNS, Row, Settings, Target, format_table
from bench.figures.roundtrip import TARGET_DEPTH
from bench.run import build_parser, main

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK_TIMEOUT = 120.0


def table_rows(output: str) -> list[list[str]]:
    """The cells of every markdown table line of ``output`` (header and separator included)."""
    return [
        [cell.strip() for cell in line.strip()[1:-1].split("|")]
        for line in output.splitlines()
        if line.startswith("|") and line.rstrip().endswith("|")
    ]


def expected_rows(settings: Settings) -> dict[int, int]:
    """Rows per figure: the round trip, two reference floors, the round trip and the server
    CPU per round trip against the trio floor; a pipelined row per depth plus
    posted, and at the target depth the bare trio floor, our rate against it and the server
    CPU per request against the floor's; per DMA
    size an fd-map row and a message row against each of two baselines (the
    socketpair, the two-process floor); two interrupt clients; a row per scale
    plus memory; migration without and with pre-copy; unread-reply memory; fairness; two
    policies against SpecOrder on three workloads."""
    return {
        1: 5,
        2: len(settings.depths) + 1 + (3 if TARGET_DEPTH in settings.depths else 0),
        3: 3 * len(settings.dma_sizes),
        4: 2,
        5: len(settings.scales) + 1,
        6: 2,
        7: 1,
        8: 1,
        9: 6,
    }


@pytest.fixture(scope="module")
def quick_run() -> subprocess.CompletedProcess[str]:
    if shutil.which("gcc") is None:
        pytest.skip("the C baselines need gcc")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT,
        check=False,
    )


def test_quick_run_prints_the_full_table(quick_run: subprocess.CompletedProcess[str]) -> None:
    assert quick_run.returncode == 0, quick_run.stderr
    rows = table_rows(quick_run.stdout)
    assert rows[0] == list(COLUMNS)
    assert all(re.fullmatch(r"-{3,}", cell) for cell in rows[1])
    body = rows[2:]
    assert all(len(row) == len(COLUMNS) for row in body)

    per_figure: dict[int, int] = {}
    for row in body:
        per_figure[int(row[0])] = per_figure.get(int(row[0]), 0) + 1
    assert per_figure == expected_rows(Settings.quick())


def test_quick_run_cells_say_what_their_columns_promise(
    quick_run: subprocess.CompletedProcess[str],
) -> None:
    assert quick_run.returncode == 0, quick_run.stderr
    body = table_rows(quick_run.stdout)[2:]
    targets = 0
    for _, case, ours, baseline, ratio, target, met in body:
        assert case and ours and baseline
        assert ratio == "—" or math.isfinite(float(ratio))
        if target == "—":
            assert met == "—"
        else:
            targets += 1
            assert re.fullmatch(r"[≥≤] [\d.]+(x| KiB| MiB)", target)
            assert met in ("yes", "**no**")
    # Round trip (against raw C and against the trio floor), 64 in flight, fd-map DMA from
    # 64 KiB (one size in quick mode), two interrupt clients, memory per connection,
    # unread-reply memory, fairness.
    assert targets == 9


def test_quick_run_records_the_machine(quick_run: subprocess.CompletedProcess[str]) -> None:
    assert quick_run.returncode == 0, quick_run.stderr
    out = quick_run.stdout
    for label in ("- CPU: ", "- cores: ", "- kernel: ", "- Python: ", "Command: `python -m bench"):
        assert label in out
    assert "--quick" in out.split("Command:", 1)[1].splitlines()[0]


def test_table_marks_targets_met_and_missed() -> None:
    rows = [
        Row(1, "a", "x", "y", 0.75, Target.ratio_at_least(0.5)),
        Row(4, "b", "x", "y", 3.0, Target.ratio_at_most(2.0)),
        Row(5, "c|d", "x", "y", None, Target(64, False, "≤ 64 KiB"), judged=10.0),
        Row(2, "e", "x", "y", 0.1, None),
    ]
    lines = table_rows(format_table(rows))
    assert [line[-1] for line in lines[2:]] == ["yes", "**no**", "yes", "—"]
    assert [line[4] for line in lines[2:]] == ["0.75", "3.00", "—", "0.10"]
    assert lines[4][1] == "c/d"  # a pipe inside a cell would break the table


@pytest.mark.parametrize("figures", ["0", "10", "1,x", ""])
def test_figure_list_is_checked(figures: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--figures", figures])
    assert "--figures" in capsys.readouterr().err


def test_figure_list_selects_figures() -> None:
    args = build_parser().parse_args(["--quick", "--figures", "4,1"])
    assert args.figures == frozenset({1, 4})
    assert args.quick


def test_leading_double_dash_is_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    # `vfio-user-trio bench -- --quick` hands us ["--", "--quick"].
    with pytest.raises(SystemExit) as exc:
        main(["--", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out
