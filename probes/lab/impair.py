"""Link impairments in the router namespace: loss and partition (nftables), delay (TUN box).

The kernel here has no netem, so loss is ``numgen random mod 100 < N drop`` in the router's
forward hook and delay is a userspace delay box (:mod:`probes.lab.delaybox`) that the router
sends a host's packets through by policy routing.

The whole nftables table is re-rendered from the desired state on every change and loaded with
one ``nft -f`` (atomic), so rules never pile up or half-apply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

TABLE = "twlab"


class Direction(enum.StrEnum):
    EGRESS = "egress"  # packets the host sends (one-way: a round trip loses N%, not ~2N%)
    INGRESS = "ingress"  # packets sent to the host
    BOTH = "both"


@dataclass(slots=True)
class LinkState:
    loss_percent: int = 0
    loss_direction: Direction = Direction.EGRESS
    partitioned: bool = False
    drop_icmp_frag_needed: bool = False  # PMTU black hole
    delay_ms: float = 0.0


def render_ruleset(links: dict[str, LinkState]) -> str:
    """nft script for the router: ``links`` maps the router-side interface name to its state."""
    rules: list[str] = []
    # the router's own ICMP (e.g. frag-needed for a link whose MTU it lowered) is locally
    # generated: it passes the output hook, never forward, so the black hole needs both
    output_rules: list[str] = []
    for ifname, st in sorted(links.items()):
        if st.partitioned:
            rules.append(f'iifname "{ifname}" counter drop')
            rules.append(f'oifname "{ifname}" counter drop')
            continue
        if st.drop_icmp_frag_needed:
            rule = (f'oifname "{ifname}" icmp type destination-unreachable '
                    "icmp code frag-needed counter drop")
            rules.append(rule)
            output_rules.append(rule)
        if st.loss_percent > 0:
            match = {
                Direction.EGRESS: [f'iifname "{ifname}"'],
                Direction.INGRESS: [f'oifname "{ifname}"'],
                Direction.BOTH: [f'iifname "{ifname}"', f'oifname "{ifname}"'],
            }[st.loss_direction]
            rules.extend(f"{m} numgen random mod 100 < {st.loss_percent} counter drop"
                         for m in match)
    body = "\n".join(f"        {r}" for r in rules)
    output_body = "\n".join(f"        {r}" for r in output_rules)
    return (
        f"table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        "    chain forward {\n"
        "        type filter hook forward priority 0; policy accept;\n"
        f"{body}\n"
        "    }\n"
        "    chain output {\n"
        "        type filter hook output priority 0; policy accept;\n"
        f"{output_body}\n"
        "    }\n"
        "}\n"
    )
