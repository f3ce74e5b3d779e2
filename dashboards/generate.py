#!/usr/bin/env python3
"""Generate tunnelwatch's Grafana dashboards with grafana-foundation-sdk (Grafana 11.6 build).

Run ``python dashboards/generate.py`` after editing; it rewrites ``dashboards/*.json``. The JSON is
committed (Grafana provisions it from deploy/grafana/provisioning/) and
``tests/observability/test_dashboards.py`` fails when it drifts from what this script writes.

Four dashboards, linked to each other:

* fleet overview: verdicts by PoP, SLOs and burn rates, load spread;
* node detail: one node's per-vantage results, reasons, timings, in-tunnel quality, telemetry;
* vantage matrix: agents x nodes success, impaired vantages, agent health;
* mesh & publisher health: ingest, verdict churn, pool guard, publishing.

Queries prefer the recording rules of rules/ (``pop:``, ``node:``, ``slo:``), so a dashboard and
an alert never disagree about what a number means. Rates use ``$__rate_interval``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from grafana_foundation_sdk.builders import (
    bargauge,
    dashboard,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    Panel,
    VariableRefresh,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

HERE = Path(__file__).resolve().parent
PROM = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
TAGS = ["tunnelwatch"]

POP = 'pop=~"$pop"'
NODE = 'node=~"$node"'
VANTAGE = 'vantage=~"$vantage"'


# ---------------------------------------------------------------------------- building blocks


def query(expr: str, legend: str = "", *, instant: bool = False) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant().format(PromQueryFormat.TABLE)
    return q


def graph(
    title: str, unit: str, targets: Iterable[prometheus.Dataquery], *, desc: str, w: int = 12
) -> timeseries.Panel:
    """A time series of several queries, lettered A, B, ... in order.

    Here and in the other panel builders ``desc`` is required: it is the panel's hover text, and
    every panel should say what it shows.
    """
    panel = timeseries.Panel().title(title).description(desc).datasource(PROM).unit(unit).height(8)
    for ref, t in zip("ABCDEFGH", targets, strict=False):
        panel = panel.with_target(t.ref_id(ref))
    return panel.span(w)


def ts(
    title: str, unit: str, expr: str, legend: str, *, desc: str, w: int = 12
) -> timeseries.Panel:
    """A time series of one query."""
    return graph(title, unit, [query(expr, legend)], desc=desc, w=w)


def single(title: str, unit: str, expr: str, legend: str, *, desc: str, w: int = 6) -> stat.Panel:
    panel = stat.Panel().title(title).description(desc).datasource(PROM).unit(unit).height(5)
    return panel.span(w).with_target(query(expr, legend).ref_id("A"))


def bars(
    title: str, unit: str, expr: str, legend: str, *, desc: str, w: int = 12
) -> bargauge.Panel:
    panel = bargauge.Panel().title(title).description(desc).datasource(PROM).unit(unit).height(8)
    return panel.span(w).with_target(query(expr, legend).ref_id("A"))


def matrix(title: str, expr: str, rows: str, cols: str, *, desc: str, unit: str) -> table.Panel:
    """A rows x columns table from an instant query (Grafana's groupingToMatrix transformation)."""
    return (
        table.Panel()
        .title(title)
        .description(desc)
        .datasource(PROM)
        .unit(unit)
        .height(10)
        .span(24)
        .with_target(query(expr, instant=True).ref_id("A"))
        .with_transformation(
            DataTransformerConfig(
                id_val="groupingToMatrix",
                options={"rowField": rows, "columnField": cols, "valueField": "Value"},
            )
        )
    )


# a row, or any panel builder (timeseries, stat, bar gauge, table)
Item = dashboard.Row | cogbuilder.Builder[Panel]


def laid_out(d: dashboard.Dashboard, *items: Item) -> dashboard.Dashboard:
    """Add rows and panels in reading order: the SDK puts each one on the grid after the one
    before (width ``span``, wrapping at 24), so the order of ``items`` is the layout."""
    for item in items:
        d = d.with_row(item) if isinstance(item, dashboard.Row) else d.with_panel(item)
    return d


def variable(name: str, label: str, expr: str, *, multi: bool = True) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name)
        .label(label)
        .datasource(PROM)
        .query(expr)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(multi)
        .include_all(True)
        .all_value(".*")
    )


