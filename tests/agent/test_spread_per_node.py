"""Each node's checks of a tier are spread over the interval, not bunched in one burst.

With the plan in config order (node 1's checks, then node 2's...) and phases i/n, a node's c
checks would sit next to each other and a silent node would give its first evidence only once
per interval; interleaved, one of its checks runs every interval / c.
"""

from __future__ import annotations

import random

import pytest

from probes.agent.scheduler import ScheduleCore
from probes.config import TierPolicy
from probes.model import Tier

from .fakes import planned

pytestmark = pytest.mark.agent

TIERS = {"l4": TierPolicy(interval=2.0, timeout=1.0, fast_interval=0.25)}


@pytest.mark.parametrize(("nodes", "per_node"), [(3, 4), (5, 2), (1, 3), (7, 1)])
def test_each_nodes_checks_are_evenly_spread(nodes: int, per_node: int) -> None:
    core = ScheduleCore(TIERS, rng=random.Random(3))
    core.load([planned(f"node-{n}", Tier.L4, f"c{i}")
               for n in range(nodes) for i in range(per_node)])
    total = nodes * per_node
    all_phases = sorted(st.phase for st in core.states.values())
    assert all_phases == pytest.approx([i / total for i in range(total)])  # still evenly spread
    for n in range(nodes):
        phases = sorted(core.states[f"node-{n}/c{i}"].phase for i in range(per_node))
        gaps = [b - a for a, b in zip(phases, [*phases[1:], phases[0] + 1], strict=True)]
        assert max(gaps) == pytest.approx(1 / per_node), (n, phases)


def test_uneven_nodes_keep_every_check() -> None:
    core = ScheduleCore(TIERS, rng=random.Random(3))
    checks = [planned("a", Tier.L4, f"c{i}") for i in range(3)] + [planned("b", Tier.L4, "c0")]
    core.load(checks)
    assert set(core.states) == {c.key for c in checks}
