"""Fault to BGP withdrawal with the whole stack: real agents probing real VPN nodes every 2 s,
the mesh deciding, gobgpd speakers per PoP, a BIRD upstream whose RIB is what the world sees.

Each fault kills a PoP's VPN daemons (its only node: OpenVPN and strongSwan stop, the host
stays up); the clock runs until the PoP's path leaves the upstream's RIB. Then the daemons come
back and the clock runs until the path returns (hysteresis included). Prints figures only.
"""

from __future__ import annotations

import statistics
import time

import pytest

from probes.lab.stack import StackOptions, running_stack
from probes.lab.topology import wait_for
from tests.conftest import lab_unavailable

pytestmark = [pytest.mark.slow, pytest.mark.bgp, pytest.mark.lab]

FAULTS = 6


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@pytest.mark.timeout(1800)
def test_fault_to_withdrawal_at_the_upstream() -> None:
    if reason := lab_unavailable():
        pytest.skip(reason)
    options = StackOptions(nodes=3, agents=3, interval=2.0, anycast=True, prometheus=False)
    with running_stack("anybench", options) as stack:
        stack.wait_settled()
        everyone = {n.pop: 100 for n in stack.fleet.nodes.values()}
        wait_for(lambda: stack.announcing_pops() == everyone, 60, "every PoP announced")
        withdraw, announce = [], []
        nodes = list(stack.fleet.nodes.values())
        for i in range(FAULTS):
            node = nodes[i % len(nodes)]
            others = {p: m for p, m in everyone.items() if p != node.pop}
            started = time.monotonic()
            stack.kill_vpn(node.name)
            wait_for(lambda o=others: stack.announcing_pops() == o, 60, "withdrawal", 0.02)
            withdraw.append(time.monotonic() - started)
            started = time.monotonic()
            stack.restore_vpn(node.name)
            wait_for(lambda: stack.announcing_pops() == everyone, 90, "re-announcement", 0.05)
            announce.append(time.monotonic() - started)
        print(f"\nanycast, {FAULTS} faults at a {options.interval:g} s probe interval "
              f"(fall 3 at fastinter {options.fast_interval:g} s, mesh fall {options.mesh_fall}):")
        print(f"  fault -> withdrawal at the upstream: median {statistics.median(withdraw):.2f} s,"
              f" p99 {_pct(withdraw, 0.99):.2f} s, max {max(withdraw):.2f} s (target <= 5 s)")
        print(f"  repair -> re-announced: median {statistics.median(announce):.2f} s "
              f"(includes the {options.anycast_up_after:g} s PoP hysteresis)")
        assert len(withdraw) == FAULTS
