"""Corroboration on demand: when one vantage sees a check of a node begin to fail, ask the other
vantages that probe the node to re-probe it now, in the reply to their next batch.

A majority forms when the second vantage's probes fail; without this, that waits for the second
vantage's next slots (with three vantages at a 2 s interval, ~1 s on average). Asked now, it
takes one handshake time. Who is asked for what comes from the engine
(:meth:`probes.mesh.decision.DecisionEngine.corroboration_asks`: the same check at every other
fresh, unimpaired vantage that has not answered since, and for an L4 failure its functional
checks too); this module bounds it so that a flood of failures cannot become a probe storm:

* per node: each (node, check) is asked about at most once per ``node_cooldown_seconds``;
* per agent: a token bucket of ``agent_rate`` requests per second (bursts of twice that);
* a request not delivered within ``max_delay_seconds`` (the agent sent no batch since) is
  dropped: by then the agent's own schedule has probed the check anyway.

The agent bounds what it honours once more (``agent.max_reprobe_rate``). Requests change no
verdict by themselves — they only make evidence arrive sooner — so none of this is journaled:
a replay decides the same verdicts from the same observations. Every request is counted:
``sent``, or dropped by ``cooldown``, ``agent-rate`` or ``expired``.
"""

from __future__ import annotations

import math
from collections import deque

import msgspec

from probes.mesh.decision import DecisionEngine

RESULTS = ("sent", "cooldown", "agent-rate", "expired")
MAX_QUEUED = 10_000  # per agent: a vantage that never reports again cannot grow it without end


class ReprobePolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The mesh config's ``reprobe:`` section (corroboration on demand)."""

    enabled: bool = True
    node_cooldown_seconds: float = 5.0  # each (node, check) asked about at most once per this
    agent_rate: float = 20.0  # requests per second per agent; bursts of twice this
    max_delay_seconds: float = 2.0  # a request older than this when its agent reports: dropped


class ReprobePlanner:
    """Turns the engine's asks into per-agent queues, delivered by :meth:`take`."""

    def __init__(self, policy: ReprobePolicy) -> None:
        self.policy = policy
        self._queues: dict[str, deque[tuple[str, str, float]]] = {}
        self._asked: dict[tuple[str, str], float] = {}
        self._tokens: dict[str, tuple[float, float]] = {}  # agent -> (tokens, at)
        self.counts: dict[str, int] = dict.fromkeys(RESULTS, 0)

    def plan(self, engine: DecisionEngine, now: float) -> None:
        """Queue the requests for the failures the engine's last observe() saw begin."""
        if not self.policy.enabled:
            return
        cooldown = self.policy.node_cooldown_seconds
        counts = self.counts
        for ask in engine.corroboration_asks(now):
            asked: set[tuple[str, str]] = set()
            for peer, checks in ask.peers:
                for check in checks:
                    key = (ask.node, check)
                    if now - self._asked.get(key, -math.inf) < cooldown:
                        counts["cooldown"] += 1
                        continue
                    asked.add(key)  # every peer is asked; the cooldown starts after them
                    if not self._spend(peer, now):
                        counts["agent-rate"] += 1
                        continue
                    queue = self._queues.setdefault(peer, deque(maxlen=MAX_QUEUED))
                    queue.append((ask.node, check, now))
            for key in asked:
                self._asked[key] = now
        if len(self._asked) > MAX_QUEUED:
            self._asked = {k: t for k, t in self._asked.items() if now - t < cooldown}

    def take(self, agent: str, now: float) -> list[tuple[str, str]]:
        """The requests for ``agent`` (it just sent a batch): the reply carries them."""
        queue = self._queues.get(agent)
        if not queue:
            return []
        out: list[tuple[str, str]] = []
        seen: set[tuple[str, str]] = set()
        oldest = now - self.policy.max_delay_seconds
        while queue:
            node, check, at = queue.popleft()
            if at < oldest:
                self.counts["expired"] += 1
            elif (node, check) not in seen:
                seen.add((node, check))
                out.append((node, check))
        self.counts["sent"] += len(out)
        return out

    def _spend(self, agent: str, now: float) -> bool:
        rate = self.policy.agent_rate
        burst = 2 * rate
        tokens, at = self._tokens.get(agent, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens < 1:
            self._tokens[agent] = (tokens, now)
            return False
        self._tokens[agent] = (tokens - 1, now)
        return True


def policy_problems(policy: ReprobePolicy, path: str = "$.reprobe") -> list[tuple[str, str]]:
    """(field path, message) for every value out of range."""
    out = []
    for name in ("node_cooldown_seconds", "agent_rate", "max_delay_seconds"):
        value = getattr(policy, name)
        if not (math.isfinite(value) and value >= 0):
            out.append((f"{path}.{name}", f"must be a finite number >= 0, got {value}"))
    return out
