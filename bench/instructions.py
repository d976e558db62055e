"""Instructions per request, counted by valgrind's callgrind.

    python -m bench.instructions [--workload region-read|message-dma]
                                 [--server gpio|trio-floor] [--depth D] [--count N]
                                 [--size BYTES] [--tree PATH ...] [--json]

``region-read`` (the default): the server runs under ``valgrind --tool=callgrind`` with
collection off; the C load generator connects once unmeasured (VERSION, warm-up), then
collection is switched on (``callgrind_control -i on``) for ``--count`` 4-byte REGION_READs
of BAR2 with ``--depth`` in flight, and off again. The figure is the user-space instructions
the server executed per request in that window: the kernel's share (system calls) is not
counted. ``gpio`` is our server (``vfio-user-trio serve gpio``), ``trio-floor`` the bare
trio responder of figure 1 (``bench/figures/floors.py``).

``message-dma``: figure 3's message row. A device process and the client process that
answers its DMA_READ / DMA_WRITE messages (:mod:`bench.dma_rounds`) both run under
callgrind, collection switched on in each for ``--count`` rounds (a read and a write of
``--size`` bytes, one at a time) and off again; the figures are each process's
instructions per round. The device's count repeats as the region-read one does (it always
waits for its reply). The client's depends on how the two processes share the cores: a
receive that yields first finds the next command only if the device ran meanwhile, so on a
loaded machine (the device preempting the client) it comes out up to 10% lower. Compare
trees in one run on a quiet machine. The measured tree needs ``bench/dma_rounds.py`` (for
an older commit, copy this ``bench/`` into its checkout).

Unlike a rate or a CPU time, the count repeats to within about 0.5% from run to run,
whatever else the machine does, so it can tell apart changes of a few percent on a shared,
noisy machine where timings cannot (docs/performance.md). It is no substitute for the
timed figures: it weighs every instruction alike (a cache miss or a system call costs
nothing here), and under valgrind the server runs ~50x slower than the load generator, so
reads hold as many requests as are in flight. Compare trees in one run: ``--tree`` takes
checkouts (``git worktree add /tmp/base REV``); each is measured with its own code on
``PYTHONPATH``.
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.baselines import BenchToolError, run_loadgen

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Bounds the server's start under valgrind (imports run ~50x slower there).
START_TIMEOUT = 300.0
STOP_TIMEOUT = 120.0
#: What is counted: REGION_READs a server answers (the C load generator sends them), or
#: message-DMA rounds a device issues and a client process answers (bench.dma_rounds).
WORKLOADS = ("region-read", "message-dma")
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


@contextmanager
def _under_callgrind(
    tree: Path, argv: Sequence[str], tmp: Path, **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """``python argv`` from ``tree`` under callgrind, collection off, its children traced
    (each writes ``tmp/callgrind.out.<pid>[.<dump>]``); ended with SIGTERM on leaving."""
    process = subprocess.Popen(
        [
            _tool("valgrind"),
            "--tool=callgrind",
            "--instr-atstart=no",
            "--trace-children=yes",
            f"--callgrind-out-file={tmp / 'callgrind.out.%p'}",
            sys.executable,
            *argv,
        ],
        cwd=tree,
        env=dict(os.environ, PYTHONPATH=str(tree)),
        **popen,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _counted(tmp: Path, pid: int) -> int:
    """The instructions the dumps of process ``pid`` count: the one asked for and the one
    written at exit (nothing collected after the last switch off)."""
    dumps = [*tmp.glob(f"callgrind.out.{pid}"), *tmp.glob(f"callgrind.out.{pid}.*")]
    return sum(total_instructions(dump.read_text()) for dump in dumps)


def measure(tree: Path, server: str = "gpio", *, depth: int = 64, count: int = 10_000) -> float:
    """Instructions per request of ``server`` from the checkout ``tree`` (see module doc)."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-instructions-") as name,
        open(Path(name) / "server.log", "w+b") as log,
    ):
        tmp = Path(name)
        socket_path = tmp / "server.sock"
        argv = [arg.format(socket=socket_path) for arg in SERVERS[server]]
        with _under_callgrind(
            tree, argv, tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        ) as process:
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
        total = _counted(tmp, process.pid)
    if total == 0:
        raise InstructionsError(f"callgrind counted nothing for {server} from {tree}")
    return total / count


