#!/usr/bin/env python3
"""Generate tunnelwatch's Prometheus recording and alerting rules.

Run ``python rules/generate.py`` after editing this file; it rewrites ``rules/*.rules.yaml`` and
the same groups as a PrometheusRule in ``deploy/kubernetes/prometheusrule.yaml``. The generated
YAML is committed, and ``tests/observability/test_rules.py`` fails when it drifts from what this
script would write, so the two never disagree.

Why a generator: the multi-window multi-burn-rate alerts (Google SRE workbook, chapter 5; the
same table Sloth and kubernetes-mixin use) repeat the same shape for every SLO and every window
pair. Writing them by hand invites a typo in one threshold out of thirty-two.

Layout of the output:

* ``recording.rules.yaml``: per-PoP building blocks (verdict counts, ratios) and, per SLO,
  ``slo:sli_error:ratio_rate<w>`` for every window, ``slo:sli_total:increase<w>`` for the short
  windows (the low-traffic guard), ``slo:objective:ratio`` and ``slo:error_budget_remaining:ratio``.
* ``slo.rules.yaml``: one alert name per SLO; four rules each (two window pairs x page/ticket),
  told apart by the ``long``/``short`` labels, like kubernetes-mixin's ``KubeAPIErrorBudgetBurn``.
* ``alerts.rules.yaml``: plain-threshold and operational alerts.

Conventions (monitoring-mixins): CamelCase alert names; ``severity`` is critical (page), warning
(ticket) or info; ``summary`` is static and ends with a period; ``description`` is templated;
``runbook_url`` points at a heading in docs/runbooks/. Every alert carries ``pop``: Alertmanager's
inhibition compares it, and a missing label compares equal to an empty one. Fleet-wide alerts
(a vantage, an agent, the mesh) get ``pop="fleet"`` through ``label_replace`` when their series
have no ``pop``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

# Runbook links are absolute URLs (Alertmanager templates and pagers need them); the test maps the
# prefix back onto the repository to check the file and the anchor exist.
RUNBOOK_BASE = "https://github.com/tunnelwatch/tunnelwatch/blob/main/docs/runbooks/"

POP_LABELS = "pop, region"
NODE_LABELS = "node, pool, pop, region"

# Failures the agent blames on itself (docs/metrics-agent.md): never the node's fault, never budget.
AGENT_SIDE_REASONS = "probe-error|overloaded"
# The agent's series carry the check *name*; protocol checks are named after their kind
# (probes/agent/plan.py). Handshakes: the functional-tier protocol kinds, not mtu.udp.
HANDSHAKE = (
    r'check=~"wireguard\\.handshake|openvpn\\.(reset|tls)|ikev2\\.(init|auth)|quic\\.handshake"'
)
# In-tunnel synthetic sessions: the session-tier kinds.
SESSION = (
    r'check=~"wireguard\\.session|openvpn\\.(session|tunnel)|ikev2\\.tunnel|quic\\.connect-.+"'
)
# The user's path through the tunnel (docs/probes/user-path.md): egress beyond the node and DNS
# through the tunnel to the node's resolver.
EGRESS = r'check=~".+\\.egress"'
DNS = r'check=~".+\\.dns"'
NODE_FAULT = f'reason!~"{AGENT_SIDE_REASONS}"'
# The latency SLO edge: the agent's histogram has a bucket at exactly 0.15 s.
HANDSHAKE_FAST = HANDSHAKE + ', le="0.15"'

# The smallest number of events a short window needs before a burn rate over it may page. Probes
# are low-volume: two failed handshakes out of three would otherwise be a 66 % error ratio.
MIN_EVENTS_SHORT_WINDOW = 10


@dataclass(frozen=True)
class BurnWindow:
    """One row of the SRE workbook table: burn ``factor`` over ``long`` confirmed by ``short``."""

    long: str
    short: str
    factor: float
    severity: str
    for_: str


# (budget share spent, window) -> factor = share x 720 h / long window.
BURN_WINDOWS = (
    BurnWindow("1h", "5m", 14.4, "critical", "2m"),
    BurnWindow("6h", "30m", 6.0, "critical", "15m"),
    BurnWindow("1d", "2h", 3.0, "warning", "1h"),
    BurnWindow("3d", "6h", 1.0, "warning", "3h"),
)
ALL_WINDOWS = ("5m", "30m", "1h", "2h", "6h", "1d", "3d", "30d")
SHORT_WINDOWS = tuple(dict.fromkeys(w.short for w in BURN_WINDOWS))


@dataclass(frozen=True)
class Slo:
    """One SLO over the 30 d window. ``error``/``total`` are PromQL with ``{w}`` for the range.

    ``total`` None means the SLI is a gauge averaged over time (no event count, no guard).
    """

    name: str
    alert: str
    objective: float
    what: str  # for the description: "PoP {pop} <what> over the last 5m is ..."
    summary: str
    error: str
    total: str | None
    runbook: str

    @property
    def budget(self) -> float:
        return round(1 - self.objective, 10)


def _rate(metric: str, sel: str, w: str) -> str:
    selector = f"{metric}{{{sel}}}" if sel else metric
    return f"sum by ({POP_LABELS}) (rate({selector}[{w}]))"


def _failure_ratio(sel: str, w: str) -> str:
    """Failures / attempts. The agent creates a failure series at its first failure, so a PoP
    that never failed has none: ``or 0 * attempts`` makes its ratio 0 instead of absent."""
    failures = _rate(
        "tunnelwatch_probe_failures_total", ", ".join(filter(None, (sel, NODE_FAULT))), w
    )
    attempts = _rate("tunnelwatch_probe_attempts_total", sel, w)
    return f"(\n  {failures}\n  or\n  0 * {attempts}\n)\n/\n{attempts}"


SLOS = (
    Slo(
        name="pop-availability",
        alert="PoPAvailabilityBudgetBurn",
        objective=0.9995,
        what="share of node time judged DOWN by the mesh",
        summary="PoP availability error budget is burning too fast.",
        # The mesh verdict already votes across vantages and leaves impaired ones out, so this
        # is the SLI that says "the PoP was unavailable", not "one agent had a bad minute".
        error="avg_over_time(pop:tunnelwatch_node_unavailable:ratio[{w}])",
        total=None,
        runbook="slo.md",
    ),
    Slo(
        name="probe-success",
        alert="PoPProbeErrorBudgetBurn",
        objective=0.9995,
        what="probe error ratio across all vantages",
        summary="PoP probe error budget is burning too fast.",
        error=_failure_ratio("", "{w}"),
        total=_rate("tunnelwatch_probe_attempts_total", "", "{w}"),
        runbook="slo.md",
    ),
    Slo(
        name="handshake-errors",
        alert="HandshakeErrorBudgetBurn",
        objective=0.996,
        what="handshake error ratio",
        summary="VPN handshake error budget is burning too fast.",
        error=_failure_ratio(HANDSHAKE, "{w}"),
        total=_rate("tunnelwatch_probe_attempts_total", HANDSHAKE, "{w}"),
        runbook="slo.md",
    ),
    Slo(
        name="handshake-latency",
        alert="HandshakeLatencyBudgetBurn",
        objective=0.99,  # "P99 under 150 ms" as a ratio: 99 % of handshakes take <= 0.15 s
        what="share of handshakes slower than 150ms",
        summary="VPN handshake latency budget is burning too fast.",
        error=(
            "1 - (\n"
            f"  {_rate('tunnelwatch_probe_duration_seconds_bucket', HANDSHAKE_FAST, '{w}')}\n"
            "  /\n"
            f"  {_rate('tunnelwatch_probe_duration_seconds_count', HANDSHAKE, '{w}')}\n"
            ")"
        ),
        total=_rate("tunnelwatch_probe_duration_seconds_count", HANDSHAKE, "{w}"),
        runbook="slo.md",
    ),
    Slo(
        name="egress",
        alert="EgressErrorBudgetBurn",
        objective=0.995,
        what="egress error ratio through the tunnels (targets beyond the node)",
        summary="Egress through the VPN nodes error budget is burning too fast.",
        error=_failure_ratio(EGRESS, "{w}"),
        total=_rate("tunnelwatch_probe_attempts_total", EGRESS, "{w}"),
        runbook="slo.md",
    ),
    Slo(
        name="dns-through-tunnel",
        alert="DnsThroughTunnelBudgetBurn",
        objective=0.995,
        what="DNS-through-the-tunnel error ratio",
        summary="DNS through the VPN tunnels error budget is burning too fast.",
        error=_failure_ratio(DNS, "{w}"),
        total=_rate("tunnelwatch_probe_attempts_total", DNS, "{w}"),
        runbook="slo.md",
    ),
)


# ---------------------------------------------------------------------------- helpers


def _num(x: float) -> str:
    return f"{x:.6g}"


def _runbook(page: str, alert: str) -> str:
    return f"{RUNBOOK_BASE}{page}#{alert.lower()}"


def fleet_pop(expr: str) -> str:
    """Give fleet-wide series ``pop="fleet"`` (only where they have no pop of their own)."""
    return f'label_replace(\n{_indent(expr)}\n, "pop", "fleet", "pop", "")'


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line if line else line for line in text.splitlines())


def record(name: str, expr: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"record": name, "expr": expr}
    if labels:
        # a copy: PyYAML writes a dict shared by several rules as an &anchor and *aliases
        rule["labels"] = dict(labels)
    return rule


def alert(
    name: str,
    expr: str,
    *,
    severity: str,
    summary: str,
    description: str,
    runbook: str,
    for_: str | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    assert summary.endswith("."), name
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, **(labels or {})}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": _runbook(runbook, name),
    }
    return rule


@dataclass(frozen=True)
class Scope:
    """What a plain alert is about: its ``scope`` label and the runbook page that covers it.

    The scope decides both, so an alert names only its scope and what is its own. Series of a
    ``fleet_wide`` scope (a vantage, the mesh, a publisher, an agent) have no ``pop``; their
    expressions go through :func:`fleet_pop` so inhibition still has a ``pop`` to compare.
    """

    label: str
    runbook: str
    fleet_wide: bool = False

    def alert(
        self,
        name: str,
        expr: str,
        *,
        severity: str,
        summary: str,
        description: str,
        for_: str | None = None,
    ) -> dict[str, Any]:
        return alert(
            name,
            fleet_pop(expr) if self.fleet_wide else expr,
            for_=for_,
            severity=severity,
            labels={"scope": self.label},
            summary=summary,
            description=description,
            runbook=self.runbook,
        )

    def critical(
        self, name: str, expr: str, *, summary: str, description: str, for_: str | None = None
    ) -> dict[str, Any]:
        """Pages."""
        return self.alert(
            name, expr, severity="critical", summary=summary, description=description, for_=for_
        )

    def warning(
        self, name: str, expr: str, *, summary: str, description: str, for_: str | None = None
    ) -> dict[str, Any]:
        """Opens a ticket."""
        return self.alert(
            name, expr, severity="warning", summary=summary, description=description, for_=for_
        )


POPS = Scope("pop", "fleet.md")
NODES = Scope("node", "fleet.md")
VANTAGES = Scope("vantage", "mesh.md", fleet_wide=True)
# A pool's PoP comes from the placement join; PoolGuardHolding falls back to "fleet" itself.
POOLS = Scope("pool", "mesh.md")
MESH = Scope("mesh", "mesh.md", fleet_wide=True)
PUBLISHERS = Scope("publisher", "publisher.md", fleet_wide=True)
ANYCAST = Scope("anycast", "anycast.md")
AGENTS = Scope("agent", "agent.md", fleet_wide=True)
TARGETS = Scope("target", "agent.md", fleet_wide=True)
# weights from load and capacity advice (docs/weights.md, docs/runbooks/weights.md)
LOAD_POPS = Scope("pop", "weights.md")
WEIGHT_POOLS = Scope("pool", "weights.md")


# ---------------------------------------------------------------------------- recording rules

VERDICT = "node:tunnelwatch_verdict:state"


def leaders(series: str) -> str:
    """A mesh series as the leader sees it: with several replicas (HA) only the leader's view
    counts; a replica that exports no tunnelwatch_mesh_leader (a single mesh) counts as it is."""
    return (
        f"  {series}\n"
        "    and on (job, instance) (tunnelwatch_mesh_leader == 1)\n"
        "  or\n"
        f"  {series}\n"
        "    unless on (job, instance) tunnelwatch_mesh_leader\n"
    )


def _pop_nodes(state: str) -> str:
    """Nodes per PoP whose verdict matches ``state``; ``or 0 * all`` gives a PoP with none 0,
    not no series."""
    return (
        f"sum by ({POP_LABELS}) ({VERDICT}{{{state}}})\nor\n0 * sum by ({POP_LABELS}) ({VERDICT})"
    )


def pop_building_blocks() -> list[dict[str, Any]]:
    """Per-PoP and per-node series the SLOs, alerts and dashboards share."""
    return [
        # Where each node belongs, from the agent's series (every planned check is exported
        # from the start, so this exists as soon as an agent is scraped). The mesh's verdict
        # series carry node and pool only; this join gives them pop and region.
        record(
            "node:tunnelwatch_node_placement:info",
            f"group by ({NODE_LABELS}) (tunnelwatch_probe_attempts_total)",
        ),
        # The mesh exports one series per node, value 1, labelled with the current state.
        # With several replicas (HA), only the leader's view counts; a replica that exports
        # no tunnelwatch_mesh_leader (a single mesh) counts as it is.
        record(
            VERDICT,
            "max by (node, pool, state) (\n"
            + leaders("tunnelwatch_mesh_node_verdict")
            + ")\n"
            "* on (node, pool) group_left (pop, region)\n"
            "node:tunnelwatch_node_placement:info",
        ),
        record("pop:tunnelwatch_nodes_down:count", _pop_nodes('state="DOWN"')),
        # The share of scanned nodes that take a hybrid post-quantum key exchange (any
        # vantage's latest scan of a node counts): the fleet's PQ readiness.
        record(
            "pop:tunnelwatch_nodes_pq_ready:ratio",
            "avg by (pop, region) (\n"
            f"  max by ({NODE_LABELS}) (tunnelwatch_node_pq_key_exchange_accepted)\n"
            ")",
        ),
        # UP and DEGRADED nodes carry traffic; DRAINING/MAINTENANCE are admin states.
        record("pop:tunnelwatch_nodes_serving:count", _pop_nodes('state=~"UP|DEGRADED"')),
        # Admin drain is a state, not a failure: drained nodes leave the denominator.
        record(
            "pop:tunnelwatch_node_unavailable:ratio",
            "pop:tunnelwatch_nodes_down:count\n/\n"
            f'sum by ({POP_LABELS}) ({VERDICT}{{state!~"DRAINING|MAINTENANCE"}})',
        ),
        # Sessions on a node, all its protocols: each protocol's telemetry (check) may come
        # from several vantages, and summing those would double-count, so take the freshest
        # view (max across vantages) per protocol, then add the protocols up.
        record(
            "node:tunnelwatch_node_active_peers:sum",
            f"sum by ({NODE_LABELS}) (\n"
            f"  max by ({NODE_LABELS}, check) (tunnelwatch_node_active_peers)\n)",
        ),
        record(
            "pop:tunnelwatch_node_active_peers:cv",
            f"stddev by ({POP_LABELS}) (node:tunnelwatch_node_active_peers:sum)\n/\n"
            f"avg by ({POP_LABELS}) (node:tunnelwatch_node_active_peers:sum)",
        ),
        # In-tunnel loss: the agent exports each session probe's loss ratio as a gauge; average
        # it over 15 minutes per series, then take the median across vantages and checks so
        # one vantage's bad path does not decide.
        record(
            "node:tunnelwatch_probe_loss:ratio_median15m",
            f"quantile by ({NODE_LABELS}) (0.5,\n"
            f"  avg_over_time(tunnelwatch_probe_loss_ratio{{{SESSION}}}[15m])\n)",
        ),
        # In-tunnel latency: median across vantages of each session probe's P99 RTT.
        record(
            "node:tunnelwatch_probe_rtt_p99_seconds:median",
            f"quantile by ({NODE_LABELS}) (0.5, tunnelwatch_probe_rtt_p99_seconds{{{SESSION}}})",
        ),
        # Reconnects per active session per second (node telemetry: a known client's new
        # session, or its return after a gap; probes/checks/reconnects.py), per protocol the
        # max across vantages as above.
        record(
            "node:tunnelwatch_node_reconnects_per_session:rate15m",
            f"sum by ({NODE_LABELS}) (\n"
            f"  max by ({NODE_LABELS}, check) (rate(tunnelwatch_node_reconnects_total[15m]))\n"
            f")\n/\n"
            f"(node:tunnelwatch_node_active_peers:sum > 0)",
        ),
    ]


# Capacity advice, the brief's: scale up when P95 latency climbs 30 % for 3 minutes while packets
# per node are above SCALE_UP_PPS; one node can go when the PoP's load would fit in one node fewer
# with SPARE to spare, for 15 minutes; keep SPARE per PoP.
SCALE_UP_PPS = 100_000
LATENCY_CLIMB = 1.3
SPARE = 0.2
SERVING = f'{VERDICT}{{state=~"UP|DEGRADED"}}'


def _node_load(series: str) -> str:
    """A weight-engine gauge per node (leader's view) with the node's region."""
    return (
        "max by (node, pool, pop) (\n"
        + leaders(series)
        + ")\n"
        "* on (node, pool) group_left (region)\n"
        "group by (node, pool, region) (node:tunnelwatch_node_placement:info)"
    )


def _serving(series: str) -> str:
    return f"{series}\nand on (node, pool)\n{SERVING}"


def _cv(series: str, floor: str) -> str:
    """Coefficient of variation across a PoP's serving nodes; absent below ``floor`` (an idle
    PoP's ratios are noise)."""
    serving = _indent(_serving(series))
    return (
        f"stddev by ({POP_LABELS}) (\n{serving}\n)\n/\n"
        f"(avg by ({POP_LABELS}) (\n{serving}\n) > {floor})"
    )


def load_building_blocks() -> list[dict[str, Any]]:
    """Weights and load (the mesh's weight engine, docs/weights.md) per node and PoP."""
    cpu = "node:tunnelwatch_node_cpu_busy:ratio"
    capacity = "node:tunnelwatch_node_capacity:max"
    def handshake_p95(window: str) -> str:
        return ("histogram_quantile(0.95,\n"
                f"  sum by (le, {POP_LABELS}) (rate(tunnelwatch_probe_duration_seconds_bucket"
                f"{{{HANDSHAKE}}}[{window}))\n)")

    return [
        record(cpu, _node_load("tunnelwatch_mesh_node_load_cpu_busy_ratio")),
        record("node:tunnelwatch_node_effective_sessions:smoothed",
               _node_load("tunnelwatch_mesh_node_load_effective_sessions")),
        record("node:tunnelwatch_node_packets_per_second:smoothed",
               _node_load("tunnelwatch_mesh_node_load_packets_per_second")),
        record("node:tunnelwatch_node_weight:ratio",
               _node_load("tunnelwatch_mesh_node_weight_ratio")),
        record(capacity, _node_load("tunnelwatch_mesh_node_capacity")),
        record("pop:tunnelwatch_node_cpu_busy:cv", _cv(cpu, "0.05")),
        record("pop:tunnelwatch_node_effective_sessions:cv",
               _cv("node:tunnelwatch_node_effective_sessions:smoothed", "1")),
        # how often the balancers are told a new weight, per node of the pool
        record(
            "pool:tunnelwatch_weight_changes_per_node:rate5m",
            "sum by (pool, pop, region) (\n"
            + _indent(_node_load("rate(tunnelwatch_mesh_node_weight_changes_total[5m])"))
            + "\n)\n/\n"
            "count by (pool, pop, region) (node:tunnelwatch_node_weight:ratio)",
        ),
        # 1 - load / capacity over the serving nodes (CPU busy share x capacity)
        record(
            "pop:tunnelwatch_capacity_spare:ratio",
            f"1 - (\n  sum by ({POP_LABELS}) (\n"
            + _indent(_serving(f"{cpu} * on (node, pool) group_left () {capacity}"), "    ")
            + f"\n  )\n  /\n  sum by ({POP_LABELS}) (\n"
            + _indent(_serving(capacity), "    ")
            + "\n  )\n)",
        ),
        # the PoP's load as a share of its capacity without its biggest serving node
        record(
            "pop:tunnelwatch_capacity_one_node_fewer:ratio",
            f"sum by ({POP_LABELS}) (\n"
            + _indent(_serving(f"{cpu} * on (node, pool) group_left () {capacity}"))
            + f"\n)\n/\n(\n  sum by ({POP_LABELS}) (\n"
            + _indent(_serving(capacity), "    ")
            + f"\n  )\n  -\n  max by ({POP_LABELS}) (\n"
            + _indent(_serving(capacity), "    ")
            + "\n  )\n)",
        ),
        record("pop:tunnelwatch_handshake_seconds:p95_5m", handshake_p95("5m]")),
        # the hour before those 5 minutes: the baseline a climb is measured against
        record("pop:tunnelwatch_handshake_seconds:p95_1h_before", handshake_p95("1h] offset 5m")),
    ]


def slo_recording_rules(slo: Slo) -> list[dict[str, Any]]:
    labels = {"slo": slo.name}
    rules = [
        record(f"slo:sli_error:ratio_rate{w}", slo.error.replace("{w}", w), labels)
        for w in ALL_WINDOWS
    ]
    if slo.total is not None:
        # The low-traffic guard wants event counts: the same sum over increase(), not rate().
        total = slo.total.replace("rate(", "increase(")
        rules += [
            record(f"slo:sli_total:increase{w}", total.replace("{w}", w), labels)
            for w in SHORT_WINDOWS
        ]
    return [
        *rules,
        record("slo:objective:ratio", f"vector({_num(slo.objective)})", labels),
        record(
            "slo:error_budget_remaining:ratio",
            f'1 - slo:sli_error:ratio_rate30d{{slo="{slo.name}"}} / {_num(slo.budget)}',
            labels,
        ),
    ]


# ---------------------------------------------------------------------------- SLO alerts


def burn_alerts(slo: Slo) -> list[dict[str, Any]]:
    rules = []
    sel = f'{{slo="{slo.name}"}}'
    for bw in BURN_WINDOWS:
        bound = _num(bw.factor * slo.budget)
        expr = (
            f"slo:sli_error:ratio_rate{bw.short}{sel} > {bound}\n"
            f"and on ({POP_LABELS})\n"
            f"slo:sli_error:ratio_rate{bw.long}{sel} > {bound}"
        )
        if slo.total is not None:
            expr += (
                f"\nand on ({POP_LABELS})\n"
                f"slo:sli_total:increase{bw.short}{sel} >= {MIN_EVENTS_SHORT_WINDOW}"
            )
        rules.append(
            alert(
                slo.alert,
                expr,
                for_=bw.for_,
                severity=bw.severity,
                labels={"slo": slo.name, "long": bw.long, "short": bw.short},
                summary=slo.summary,
                description=(
                    f"PoP {{{{ $labels.pop }}}} ({{{{ $labels.region }}}}) {slo.what} over the "
                    f"last {bw.short} is {{{{ $value | humanizePercentage }}}}, "
                    f"{_num(bw.factor)}x the budget of {_num(slo.budget * 100)}%."
                ),
                runbook=slo.runbook,
            )
        )
    return rules


# ---------------------------------------------------------------------------- other alerts


# Path evidence (docs/paths.md) in descriptions: where each vantage loses the node, where an
# impaired vantage loses most of what it fails. Prometheus's ``query`` template function reads it
# when the alert fires; nothing is added when there is none. The series come back in no set
# order, so they are sorted by vantage: the same faults give the same text (and promtool tests
# that compare the text do not flake).
NODE_PATHS = (
    '{{ with printf "tunnelwatch_mesh_path_fault{node=\\"%s\\"}" $labels.node | query'
    ' | sortByLabel "vantage" }}'
    "{{ range . }} Vantage {{ .Labels.vantage }} loses it after AS{{ .Labels.asn }} "
    "({{ .Labels.kind }}).{{ end }}{{ end }}"
)
VANTAGE_PATHS = (
    '{{ with printf "tunnelwatch_mesh_vantage_path_fault{vantage=\\"%s\\"}" $labels.vantage'
    ' | query | sortByLabel "asn" }}'
    "{{ range . }} It loses most of the nodes it fails after AS{{ .Labels.asn }}: "
    "check its ASN routing.{{ end }}{{ end }}"
)


def fleet_alerts() -> list[dict[str, Any]]:
    return [
        POPS.critical(
            "PoPDown",
            "pop:tunnelwatch_nodes_serving:count == 0\n"
            f"and on ({POP_LABELS})\npop:tunnelwatch_nodes_down:count > 0",
            for_="1m",
            summary="Every serving node of a PoP is down.",
            description=(
                "PoP {{ $labels.pop }} ({{ $labels.region }}) has no node UP or DEGRADED; "
                "the mesh judges every non-drained node DOWN."
            ),
        ),
        NODES.warning(
            "NodeDown",
            f'max by ({NODE_LABELS}) (node:tunnelwatch_verdict:state{{state="DOWN"}}) == 1',
            for_="5m",
            summary="The mesh judges a VPN node DOWN.",
            description=(
                "Node {{ $labels.node }} in PoP {{ $labels.pop }} (pool {{ $labels.pool }}) "
                "has been DOWN for 5 minutes." + NODE_PATHS
            ),
        ),
        NODES.warning(
            "PathLossAtNetwork",
            # a vantage's latest trace loses the node in a network on the way (not at the node's
            # own edge): the path, not the node; placement gives the alert its PoP
            "max by (node, vantage, asn, kind) (\n"
            '  tunnelwatch_mesh_path_fault{kind!~"node-network|no-answer"}\n'
            ")\n"
            "* on (node) group_left (pool, pop, region)\n"
            f"group by ({NODE_LABELS}) (node:tunnelwatch_node_placement:info)",
            for_="10m",
            summary="A vantage loses a VPN node in a network on the way to it.",
            description=(
                "Vantage {{ $labels.vantage }} loses node {{ $labels.node }} (PoP "
                "{{ $labels.pop }}) after AS{{ $labels.asn }} ({{ $labels.kind }}): check ASN "
                "routing between them."
            ),
        ),
        POPS.warning(
            "PoPLoadImbalanced",
            "pop:tunnelwatch_node_active_peers:cv > 0.25",
            for_="15m",
            summary="Active sessions are unevenly spread across a PoP's nodes.",
            description=(
                "PoP {{ $labels.pop }} ({{ $labels.region }}): the coefficient of variation of "
                'active sessions across its nodes is {{ $value | printf "%.2f" }} (bound 0.25).'
            ),
        ),
        NODES.warning(
            "TunnelDropRateHigh",
            "node:tunnelwatch_probe_loss:ratio_median15m > 0.001",
            for_="15m",
            summary="In-tunnel packet loss is above 0.1%.",
            description=(
                "Node {{ $labels.node }} in PoP {{ $labels.pop }} drops "
                "{{ $value | humanizePercentage }} of synthetic in-tunnel packets."
            ),
        ),
        NODES.warning(
            "TunnelLatencyHigh",
            "node:tunnelwatch_probe_rtt_p99_seconds:median > 0.15",
            for_="15m",
            summary="In-tunnel P99 round-trip time is above 150 ms.",
            description=(
                "Node {{ $labels.node }} in PoP {{ $labels.pop }}: median across vantages of the "
                "in-tunnel P99 RTT is {{ $value | humanizeDuration }}."
            ),
        ),
        NODES.warning(
            "NodeReconnectionRateHigh",
            # More than one reconnect per session every 10 minutes, sustained.
            "node:tunnelwatch_node_reconnects_per_session:rate15m > (1 / 600)",
            for_="15m",
            summary="Clients reconnect to a VPN node unusually often.",
            description=(
                "Node {{ $labels.node }} in PoP {{ $labels.pop }}: "
                '{{ $value | printf "%.4f" }} reconnects per active session per second '
                "(bound 1/600)."
            ),
        ),
        NODES.warning(
            "NodeTelemetryUnreadable",
            # Every vantage's reads of one protocol's telemetry fail: the load-imbalance and
            # reconnect alerts for that node have gone blind (telemetry never makes a verdict).
            f"sum by ({NODE_LABELS}, check) "
            "(rate(tunnelwatch_telemetry_read_failures_total[15m]))\n/\n"
            f"sum by ({NODE_LABELS}, check) (rate(tunnelwatch_telemetry_reads_total[15m]))\n"
            "> 0.9",
            for_="30m",
            summary="A VPN node's own telemetry cannot be read.",
            description=(
                "Node {{ $labels.node }} in PoP {{ $labels.pop }}: "
                "{{ $value | humanizePercentage }} of the {{ $labels.check }} reads failed in "
                "the last 15 minutes."
            ),
        ),
        *certificate_expiry_alerts(),
        *crypto_policy_alerts(),
    ]


def certificate_expiry_alerts() -> list[dict[str, Any]]:
    """One alert name at two horizons: a ticket two weeks ahead, a page two days ahead."""
    return [
        NODES.alert(
            "NodeCertificateExpiry",
            f"min by ({NODE_LABELS}) (tunnelwatch_node_certificate_expiry_timestamp_seconds)"
            f" - time() < {days} * 86400",
            for_="10m",
            severity=severity,
            summary="A VPN node's server certificate is about to expire.",
            description=(
                "The certificate of node {{ $labels.node }} in PoP {{ $labels.pop }} expires in "
                "{{ $value | humanizeDuration }}."
            ),
        )
        for days, severity in ((14, "warning"), (2, "critical"))
    ]


def crypto_policy_alerts() -> list[dict[str, Any]]:
    """What a node is willing to accept (the hourly policy scans) and certificates that are not
    valid yet; docs/crypto-policy.md."""
    return [
        NODES.critical(
            "WeakCryptoAccepted",
            # one alert per node and deprecated choice, from any vantage's latest scan; the
            # gauge is only ever set by a scan, so it needs no `for` beyond a scrape or two
            f"max by ({NODE_LABELS}, item) (tunnelwatch_policy_weak_accepted) == 1",
            for_="2m",
            summary="A VPN node accepts a deprecated algorithm.",
            description=(
                "Node {{ $labels.node }} in PoP {{ $labels.pop }} accepted {{ $labels.item }} "
                "when the policy scan offered it alone."
            ),
        ),
        NODES.critical(
            "NodeCertificateNotYetValid",
            f"max by ({NODE_LABELS}) "
            "(tunnelwatch_node_certificate_not_before_timestamp_seconds) - time() > 0",
            for_="10m",
            summary="A VPN node presents a certificate that is not valid yet.",
            description=(
                "A certificate node {{ $labels.node }} in PoP {{ $labels.pop }} presents starts "
                "being valid in {{ $value | humanizeDuration }}: clients with a correct clock "
                "refuse it."
            ),
        ),
    ]


def mesh_alerts() -> list[dict[str, Any]]:
    return [
        VANTAGES.warning(
            "VantageImpaired",
            "max by (vantage) (tunnelwatch_mesh_vantage_impaired) == 1",
            for_="5m",
            summary="The mesh ignores a vantage that sees most of the fleet down.",
            description=(
                "Vantage {{ $labels.vantage }} is judged impaired and left out of every vote; "
                "its network, not the nodes, is the likely problem." + VANTAGE_PATHS
            ),
        ),
        POOLS.critical(
            "PoolGuardHolding",
            # the guard works per pool; the pool's PoP comes from the placement join, and a pool
            # no agent reports on still alerts, as pop="fleet"
            "max by (pool, pop, region) (\n"
            "  tunnelwatch_mesh_pool_guard_holding\n"
            "  * on (pool) group_left (pop, region)\n"
            "  group by (pool, pop, region) (node:tunnelwatch_node_placement:info)\n"
            ") > 0\n"
            "or on (pool)\n" + fleet_pop("max by (pool) (tunnelwatch_mesh_pool_guard_holding) > 0"),
            for_="1m",
            summary="The pool guard keeps failing nodes in service.",
            description=(
                "Pool {{ $labels.pool }} would have more nodes DOWN than its guard allows; "
                "{{ $value }} failing node(s) are held in service."
            ),
        ),
        MESH.warning(
            "MeshIngestRejects",
            "sum by (reason) (rate(tunnelwatch_mesh_ingest_rejects_total[10m])) > 0.01",
            for_="10m",
            summary="The mesh rejects observation batches.",
            description=(
                'The mesh rejects {{ $value | printf "%.3f" }} batches per second '
                "with reason {{ $labels.reason }}."
            ),
        ),
        MESH.critical(
            "MeshStoreFailing",
            "min by (job, instance) (tunnelwatch_mesh_store_up) == 0",
            for_="1m",
            summary="The mesh's store cannot commit: it refuses every observation.",
            description=(
                "Mesh {{ $labels.instance }} of job {{ $labels.job }} cannot commit to its store "
                "(a full disk, a read-only file) and answers agents 503: verdicts stay as they "
                "were until it can."
            ),
        ),
        MESH.critical(
            "MeshNoLeader",
            "sum by (job) (tunnelwatch_mesh_leader) == 0",
            for_="1m",
            summary="No mesh replica is the leader: verdict changes are not published.",
            description=(
                "None of the replicas of job {{ $labels.job }} holds the leader lease; "
                "balancers keep their last verdicts."
            ),
        ),
        MESH.warning(
            "MeshSeveralLeaders",
            "sum by (job) (tunnelwatch_mesh_leader) > 1",
            for_="2m",
            summary="More than one mesh replica believes it is the leader.",
            description=(
                "{{ $value }} replicas of job {{ $labels.job }} report tunnelwatch_mesh_leader 1; "
                "fencing keeps the stale one from publishing, but its clock or etcd path is off."
            ),
        ),
        PUBLISHERS.warning(
            "PublisherLagHigh",
            "max by (publisher) (tunnelwatch_publisher_lag_seconds) > 60",
            for_="5m",
            summary="Verdict changes wait too long in the outbox.",
            description=(
                "Publisher {{ $labels.publisher }}: the oldest undelivered verdict change is "
                "{{ $value | humanizeDuration }} old."
            ),
        ),
        PUBLISHERS.warning(
            "PublisherDeadLetters",
            "sum by (publisher) (increase(tunnelwatch_publisher_dead_lettered_total[15m])) > 0",
            summary="A verdict change could not be delivered and was dead-lettered.",
            description=(
                "Publisher {{ $labels.publisher }} dead-lettered about "
                '{{ $value | printf "%.0f" }} verdict change(s) in the last 15 minutes.'
            ),
        ),
    ]


def load_alerts() -> list[dict[str, Any]]:
    """Load uniformity, weight churn and guard, capacity advice (docs/runbooks/weights.md)."""
    return [
        LOAD_POPS.warning(
            "PoPLoadUneven",
            "pop:tunnelwatch_node_cpu_busy:cv > 0.25",
            for_="15m",
            summary="CPU load is unevenly spread across a PoP's serving nodes.",
            description=(
                "PoP {{ $labels.pop }} ({{ $labels.region }}): the coefficient of variation of "
                'its serving nodes\' CPU busy share is {{ $value | printf "%.2f" }} (bound 0.25).'
            ),
        ),
        LOAD_POPS.warning(
            "PoPEffectiveSessionsUneven",
            "pop:tunnelwatch_node_effective_sessions:cv > 0.25",
            for_="15m",
            summary="Effective sessions are unevenly spread across a PoP's serving nodes.",
            description=(
                "PoP {{ $labels.pop }} ({{ $labels.region }}): the coefficient of variation of "
                "its serving nodes' effective sessions is "
                '{{ $value | printf "%.2f" }} (bound 0.25).'
            ),
        ),
        WEIGHT_POOLS.warning(
            "WeightChurn",
            # a new weight at more than every other step (1 s by default), sustained: the dead
            # band or the hysteresis is too narrow for this pool's load noise. Least load steers
            # by design: on a small pool with clients coming and going every second or two the
            # weights move every few seconds (the weights simulation: ~20 changes per node and
            # minute, 0.33/s), which is the work, not churn
            "pool:tunnelwatch_weight_changes_per_node:rate5m > 0.5",
            for_="15m",
            summary="The mesh changes a pool's weights so often that it churns its balancers.",
            description=(
                "Pool {{ $labels.pool }} in PoP {{ $labels.pop }}: "
                '{{ $value | printf "%.3f" }} weight changes per node per second.'
            ),
        ),
        WEIGHT_POOLS.warning(
            "WeightGuardHolding",
            "max by (pool, pop, region) (\n"
            "  max by (pool) (\n" + _indent(leaders("tunnelwatch_mesh_weight_guard_scale"), "  ")
            + "\n  )\n"
            "  * on (pool) group_left (pop, region)\n"
            "  group by (pool, pop, region) (node:tunnelwatch_node_placement:info)\n"
            ") > 1",
            for_="10m",
            summary="A whole pool is loaded: the weight guard scales its load cuts back.",
            description=(
                "Pool {{ $labels.pool }} in PoP {{ $labels.pop }}: every node is cut for load; "
                'the guard scales the cuts back by {{ $value | printf "%.2f" }}x.'
            ),
        ),
        LOAD_POPS.warning(
            "PoPScaleUp",
            f"pop:tunnelwatch_handshake_seconds:p95_5m\n> {_num(LATENCY_CLIMB)} * "
            "pop:tunnelwatch_handshake_seconds:p95_1h_before\n"
            f"and on ({POP_LABELS})\n"
            f"avg by ({POP_LABELS}) (node:tunnelwatch_node_packets_per_second:smoothed)"
            f" > {SCALE_UP_PPS}",
            for_="3m",
            summary="A PoP's handshakes slow down under heavy load: add a node.",
            description=(
                "PoP {{ $labels.pop }} ({{ $labels.region }}): handshake P95 is "
                "{{ $value | humanizeDuration }}, 30 % above the hour before, while its nodes "
                f"carry over {SCALE_UP_PPS} packets per second each."
            ),
        ),
        LOAD_POPS.alert(
            "PoPCanShedNode",
            f"pop:tunnelwatch_capacity_one_node_fewer:ratio < {_num(1 - SPARE)}\n"
            f"and on ({POP_LABELS})\n"
            f"count by ({POP_LABELS}) ({SERVING}) > 1",
            for_="15m",
            severity="info",
            summary="A PoP's load would fit in one node fewer with 20 % to spare.",
            description=(
                "PoP {{ $labels.pop }} ({{ $labels.region }}): without its biggest node the "
                "load would use {{ $value | humanizePercentage }} of its capacity; one node can "
                "be drained."
            ),
        ),
        LOAD_POPS.warning(
            "PoPSpareCapacityLow",
            f"pop:tunnelwatch_capacity_spare:ratio < {_num(SPARE)}",
            for_="15m",
            summary="A PoP has less than 20 % spare capacity.",
            description=(
                "PoP {{ $labels.pop }} ({{ $labels.region }}) has "
                "{{ $value | humanizePercentage }} of its serving capacity to spare (keep 20 %)."
            ),
        ),
    ]


def anycast_alerts() -> list[dict[str, Any]]:
    """The mesh's anycast controller (docs/anycast.md): one BGP speaker per PoP."""
    return [
        ANYCAST.warning(
            "AnycastPoPWithdrawn",
            'max by (pop) (tunnelwatch_anycast_pop_state{state="WITHDRAWN"}) == 1',
            for_="1m",
            summary="A PoP's anycast prefixes are withdrawn.",
            description=(
                "PoP {{ $labels.pop }} no longer announces its anycast prefixes; "
                "its users are routed to other PoPs."
            ),
        ),
        ANYCAST.critical(
            "AnycastGuardHolding",
            "max by (pop) (tunnelwatch_anycast_guard_holding) == 1",
            for_="1m",
            summary="The anycast guard keeps a failing PoP announced.",
            description=(
                "PoP {{ $labels.pop }} should be withdrawn, but the guard keeps it announced "
                "so that not too many PoPs leave at once."
            ),
        ),
        ANYCAST.warning(
            "AnycastSpeakerDown",
            "max by (pop) (tunnelwatch_anycast_speaker_up) == 0",
            for_="5m",
            summary="The mesh cannot reach a PoP's BGP speaker.",
            description=(
                "The BGP speaker of PoP {{ $labels.pop }} does not answer; announcements "
                "there cannot change until it does."
            ),
        ),
    ]


def agent_alerts() -> list[dict[str, Any]]:
    return [
        AGENTS.warning(
            "AgentSpoolFilling",
            "max by (vantage) (\n"
            "  tunnelwatch_spool_bytes / tunnelwatch_spool_capacity_bytes\n"
            ") > 0.5",
            for_="10m",
            summary="An agent's report spool is filling up: the mesh is not taking reports.",
            description=(
                "Agent at vantage {{ $labels.vantage }} has its spool "
                "{{ $value | humanizePercentage }} full."
            ),
        ),
        AGENTS.warning(
            "AgentSpoolDropping",
            "sum by (vantage) (increase(tunnelwatch_spool_dropped_observations_total[10m])) > 0",
            summary="An agent drops observations because its spool is full.",
            description=(
                "Agent at vantage {{ $labels.vantage }} dropped about "
                '{{ $value | printf "%.0f" }} observation(s) in the last 10 minutes.'
            ),
        ),
        AGENTS.warning(
            "AgentBatchesRefused",
            'sum by (vantage) (increase(tunnelwatch_report_batches_total{result="refused"}[10m]))'
            " > 2",
            summary="The mesh refuses an agent's batches as replays of a newer agent instance.",
            description=(
                "The mesh refused about {{ $value | printf \"%.0f\" }} batch(es) of vantage "
                "{{ $labels.vantage }} in the last 10 minutes: another instance reports under "
                "its name, or its clock went back."
            ),
        ),
        AGENTS.warning(
            "AgentSchedulerLagging",
            # share of probes that started more than 250 ms after their slot (lag histogram)
            "1 - (\n"
            "  sum by (vantage)\n"
            '  (rate(tunnelwatch_scheduler_lag_seconds_bucket{le="0.25"}[10m]))\n'
            "  /\n"
            "  sum by (vantage) (rate(tunnelwatch_scheduler_lag_seconds_count[10m]))\n"
            ") > 0.05",
            for_="10m",
            summary="An agent starts its checks late.",
            description=(
                "Agent at vantage {{ $labels.vantage }} starts "
                "{{ $value | humanizePercentage }} of its probes more than 250ms late; "
                "their timings may be inflated."
            ),
        ),
        AGENTS.warning(
            "AgentOverloaded",
            "sum by (vantage) (rate(tunnelwatch_scheduler_overloaded_total[10m])) > 0.01",
            for_="10m",
            summary="An agent refuses probes it cannot start on time.",
            description=(
                "Agent at vantage {{ $labels.vantage }} refuses "
                '{{ $value | printf "%.3f" }} probes per second as overloaded; '
                "its nodes are probed less often than configured."
            ),
        ),
        AGENTS.warning(
            "AgentPathTraceBudgetShort",
            # the plan's baselines alone want more traces than max_per_minute allows
            "max by (vantage) (\n"
            "  tunnelwatch_path_trace_baseline_demand_per_second\n"
            "  / tunnelwatch_path_trace_budget_per_second\n"
            ") > 1",
            for_="15m",
            summary="An agent's baseline path traces want more than its trace budget.",
            description=(
                "Agent at vantage {{ $labels.vantage }} plans "
                '{{ $value | printf "%.2f" }} times the baseline traces per second that '
                "paths.max_per_minute allows: each node's baseline comes that much less often "
                "than paths.baseline_interval, and route changes go unseen meanwhile."
            ),
        ),
        AGENTS.warning(
            "AgentPathTracesBehind",
            "max by (vantage) (tunnelwatch_path_trace_backlog_seconds) > 900",
            for_="30m",
            summary="An agent starts its path traces long after they are due.",
            description=(
                "Agent at vantage {{ $labels.vantage }} has a path trace waiting "
                "{{ $value | humanizeDuration }} past its due time: its baselines and re-traces "
                "of failing nodes lag behind their intervals."
            ),
        ),
        TARGETS.warning(
            "TunnelwatchTargetDown",
            'up{job=~"tunnelwatch-.*"} == 0',
            for_="5m",
            summary="Prometheus cannot scrape a tunnelwatch agent or mesh.",
            description="Target {{ $labels.instance }} of job {{ $labels.job }} is down.",
        ),
    ]


# ---------------------------------------------------------------------------- output


@dataclass
class RuleFile:
    name: str
    groups: list[dict[str, Any]] = field(default_factory=list)

    def group(self, name: str, rules: list[dict[str, Any]], interval: str | None = None) -> None:
        g: dict[str, Any] = {"name": name}
        if interval:
            g["interval"] = interval
        g["rules"] = rules
        self.groups.append(g)


def build() -> list[RuleFile]:
    recording = RuleFile("recording.rules.yaml")
    recording.group("tunnelwatch-pop", pop_building_blocks())
    recording.group("tunnelwatch-load", load_building_blocks())
    for slo in SLOS:
        recording.group(f"tunnelwatch-slo-{slo.name}", slo_recording_rules(slo))
    slo_alerts = RuleFile("slo.rules.yaml")
    slo_alerts.group("tunnelwatch-slo-alerts", [r for slo in SLOS for r in burn_alerts(slo)])
    other = RuleFile("alerts.rules.yaml")
    other.group("tunnelwatch-fleet-alerts", fleet_alerts())
    other.group("tunnelwatch-mesh-alerts", mesh_alerts())
    other.group("tunnelwatch-load-alerts", load_alerts())
    other.group("tunnelwatch-anycast-alerts", anycast_alerts())
    other.group("tunnelwatch-agent-alerts", agent_alerts())
    return [recording, slo_alerts, other]


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)

