"""IKEv2 node telemetry: SA counts from ``swanctl --list-sas``, locally or over SSH.

The node's own view complements the probes: how many IKE SAs it holds and in which state
(``CONNECTING`` ones are half-open: what strongSwan's cookie/block thresholds count), and how many
CHILD_SAs are installed. The probes delete everything they set up, so a rising count of
half-open or established SAs from probe identities points at a probe (or network) problem.

``swanctl --list-sas`` prints one unindented line per IKE SA and one indented line per CHILD_SA::

    lab: #6, ESTABLISHED, IKEv2, 818e1e172aa1c550_i cb9c752afdeb270b_r*
      net: #1, reqid 1, INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-256
    (unnamed): #2, CONNECTING, IKEv2, 82f21de0e399aea2_i aa35e38738a70e61_r*

Everything else (addresses, algorithms, byte counters) is skipped.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from probes.checks.remote import NodeShell, TelemetryError, node_output

_SWANCTL_TIMEOUT_SECONDS = 10.0
_IKE_LINE = re.compile(r"^(?P<name>\S[^:]*): #(?P<id>\d+), (?P<state>[A-Z_]+), IKEv(?P<v>[12]),")
_CHILD_LINE = re.compile(r"^\s+(?P<name>[^\s:]+): #(?P<id>\d+), reqid \d+, (?P<state>[A-Z_]+), ")
HALF_OPEN_STATE = "CONNECTING"


@dataclass(frozen=True, slots=True)
class SaCounts:
    ike_by_state: dict[str, int] = field(default_factory=dict)
    child_by_state: dict[str, int] = field(default_factory=dict)

    @property
    def ike_sas(self) -> int:
        return sum(self.ike_by_state.values())

    @property
    def half_open(self) -> int:
        return self.ike_by_state.get(HALF_OPEN_STATE, 0)

    @property
    def child_sas(self) -> int:
        return sum(self.child_by_state.values())

    def summary(self) -> dict[str, Any]:
        return {"ike_sas": self.ike_sas, "half_open": self.half_open,
                "child_sas": self.child_sas, "ike_by_state": dict(self.ike_by_state),
                "child_by_state": dict(self.child_by_state)}


def parse_list_sas(text: str) -> SaCounts:
    ike: Counter[str] = Counter()
    child: Counter[str] = Counter()
    seen_ike = False
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not line[0].isspace():
            m = _IKE_LINE.match(line)
            if m is None:
                raise TelemetryError(f"line {line_no}: not an IKE SA line: {line[:60]!r}")
            ike[m["state"]] += 1
            seen_ike = True
            continue
        m = _CHILD_LINE.match(line)
        if m is not None:
            if not seen_ike:
                raise TelemetryError(f"line {line_no}: CHILD_SA before any IKE SA")
            child[m["state"]] += 1
    return SaCounts(dict(ike), dict(child))


def list_sas_command(vici_uri: str | None = None) -> list[str]:
    argv = ["swanctl", "--list-sas"]
    if vici_uri:
        argv += ["--uri", vici_uri]
    return argv


async def collect(vici_uri: str | None = None, shell: NodeShell | None = None, *,
                  timeout: float = _SWANCTL_TIMEOUT_SECONDS) -> SaCounts:
    """``swanctl --list-sas`` here (``vici_uri`` e.g. ``unix:///run/charon.vici``), or on the
    node over SSH (its user must be allowed to talk to charon's VICI)."""
    return parse_list_sas(await node_output(list_sas_command(vici_uri), shell,
                                            error=TelemetryError, timeout=timeout))
