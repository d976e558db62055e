"""``python -m tests.fuzz --seconds 600``: the session fuzzer for long runs outside CI.

Runs :class:`tests.fuzz.machine.SessionMachine` batch after batch, each batch with a new
random seed, until the time is up. Every case (one hypothesis example: a fresh target and
sentinel device, then up to ``--steps`` rules) is checked as in CI: nothing escaped the
server, its loop answers, the sentinel device answers after every step, fds are back to
baseline after every hang-up and case, and this process's RSS stays under
``--max-rss-mib``. On the first failure hypothesis shrinks it and prints the falsifying
steps; the seed to reproduce it is printed too. Exit status 0 when nothing failed.

    python -m tests.fuzz --seconds 60
    python -m tests.fuzz --seed 1234 --seconds 30        # the same batches again
    python -m tests.fuzz --findings none                  # only the generic rules
"""

from __future__ import annotations

import argparse
import faulthandler
import random
import sys
import time
import traceback
from collections.abc import Sequence

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from .machine import FINDINGS, PROCESS_KILLING, SessionMachine, Stats, rss_mib

#: Cases per seed: small, so that the time limit is kept to within a batch.
BATCH = 20


def _findings(text: str) -> frozenset[str]:
    if text == "all":
        return frozenset(FINDINGS)
    if text == "none":
        return frozenset()
    if text == "default":
        return frozenset(FINDINGS) - PROCESS_KILLING
    chosen = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = chosen - frozenset(FINDINGS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown findings: {', '.join(sorted(unknown))}")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz",
        description="fuzz well-formed and hostile vfio-user sessions against served devices",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run (60)")
    parser.add_argument("--seed", type=int, help="seed of the first batch (default: random)")
    parser.add_argument(
        "--max-rss-mib", type=float, default=1024.0, help="RSS bound of this process (1024)"
    )
    parser.add_argument("--steps", type=int, default=40, help="most rules per case (40)")
    parser.add_argument(
        "--findings",
        type=_findings,
        default="default",
        help="finding rules to run: all, none, default (all but those that kill this process "
        f"while unfixed: {', '.join(sorted(PROCESS_KILLING)) or 'none now'}), or a "
        "comma-separated list of rule names",
    )
    parser.add_argument("--no-shrink", action="store_true", help="report failures unshrunk")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    faulthandler.enable()  # a SIGBUS or SIGSEGV still says where it happened
    first = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    seeds = random.Random(first)
    stats = Stats()

    class Machine(SessionMachine):
        findings = args.findings
        max_rss_mib = args.max_rss_mib

    Machine.stats = stats
    phases = (Phase.generate,) if args.no_shrink else (Phase.generate, Phase.shrink)
    config = settings(
        max_examples=BATCH,
        stateful_step_count=args.steps,
        deadline=None,
        database=None,
        phases=phases,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )
    print(
        f"fuzzing for {args.seconds:g} s from seed {first}; findings: "
        f"{', '.join(sorted(args.findings)) or 'none'}",
        flush=True,
    )
    started = time.monotonic()
    batch_seed = first
    failed = False
    try:
        while time.monotonic() - started < args.seconds:
            print(f"batch seed {batch_seed}", flush=True)
            run_state_machine_as_test(seed(batch_seed)(Machine), settings=config)
            batch_seed = seeds.randrange(2**32)
    except BaseException as exc:
        failed = True
        traceback.print_exception(exc)  # its notes hold hypothesis's falsifying steps
        print(f"\nFAILED in the batch of seed {batch_seed}: {exc!r}", flush=True)
        print(
            f"reproduce: python -m tests.fuzz --seed {batch_seed} --seconds 1 "
            f"--steps {args.steps} --findings {','.join(sorted(args.findings)) or 'none'}",
            flush=True,
        )
        if not isinstance(exc, Exception):
            raise
    elapsed = time.monotonic() - started
    print(
        f"\n{stats.cases} cases, {stats.steps} steps, {stats.frames} frames in {elapsed:.1f} s: "
        f"{stats.cases / elapsed:.1f} cases/s, {stats.frames / elapsed:.0f} frames/s; "
        f"{stats.warnings} server warnings; peak RSS {stats.peak_rss_mib:.0f} MiB "
        f"(now {rss_mib():.0f} MiB)",
        flush=True,
    )
    ran = ", ".join(f"{name} {count}" for name, count in sorted(stats.rules.items()))
    print(f"rules run: {ran}", flush=True)
    never = sorted(set(_rule_names()) - set(stats.rules))
    if never:
        print(f"rules never run: {', '.join(never)}", flush=True)
    return 1 if failed else 0


def _rule_names() -> list[str]:
    """Every rule of the machine, by name (findings left out of the run included)."""
    return [
        name
        for name in dir(SessionMachine)
        if hasattr(getattr(SessionMachine, name), "hypothesis_stateful_rule")
    ]


if __name__ == "__main__":
    sys.exit(main())