def base(uid: str, title: str, description: str) -> dashboard.Dashboard:
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .time("now-6h", "now")
        .refresh("1m")
        .with_variable(
            dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
        .link(
            dashboard.DashboardLink("tunnelwatch")
            .type(DashboardLinkType.DASHBOARDS)
            .tags(TAGS)
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )


def with_region_pop(d: dashboard.Dashboard) -> dashboard.Dashboard:
    return d.with_variable(
        variable("region", "Region", "label_values(node:tunnelwatch_node_placement:info, region)")
    ).with_variable(
        variable(
            "pop",
            "PoP",
            'label_values(node:tunnelwatch_node_placement:info{region=~"$region"}, pop)',
        )
    )


# ---------------------------------------------------------------------------- dashboards

SLOS = ("pop-availability", "probe-success", "handshake-errors", "handshake-latency")


def burn(slo: str, window: str) -> str:
    """Burn rate = error ratio / error budget (1 = spending exactly the 30 d budget)."""
    return (
        f'slo:sli_error:ratio_rate{window}{{slo="{slo}", {POP}}}\n'
        f'/ on (slo) group_left () (1 - slo:objective:ratio{{slo="{slo}"}})'
    )


def burn_rates(window: str, *, desc: str) -> timeseries.Panel:
    """Every SLO's burn rate over one alert window, one series per PoP and SLO."""
    targets = (query(burn(s, window), "{{pop}} " + s) for s in SLOS)
    # "1h" is titled "1 h", the way the descriptions write durations
    return graph(f"Burn rate, {window[:-1]} {window[-1]} window", "none", targets, desc=desc)


def slo_error_ratio(title: str, slo: str, *, desc: str) -> timeseries.Panel:
    """One SLO's error ratio over the shortest window, per PoP."""
    expr = f'slo:sli_error:ratio_rate5m{{slo="{slo}", {POP}}}'
    return ts(title, "percentunit", expr, "{{pop}}", desc=desc)


def fleet_overview() -> dashboard.Dashboard:
    d = with_region_pop(
        base(
            "tunnelwatch-fleet",
            "tunnelwatch / Fleet overview",
            "Node verdicts by PoP, SLOs and error-budget burn, load spread across nodes.",
        )
    )
    return laid_out(
        d,
        dashboard.Row("Verdicts"),
        single(
            "Serving nodes",
            "none",
            f"sum(pop:tunnelwatch_nodes_serving:count{{{POP}}})",
            "serving",
            desc="Nodes UP or DEGRADED (drained nodes are not counted).",
        ),
        single(
            "Nodes down",
            "none",
            f"sum(pop:tunnelwatch_nodes_down:count{{{POP}}})",
            "down",
            desc="Nodes the mesh judges DOWN.",
        ),
        single(
            "Impaired vantages",
            "none",
            "sum(tunnelwatch_mesh_vantage_impaired)",
            "impaired",
            desc="Vantages left out of every vote because they see most of the fleet down.",
        ),
        single(
            "Nodes held by the pool guard",
            "none",
            "sum(tunnelwatch_mesh_pool_guard_holding)",
            "held",
            desc="Failing nodes kept in service because their pool is at its DOWN share.",
        ),
        bars(
            "Nodes by PoP and state",
            "none",
            f'sum by (pop, state) (node:tunnelwatch_verdict:state{{{POP}, region=~"$region"}})',
            "{{pop}} {{state}}",
            desc="The verdict map: how many nodes of each PoP are in each state right now.",
            w=24,
        ),
        dashboard.Row("SLOs (30 days)"),
        bars(
            "Error budget remaining",
            "percentunit",
            f"slo:error_budget_remaining:ratio{{{POP}}}",
            "{{pop}} {{slo}}",
            desc="1 = untouched, 0 = spent, below 0 = SLO missed over the last 30 days.",
        ),
        bars(
            "PoP availability (30 d)",
            "percentunit",
            f'1 - slo:sli_error:ratio_rate30d{{slo="pop-availability", {POP}}}',
            "{{pop}}",
            desc="Share of node time not judged DOWN by the mesh. Objective 99.95 %.",
        ),
        burn_rates("1h", desc="Pages when above 14.4 together with the 5 m window."),
        burn_rates("6h", desc="Pages when above 6 together with the 30 m window."),
        slo_error_ratio(
            "Handshake error ratio",
            "handshake-errors",
            desc="Failed handshakes / attempts (agent-side failures excluded). Budget 0.4 %.",
        ),
        slo_error_ratio(
            "Handshakes slower than 150 ms",
            "handshake-latency",
            desc="Share of handshakes above the 0.15 s bucket. Budget 1 % (P99 < 150 ms).",
        ),
        slo_error_ratio(
            "Egress error ratio (beyond the node)",
            "egress",
            desc="Failed egress checks / attempts: echoes through a real tunnel to targets "
            "beyond the node (docs/probes/user-path.md). Budget 0.5 %.",
        ),
        slo_error_ratio(
            "DNS through the tunnel error ratio",
            "dns-through-tunnel",
            desc="Failed DNS-through-the-tunnel checks / attempts (timeout, unreachable, "
            "SERVFAIL, REFUSED, wrong answer). Budget 0.5 %.",
        ),
        dashboard.Row("Load"),
        ts(
            "Active sessions per node",
            "none",
            f"node:tunnelwatch_node_active_peers:sum{{{POP}}}",
            "{{pop}} {{node}}",
            desc="Node telemetry, the largest figure any vantage reports for the node.",
        ),
        ts(
            "Load imbalance (coefficient of variation)",
            "none",
            f"pop:tunnelwatch_node_active_peers:cv{{{POP}}}",
            "{{pop}}",
            desc="Standard deviation / mean of active sessions across a PoP's nodes; alert > 0.25.",
        ),
        dashboard.Row("Weights, load and spare capacity"),
        ts(
            "Node weights",
            "percentunit",
            f"node:tunnelwatch_node_weight:ratio{{{POP}}}",
            "{{pop}} {{node}}",
            desc="The weight the mesh publishes to the balancers, a share of the node's nominal "
            "weight (docs/weights.md); 0 = no new flows.",
        ),
        ts(
            "Node load (CPU busy)",
            "percentunit",
            f"node:tunnelwatch_node_cpu_busy:ratio{{{POP}}}",
            "{{pop}} {{node}}",
            desc="Smoothed CPU busy share of each node (host or VPN daemon), from telemetry.load.",
        ),
        ts(
            "Effective sessions",
            "none",
            f"node:tunnelwatch_node_effective_sessions:smoothed{{{POP}}}",
            "{{pop}} {{node}}",
            desc="Sessions weighted by their recent traffic (a 1 Mbit/s client counts one).",
        ),
        ts(
            "CPU load uniformity (coefficient of variation)",
            "none",
            f"pop:tunnelwatch_node_cpu_busy:cv{{{POP}}}",
            "{{pop}}",
            desc="Standard deviation / mean of CPU busy across a PoP's serving nodes (not "
            "computed below 5 % mean); PoPLoadUneven above 0.25.",
        ),
        ts(
            "Effective-session uniformity (coefficient of variation)",
            "none",
            f"pop:tunnelwatch_node_effective_sessions:cv{{{POP}}}",
            "{{pop}}",
            desc="Standard deviation / mean of effective sessions across a PoP's serving nodes "
            "(not computed below one per node); PoPEffectiveSessionsUneven above 0.25.",
        ),
        ts(
            "Spare capacity",
            "percentunit",
            f"pop:tunnelwatch_capacity_spare:ratio{{{POP}}}",
            "{{pop}}",
            desc="1 - load / capacity of a PoP's serving nodes; keep 20 % (PoPSpareCapacityLow).",
        ),
        ts(
            "Weight changes per node",
            "ops",
            "pool:tunnelwatch_weight_changes_per_node:rate5m",
            "{{pool}}",
            desc="How often the balancers get a new weight, per node; churn alert above 1/60 s.",
        ),
        dashboard.Row("Crypto policy"),
        ts(
            "Post-quantum ready share",
            "percentunit",
            f"pop:tunnelwatch_nodes_pq_ready:ratio{{{POP}}}",
            "{{pop}}",
            desc="Share of a PoP's scanned nodes that took the policy scan's hybrid ML-KEM key "
            "exchange (docs/crypto-policy.md).",
        ),
        bars(
            "Deprecated choices accepted",
            "none",
            f"max by (node, item) (tunnelwatch_policy_weak_accepted{{{POP}}}) == 1",
            "{{node}} {{item}}",
            desc="Each node and deprecated algorithm its last policy scan saw accepted "
            "(WeakCryptoAccepted pages on each).",
        ),
    )


def node_detail() -> dashboard.Dashboard:
    d = base(
        "tunnelwatch-node",
        "tunnelwatch / Node detail",
        "One node seen from every vantage: results, reasons, timings, tunnel quality, telemetry.",
    )
    d = d.with_variable(
        variable("pop", "PoP", "label_values(node:tunnelwatch_node_placement:info, pop)")
    )
    d = d.with_variable(
        variable(
            "node", "Node", 'label_values(node:tunnelwatch_node_placement:info{pop=~"$pop"}, node)'
        )
    )
    sel = NODE
    return laid_out(
        d,
        dashboard.Row("Verdict and results"),
        ts(
            "Verdict state",
            "none",
            f"node:tunnelwatch_verdict:state{{{sel}}}",
            "{{node}} {{state}}",
            desc="The mesh's verdict (one series per state the node was in).",
        ),
        ts(
            "Probe success by vantage",
            "percentunit",
            f"1 - (sum by (vantage) (rate(tunnelwatch_probe_failures_total{{{sel}}}[{RATE}]))\n"
            f"/ sum by (vantage) (rate(tunnelwatch_probe_attempts_total{{{sel}}}[{RATE}])))",
            "{{vantage}}",
            desc="Share of probes that passed, all checks, per vantage.",
        ),
        ts(
            "Failures by reason",
            "ops",
            f"sum by (reason) (rate(tunnelwatch_probe_failures_total{{{sel}}}[{RATE}]))",
            "{{reason}}",
            desc="Closed-enum reasons (probes.model.Reason).",
        ),
        ts(
            "Check duration P99 by check, whole PoP",
            "s",
            "histogram_quantile(0.99, sum by (le, check) "
            f"(rate(tunnelwatch_probe_duration_seconds_bucket{{{POP}}}[{RATE}])))",
            "{{check}}",
            desc="The agent's duration histogram has no node label (bounded series), so this is "
            "the node's PoP. The SLO edge is 0.15 s for handshakes.",
        ),
        ts(
            "Last probe's phases",
            "s",
            f"max by (check, phase) (tunnelwatch_probe_phase_duration_seconds{{{sel}}})",
            "{{check}} {{phase}}",
            desc="Where a probe spends its time (connect, handshake, tunnel...), worst vantage.",
            w=24,
        ),
        dashboard.Row("In-tunnel quality"),
        ts(
            "User path: egress, DNS and TCP transactions through the tunnel",
            "percentunit",
            f'min by (check) (tunnelwatch_probe_success{{{sel}, '
            f'check=~".+\\\\.(egress|dns|transaction)"}})',
            "{{check}}",
            desc="The last result of each egress, DNS-through-the-tunnel and TCP transaction "
            "check, worst vantage (1 passed, 0 failed; docs/probes/user-path.md). The reason "
            "is in 'Failures by reason'; a transaction's phases (connect, tls, http) are in "
            "\"Last probe's phases\".",
            w=24,
        ),
        ts(
            "In-tunnel P99 RTT by vantage",
            "s",
            f"tunnelwatch_probe_rtt_p99_seconds{{{sel}}}",
            "{{vantage}} {{check}}",
            desc="P99 round-trip time of the last session probe's exchanges.",
        ),
        ts(
            "Throughput beyond the node",
            "Bps",
            f"tunnelwatch_probe_throughput_bytes_per_second{{{sel}}}",
            "{{vantage}} {{check}}",
            desc="Inner IP bytes per second the last throughput burst got to the reflector "
            "beyond the node (a short rate-capped burst within the node's hourly byte budget).",
        ),
        ts(
            "Queueing delay under load",
            "s",
            f"tunnelwatch_probe_queueing_delay_seconds{{{sel}}}",
            "{{vantage}} {{check}}",
            desc="The burst's median RTT minus the idle RTT before it: what a full queue on "
            "the path adds. Above the bound: DEGRADED.",
        ),
        ts(
            "In-tunnel loss (15 m)",
            "percentunit",
            f"node:tunnelwatch_probe_loss:ratio_median15m{{{sel}}}",
            "{{node}}",
            desc="Median across vantages of in-tunnel session loss; alert above 0.1 %.",
        ),
        dashboard.Row("Node telemetry"),
        ts(
            "Active sessions",
            "none",
            f"node:tunnelwatch_node_active_peers:sum{{{sel}}}",
            "{{node}}",
            desc="Node telemetry: sessions on the node.",
        ),
        ts(
            "Reconnects per session",
            "ops",
            f"node:tunnelwatch_node_reconnects_per_session:rate15m{{{sel}}}",
            "{{node}}",
            desc="Reconnects per active session per second; alert above 1/600.",
        ),
        single(
            "Certificate expires in",
            "s",
            f"min(tunnelwatch_node_certificate_expiry_timestamp_seconds{{{sel}}}) - time()",
            "expires in",
            w=12,
            desc="Earliest server certificate expiry seen by the TLS-level checks.",
        ),
    )


def vantage_matrix() -> dashboard.Dashboard:
    d = with_region_pop(
        base(
            "tunnelwatch-vantages",
            "tunnelwatch / Vantage matrix",
            "Every agent against every node: who sees what, and which vantages are impaired.",
        )
    )
    d = d.with_variable(
        variable("vantage", "Vantage", "label_values(tunnelwatch_probe_attempts_total, vantage)")
    )
    sel = f"{POP}, {VANTAGE}"
    return laid_out(
        d,
        matrix(
            "Probe success: vantages x nodes",
            f"1 - (sum by (vantage, node) (rate(tunnelwatch_probe_failures_total{{{sel}}}[10m]))\n"
            f"/ sum by (vantage, node) (rate(tunnelwatch_probe_attempts_total{{{sel}}}[10m])))",
            "vantage",
            "node",
            desc="Success ratio over 10 minutes. A whole red row is a vantage problem, "
            "a whole red column a node problem.",
            unit="percentunit",
        ),
        ts(
            "Impaired vantages",
            "none",
            f"tunnelwatch_mesh_vantage_impaired{{{VANTAGE}}}",
            "{{vantage}}",
            desc="1 = the mesh leaves this vantage out of every vote.",
        ),
        ts(
            "Seconds since the mesh heard from each vantage",
            "s",
            f"tunnelwatch_mesh_vantage_last_report_age_seconds{{{VANTAGE}}}",
            "{{vantage}}",
            desc="A stale vantage is left out of the vote.",
        ),
        ts(
            "Probe attempts per second by vantage",
            "ops",
            f"sum by (vantage) (rate(tunnelwatch_probe_attempts_total{{{sel}}}[{RATE}]))",
            "{{vantage}}",
            desc="How much each agent probes; a drop means it is starved.",
        ),
        dashboard.Row("Agent health"),
        ts(
            "Spool fill",
            "percentunit",
            f"tunnelwatch_spool_bytes{{{VANTAGE}}} / tunnelwatch_spool_capacity_bytes{{{VANTAGE}}}",
            "{{vantage}}",
            desc="Reports waiting for the mesh; alert above 50 % for 10 minutes.",
            w=8,
        ),
        ts(
            "Observations dropped (spool full)",
            "ops",
            "sum by (vantage) "
            f"(rate(tunnelwatch_spool_dropped_observations_total{{{VANTAGE}}}[{RATE}]))",
            "{{vantage}}",
            desc="Observations lost because the agent's spool was full.",
            w=8,
        ),
        ts(
            "Scheduler lag P99",
            "s",
            "histogram_quantile(0.99, sum by (le, vantage) "
            f"(rate(tunnelwatch_scheduler_lag_seconds_bucket{{{VANTAGE}}}[{RATE}])))",
            "{{vantage}}",
            desc="How late probes start after their slot; alert when 5 % start 250 ms late.",
            w=8,
        ),
    )


def mesh_and_publisher() -> dashboard.Dashboard:
    d = base(
        "tunnelwatch-mesh",
        "tunnelwatch / Mesh & publisher health",
        "Observation ingest, verdict churn, pool guard, and verdict delivery to balancers.",
    )
    d = d.with_variable(
        variable(
            "publisher", "Publisher", "label_values(tunnelwatch_publisher_lag_seconds, publisher)"
        )
    )
    pub = 'publisher=~"$publisher"'
    return laid_out(
        d,
        dashboard.Row("Ingest and decisions"),
        ts(
            "Observations ingested per second",
            "ops",
            f"sum(rate(tunnelwatch_mesh_ingest_observations_total[{RATE}]))",
            "accepted",
            desc="Observations in batches the mesh accepted.",
        ),
        ts(
            "Rejected batches by reason",
            "ops",
            f"sum by (reason) (rate(tunnelwatch_mesh_ingest_rejects_total[{RATE}]))",
            "{{reason}}",
            desc="Bad signature, replay, stale timestamp, schema... (alert above 0.01/s).",
        ),
        ts(
            "Verdict transitions per second",
            "ops",
            f"sum by (to) (rate(tunnelwatch_mesh_verdict_transitions_total[{RATE}]))",
            "to {{to}}",
            desc="Verdict changes by new state; a steady stream means flapping.",
        ),
        ts(
            "Nodes held by the pool guard",
            "none",
            "tunnelwatch_mesh_pool_guard_holding",
            "{{pool}}",
            desc="Failing nodes kept in service because their pool is at its DOWN share.",
        ),
        dashboard.Row("Anycast"),
        ts(
            "Anycast state by PoP",
            "none",
            "max by (pop, state) (tunnelwatch_anycast_pop_state) == 1",
            "{{pop}} {{state}}",
            desc="ANNOUNCED, DRAINED or WITHDRAWN, per PoP (docs/anycast.md).",
        ),
        ts(
            "BGP speakers answering",
            "none",
            "tunnelwatch_anycast_speaker_up",
            "{{pop}}",
            desc="1 when the PoP's speaker answered the mesh's last call.",
        ),
        dashboard.Row("Publishing"),
        ts(
            "Delivered per second",
            "ops",
            f"sum by (publisher) (rate(tunnelwatch_publisher_delivered_total{{{pub}}}[{RATE}]))",
            "{{publisher}}",
            desc="Verdict changes each destination acknowledged.",
            w=8,
        ),
        ts(
            "Retries per second",
            "ops",
            f"sum by (publisher) (rate(tunnelwatch_publisher_retries_total{{{pub}}}[{RATE}]))",
            "{{publisher}}",
            desc="Failed deliveries that will be retried with backoff.",
            w=8,
        ),
        ts(
            "Dead-lettered (1 h)",
            "none",
            "sum by (publisher) "
            f"(increase(tunnelwatch_publisher_dead_lettered_total{{{pub}}}[1h]))",
            "{{publisher}}",
            desc="Verdict changes given up on in the last hour; reconcile repairs it.",
            w=8,
        ),
        ts(
            "Publisher lag",
            "s",
            f"tunnelwatch_publisher_lag_seconds{{{pub}}}",
            "{{publisher}}",
            desc="Age of the oldest undelivered verdict change; alert above 60 s for 5 minutes.",
            w=24,
        ),
    )


DASHBOARDS = {
    "fleet-overview.json": fleet_overview,
    "node-detail.json": node_detail,
    "vantage-matrix.json": vantage_matrix,
    "mesh-publisher.json": mesh_and_publisher,
}


def render(d: dashboard.Dashboard) -> str:
    text = JSONEncoder(sort_keys=True, indent=2).encode(d.build())
    # round-trip through json so the file is plain, stable JSON with a trailing newline
    return json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else HERE
    for name, build in DASHBOARDS.items():
        (out / name).write_text(render(build()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
