"""The NVMe example in a Linux guest, against QEMU's own ``-device nvme`` in the same guest.

    python -m bench nvme [--passes N] [--seq-mib M] [--random-ops K] [--profile FILE]

One guest boot (tests/qemu_guest.py's harness, so the provisioned QEMU: source
/var/cache/vfio-user-qemu/env.sh or what ``../shared/qemu/provision.sh`` prints) holds two
disks of :data:`DISK_SIZE` bytes, each on a file in the host's page cache: ours, served by a
``vfio-user-trio serve nvme --backing FILE`` process behind QEMU's ``vfio-user-pci``, and
QEMU's emulated controller. In the guest a static tool (tests/nvme_bench/nvbench.c, built here
with ``gcc -static``) runs on each disk in turn, the order alternating between passes: M MiB
written then read sequentially in 128 KiB requests, then K random 4 KiB reads and K writes,
O_DIRECT, one request at a time. Each cell is the median over the passes; the ratio is ours
over QEMU's (higher is better). Nothing is asserted: the machine is shared and TCG is slow,
so only ratios within one run mean anything.

``--profile FILE`` runs the server under cProfile (which slows it: those figures are not the
ones to quote) and prints its top entries by cumulative and by own time.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.qemu_guest import GuestDevice, Qemu, build_initramfs, report_values, running_guest

from .common import BenchError, bandwidth, median, ratio
from .processes import REPO_ROOT, ServerProcess, cpu_ticks, running

DISK_SIZE = 64 << 20
NVBENCH = REPO_ROOT / "tests" / "nvme_bench" / "nvbench.c"
#: What nvbench prints, as (key, case label, unit).
METRICS = (
    ("seq_write_mbps", "sequential write, 128 KiB", "MB/s"),
    ("seq_read_mbps", "sequential read, 128 KiB", "MB/s"),
    ("rand_read_iops", "random read, 4 KiB", "IOPS"),
    ("rand_write_iops", "random write, 4 KiB", "IOPS"),
)
#: Identify Controller's model of ours (vfiouser_trio.examples.nvme.identify.ControllerInfo).
OUR_MODEL_PREFIX = "vfiouser"

SCRIPT = r"""
i=0; while [ $(ls /sys/block | grep -c nvme) -lt 2 ] && [ $i -lt 600 ]; do
  sleep 0.1; i=$((i + 1)); done
for c in /sys/class/nvme/nvme*; do
  case "$(cat $c/model)" in
    OUR_MODEL*) ours=/dev/$(basename $c)n1 ;;
    *) qemus=/dev/$(basename $c)n1 ;;
  esac
done
echo "ours=$ours qemus=$qemus"
for p in $(seq PASSES); do
  if [ $((p % 2)) = 1 ]; then order="ours qemu"; else order="qemu ours"; fi
  for label in $order; do
    if [ $label = ours ]; then dev=$ours; else dev=$qemus; fi
    nvbench $dev SEQ_MIB RANDOM_OPS | sed "s/^/p${p}_${label}_/"
  done