def measure_message_dma(tree: Path, *, size: int = 4096, rounds: int = 200) -> tuple[float, float]:
    """Instructions per message-DMA round (a DMA_READ and a DMA_WRITE of ``size`` bytes) in
    the device's process and in the client's that answers, from the checkout ``tree``: the
    two processes of :mod:`bench.dma_rounds`, both counted for ``rounds`` rounds alone."""
    argv = ["-m", "bench.dma_rounds", f"--size={size}", f"--rounds={rounds}"]
    with (
        tempfile.TemporaryDirectory(prefix="bench-instructions-") as name,
        open(Path(name) / "rounds.log", "w+b") as log,
    ):
        tmp = Path(name)

        def said(expected: str, process: subprocess.Popen[bytes]) -> list[str]:
            assert process.stdout is not None
            words = process.stdout.readline().decode(errors="replace").split()
            if not words or words[0] != expected:
                process.wait(STOP_TIMEOUT)
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise InstructionsError(f"bench.dma_rounds from {tree} failed:\n{tail}")
            return words[1:]

        with _under_callgrind(
            tree, argv, tmp, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
        ) as process:
            assert process.stdin is not None
            pids = [int(word) for word in said("ready", process)]
            for pid in pids:
                _control(pid, "-i", "on")
            process.stdin.write(b"go\n")
            process.stdin.flush()
            said("done", process)
            for pid in pids:
                _control(pid, "-i", "off")
                _control(pid, "-d")
            process.stdin.close()
            process.wait(STOP_TIMEOUT)
        server, client = (_counted(tmp, pid) for pid in pids)
    if not (server and client):
        raise InstructionsError(f"callgrind counted nothing for message DMA from {tree}")
    return server / rounds, client / rounds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workload", choices=WORKLOADS, default="region-read")
    parser.add_argument(
        "--server", choices=sorted(SERVERS), default="gpio", help="region-read: the server"
    )
    parser.add_argument("--depth", type=int, default=64, help="region-read: requests in flight")
    parser.add_argument(
        "--count", type=int, help="requests (region-read, default 10000) or rounds (200)"
    )
    parser.add_argument("--size", type=int, default=4096, help="message-dma: bytes per access")
    parser.add_argument(
        "--tree",
        type=Path,
        action="append",
        help="a checkout to measure (repeatable; default: this one)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per tree")
    args = parser.parse_args(argv)
    dma = args.workload == "message-dma"
    count = args.count if args.count is not None else 200 if dma else 10_000
    if count < 1 or args.size < 1:
        parser.error("--count and --size must be at least 1")
    try:
        for tree in args.tree or [REPO_ROOT]:
            if dma:
                server, client = measure_message_dma(tree.resolve(), size=args.size, rounds=count)
                figures = {"size": args.size, "rounds": count}
                counts = {"server_per_round": round(server), "client_per_round": round(client)}
                what = f"message DMA, {args.size} bytes: instructions per round"
                text = f"device process {server:,.0f}, client process {client:,.0f}"
            else:
                per_request = measure(tree.resolve(), args.server, depth=args.depth, count=count)
                figures = {"server": args.server, "depth": args.depth, "count": count}
                counts = {"instructions_per_request": round(per_request)}
                what = f"{args.server}, {args.depth} in flight"
                text = f"{per_request:,.0f} instructions per request"
            if args.json:
                record = {"tree": str(tree), "workload": args.workload, **figures, **counts}
                print(json.dumps(record))
            else:
                print(f"{tree}: {what}: {text}")
    except (InstructionsError, BenchToolError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
