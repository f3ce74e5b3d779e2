"""Node telemetry without servers: the reconnect counter, failure reasons, planning."""

from __future__ import annotations

import errno
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from probes.agent.plan import plan_target
from probes.checks import telemetry
from probes.checks.reconnects import ReconnectCounter
from probes.config import Target
from probes.model import Reason, Tier

pytestmark = pytest.mark.agent


def test_reconnects_are_returns_and_new_sessions_of_known_clients() -> None:
    counter = ReconnectCounter()
    assert counter.observe({"alice": "s1", "bob": "s1"}) == 0  # first sight: not reconnects
    assert counter.observe({"alice": "s1", "bob": "s1"}) == 0  # same sessions
    assert counter.observe({"alice": "s2", "bob": "s1"}) == 1  # alice's session was replaced
    assert counter.observe({"bob": "s1"}) == 0  # alice gone: not yet a reconnect
    assert counter.observe({"alice": "s2", "bob": "s1", "carol": "s1"}) == 1  # alice is back
    assert counter.total == 2 and counter.remembered == 3


def test_memory_forgets_the_longest_gone_first() -> None:
    counter = ReconnectCounter(memory=2)
    counter.observe({"a": "1"})
    counter.observe({"b": "1"})
    counter.observe({"c": "1", "b": "1"})  # a is the longest gone: forgotten
    assert counter.observe({"a": "1"}) == 0  # a counts as new again
    assert counter.observe({"b": "1"}) == 1  # b is still remembered: gone, then back
    assert counter.remembered == 2
    with pytest.raises(ValueError, match="memory"):
        ReconnectCounter(memory=0)


views = st.lists(st.dictionaries(st.sampled_from("abcdef"), st.sampled_from("xyz"), max_size=6),
                 max_size=30)


@given(views)
def test_reconnect_count_properties(sequence: list[dict[str, str]]) -> None:
    """Never more reconnects than returning clients; repeating a view adds none; total is the
    sum of what each view revealed."""
    counter = ReconnectCounter()
    seen: set[str] = set()
    total = 0
    for view in sequence:
        found = counter.observe(view)
        assert 0 <= found <= len(set(view) & seen)
        assert counter.observe(view) == 0
        seen |= set(view)
        total += found
    assert counter.total == total


@pytest.mark.parametrize(("cause", "reason"), [
    (TimeoutError(), Reason.TIMEOUT),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Reason.REFUSED),
    (OSError(errno.EHOSTUNREACH, "no route"), Reason.NETWORK_UNREACHABLE),
    (PermissionError(errno.EACCES, "denied"), Reason.PROBE_ERROR),
    (None, Reason.BAD_RESPONSE),
])
def test_failure_reason_comes_from_the_cause(cause: BaseException | None,
                                              reason: Reason) -> None:
    error = ValueError("telemetry failed")
    error.__cause__ = cause
    assert telemetry.failure_reason(error) is reason


def _target(section: dict[str, object]) -> Target:
    return msgspec.convert({"id": "n1", "pool": "p", "pop": "fra", "region": "eu",
                            "address": "10.0.0.7", "l4": {"tcp_ports": [443]},
                            "telemetry": section}, Target)


def test_telemetry_section_plans_one_read_per_source(tmp_path: Path) -> None:
    checks = plan_target(_target({
        "wireguard_interface": "wg0", "openvpn_management_socket": "/run/ovpn.sock",
        "ikev2": True, "ssh": {"username": "tw", "key_file": "keys/tw"}}), tmp_path, tmp_path)
    reads = {c.check: c for c in checks if c.tier is Tier.TELEMETRY}
    assert sorted(reads) == ["telemetry.ikev2", "telemetry.openvpn", "telemetry.wireguard"]
    wg = reads["telemetry.wireguard"].params
    assert isinstance(wg, telemetry.WireGuardTelemetry) and wg.interface == "wg0"
    assert wg.ssh is not None and wg.ssh.host == "10.0.0.7"  # the target's address by default
    assert wg.ssh.key_file == str(tmp_path / "keys/tw")  # relative to the config file
    assert wg.ssh.ssh_options()["known_hosts"] == ()  # verified against ~/.ssh/known_hosts
    local = plan_target(_target({"ikev2": True}), tmp_path, tmp_path)
    ike = [c.params for c in local if c.tier is Tier.TELEMETRY]
    assert ike == [telemetry.IKEv2Telemetry(node="n1")]  # no ssh: read on this host
    filtered = msgspec.structs.replace(_target({"ikev2": True}), checks=["tcp"])
    assert [c.check for c in plan_target(filtered, tmp_path, tmp_path)] == ["tcp:443"]