done
"""


def build_nvbench(directory: Path) -> Path:
    """nvbench.c built static (the guest has no libc) into ``directory``; BenchError without
    a compiler that can."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc is needed to build the guest's benchmark tool (nvbench.c)")
    tool = directory / "nvbench"
    built = subprocess.run(
        [gcc, "-static", "-O2", "-o", str(tool), str(NVBENCH)],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        raise BenchError(f"gcc -static nvbench.c failed (a static libc?):\n{built.stderr}")
    return tool


def guest_script(passes: int, seq_mib: int, random_ops: int) -> str:
    return (
        SCRIPT.replace("OUR_MODEL", OUR_MODEL_PREFIX)
        .replace("PASSES", str(passes))
        .replace("SEQ_MIB", str(seq_mib))
        .replace("RANDOM_OPS", str(random_ops))
    )


@dataclass(frozen=True)
class Result:
    """One metric: every pass's value for ours and QEMU's."""

    key: str
    case: str
    unit: str
    ours: list[float]
    qemus: list[float]

    @property
    def ratio(self) -> float:
        return ratio(median(self.ours), median(self.qemus))


def results(report: dict[str, str], passes: int) -> list[Result]:
    """The metrics out of the guest's ``p<N>_<ours|qemu>_<key>=value`` lines."""
    out = []
    for key, case, unit in METRICS:
        try:
            ours = [float(report[f"p{p}_ours_{key}"]) for p in range(1, passes + 1)]
            qemus = [float(report[f"p{p}_qemu_{key}"]) for p in range(1, passes + 1)]
        except KeyError as missing:
            raise BenchError(f"the guest reported no {missing}: {report}") from None
        out.append(Result(key, case, unit, ours, qemus))
    return out


def _cell(value: float, unit: str) -> str:
    return bandwidth(value) if unit == "MB/s" else f"{value:.0f} IOPS"


def table(rows: Sequence[Result]) -> str:
    lines = ["| case | ours | QEMU's nvme | ratio |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.case} | {_cell(median(r.ours), r.unit)} | "
            f"{_cell(median(r.qemus), r.unit)} | {r.ratio:.2f} |"
        )
    return "\n".join(lines)


def _server_argv(backing: Path, socket_path: Path, profile: Path | None) -> list[str]:
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    return [
        *argv, "-m", "vfiouser_trio.cli", "serve", "nvme", f"--backing={backing}",
        f"--size={DISK_SIZE}", f"--socket-path={socket_path}",
    ]  # fmt: skip


async def _boot(
    qemu: Qemu, directory: Path, initrd: Path, socket_path: Path, theirs: Path
) -> dict[str, str]:
    extra = [
        "-drive", f"file={theirs},if=none,id=qemu-disk,format=raw",
        "-device", "pcie-root-port,id=qemu-nvme-port,chassis=9",
        "-device", "nvme,drive=qemu-disk,serial=qemu-nvme,bus=qemu-nvme-port",
    ]  # fmt: skip
    devices = [GuestDevice(socket_path, "nvme")]
    async with running_guest(
        qemu, directory, initrd, devices, shared_memory=True, extra=extra
    ) as guest:
        pass
    return report_values(guest.report())


@dataclass(frozen=True)
class Run:
    """What one guest boot measured: the metrics, and the server process's CPU time
    against the guest's wall time (boot included)."""

    results: list[Result]
    server_cpu: float
    wall: float


def measure(passes: int, seq_mib: int, random_ops: int, profile: Path | None = None) -> Run:
    """Boot the guest once, run the passes, return the metrics (see the module doc)."""
    try:  # the harness says what is missing by skipping
        qemu = Qemu.from_environment(modules=True)
        modules = qemu.module_files(["nvme"])
    except pytest.skip.Exception as missing:
        raise BenchError(str(missing)) from None
    with tempfile.TemporaryDirectory(prefix="nvme-bench-") as name:
        directory = Path(name)
        tool = build_nvbench(directory)
        ours, theirs = directory / "ours.img", directory / "qemu.img"
        for image in (ours, theirs):
            with image.open("wb") as f:
                f.truncate(DISK_SIZE)
        initrd = build_initramfs(
            directory, guest_script(passes, seq_mib, random_ops), modules, [tool]
        )
        socket_path = directory / "nvme.sock"
        server = ServerProcess(_server_argv(ours, socket_path, profile), "serve nvme")
        with running(server):
            server.wait_for_socket(socket_path)
            started, ticks = time.monotonic(), cpu_ticks(server.pid)
            report = trio.run(_boot, qemu, directory, initrd, socket_path, theirs)
            wall = time.monotonic() - started
            cpu = (cpu_ticks(server.pid) - ticks) / os.sysconf("SC_CLK_TCK")
    return Run(results(report, passes), cpu, wall)


def profile_summary(profile: Path, entries: int = 25) -> str:
    """The top ``entries`` of a cProfile dump by cumulative time, then by own time."""
    out = io.StringIO()
    stats = pstats.Stats(str(profile), stream=out)
    stats.strip_dirs()
    for key in ("cumulative", "tottime"):
        out.write(f"\n--- by {key} ---\n")
        stats.sort_stats(key).print_stats(entries)
    return out.getvalue()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench nvme",
        description="the NVMe example against QEMU's own nvme, in one Linux guest",
    )
    parser.add_argument("--passes", type=int, default=3, help="passes per disk (default 3)")
    parser.add_argument("--seq-mib", type=int, default=32, help="MiB per sequential pass")
    parser.add_argument("--random-ops", type=int, default=2000, help="4 KiB ops per pass")
    parser.add_argument("--profile", type=Path, help="run the server under cProfile into FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.passes, args.seq_mib, args.random_ops) < 1:
        raise SystemExit("--passes, --seq-mib and --random-ops must be positive")
    command = "python -m bench nvme " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        run = measure(args.passes, args.seq_mib, args.random_ops, args.profile)
    except BenchError as error:
        print(f"python -m bench nvme: {error}", file=sys.stderr)
        return 1
    print(f"## NVMe in a guest: ours against QEMU's nvme\n\nCommand: `{command.strip()}`; "
          f"{args.passes} pass(es), {args.seq_mib} MiB sequential, {args.random_ops} random "
          f"4 KiB ops per pass, {DISK_SIZE >> 20} MiB disks.\n")  # fmt: skip
    if args.profile is not None:
        print("(the server ran under cProfile: these figures are slowed by it)\n")
    print(table(run.results))
    print(f"\nOur server process used {run.server_cpu:.1f} s of CPU over the guest's "
          f"{run.wall:.1f} s (boot included).")  # fmt: skip
    if args.profile is not None:
        print("\n```\n" + profile_summary(args.profile) + "```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
