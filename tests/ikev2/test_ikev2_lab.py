"""IKEv2 checks against a real strongSwan (charon + kernel-libipsec) in the lab."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from probes.checks.base import CheckResult
from probes.checks.ikev2 import Ikev2Params, run_level
from probes.lab import netns
from probes.lab.strongswan import DEFAULT_PROPOSALS, render_connection
from probes.model import Reason

pytestmark = [pytest.mark.ikev2, pytest.mark.lab]

T = TypeVar("T")
FAST_FIRST = ("aes256gcm16-prfsha256-ecp256-curve25519-modp2048",)  # lab's first choice: no retry


def in_agent(agent: Any, coro_fn: Callable[[], Awaitable[T]]) -> T:
    with agent.entered():
        return asyncio.run(coro_fn())  # type: ignore[arg-type]


def params(node: Any, ike: Any, **kw: Any) -> Ikev2Params:
    base: dict[str, Any] = dict(host=node.address, psk_file=str(ike.psk_file),
                                local_id=ike.remote_id, remote_id=ike.local_id,
                                inner_address="10.211.0.7")
    base.update(kw)
    return Ikev2Params(**base)


def probe(agent: Any, p: Ikev2Params, level: str, timeout: float = 5.0) -> CheckResult:
    return in_agent(agent, lambda: run_level(p, timeout, level))


def ike_sas(ike: Any) -> list[str]:
    """IKE SA lines of ``swanctl --list-sas`` ("name: #n, STATE, IKEv2, ...")."""
    return [line for line in ike.list_sas().splitlines() if re.match(r"^\S.*: #\d+, ", line)]


def settled_sas(ike: Any, within: float = 3.0) -> list[str]:
    """IKE SAs once charon has finished destroying deleted ones: it answers the Delete first
    and destroys the SA a moment later, so a busy machine can show it for a few ms."""
    deadline = time.monotonic() + within
    while (lines := ike_sas(ike)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines


@pytest.fixture
def setup(lab: Any) -> tuple[Any, Any, Any, Any]:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node)
    return lab, node, agent, ike


def test_init_auth_and_tunnel_succeed_and_leave_nothing(setup: Any) -> None:
    _, node, agent, ike = setup
    p = params(node, ike, echo_count=10)
    auth = probe(agent, p, "auth")
    assert auth.ok, auth
    assert auth.facts["responder_auth_verified"] is True
    assert auth.facts["responder_id"] == ike.local_id and auth.facts["childless"] is True
    assert auth.facts["delete_acked"] is True
    tunnel = probe(agent, p, "tunnel")
    assert tunnel.ok, tunnel
    assert tunnel.quality is not None and tunnel.quality.received == 10
    assert tunnel.quality.rtt_p50_seconds is not None
    assert tunnel.facts["ping"] == ike.inner_address and tunnel.facts["delete_acked"] is True
    assert settled_sas(ike) == []  # both SAs of both probes deleted
    init = probe(agent, p, "init")
    assert init.ok and init.reason is Reason.OK and init.facts["alive"] is True, init
    assert init.facts["childless_supported"] is True
    half_open = ike_sas(ike)  # init leaves exactly one SA, half-open
    assert len(half_open) == 1 and "CONNECTING" in half_open[0], half_open
    print(f"\nauth {auth.duration_seconds * 1e3:.1f} ms, tunnel rtt p50 "
          f"{tunnel.quality.rtt_p50_seconds * 1e3:.2f} ms")


def test_only_another_dh_group_accepted_retries_with_it(lab: Any) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node, proposals=("aes256gcm16-prfsha256-modp2048",))
    result = probe(agent, params(node, ike), "auth")  # default proposals lead with curve25519
    assert result.ok, result
    assert result.facts["invalid_ke_rounds"] == 1 and result.facts["dh_group"] == 14


def test_cookie_demanded_on_every_request_still_succeeds(lab: Any) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    # cookie_threshold = 1: while one half-open SA exists every IKE_SA_INIT gets a COOKIE (and
    # strongSwan then keeps demanding them for its calm-down delay)
    ike = lab.start_strongswan(node, charon_settings="  cookie_threshold = 1")
    p = params(node, ike, proposals=FAST_FIRST)
    first = probe(agent, p, "init")  # leaves the half-open SA that switches cookies on
    assert first.ok, first
    for _ in range(3):
        result = probe(agent, p, "auth")
        assert result.ok, result
        assert result.facts["cookie_rounds"] == 1
    assert "sending COOKIE" in ike.log() or "COOKIE" in ike.log()


def test_nat_between_agent_and_responder_floats_to_4500(lab: Any) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node)
    # a real source NAT in the router: the agent's packets reach the node from the router address
    netns.run(netns.exec_argv(lab.router_ns, ["nft", "-f", "-"]), input_text=(
        "table ip tw_ikev2_nat {\n"
        "  chain post {\n"
        "    type nat hook postrouting priority 100; policy accept;\n"
        f'    ip saddr {agent.address} oifname "{node.router_if}" masquerade\n'
        "  }\n"
        "}\n"))
    p = params(node, ike, echo_count=5)
    auth = probe(agent, p, "auth")
    assert auth.ok, auth
    assert auth.facts["behind_nat"] is True and auth.facts["nat_t"] is True
    tunnel = probe(agent, p, "tunnel")
    assert tunnel.ok and tunnel.facts["behind_nat"] is True, tunnel
    assert tunnel.quality is not None and tunnel.quality.received == 5
    assert settled_sas(ike) == []


@pytest.mark.parametrize("psk", ["0xq3Zk9_abcdefghijklmnop", "0sQ3Zk9-abcdefghijklmnop"],
                         ids=["0x", "0s"])
def test_a_psk_in_strongswans_notation_is_the_same_key_to_both(lab: Any, psk: str) -> None:
    """swanctl reads a secret starting "0x" as hex and "0s" as base64; the lab's random PSKs
    start so 1 time in 2,048, and then charon answered AUTHENTICATION_FAILED (a CI flake)."""
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node, psk=psk)
    result = probe(agent, params(node, ike), "auth")
    assert result.ok, f"{result}\n{ike.exchange_log()}"


def test_wrong_psk_no_common_proposal_and_down(lab: Any, tmp_path: Any) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node)
    wrong = probe(agent, params(node, ike, psk_file=None, psk="not-the-psk"), "auth")
    assert not wrong.ok and wrong.reason is Reason.AUTH_FAILED, wrong

    none = probe(agent, params(node, ike, proposals=("aes128-sha384-ecp384",)), "init")
    assert not none.ok and none.reason is Reason.NO_PROPOSAL_CHOSEN, none
    assert none.facts["alive"] is True

    lab.partition(node)
    down = probe(agent, params(node, ike, retransmit_initial=0.2), "auth", timeout=1.5)
    assert not down.ok and down.reason is Reason.TIMEOUT, down
    lab.heal(node)

    ike.stop()  # the host answers, nobody listens: ICMP port unreachable, reported as such
    stopped = probe(agent, params(node, ike), "init", timeout=2.0)
    print(f"\nstopped responder: {stopped.reason.value} ({stopped.detail})")
    assert not stopped.ok and stopped.reason is Reason.ICMP_UNREACHABLE, stopped


def test_hundred_auth_probes_leave_no_sa_and_no_cookie(setup: Any) -> None:
    _, node, agent, ike = setup
    p = params(node, ike, proposals=FAST_FIRST)

    async def hundred() -> list[CheckResult]:
        return [await run_level(p, 5.0, "auth") for _ in range(100)]

    results = in_agent(agent, hundred)
    assert len(results) == 100
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    assert all(r.facts["cookie_rounds"] == 0 and r.facts["delete_acked"] for r in results)
    assert settled_sas(ike) == []
    log = ike.log()
    assert "COOKIE" not in log and "too aggressive" not in log
    median = sorted(r.duration_seconds for r in results)[50]
    print(f"\n100 auth probes: median {median * 1e3:.2f} ms")


def test_concurrent_probes_never_exceed_three_half_open(setup: Any) -> None:
    _, node, agent, ike = setup
    p = params(node, ike, proposals=FAST_FIRST)

    async def burst() -> list[CheckResult]:
        return list(await asyncio.gather(*(run_level(p, 5.0, "auth") for _ in range(12))))

    results = in_agent(agent, burst)
    assert len(results) == 12
    assert all(r.ok and r.facts["cookie_rounds"] == 0 for r in results), results
    assert "COOKIE" not in ike.log() and "too aggressive" not in ike.log()
    assert settled_sas(ike) == []


def test_tunnel_loss_is_measured_under_20_percent_loss(setup: Any) -> None:
    lab, node, agent, ike = setup
    lab.set_loss(agent, 20)
    result = probe(agent, params(node, ike, proposals=FAST_FIRST, echo_count=300,
                                 echo_interval=0.005), "tunnel", timeout=20.0)
    lab.heal(agent)
    assert result.ok, result
    assert result.quality is not None
    print(f"\nloss {result.quality.loss_ratio:.1%} of {result.quality.sent}")
    assert 0.10 <= result.quality.loss_ratio <= 0.30


def test_init_agrees_with_ike_scan_on_liveness(setup: Any) -> None:
    _, node, agent, ike = setup

    def ike_scan_alive() -> bool:
        out = agent.run(["ike-scan", "--ikev2", "--sport=0", "--retry=2", "--timeout=500",
                         node.address], check=False).stdout
        return "Handshake returned" in out or "Notify message" in out

    ours = probe(agent, params(node, ike), "init")
    assert ours.facts.get("alive") is True and ike_scan_alive() is True
    ike.stop()
    ours_down = probe(agent, params(node, ike), "init", timeout=2.0)
    assert ours_down.facts.get("alive") is not True and ike_scan_alive() is False


def test_half_open_slots_are_held_so_a_fourth_init_waits(setup: Any) -> None:
    """Init probes leave half-open SAs (nothing can delete them); the 4th in a row would get a
    COOKIE from strongSwan (cookie_threshold_ip = 3), so the agent refuses to send it."""
    _, node, agent, ike = setup
    p = params(node, ike, proposals=FAST_FIRST)

    async def four() -> list[CheckResult]:
        return [await run_level(p, 1.0, "init") for _ in range(4)]

    results = in_agent(agent, four)
    assert [r.ok for r in results[:3]] == [True, True, True], results
    assert results[3].reason is Reason.OVERLOADED, results[3]
    assert sum("CONNECTING" in line for line in ike_sas(ike)) == 3
    assert "COOKIE" not in ike.log()


def test_child_sa_refused_is_reported_apart_from_the_ike_sa(lab: Any) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    ike = lab.start_strongswan(node, esp_proposals=("aes128-sha256",))  # we offer AES-GCM only
    tunnel = probe(agent, params(node, ike), "tunnel")
    assert not tunnel.ok and tunnel.reason is Reason.CHILD_SA_FAILED, tunnel
    assert tunnel.facts["responder_auth_verified"] is True  # the IKE SA itself was fine
    assert tunnel.facts["child_sa_error"] == "NO_PROPOSAL_CHOSEN"
    assert tunnel.facts["delete_acked"] is True and settled_sas(ike) == []
    auth = probe(agent, params(node, ike), "auth")  # childless: unaffected by ESP settings
    assert auth.ok and auth.facts["childless"] is True, auth


def test_auth_without_childless_support_negotiates_a_child_sa(lab: Any) -> None:
    node, agent = lab.add_host("node"), lab.add_host("agent")
    conf = render_connection(
        "lab", local_addrs=node.address, remote_addrs="%any", local_id="node.lab",
        remote_id="agent.lab", proposals=DEFAULT_PROPOSALS, local_ts="10.210.0.0/16",
        remote_ts="10.211.0.0/16", esp_proposals=("aes256gcm16",), psk="lab-psk-0123456789")
    conf = conf.replace("    version = 2\n", "    version = 2\n    childless = never\n")
    ike = lab.start_strongswan(node, psk="lab-psk-0123456789", swanctl_conf=conf)
    result = probe(agent, params(node, ike), "auth")
    assert result.ok, result
    assert result.facts["childless_supported"] is False and result.facts["childless"] is False
    assert "child_sa_error" not in result.facts
    assert "CHILD_SA net{1} established" in ike.log()
    assert settled_sas(ike) == []
