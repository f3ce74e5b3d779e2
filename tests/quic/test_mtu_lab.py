"""Path-MTU check on the lab path: exact lowered MTU, PMTU black hole, no echo service.

The router lowers its link MTU toward the node (``lab.set_mtu``) and answers DF packets that are
too big with ICMP frag-needed to the agent; ``lab.black_hole_pmtu(agent)`` drops that ICMP.
"""

from __future__ import annotations

import json
import select
import sys
from typing import Any

import pytest

from probes.checks import mtu
from probes.checks.base import CheckResult, execute
from probes.model import Reason

from .conftest import ECHO_PORT, MtuLab

pytestmark = [pytest.mark.quic, pytest.mark.lab]


def _probe(env: MtuLab, timeout: float = 10.0, **overrides: Any) -> CheckResult:
    fields: dict[str, Any] = {"host": env.node.address, "port": ECHO_PORT}
    fields.update(overrides)
    return env.run(execute(mtu.UDP, mtu.MtuParams(**fields), timeout))


def test_unrestricted_path_passes_the_full_link_mtu(mtulab: MtuLab) -> None:
    result = _probe(mtulab)
    assert result.ok, result
    assert result.facts["local_mtu"] == 1500
    assert result.facts["path_mtu"] == 1500
    assert result.facts["frag_needed_seen"] is False
    assert result.facts["socket"] == "udp"  # no privileges needed


def test_sizes_over_the_local_interface_mtu_are_not_a_black_hole(mtulab: MtuLab) -> None:
    # 9000 cannot leave a 1500-byte interface with DF: EMSGSIZE locally, never on the wire
    result = _probe(mtulab, max_size=9000)
    assert result.ok, result
    assert result.facts["path_mtu"] == 1500


@pytest.mark.parametrize("lowered", [1400, 1337])
def test_lowered_mtu_found_exactly_with_frag_needed(mtulab: MtuLab, lowered: int) -> None:
    mtulab.lab.set_mtu(mtulab.node, lowered)
    for _ in range(2):  # the second run must not be fooled by the PMTU the kernel cached
        result = _probe(mtulab)
        assert result.ok, result
        assert result.facts["local_mtu"] == 1500
        assert result.facts["path_mtu"] == lowered
        assert result.facts["frag_needed_seen"] is True
        assert result.facts["frag_needed_mtu"] == lowered


def test_answers_slower_than_the_probe_wait_still_count(mtulab: MtuLab) -> None:
    # 250 ms of delay against a 150 ms wait: every answer comes during a later try of the
    # same size, and must be credited to that size (not dropped, not given to another size).
    # Six tries leave room for a busy machine; an answer never comes within its own try's wait,
    # so a search that dropped late answers would still fail every size.
    mtulab.lab.set_mtu(mtulab.node, 1400)
    mtulab.lab.set_delay(mtulab.agent, 250)
    try:
        result = _probe(mtulab, timeout=30.0, probe_wait=0.15, attempts=6)
    finally:
        mtulab.lab.set_delay(mtulab.agent, 0)
    assert result.ok, result
    assert result.facts["path_mtu"] == 1400
    assert result.facts["frag_needed_mtu"] == 1400


def test_a_frag_needed_pending_at_the_next_send_is_not_a_local_limit(mtulab: MtuLab) -> None:
    # Linux returns an ICMP error about an earlier datagram as the errno of the socket's next
    # send (sk_err). A late frag-needed for a 1500-byte try that lands just before the 576-byte
    # floor probe is sent made that send fail with EMSGSIZE, read as "our own stack cannot send
    # 576 bytes": the search then said "even 576-byte probes need fragmentation" on a 1400 path.
    # Here the frag-needed is made to wait on the socket, the reader kept from running, exactly.
    mtulab.lab.set_mtu(mtulab.node, 1400)

    async def floor_probe_after_a_pending_frag_needed() -> mtu.ProbeOutcome:
        prober = await mtu.MtuProber.open(mtulab.node.address, ECHO_PORT)
        try:
            prober.sock.send(prober.wire.message(1, 1500))
            poller = select.poll()  # blocks the event loop: the prober cannot read the error
            poller.register(prober.sock, select.POLLERR)
            assert poller.poll(5000), "no frag-needed came back for the 1500-byte datagram"
            return await prober.probe(576, attempts=2, wait=2.0)
        finally:
            prober.close()

    outcome = mtulab.run(floor_probe_after_a_pending_frag_needed())
    assert outcome == mtu.ProbeOutcome(True), outcome


