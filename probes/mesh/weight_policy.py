"""The weight policy: every knob of the weight engine, with defaults and validation.

The mesh config embeds :class:`WeightPolicy` as its ``weights:`` section (off unless
``enabled: true``). :func:`validate_weight_policy` raises
:class:`probes.mesh.policy.PolicyError` naming the field (``weights.steps[0].steps[1].cut``).

Where the defaults come from (the domain brief, shared/seed):

* the CPU steps are the brief's "-20 % weight at 75 % CPU, -50 % at 85 %";
* the drop steps follow its "drop rates over 0.1 % are a warning": -20 % at 0.1 % of packets
  dropped, -50 % at 1 %;
* the effective-session table makes it "least load", proportionally: a node's cut grows linearly
  from none at 0.9x the pool's mean effective sessions per unit of capacity to 90 % at 1.1x (down
  to the floor), and the pool's least-cut node keeps its full weight (a relative cut is a
  preference between peers, not lost capacity). Only new flows can be steered (a flow keeps its
  node) and a balancer places each at random by weight, so the response must be steep and
  continuous: the colder of two cold nodes gets more. In the weights benchmark discrete steps from
  1.2x measured CV 0.31, steps from 1.02x 0.24-0.29, this band 0.17 (equal weights 0.35-0.44); a
  simulation of the benchmark's mix with this engine (tests/bench/weights_mix_sim.py) puts the
  steps from 1.02x at 0.26 and this band at 0.21. Nodes at or below 0.9x are never cut against
  each other, so a large pool does not herd new flows onto its coldest node (anchoring the band at
  the coldest node did: worse than the earlier steps in a simulated 12-node pool);
* load is "smoothed exponentially and updated every 1-3 s": a 0.5 s half-life (effective
  sessions already decide who is a session over a window on the agent; hysteresis and the dead
  band absorb CPU noise), one step per second, at most 50 points per step (100 -> 10 in two
  steps): in the simulation every second of delay between a load change and the balancer costs
  about 0.01-0.02 of CV;
* DEGRADED keeps today's HAProxy mapping (50 %); slow start is HAProxy's ``slowstart`` idea
  (a returning node ramps up instead of taking a full share of new flows at once);
* the pool guard is the decision engine's guard carried over to weights: when every node is hot,
  shrinking them all only loses resolution in the balancer, so reductions are scaled back up
  until the pool keeps ``guard_share`` (30 %) of its capacity — never down to zero. At 50 % it
  held whenever two of three nodes were above the band (a quarter of the time in the simulated
  mix), halving what least load could steer, while the brief's CPU and drop steps (at most
  -50 %) never reach either share on their own; in a large pool it still bounds how much of the
  new flows the cold nodes can draw.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from probes.duration import Duration
from probes.mesh.policy import PolicyError, finite_fields

Signal = Literal["cpu", "drops", "effective_sessions", "sessions", "packets", "bytes"]
SIGNALS: tuple[Signal, ...] = ("cpu", "drops", "effective_sessions", "sessions", "packets",
                               "bytes")


class Step(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """At or above ``at`` the node's weight is cut by ``cut`` (0.2 = "-20 %")."""

    at: float
    cut: float


