"""Config targets -> planned checks: L4 sections, protocol sections, the ``checks:`` filter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest

from probes.agent.plan import plan_target
from probes.checks import l4
from probes.checks.base import CheckKind, CheckResult, Family, PlanContext, Planned
from probes.checks.l4 import TcpParams, UdpParams
from probes.checks.registry import all_kinds
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


_FAKE = CheckKind("quic.fake", Tier.FUNCTIONAL, _Params, _run)


def _plan_fake(ctx: PlanContext) -> list[Planned]:
    return [] if ctx.target.quic is None else [Planned.of(_FAKE, _Params(host=ctx.target.address))]


def test_protocol_section_is_planned_by_its_family(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # the L4 family plus a fake family planning from the quic section
    families = (l4.FAMILY, Family("quic", (_FAKE,), _plan_fake))
    quic = {"port": 443}
    checks = plan_target(_target(quic=quic), tmp_path, tmp_path, families)
    assert [c.check for c in checks][-1] == "quic.fake"
    assert checks[-1].params == _Params(host="10.0.0.1") and checks[-1].tier is Tier.FUNCTIONAL
    # a family whose planning fails is skipped with a log line, not an error: the agent runs
    # what it can

    def broken(ctx: PlanContext) -> list[Planned]:
        raise ValueError("unreadable")

    with caplog.at_level(logging.WARNING):
        checks = plan_target(_target(quic=quic), tmp_path, tmp_path,
                             (l4.FAMILY, Family("quic", (_FAKE,), broken)))
    assert [c.check for c in checks] == ["tcp:443", "tcp:1194", "udp:51820", "icmp"]
    assert "quic" in caplog.text and "unreadable" in caplog.text


def test_every_registered_kind_is_planned_with_its_own_tier(tmp_path: Path) -> None:
    """The planner takes a check's tier from its kind (the tier it reports to the mesh)."""
    for check in plan_target(_target(), tmp_path, tmp_path):
        assert check.tier is all_kinds()[check.kind.name].tier
