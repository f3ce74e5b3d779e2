"""The user's path through the tunnel: egress, DNS, throughput and TCP transaction checks
(docs/probes/user-path.md).

A target's ``user_path:`` section adds, per tunnel protocol that carries traffic (WireGuard with
``tunnel_address`` and ``canary``, OpenVPN beyond level ``reset``, IKEv2 with ``psk_file`` and
``ping``), ``<protocol>.egress``, ``.dns``, ``.throughput`` and ``.transaction`` in the session
tier (throughput no more often than the node's hourly byte budget allows: the plan's
``min_interval``, which the scheduler honours whatever asks). Each run is one whole client
session — the protocol's own handshake up to a working tunnel, the step, the goodbye — through
the protocol module's
:class:`~probes.checks.tunnel.TunnelProbe`, so a failure of the handshake or of the tunnel
itself fails the check with the protocol's own reason; the step's reasons say what a user gets
beyond a tunnel that works.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Hashable
from typing import Literal

import msgspec

from probes.checks import ikev2, openvpn, wireguard
from probes.checks.base import CheckKind, CheckResult, Family, PlanContext, Planned
from probes.checks.egress import egress_step
from probes.checks.resolve import dns_step
from probes.checks.throughput import min_interval, throughput_step
from probes.checks.transaction import transaction_step
from probes.checks.tunnel import Step, TunnelProbe, in_turn, run_through
from probes.config import (
    DnsCheck,
    EgressCheck,
    ThroughputCheck,
    TransactionCheck,
    carrying_tunnels,
)
from probes.model import Tier

Protocol = Literal["wireguard", "openvpn", "ikev2"]
VIAS: tuple[Protocol, ...] = ("wireguard", "openvpn", "ikev2")


class UserPathParams(msgspec.Struct, frozen=True, kw_only=True):
    """One user-path check: the tunnel's params (those of the protocol's own checks) and the
    step's section."""

    via: Protocol
    wireguard: wireguard.WireGuardParams | None = None
    openvpn: openvpn.OpenVPNParams | None = None
    ikev2: ikev2.Ikev2Params | None = None
    egress: EgressCheck | None = None
    dns: DnsCheck | None = None
    throughput: ThroughputCheck | None = None
    transaction: TransactionCheck | None = None


def _tunnel(params: UserPathParams) -> tuple[Hashable, Callable[[float], TunnelProbe]]:
    """The identity the tunnel authenticates with, and a run of it in the time left."""
    wg, ike, ovpn = params.wireguard, params.ikev2, params.openvpn
    if params.via == "wireguard":
        assert wg is not None
        return wireguard.identity(wg), lambda left: wireguard.tunnel_probe(wg, left)
    if params.via == "ikev2":
        assert ike is not None
        return ikev2.identity(ike), lambda left: ikev2.tunnel_probe(ike, left)
    assert ovpn is not None
    return openvpn.identity(ovpn), lambda left: openvpn.tunnel_probe(ovpn, left)


async def _run(params: UserPathParams, timeout: float, step: Step) -> CheckResult:
    """One session through the tunnel with ``step`` in it, in the identity's turn."""
    identity, probe = _tunnel(params)
    return await in_turn(identity, timeout, lambda left: run_through(probe(left), step))


async def run_egress(params: UserPathParams, timeout: float) -> CheckResult:
    assert params.egress is not None
    return await _run(params, timeout, functools.partial(egress_step, check=params.egress))


async def run_dns(params: UserPathParams, timeout: float) -> CheckResult:
    assert params.dns is not None
    return await _run(params, timeout, functools.partial(dns_step, check=params.dns))


async def run_throughput(params: UserPathParams, timeout: float) -> CheckResult:
    assert params.throughput is not None
    return await _run(params, timeout,
                      functools.partial(throughput_step, check=params.throughput))


async def run_transaction(params: UserPathParams, timeout: float) -> CheckResult:
    assert params.transaction is not None
    return await _run(params, timeout,
                      functools.partial(transaction_step, check=params.transaction))


def _kind(via: Protocol, what: str, run: Callable[[UserPathParams, float],
                                                  Awaitable[CheckResult]],
          description: str) -> CheckKind[UserPathParams]:
    return CheckKind(name=f"{via}.{what}", tier=Tier.SESSION, params_type=UserPathParams,
                     run=run, description=description)


EGRESS = {via: _kind(via, "egress", run_egress,
                     f"{via} tunnel, then ICMP (and reflector UDP) echoes to the node and to "
                     "targets beyond it: egress-failed when only the node answers")
          for via in VIAS}
DNS = {via: _kind(via, "dns", run_dns,
                  f"{via} tunnel, then a DNS query through it to the node's resolver "
                  "(pushed or configured), its answer checked")
       for via in VIAS}
THROUGHPUT = {via: _kind(via, "throughput", run_throughput,
                         f"{via} tunnel, then a short rate-capped UDP burst to a reflector "
                         "beyond the node: rate, loss, queueing delay (DEGRADED bounds)")
              for via in VIAS}
TRANSACTION = {via: _kind(via, "transaction", run_transaction,
                          f"{via} tunnel, then one TCP connection (user-space TCP) to a server "
                          "beyond the node: TLS handshake and HTTP HEAD as configured")
               for via in VIAS}


_PLANS = {"wireguard": wireguard.plan, "openvpn": openvpn.plan, "ikev2": ikev2.plan}


def plan(ctx: PlanContext) -> list[Planned]:
    """``user_path:`` -> ``<protocol>.egress`` / ``<protocol>.dns`` per tunnel in ``via``."""
    section = ctx.target.user_path
    if section is None:
        return []
    out: list[Planned] = []
    for name in carrying_tunnels(ctx.target):
        via = next(v for v in VIAS if v == name)
        # the params the protocol's own plan gives its checks (one struct for all of them)
        tunnel = {via: _PLANS[via](ctx)[0].params}
        if section.egress is not None:
            out.append(Planned.of(EGRESS[via], UserPathParams(via=via, egress=section.egress,
                                                              **tunnel)))
        if section.dns is not None:
            out.append(Planned.of(DNS[via], UserPathParams(via=via, dns=section.dns, **tunnel)))
        if section.throughput is not None:
            # the node's hourly byte budget, shared by its throughput checks (one per tunnel)
            every = min_interval(section.throughput, len(carrying_tunnels(ctx.target)))
            out.append(Planned.of(THROUGHPUT[via], UserPathParams(
                via=via, throughput=section.throughput, **tunnel), min_interval=every))
        if section.transaction is not None:
            transaction = msgspec.structs.replace(
                section.transaction, ca_file=ctx.path(section.transaction.ca_file))
            out.append(Planned.of(TRANSACTION[via], UserPathParams(
                via=via, transaction=transaction, **tunnel)))
    return out


FAMILY = Family("user_path", (*EGRESS.values(), *DNS.values(), *THROUGHPUT.values(),
                             *TRANSACTION.values()), plan,
                "The user's path through the tunnel: egress beyond the node, DNS, throughput, "
                "a TCP transaction")
