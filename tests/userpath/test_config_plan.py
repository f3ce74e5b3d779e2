"""The ``user_path:`` section: what it plans, and the problems it names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from probes.agent.plan import plan_target
from probes.checks.user_path import UserPathParams
from probes.config import Target, user_path_problems

KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def _target(**over: Any) -> Target:
    data: dict[str, Any] = {
        "id": "n1", "pool": "p", "pop": "fra1", "region": "eu", "address": "192.0.2.10",
        "wireguard": {"port": 51820, "server_public_key": KEY, "private_key_file": "k",
                      "tunnel_address": "10.201.0.2/32", "canary": "10.201.0.1",
                      "dns_resolver": "10.201.0.53"},
        "openvpn": {"level": "tunnel", "ca_file": "ca.pem", "cert_file": "c.pem",
                    "key_file": "k.pem"},
        "user_path": {"egress": {"targets": [{"name": "gw", "address": "198.51.100.1",
                                              "udp_port": 7447}]},
                      "dns": {"name": "probe.example.com", "expect": ["198.51.100.7"]}},
    }
    data.update(over)
    return msgspec.convert(data, Target)


def _problems(target: Target) -> dict[str, str]:
    return {p.path: p.message for p in user_path_problems(target, "t.user_path", Path("."))}


def test_every_carrying_tunnel_gets_an_egress_and_a_dns_check(tmp_path: Path) -> None:
    target = _target()
    assert _problems(target) == {}
    planned = {c.check: c for c in plan_target(target, tmp_path, tmp_path)}
    assert {"wireguard.egress", "wireguard.dns", "openvpn.egress", "openvpn.dns"} <= set(planned)
    wg_dns = planned["wireguard.dns"].params
    assert isinstance(wg_dns, UserPathParams) and wg_dns.via == "wireguard"
    assert wg_dns.wireguard is not None and wg_dns.wireguard.dns_resolver == "10.201.0.53"
    assert wg_dns.dns is not None and wg_dns.egress is None
    ovpn = planned["openvpn.egress"].params
    assert ovpn.openvpn is not None and ovpn.openvpn.dns_resolver is None  # pushed


IKE = {"psk_file": "psk", "ping": "10.210.0.1", "request_config": True}


def test_ikev2_with_a_psk_and_a_ping_carries_the_user_path(tmp_path: Path) -> None:
    target = _target(ikev2=IKE)
    assert _problems(target) == {}
    planned = {c.check: c for c in plan_target(target, tmp_path, tmp_path)}
    assert {"ikev2.egress", "ikev2.dns", "ikev2.tunnel"} <= set(planned)
    dns = planned["ikev2.dns"].params
    assert isinstance(dns, UserPathParams) and dns.via == "ikev2" and dns.ikev2 is not None
    assert dns.ikev2.request_config and dns.ikev2.dns_resolver is None  # INTERNAL_IP4_DNS
    assert dns.ikev2.ping == "10.210.0.1" and dns.ikev2.psk_file is not None
    assert planned["ikev2.egress"].tier.value == "session"
    # at level auth (or without ping) IKEv2 carries no traffic: not a tunnel to test through
    for section in ({**IKE, "level": "auth"}, {"psk_file": "psk", "request_config": True}):
        planned_names = [c.check for c in plan_target(_target(ikev2=section), tmp_path,
                                                      tmp_path)]
        assert not any(c.startswith("ikev2.") and c.endswith(("egress", "dns"))
                       for c in planned_names)


def test_a_transaction_is_planned_per_tunnel_with_its_ca_file_resolved(tmp_path: Path) -> None:
    up = {"transaction": {"address": "198.51.100.9", "server_name": "www.example.com",
                          "ca_file": "pki/ca.pem", "expect_status": [200, 204]}}
    target = _target(user_path=up)
    planned = {c.check: c for c in plan_target(target, tmp_path, tmp_path)}
    assert {"wireguard.transaction", "openvpn.transaction"} <= set(planned)
    params = planned["openvpn.transaction"].params
    assert isinstance(params, UserPathParams) and params.transaction is not None
    assert params.transaction.ca_file == str(tmp_path / "pki/ca.pem")
    assert params.transaction.port == 443 and params.transaction.tls
    assert planned["wireguard.transaction"].tier.value == "session"


def test_via_and_the_checks_filter_narrow_the_plan(tmp_path: Path) -> None:
    up = {"via": ["openvpn"], "dns": {"name": "probe.example.com"}}
    planned = [c.check for c in plan_target(_target(user_path=up), tmp_path, tmp_path)]
    assert "openvpn.dns" in planned and not any(c.startswith("wireguard.") and
                                                c.endswith(("dns", "egress")) for c in planned)
    only = _target(checks=["openvpn.dns"])
    assert [c.check for c in plan_target(only, tmp_path, tmp_path)] == ["openvpn.dns"]


@pytest.mark.parametrize(("over", "field", "words"), [
    ({"user_path": {}}, "t.user_path", "nothing to check"),
    ({"user_path": {"egress": {"targets": []}}}, "t.user_path.egress.targets", "at least one"),
    ({"user_path": {"egress": {"targets": [{"name": "a", "address": "example.com"}]}}},
     "t.user_path.egress.targets[0].address", "IPv4"),
    ({"user_path": {"egress": {"targets": [{"name": "a", "address": "192.0.2.1"},
                                           {"name": "a", "address": "192.0.2.2"}]}}},
     "t.user_path.egress.targets[1].name", "duplicate"),
    ({"user_path": {"egress": {"targets": [{"name": "a", "address": "192.0.2.1"}],
                               "min_targets": 2}}}, "t.user_path.egress.min_targets", "1..1"),
    ({"user_path": {"dns": {"name": "a..b"}}}, "t.user_path.dns.name", "bad label"),
    ({"user_path": {"dns": {"name": "x.lab", "expect": ["::1"]}}},
     "t.user_path.dns.expect[0]", "IPv4"),
    ({"user_path": {"dns": {"name": "x.lab", "attempts": 0}}}, "t.user_path.dns.attempts",
     ">= 1"),
    ({"user_path": {"via": ["wireguard"], "dns": {"name": "x.lab"}},
      "wireguard": {"port": 51820, "server_public_key": KEY, "private_key_file": "k",
                    "tunnel_address": "10.201.0.2/32", "canary": "10.201.0.1"}},
     "t.user_path.dns", "wireguard.dns_resolver"),
    ({"user_path": {"via": ["wireguard"], "dns": {"name": "x.lab"}}, "wireguard": None},
     "t.user_path.via[0]", "not configured to carry traffic"),
    ({"user_path": {"transaction": {"address": "www.example.com"}}},
     "t.user_path.transaction.address", "IPv4"),
    ({"user_path": {"transaction": {"address": "192.0.2.9", "http_path": "health"}}},
     "t.user_path.transaction.http_path", "a path like"),
    ({"user_path": {"transaction": {"address": "192.0.2.9", "expect_status": [42]}}},
     "t.user_path.transaction.expect_status[0]", "not an HTTP status"),
    ({"user_path": {"transaction": {"address": "192.0.2.9", "http_path": None,
                                    "expect_status": [200]}}},
     "t.user_path.transaction.expect_status", "only with http_path"),
    ({"user_path": {"transaction": {"address": "192.0.2.9", "mss": 9000}}},
     "t.user_path.transaction.mss", "536..1460"),
    ({"user_path": {"via": ["ikev2"], "dns": {"name": "x.lab"}},
      "ikev2": {"psk_file": "psk", "ping": "10.210.0.1"}},
     "t.user_path.dns", "ikev2.request_config"),
    ({"user_path": {"via": ["ikev2"], "dns": {"name": "x.lab"}},
      "ikev2": {"psk_file": "psk", "level": "tunnel"}},
     "t.user_path.via[0]", "ikev2 psk_file and ping"),
])
def test_problems_name_the_field(over: dict[str, Any], field: str, words: str) -> None:
    problems = _problems(_target(**over))
    assert field in problems, problems
    assert words in problems[field]
