"""vfiouser_trio.policies: the library's bypass policy under the explorer and in the CLI."""

from __future__ import annotations

import pytest

from tests.explore_scenario import scenario
from vfiouser_trio.cli import load_policy
from vfiouser_trio.policies import READS_PASS_POSTED_WRITES, BypassOrder
from vfiouser_trio.testing import explore

pytestmark = pytest.mark.usefixtures("no_fd_leak")


@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize(
    "strategy", [explore.Exhaustive(bound=1), explore.Random(seed=1)], ids=["exhaustive", "random"]
)
def test_it_passes_the_explorer(inline: bool, strategy: explore.Strategy) -> None:
    """The explorer's scenario (posted writes to both regions, reads of both): no schedule
    breaks the spec order (minus the declared relaxation) or reads-see-writes, with the
    inline fast path on or off."""

    class Policy(BypassOrder):
        runs_inline = inline

    report = explore.explore(scenario(Policy), strategy, runs=100)
    assert report.ok, str(report)


def test_it_declares_one_relaxation() -> None:
    assert BypassOrder().relaxations == (READS_PASS_POSTED_WRITES,)


def test_serve_policy_names_it() -> None:
    assert isinstance(load_policy("vfiouser_trio.policies:BypassOrder"), BypassOrder)
