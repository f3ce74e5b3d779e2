"""The weights benchmark's client mix, simulated: the same arrivals (``mix``), the real weight
engine fed each node's effective sessions once a second (one second late, as the agent's read
is), and a balancer that places each new flow at random by weight, as nftlb's ``numgen`` does.
No packets: it shows what a step table can reach on this mix before a lab run, over many mix and
placement seeds where the lab affords one (the lab run is the figure that counts).

``.venv/bin/python -m tests.bench.weights_mix_sim [--seeds N] [--lag S] [--steps JSON]`` prints
the mean coefficient of variation of node load for equal weights, the weights (the default
policy, or ``--steps '[[1.2, 0.3], [1.5, 0.6]]'`` as the relative effective-session table) and
least-load placement (every flow to the least-loaded node, which no weighted-random balancer can
do: the floor of the mix). ``--lag``: seconds from a load change to the engine's read of it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Callable

from probes.lab.udp_pool import WEIGHTS
from probes.mesh.weight_policy import SignalSteps, Step, WeightPolicy
from probes.mesh.weights import WeightEngine, WeightNode
from probes.model import NodeLoad, VerdictState
from tests.bench.test_weights_bench import LIGHT, RUN, SAMPLE, WARM_UP, cv, mix

NODES = ("node1", "node2", "node3")
TICK = 0.1
Placement = Callable[[dict[str, float], WeightEngine, random.Random], str]


def by_weight(load: dict[str, float], engine: WeightEngine, rng: random.Random) -> str:
    return rng.choices(NODES, weights=[engine.nodes[n].published or 0 for n in NODES])[0]


def at_random(load: dict[str, float], engine: WeightEngine, rng: random.Random) -> str:
    return rng.choice(NODES)


def least_loaded(load: dict[str, float], engine: WeightEngine, rng: random.Random) -> str:
    return min(NODES, key=load.__getitem__)


def simulate(place: Placement, mix_seed: int, place_seed: int,
             policy: WeightPolicy | None = None, lag: float = 1.0) -> float:
    """Mean CV of the nodes' load (in light clients' worth) over the run after the warm-up."""
    policy = policy or WeightPolicy(**{**WEIGHTS, "enabled": True})
    engine = WeightEngine(policy, [WeightNode(n, "udp") for n in NODES])
    for n in NODES:
        engine.set_state(n, VerdictState.UP, 0.0)
    rng = random.Random(place_seed)
    arrivals = mix(RUN, mix_seed)
    flows: list[tuple[float, str, float]] = []  # (leaves at, node, load)
    seen: list[tuple[float, dict[str, float]]] = []  # what a read would have seen, when
    cvs: list[float] = []
    next_read, next_sample = 1.0, WARM_UP + SAMPLE
    for step in range(int(RUN / TICK)):
        now = step * TICK
        flows = [f for f in flows if f[0] > now]
        load = {n: sum(f[2] for f in flows if f[1] == n) for n in NODES}
        seen.append((now, load))
        if now >= next_read:
            past = [s for at, s in seen if at <= now - lag] or [dict.fromkeys(NODES, 0.0)]
            engine.load([(n, NodeLoad(1.0, effective_sessions=past[-1][n])) for n in NODES],
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
    return statistics.fmean(cvs)


def policy_with(steps: list[list[float]] | None) -> WeightPolicy:
    """The lab's weights policy; ``steps`` replaces its relative effective-session table."""
    policy = WeightPolicy(**{**WEIGHTS, "enabled": True})
    if steps is None:
        return policy
    tables = [t for t in policy.steps if t.signal != "effective_sessions"]
    tables.append(SignalSteps("effective_sessions", [Step(at, cut) for at, cut in steps],
                              relative=True, min_mean=1.0))
    return WeightPolicy(**{**WEIGHTS, "enabled": True, "steps": tables})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="mixes (two placements each)")
    parser.add_argument("--lag", type=float, default=1.0)
    parser.add_argument("--steps", type=json.loads, default=None)
    args = parser.parse_args()
    policy = policy_with(args.steps)
    runs = [(m, p) for m in range(1, args.seeds + 1) for p in (0, 1)]
    print(f"mean CV of node load over {len(runs)} simulated runs ({args.seeds} mixes x 2 "
          f"placements), {args.lag:g} s from a load change to its read")
    for name, place in (("equal weights", at_random), ("weights", by_weight),
                        ("least-loaded (floor)", least_loaded)):
        figures = [simulate(place, m, p, policy, args.lag) for m, p in runs]
        over = sum(f > 0.25 for f in figures)
        print(f"{name:22} mean {statistics.fmean(figures):.3f}  max {max(figures):.3f}  "
              f"runs over 0.25: {over}/{len(figures)}")


if __name__ == "__main__":
    main()
