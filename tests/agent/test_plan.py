"""Config targets -> planned checks: L4 sections, protocol sections, the ``checks:`` filter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest

from probes.agent.plan import plan_target
from probes.checks.base import CheckKind, CheckResult, all_kinds
from probes.checks.l4 import TcpParams, UdpParams
from probes.config import Target
from probes.model import Reason, Tier

pytestmark = pytest.mark.agent


def _target(**extra: Any) -> Target:
    raw = {"id": "vpn-1", "pool": "p", "pop": "fra", "region": "eu", "address": "10.0.0.1",
           "l4": {"tcp_ports": [443, 1194], "udp": [{"port": 51820, "send_hex": "01",
                                                     "expect_hex": "02"}], "icmp": True}}
    raw.update(extra)
    return msgspec.convert(raw, Target)


def test_l4_section_becomes_one_check_per_port(tmp_path: Path) -> None:
    checks = plan_target(_target(), tmp_path, tmp_path)
    assert [c.check for c in checks] == ["tcp:443", "tcp:1194", "udp:51820", "icmp"]
    assert all(c.tier is Tier.L4 and c.node == "vpn-1" for c in checks)
    assert checks[0].params == TcpParams(host="10.0.0.1", port=443)
    assert checks[2].params == UdpParams(host="10.0.0.1", port=51820, send=b"\x01",
                                         expect_prefix=b"\x02")
    assert checks[0].key == "vpn-1/tcp:443"


def test_checks_list_filters_by_name_or_kind(tmp_path: Path) -> None:
    only = plan_target(_target(checks=["tcp:443", "icmp"]), tmp_path, tmp_path)
    assert [c.check for c in only] == ["tcp:443", "icmp"]
    kind = plan_target(_target(checks=["udp"]), tmp_path, tmp_path)
    assert [c.check for c in kind] == ["udp:51820"]


class _Params(msgspec.Struct, frozen=True):
    host: str


async def _run(params: _Params, timeout: float) -> CheckResult:
    return CheckResult(True, Reason.OK, 0.0)


def params_from_target(target: Target, base_dir: Path) -> _Params:
    return _Params(host=target.address)


def test_protocol_section_uses_the_modules_params_builder(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # only the L4 kinds plus a fake protocol kind whose module (this one) has params_from_target
    kinds = {name: kind for name, kind in all_kinds().items() if "." not in name}
    kinds["quic.handshake"] = CheckKind("quic.handshake", Tier.FUNCTIONAL, _Params, _run)
    quic = {"port": 443}
    checks = plan_target(_target(quic=quic), tmp_path, tmp_path, kinds)
    assert [c.check for c in checks][-1] == "quic.handshake"
    assert checks[-1].params == _Params(host="10.0.0.1") and checks[-1].tier is Tier.FUNCTIONAL
    # a protocol without registered kinds is skipped with a log line, not an error
    kinds.pop("quic.handshake")
    with caplog.at_level(logging.WARNING):
        checks = plan_target(_target(quic=quic), tmp_path, tmp_path, kinds)
    assert all(not c.check.startswith("quic") for c in checks)
    assert "quic" in caplog.text


class _OvParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str
    port: int = 1194
    ca_file: str | None = None
    state_file: str | None = None


def test_module_without_builder_gets_params_by_convention(tmp_path: Path) -> None:
    from .fakes import _never

    kinds = {name: kind for name, kind in all_kinds().items() if "." not in name}
    for level in ("reset", "tls", "tunnel"):
        kinds[f"openvpn.{level}"] = CheckKind(f"openvpn.{level}", Tier.FUNCTIONAL, _OvParams,
                                              _never)
    target = _target(openvpn={"port": 1195, "ca_file": "ca.crt", "level": "tls"},
                     checks=["openvpn"])
    checks = plan_target(target, tmp_path, tmp_path / "state", kinds)
    # level "tls" runs reset and tls, not tunnel; fields come across by name, files resolved
    assert [c.check for c in checks] == ["openvpn.reset", "openvpn.tls"]
    assert checks[0].params == _OvParams(host="10.0.0.1", port=1195,
                                         ca_file=str(tmp_path / "ca.crt"),
                                         state_file=str(tmp_path / "state" / "openvpn-state.json"))