def test_black_hole_flagged_with_the_exact_mtu(mtulab: MtuLab) -> None:
    mtulab.lab.set_mtu(mtulab.node, 1400)
    mtulab.lab.black_hole_pmtu(mtulab.agent)
    result = _probe(mtulab, probe_wait=0.2)
    assert not result.ok
    assert result.reason is Reason.MTU_BLACK_HOLE, result
    assert result.facts["path_mtu"] == 1400
    assert result.facts["frag_needed_seen"] is False


def test_path_below_required_mtu(mtulab: MtuLab) -> None:
    mtulab.lab.set_mtu(mtulab.node, 1400)
    result = _probe(mtulab, required_mtu=1420)
    assert result.reason is Reason.MTU_BELOW_MINIMUM, result
    assert result.facts["path_mtu"] == 1400


def test_floor_over_the_path_mtu_is_below_minimum_with_the_named_mtu(mtulab: MtuLab) -> None:
    # the floor probe itself got the frag-needed: below minimum, with the MTU it named
    mtulab.lab.set_mtu(mtulab.node, 1400)
    result = _probe(mtulab, min_size=1450)
    assert result.reason is Reason.MTU_BELOW_MINIMUM, result
    assert result.facts["frag_needed_mtu"] == 1400
    assert result.facts["probes"] == 2


def test_no_echo_service_is_icmp_unreachable(mtulab: MtuLab) -> None:
    result = _probe(mtulab, port=ECHO_PORT + 1)
    assert result.reason is Reason.ICMP_UNREACHABLE, result


def test_cli_reports_black_hole_with_exit_1_and_json(mtulab: MtuLab) -> None:
    mtulab.lab.set_mtu(mtulab.node, 1400)
    argv = [sys.executable, "-m", "probes.cli", "probe", "mtu", mtulab.node.address,
            str(ECHO_PORT), "--json"]
    proc = mtulab.agent.run(argv, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["facts"]["path_mtu"] == 1400
    mtulab.lab.black_hole_pmtu(mtulab.agent)
    proc = mtulab.agent.run([*argv, "--probe-wait", "0.2"], check=False)
    result = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert result["reason"] == "mtu-black-hole"
    assert result["facts"]["path_mtu"] == 1400


# -------------------------------------------------------------------------- ICMP echo mode


def _probe_icmp(env: MtuLab, **overrides: Any) -> CheckResult:
    params = mtu.MtuParams(host=env.node.address, **overrides)
    return env.run(execute(mtu.ICMP, params, 10.0))


@pytest.mark.parametrize("ping_socket", [False, True])
def test_icmp_mode_finds_the_mtu_and_the_black_hole(mtulab: MtuLab, ping_socket: bool) -> None:
    # a new namespace allows no ping sockets ("1 0"): root falls back to a raw socket
    groups = "0 2147483647" if ping_socket else "1 0"
    mtulab.agent.run(["sysctl", "-qw", f"net.ipv4.ping_group_range={groups}"])
    mode = "icmp-ping" if ping_socket else "icmp-raw"
    mtulab.lab.set_mtu(mtulab.node, 1400)
    found = _probe_icmp(mtulab)
    assert found.ok, found
    assert (found.facts["socket"], found.facts["path_mtu"]) == (mode, 1400)
    assert found.facts["frag_needed_mtu"] == 1400
    mtulab.lab.black_hole_pmtu(mtulab.agent)
    hole = _probe_icmp(mtulab, probe_wait=0.2)
    assert hole.reason is Reason.MTU_BLACK_HOLE, hole
    assert hole.facts["path_mtu"] == 1400


def test_icmp_mode_on_a_cut_link_is_timeout(mtulab: MtuLab) -> None:
    mtulab.lab.partition(mtulab.node)
    try:
        result = _probe_icmp(mtulab, probe_wait=0.1, attempts=1)
    finally:
        mtulab.lab.heal(mtulab.node)
    assert result.reason is Reason.TIMEOUT, result
