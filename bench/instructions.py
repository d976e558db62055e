"""Instructions per request in a server process, counted by valgrind's callgrind.

    python -m bench.instructions [--server gpio|trio-floor] [--depth D] [--count N]
                                 [--tree PATH ...]

The server runs under ``valgrind --tool=callgrind`` with collection off; the C load
generator connects once unmeasured (VERSION, warm-up), then collection is switched on
(``callgrind_control -i on``) for ``--count`` 4-byte REGION_READs of BAR2 with ``--depth``
in flight, and off again. The figure is the user-space instructions the server executed
per request in that window: the kernel's share (system calls) is not counted.

Unlike a rate or a CPU time, the count repeats to within about 0.2% from run to run,
whatever else the machine does, so it can tell apart changes of a few percent on a shared,
noisy machine where timings cannot (docs/performance.md). It is no substitute for the
timed figures: it weighs every instruction alike (a cache miss or a system call costs
nothing here), and under valgrind the server runs ~50x slower than the load generator, so
reads hold as many requests as are in flight. Compare trees in one run: ``--tree`` takes
checkouts (``git worktree add /tmp/base REV``); each is measured with its own code on
``PYTHONPATH``. ``gpio`` is our server (``vfio-user-trio serve gpio``), ``trio-floor``
the bare trio responder of figure 1 (``bench/figures/floors.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.baselines import BenchToolError, run_loadgen

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Bounds the server's start under valgrind (imports run ~50x slower there).
START_TIMEOUT = 300.0
STOP_TIMEOUT = 120.0
SERVERS = {
    "gpio": ["-m", "vfiouser_trio.cli", "serve", "gpio", "--socket-path={socket}"],
    "trio-floor": ["-m", "bench.figures.floors", "trio", "--socket", "{socket}"],
}


class InstructionsError(RuntimeError):
    """valgrind is missing, or the server under it failed."""


def total_instructions(dump: str) -> int:
    """The instructions a callgrind dump file counts (its ``totals:`` line; 0 if none)."""
    for line in dump.splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    return 0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise InstructionsError(
            f"{name} not found: install valgrind (Debian: apt-get install valgrind)"
        )
    return path


def _control(pid: int, *args: str) -> None:
    done = subprocess.run(
        [_tool("callgrind_control"), *args, str(pid)],
        check=False,
        capture_output=True,
        timeout=STOP_TIMEOUT,
    )
    if done.returncode:
        output = (done.stdout + done.stderr).decode(errors="replace")
        raise InstructionsError(f"callgrind_control {' '.join(args)} failed:\n{output}")


def measure(tree: Path, server: str = "gpio", *, depth: int = 64, count: int = 10_000) -> float:
    """Instructions per request of ``server`` from the checkout ``tree`` (see module doc)."""
    valgrind = _tool("valgrind")
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        socket_path = Path(tmp) / "server.sock"
        out = Path(tmp) / "callgrind.out"
        argv = [arg.format(socket=socket_path) for arg in SERVERS[server]]
        env = dict(os.environ, PYTHONPATH=str(tree))
        with open(Path(tmp) / "server.log", "w+b") as log:
            process = subprocess.Popen(
                [
                    valgrind,
                    "--tool=callgrind",
                    "--instr-atstart=no",
                    f"--callgrind-out-file={out}",
                    sys.executable,
                    *argv,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=tree,
                env=env,
            )
            try:
                deadline = time.monotonic() + START_TIMEOUT
                while not socket_path.exists():
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = log.read().decode(errors="replace")[-2000:]
                        raise InstructionsError(f"{server} from {tree} did not start:\n{tail}")
                    time.sleep(0.1)
                run_loadgen(socket_path, "pipeline", depth=depth, count=2000, region=2, warmup=0)
                _control(process.pid, "-i", "on")
                run_loadgen(socket_path, "pipeline", depth=depth, count=count, region=2, warmup=0)
                _control(process.pid, "-i", "off")
                _control(process.pid, "-d")
            finally:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
        # The dump asked for (callgrind.out.<n>) and the one at exit (nothing collected).
        total = sum(total_instructions(p.read_text()) for p in Path(tmp).glob("callgrind.out*"))
    if total == 0:
        raise InstructionsError(f"callgrind counted nothing for {server} from {tree}")
    return total / count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--server", choices=sorted(SERVERS), default="gpio")
    parser.add_argument("--depth", type=int, default=64, help="requests in flight (1-256)")
    parser.add_argument("--count", type=int, default=10_000, help="requests measured")
    parser.add_argument(
        "--tree",
        type=Path,
        action="append",
        help="a checkout to measure (repeatable; default: this one)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per tree")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    try:
        for tree in args.tree or [REPO_ROOT]:
            per_request = measure(tree.resolve(), args.server, depth=args.depth, count=args.count)
            if args.json:
                print(
                    json.dumps(
                        {
                            "tree": str(tree),
                            "server": args.server,
                            "depth": args.depth,
                            "count": args.count,
                            "instructions_per_request": round(per_request),
                        }
                    )
                )
            else:
                what = f"{args.server}, {args.depth} in flight"
                print(f"{tree}: {what}: {per_request:,.0f} instructions per request")
    except (InstructionsError, BenchToolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
