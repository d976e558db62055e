"""Figure 9: ordering policies, each against SpecOrder on the same device in the same run.

Every policy is a deployable server: ``vfio-user-trio serve DEVICE --policy POLICY``, one
process per (device, policy). The device is ``bench.devices:PolicyBenchDevice``: BAR0's
writes take 1 ms each, BAR1 reads at once, BAR2 holds 8 queue doorbells whose writes take
1 ms each (``policy_bench``); ``policy_bench_fast`` is the same with no latency. The client
is the C load generator (``bench/c/vfu_loadgen.c``), which matches replies by message ID, so
a reply that overtakes another is fine. The policies:

- ``spec``: SpecOrder, the baseline of every ratio;
- ``bypass``: ``vfiouser_trio.policies:BypassOrder``, reads overtake posted writes to other
  regions;
- ``lanes``: ``bench.devices:queue_lanes``, KeyedOrder with one lane per doorbell queue.

The workloads: ``bypass`` (rounds of 20 posted BAR0 writes, each followed by a BAR1 read,
all sent before any reply is read; the reads' p99, lower is better), ``queues`` (doorbell
writes with replies over 4 queues, 32 in flight; doorbells/s, higher is better) and the
``bypass`` workload on the device with no latency (messages/s: what the reordering costs
by itself). Policies run in rotating order in every repeat; medians over the repeats.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.baselines import LoadgenResult, LoadMode, run_loadgen
from bench.devices import FAST_BAR, QUEUE_BAR, QUEUE_STRIDE, SLOW_BAR

from .common import Row, Settings, median, micros, rate, ratio
from .processes import ServerProcess, retry_busy, running

FIGURE = 9
#: ``serve --policy`` values, the baseline first.
POLICIES: dict[str, str] = {
    "spec": "spec",
    "bypass": "vfiouser_trio.policies:BypassOrder",
    "lanes": "bench.devices:queue_lanes",
}
BASELINE = "spec"
SLOW_DEVICE = "bench.devices:policy_bench"
FAST_DEVICE = "bench.devices:policy_bench_fast"
#: Posted writes (each followed by a read) per round of the bypass workload.
BYPASS_BATCH = 20
#: Doorbells in flight, and the queues they are spread over.
DOORBELL_DEPTH = 32
DOORBELL_QUEUES = 4
ACCESS_SIZE = 4


@dataclass(frozen=True, slots=True)
class Workload:
    key: str
    device: str
    #: The figure each run gives (from the load generator's result) ...
    value: Callable[[LoadgenResult], float]
    #: ... and whether lower is better (a latency).
    latency: bool
    describe: str


WORKLOADS = (
    Workload(
        "bypass",
        SLOW_DEVICE,
        lambda r: r.read_p99_us,
        True,
        f"read p99, {BYPASS_BATCH} posted 1 ms writes to BAR0 interleaved with BAR1 reads",
    ),
    Workload(
        "queues",
        SLOW_DEVICE,
        lambda r: r.messages_per_s,
        False,
        f"doorbells/s, {DOORBELL_DEPTH} in flight over {DOORBELL_QUEUES} queues (1 ms each)",
    ),
    Workload(
        "fast",
        FAST_DEVICE,
        lambda r: r.messages_per_s,
        False,
        "messages/s, the bypass workload with no device latency (the policy's own cost)",
    ),
)


@contextmanager
def policy_server(device: str, policy: str, socket_path: Path) -> Iterator[ServerProcess]:
    """``python -m vfiouser_trio.cli serve DEVICE --socket-path=PATH --policy=POLICY``."""
    argv = [sys.executable, "-m", "vfiouser_trio.cli", "serve", device]
    argv += [f"--socket-path={socket_path}", f"--policy={policy}"]
    server = ServerProcess(argv, f"server ({device}, --policy={policy})")
    with running(server):
        server.wait_for_socket(socket_path)
        yield server


def _load(path: Path, workload: Workload, seconds: float) -> LoadgenResult:
    if workload.key == "queues":
        return retry_busy(
            lambda: run_loadgen(
                path,
                LoadMode.QUEUES,
                depth=DOORBELL_DEPTH,
                queues=DOORBELL_QUEUES,
                stride=QUEUE_STRIDE,
                region=QUEUE_BAR,
                size=ACCESS_SIZE,
                seconds=seconds,
                warmup=DOORBELL_DEPTH,
            )
        )
    return retry_busy(
        lambda: run_loadgen(
            path,
            LoadMode.BYPASS,
            batch=BYPASS_BATCH,
            region=SLOW_BAR,
            read_region=FAST_BAR,
            size=ACCESS_SIZE,
            seconds=seconds,
            warmup=2,
        )
    )


def _show(value: float, latency: bool) -> str:
    return micros(value) if latency else rate(value)


def measure(settings: Settings) -> list[Row]:
    """Figure 9's rows: each policy but SpecOrder on each workload, against SpecOrder."""
    runs: dict[tuple[str, str], list[float]] = {(w.key, p): [] for w in WORKLOADS for p in POLICIES}
    #: The reads' medians beside their p99 (latency workloads).
    medians: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    names = list(POLICIES)
    with tempfile.TemporaryDirectory(prefix="vfu-bench-policies-") as tmp, ExitStack() as stack:
        paths: dict[tuple[str, str], Path] = {}
        for device in (SLOW_DEVICE, FAST_DEVICE):
            for name, policy in POLICIES.items():
                path = Path(tmp) / f"{device.rsplit(':', 1)[1]}-{name}.sock"
                stack.enter_context(policy_server(device, policy, path))
                paths[(device, name)] = path
        for rep in range(settings.repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for workload in WORKLOADS:
                for name in order:
                    result = _load(paths[(workload.device, name)], workload, settings.seconds)
                    runs[(workload.key, name)].append(workload.value(result))
                    medians[(workload.key, name)].append(result.read_median_us)
    rows = []
    for workload in WORKLOADS:
        base = median(runs[(workload.key, BASELINE)])
        for name in names:
            if name == BASELINE:
                continue
            ours = median(runs[(workload.key, name)])
            shown = [_show(ours, workload.latency), _show(base, workload.latency)]
            if workload.latency:
                for i, policy in enumerate((name, BASELINE)):
                    shown[i] += f" (p50 {micros(median(medians[(workload.key, policy)]))})"
            rows.append(
                Row(
                    FIGURE,
                    f"{workload.describe}: {name} vs {BASELINE}",
                    shown[0],
                    shown[1],
                    ratio(ours, base),
                )
            )
    return rows
