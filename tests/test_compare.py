"""compare(): one workload under several ordering policies, side by side."""

from __future__ import annotations

import pytest
import trio

from vfiouser_trio.client import Client
from vfiouser_trio.ordering import ConcurrentOrder, KeyedOrder, SpecOrder, region_key
from vfiouser_trio.policies import BypassOrder
from vfiouser_trio.protocol.constants import Command
from vfiouser_trio.server import Device, PciIdentity
from vfiouser_trio.testing import TraceRecord, compare, explore

pytestmark = pytest.mark.usefixtures("no_fd_leak")

WRITES = 20
WRITE_LATENCY = 0.001


class SlowWrites(Device):
    """BAR0 takes writes that take 1 ms each; BAR1 answers reads at once."""

    def __init__(self, run: explore.Run) -> None:
        super().__init__(PciIdentity(vendor_id=0x1234, device_id=0x7107, class_code=0xFF0000))
        self.add_bar(0, 16, read=self.zeros, write=self.slow_write)
        self.add_bar(1, 16, read=self.zeros)

    async def zeros(self, offset: int, size: int) -> bytes:
        return bytes(size)

    async def slow_write(self, offset: int, data: bytes) -> None:
        await trio.sleep(WRITE_LATENCY)


async def posted_writes_and_reads(client: Client, run: explore.Run) -> None:
    """20 posted writes to the slow BAR0, each followed by a read of BAR1, all pipelined."""
    pending = []
    for _ in range(WRITES):
        await client.write(0, 0, b"\1\0\0\0", posted=True)
        pending.append(await client.start_read(1, 0, 4))
    for reply in pending:
        assert await reply == bytes(4)


SCENARIO = explore.Scenario(device=SlowWrites, workload=posted_writes_and_reads)
POLICIES = {"spec": SpecOrder, "bypass": BypassOrder, "concurrent": ConcurrentOrder}


def test_the_bypass_policy_lowers_the_worst_read_latency_in_virtual_time() -> None:
    result = compare(SCENARIO, POLICIES)
    spec, bypass = result["spec"], result["bypass"]
    for policy in (spec, bypass):
        assert policy.completed == 2 * WRITES
        assert policy.latencies["read"].count == WRITES
        assert policy.latencies["posted write"].count == WRITES
    # Under the spec's order the last read waits for all 20 writes before it.
    assert spec.latencies["read"].max == pytest.approx(WRITES * WRITE_LATENCY)
    assert bypass.latencies["read"].max < spec.latencies["read"].max
    assert bypass.latencies["read"].max == 0  # virtual time: no write is waited for
    # Both take the writes' time; the bypass finishes its reads while they run.
    assert spec.seconds == pytest.approx(WRITES * WRITE_LATENCY)


def test_order_violations_per_policy() -> None:
    result = compare(SCENARIO, POLICIES)
    spec, bypass, concurrent = result["spec"], result["bypass"], result["concurrent"]
    assert spec.violations == () and spec.ok
    # The bypass reorders, but only as it declares.
    assert bypass.violations and bypass.undeclared == () and bypass.ok
    # ConcurrentOrder breaks the spec's order (reported) and declares that it does.
    assert concurrent.violations and concurrent.undeclared == ()
    assert all(v.older.header.no_reply for v in concurrent.violations)


def test_an_undeclared_reordering_is_a_problem() -> None:
    class Undeclared(ConcurrentOrder):
        relaxations = ()

    comparison = compare(SCENARIO, [Undeclared])
    [result] = comparison
    assert result.name == "Undeclared"
    assert result.undeclared == result.violations != ()
    assert not result.ok
    assert all(problem.startswith("spec order") for problem in result.problems)
    assert f"{len(result.undeclared)} NOT DECLARED" in str(comparison)


def test_results_replay_the_same_in_virtual_time() -> None:
    first, second = compare(SCENARIO, POLICIES), compare(SCENARIO, POLICIES)
    for a, b in zip(first, second, strict=True):
        assert (a.name, a.completed, a.seconds, a.latencies) == (
            b.name,
            b.completed,
            b.seconds,
            b.latencies,
        )
        assert [str(v) for v in a.violations] == [str(v) for v in b.violations]
    assert str(first) == str(second)


def test_the_table_names_every_policy_and_class() -> None:
    table = str(compare(SCENARIO, POLICIES))
    for name in POLICIES:
        assert f"\n{name}: {2 * WRITES} requests in" in table
    assert "posted write" in table and "read" in table
    assert "0 spec-order violations" in table  # SpecOrder's line


def test_user_labelled_classes() -> None:
    def by_region(record: TraceRecord) -> str | None:
        if record.header.command == Command.REGION_WRITE:
            return "doorbell"
        return None  # reads not counted

    result = compare(SCENARIO, {"lanes": lambda: KeyedOrder(region_key)}, classify=by_region)
    assert list(result["lanes"].latencies) == ["doorbell"]
    assert result["lanes"].completed == WRITES


def test_a_policy_object_and_wall_time() -> None:
    result = compare(SCENARIO, [BypassOrder()], clock="real")
    [bypass] = result
    assert result.clock == "real" and bypass.name == "BypassOrder"
    assert bypass.completed == 2 * WRITES and bypass.ok
    assert "(real time)" in str(result)


def test_an_unknown_clock_is_refused() -> None:
    with pytest.raises(ValueError, match="clock"):
        compare(SCENARIO, [SpecOrder], clock="wall")  # type: ignore[arg-type]