class SignalSteps(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A step table over one load signal.

    With ``proportional`` the cut is not stepped but interpolated linearly between the steps
    (none below the first ``at``, the last step's cut past the last ``at``; the first step may
    cut 0, the start of the ramp): the response follows the load without jumps, and needs no
    hysteresis (the dead band keeps small moves off the balancers).

    ``cpu`` is the busy share 0..1; ``drops`` the share of packets dropped (softnet, UDP receive
    buffer, interface, qdisc drops over packets); ``effective_sessions`` / ``sessions`` count
    sessions; ``packets`` / ``bytes`` are per second. With ``relative`` the value compared is the
    node's figure per unit of capacity divided by the pool's mean per unit of capacity (1.0 = an
    average node), so the table says how much busier than its peers a node may be; it applies
    only while that mean is at least ``min_mean`` (an idle pool's ratios are noise: 0.02 sessions
    is "twice" 0.01). A relative cut is a preference between peers, not lost capacity: the cuts
    are taken relative to the pool's least-cut serving node, which keeps its full weight.
    """

    signal: Signal
    steps: list[Step]
    relative: bool = False
    min_mean: float = 0.0
    proportional: bool = False


def _default_steps() -> list[SignalSteps]:
    return [
        SignalSteps("cpu", [Step(0.75, 0.2), Step(0.85, 0.5)]),
        SignalSteps("drops", [Step(0.001, 0.2), Step(0.01, 0.5)]),
        SignalSteps("effective_sessions", [Step(0.9, 0.0), Step(1.1, 0.9)],
                    relative=True, min_mean=1.0, proportional=True),
    ]


class WeightPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``weights:`` section of the mesh config. Weights are percent of a node's nominal
    weight (its balancer's configured weight): 100 = a full share, 0 = no new flows."""

    enabled: bool = False
    # EWMA of every load signal: a sample's pull halves every half-life of time since the last
    half_life_seconds: Duration = 0.5
    # weights are recomputed at most this often; ``max_step_percent`` bounds one recomputation
    step_seconds: Duration = 1.0
    steps: list[SignalSteps] = msgspec.field(default_factory=_default_steps)
    # a step is left only once its signal fell this share below the step's ``at`` (0.05 = 5 %
    # below): a signal hovering at a threshold does not flip the weight every second
    step_hysteresis: float = 0.05
    degraded_cap_percent: float = 50.0  # a DEGRADED node's weight never exceeds this
    # a node back from DOWN, MAINTENANCE or DRAINING starts at slow_start_initial_percent and
    # ramps linearly to its full weight over slow_start_seconds (0: no slow start)
    slow_start_seconds: Duration = 60.0
    slow_start_initial_percent: float = 10.0
    max_step_percent: float = 50.0  # load-driven change per step (states apply at once)
    floor_percent: float = 10.0  # load alone never takes an available node below this
    # the sum of the available nodes' weights (x capacity) never falls below this share of their
    # capacity at their caps: if load cuts would go further, the cuts are scaled back
    guard_share: float = 0.3
    # a published weight moves only when the new one differs by at least this many points
    # (reaching 0, a cap or the full weight is always published)
    dead_band_percent: float = 5.0
    # a node's load older than this is no evidence: its load cuts lapse (weight back to its cap)
    load_stale_after_seconds: Duration = 10.0
    # a drain is finished when the node's effective sessions (its active ones, when its protocols
    # give no bytes) are at or below this: its clients stopped moving traffic there
    drain_done_sessions: float = 0.0


def _within(value: float, path: str, low: float, high: float = float("inf"), *,
            open_low: bool = False, open_high: bool = False, why: str = "") -> None:
    """Raise unless ``low <= value <= high`` (strict at an open end)."""
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        span = (f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
                if high != float("inf") else f"{'>' if open_low else '>='} {low:g}")
        raise PolicyError(f"must be {'in ' if high != float('inf') else ''}{span}{why}, "
                          f"got {value}", path)


def validate_weight_policy(policy: WeightPolicy, prefix: str = "weights") -> WeightPolicy:
    """Check ranges and cross-field rules; raise :class:`PolicyError` naming the field."""
    p = prefix
    finite_fields(policy, p)
    _within(policy.half_life_seconds, f"{p}.half_life_seconds", 0, open_low=True)
    _within(policy.step_seconds, f"{p}.step_seconds", 0, open_low=True)
    seen: set[tuple[str, bool]] = set()
    for i, table in enumerate(policy.steps):
        at = f"{p}.steps[{i}]"
        key = (table.signal, table.relative)
        if key in seen:
            raise PolicyError(f"a second table for {table.signal!r}", f"{at}.signal")
        seen.add(key)
        if not table.steps:
            raise PolicyError("at least one step", f"{at}.steps")
        if table.steps[-1].cut <= 0:
            raise PolicyError("a table that cuts nothing", f"{at}.steps")
        _within(table.min_mean, f"{at}.min_mean", 0)
        if table.min_mean and not table.relative:
            raise PolicyError("only for a relative table", f"{at}.min_mean")
        previous: Step | None = None
        for j, step in enumerate(table.steps):
            here = f"{at}.steps[{j}]"
            finite_fields(step, here)
            _within(step.at, f"{here}.at", 0)
            ramp_start = table.proportional and j == 0  # where a proportional cut starts
            _within(step.cut, f"{here}.cut", 0, 1, open_low=not ramp_start, open_high=True,
                    why=" (a share of the weight; states, not load, take a node to 0)")
            if previous is not None and not (step.at > previous.at and step.cut > previous.cut):
                raise PolicyError("steps must rise: each a higher 'at' and a deeper 'cut' "
                                  "than the one before", here)
            previous = step
    _within(policy.step_hysteresis, f"{p}.step_hysteresis", 0, 1, open_high=True)
    _within(policy.degraded_cap_percent, f"{p}.degraded_cap_percent", 0, 100)
    _within(policy.slow_start_seconds, f"{p}.slow_start_seconds", 0)
    _within(policy.slow_start_initial_percent, f"{p}.slow_start_initial_percent", 0, 100)
    _within(policy.max_step_percent, f"{p}.max_step_percent", 0, 100, open_low=True)
    _within(policy.floor_percent, f"{p}.floor_percent", 0, 100, open_low=True,
            why=" (load never takes a node to 0)")
    _within(policy.guard_share, f"{p}.guard_share", 0, 1)
    _within(policy.dead_band_percent, f"{p}.dead_band_percent", 0, 100, open_high=True)
    _within(policy.load_stale_after_seconds, f"{p}.load_stale_after_seconds", 0, open_low=True)
    _within(policy.drain_done_sessions, f"{p}.drain_done_sessions", 0)
    return policy
