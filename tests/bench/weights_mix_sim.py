"""The weights benchmark's client mix, simulated: the same arrivals (``mix``), the real weight
engine fed each node's effective sessions once a second (one second late, as the agent's read
is), and a balancer that places each new flow at random by weight, as nftlb's ``numgen`` does.
No packets: it shows what a step table can reach on this mix before a lab run, over many mix and
placement seeds where the lab affords one (the lab run is the figure that counts).

``.venv/bin/python -m tests.bench.weights_mix_sim [--seeds N] [--lag S] [--linger S]
[--nodes N] [--steps JSON [--proportional]]`` prints the mean coefficient of variation of node
load for equal weights, the weights and least-load placement (every flow to the least-loaded
node, which no weighted-random balancer can do: the floor of the mix), with the weights' changes
per node and minute (what the balancers are sent) and the share of steps the pool guard held.

* ``--steps '[[1.2, 0.3], [1.5, 0.6]]'``: another relative effective-session table (stepped
  unless ``--proportional``) instead of the default policy's;
* ``--lag``: seconds from a load change to the engine's read of it;
* ``--linger``: seconds a departed client still counts one session in the engine's view (the
  lab pool's effective-session window is 10 s);
* ``--nodes``: a pool of that many nodes (a multiple of 3) with arrivals that many thirds as
  often, so each node sees the same mix: does the policy herd new flows in a bigger pool?
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from probes.lab.udp_pool import WEIGHTS
from probes.mesh.weight_policy import SignalSteps, Step, WeightPolicy
from probes.mesh.weights import WeightEngine, WeightNode
from probes.model import NodeLoad, VerdictState
from tests.bench.test_weights_bench import LIGHT, RUN, SAMPLE, WARM_UP, Arrival, cv, mix

TICK = 0.1
Placement = Callable[[dict[str, float], WeightEngine, random.Random], str]


def by_weight(load: dict[str, float], engine: WeightEngine, rng: random.Random) -> str:
    nodes = list(load)
    return rng.choices(nodes, weights=[engine.nodes[n].published or 0 for n in nodes])[0]


def at_random(load: dict[str, float], engine: WeightEngine, rng: random.Random) -> str:
    return rng.choice(list(load))


def least_loaded(load: dict[str, float], engine: WeightEngine, rng: random.Random) -> str:
    return min(load, key=load.__getitem__)


@dataclass
class Simulated:
    cv: float  # mean over the samples after the warm-up
    changes_per_node_minute: float  # published weight changes
    guard_share: float  # of the weight steps in which the pool guard scaled cuts back


def simulate(place: Placement, mix_seed: int, place_seed: int,
             policy: WeightPolicy | None = None, lag: float = 1.0, nodes: int = 3,
             linger: float = 0.0) -> Simulated:
    """One run: the CV of the nodes' load (in light clients' worth), what the weights did.
    ``linger``: seconds a departed client still counts one effective session in the engine's
    view (the agent's effective-session window: it cannot tell a client gone from one idle)."""
    policy = policy or WeightPolicy(**{**WEIGHTS, "enabled": True})
    names = [f"node{i + 1}" for i in range(nodes)]
    engine = WeightEngine(policy, [WeightNode(n, "udp") for n in names])
    for n in names:
        engine.set_state(n, VerdictState.UP, 0.0)
    rng = random.Random(place_seed)
    scale = nodes / 3  # arrivals as often per node as in the three-node bench
    arrivals = [Arrival(a.at / scale, a.lifetime, a.rate) for a in mix(RUN * scale, mix_seed)]
    flows: list[tuple[float, str, float]] = []  # (leaves at, node, load)
    gone: list[tuple[float, str, float]] = []  # flows that left less than ``linger`` ago
    seen: list[tuple[float, dict[str, float]]] = []  # what a read would have seen, when
    cvs: list[float] = []
    next_read, next_sample = 1.0, WARM_UP + SAMPLE
    for step in range(int(RUN / TICK)):
        now = step * TICK
        gone += [f for f in flows if f[0] <= now]
        flows = [f for f in flows if f[0] > now]
        gone = [f for f in gone if f[0] + linger > now]
        load = dict.fromkeys(names, 0.0)
        for f in flows:
            load[f[1]] += f[2]
        view = dict(load)
        for f in gone:
            view[f[1]] += 1.0
        seen.append((now, view))
        if now >= next_read:
            past = [s for at, s in seen if at <= now - lag] or [dict.fromkeys(names, 0.0)]
            engine.load([(n, NodeLoad(1.0, effective_sessions=past[-1][n])) for n in names],
                        now)
            engine.tick(now)
            next_read += 1.0
        while arrivals and arrivals[0].at <= now:
            arrival = arrivals.pop(0)
            node = place(load, engine, rng)
            flows.append((now + arrival.lifetime, node, arrival.rate / LIGHT))
            load[node] += arrival.rate / LIGHT
        if now >= next_sample:
            cvs.append(cv(list(load.values())))
            next_sample += SAMPLE
    minutes = (RUN / 60) * nodes
    return Simulated(statistics.fmean(cvs), engine.changes_total / minutes,
                     engine.guard_steps_total / max(1.0, RUN / policy.step_seconds))


def policy_with(steps: list[list[float]] | None, proportional: bool = False) -> WeightPolicy:
    """The lab's weights policy; ``steps`` replaces its relative effective-session table."""
    policy = WeightPolicy(**{**WEIGHTS, "enabled": True})
    if steps is None:
        return policy
    tables = [t for t in policy.steps if t.signal != "effective_sessions"]
    tables.append(SignalSteps("effective_sessions", [Step(at, cut) for at, cut in steps],
                              relative=True, min_mean=1.0, proportional=proportional))
    return WeightPolicy(**{**WEIGHTS, "enabled": True, "steps": tables})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="mixes (two placements each)")
    parser.add_argument("--lag", type=float, default=1.0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--linger", type=float, default=0.0,
                        help="seconds a departed client still counts one session (the lab: 10)")
    parser.add_argument("--steps", type=json.loads, default=None)
    parser.add_argument("--proportional", action="store_true")
    args = parser.parse_args()
    policy = policy_with(args.steps, args.proportional)
    runs = [(m, p) for m in range(1, args.seeds + 1) for p in (0, 1)]
    print(f"mean CV of node load over {len(runs)} simulated runs ({args.seeds} mixes x 2 "
          f"placements), {args.nodes} nodes, {args.lag:g} s from a load change to its read, "
          f"departed clients linger {args.linger:g} s")
    for name, place in (("equal weights", at_random), ("weights", by_weight),
                        ("least-loaded (floor)", least_loaded)):
        runs_of = [simulate(place, m, p, policy, args.lag, args.nodes, args.linger)
                   for m, p in runs]
        figures = [r.cv for r in runs_of]
        over = sum(f > 0.25 for f in figures)
        print(f"{name:22} mean {statistics.fmean(figures):.3f}  max {max(figures):.3f}  "
              f"runs over 0.25: {over}/{len(figures)}", end="")
        if place is by_weight:
            print(f"  weight changes/node/min "
                  f"{statistics.fmean(r.changes_per_node_minute for r in runs_of):.1f}  "
                  f"guard held {statistics.fmean(r.guard_share for r in runs_of):.0%} of steps",
                  end="")
        print()


if __name__ == "__main__":
    main()