HEADER = "# GENERATED by rules/generate.py; edit that file and rerun it. Do not edit by hand.\n"


def render(rf: RuleFile) -> str:
    body = yaml.dump({"groups": rf.groups}, Dumper=_Dumper, sort_keys=False, width=100)
    return HEADER + body


PROMETHEUS_RULE = "prometheusrule.yaml"
K8S_DIR = HERE.parent / "deploy" / "kubernetes"


def render_prometheus_rule(files: list[RuleFile]) -> str:
    """The same groups as a Prometheus Operator PrometheusRule (deploy/kubernetes/)."""
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "tunnelwatch",
            "namespace": "tunnelwatch",
            "labels": {"app.kubernetes.io/part-of": "tunnelwatch", "release": "prometheus"},
        },
        "spec": {"groups": [g for rf in files for g in rf.groups]},
    }
    return HEADER + yaml.dump(resource, Dumper=_Dumper, sort_keys=False, width=100)


def main(argv: list[str]) -> int:
    """Write the rule files and the PrometheusRule to ``argv[1]`` (default rules/, deploy/)."""
    out = Path(argv[1]) if len(argv) > 1 else HERE
    files = build()
    for rf in files:
        (out / rf.name).write_text(render(rf))
    k8s = out if len(argv) > 1 else K8S_DIR
    (k8s / PROMETHEUS_RULE).write_text(render_prometheus_rule(files))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
