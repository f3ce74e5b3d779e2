"""Scripted faults against a running stack, and what each one did, with timings.

A scenario is a list of :class:`Step`: an action (kill a node's OpenVPN, restore it, cut a vantage
off the fleet, inject loss everywhere, ...) and what should follow:

* ``expect_node``/``expect_state``: that node's verdict should become ``expect_state`` and HAProxy
  should take it out of (DOWN) or put it back into (UP) rotation. The step ends when both
  happened, or after ``max_wait`` seconds (then it is reported as missed);
* no expectation: nothing may change. The step holds for ``hold`` seconds and reports every
  verdict change in that window (a DOWN there is a false DOWN) and which vantages the mesh
  judged impaired or stale.

For each step the result has: fault time (wall clock, taken just before the action), verdict
time (the mesh's ``decided_at``), balancer time (first HAProxy poll that saw the change), and
the same for HAProxy's own checks on the ``native`` backend when the stack runs them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from probes.lab import netns
from probes.lab.recorder import Recorder, VerdictEvent
from probes.lab.stack import Stack

Action = Callable[[Stack], None]


@dataclass(frozen=True)
class Step:
    name: str
    action: Action
    expect_node: str | None = None
    expect_state: str | None = None  # "DOWN" | "UP" | ...; None: nothing may change
    max_wait: float = 60.0
    hold: float = 0.0  # seconds to observe after the expectation (or alone, without one)
    settle: bool = False  # wait for the whole fleet to be UP and in rotation before the action
    report_vantages: bool = False  # note which vantages the mesh judged impaired or stale


@dataclass
class StepResult:
    step: Step
    fault_at: float
    verdict_at: float | None = None
    balancer_at: float | None = None
    native_at: float | None = None
    ended_at: float = 0.0
    changes: list[VerdictEvent] = field(default_factory=list)  # every verdict change in the step
    impaired: set[str] = field(default_factory=set)
    stale: set[str] = field(default_factory=set)

    @property
    def to_verdict(self) -> float | None:
        return None if self.verdict_at is None else self.verdict_at - self.fault_at

    @property
    def to_balancer(self) -> float | None:
        return None if self.balancer_at is None else self.balancer_at - self.fault_at

    @property
    def to_native(self) -> float | None:
        return None if self.native_at is None else self.native_at - self.fault_at

    @property
    def met(self) -> bool:
        if self.step.expect_state is None:
            return not self.false_downs
        return self.verdict_at is not None and self.balancer_at is not None

    @property
    def false_downs(self) -> list[VerdictEvent]:
        """DOWN verdicts nobody asked for: any DOWN in a no-change step, other nodes' otherwise."""
        return [c for c in self.changes if c.state == "DOWN"
                and (self.step.expect_state is None or c.node != self.step.expect_node)]


# ---------------------------------------------------------------------- actions


def kill_openvpn(node: str) -> Action:
    return lambda stack: stack.kill_openvpn(node)


def restore_openvpn(node: str) -> Action:
    return lambda stack: stack.restore_openvpn(node)


def kill_vpn(node: str) -> Action:
    return lambda stack: stack.kill_vpn(node)


def restore_vpn(node: str) -> Action:
    return lambda stack: stack.restore_vpn(node)


def isolate_node(node: str) -> Action:
    """The node drops off the network (every packet to and from it dropped at the router)."""
    return lambda stack: stack.lab.partition(stack.fleet.nodes[node].host)


def reconnect_node(node: str) -> Action:
    return lambda stack: stack.lab.heal(stack.fleet.nodes[node].host)


FLEET_CUT_TABLE = "tw_scenario"


def _fleet_cut_rules(stack: Stack, vantages: list[str]) -> str:
    nodes = ", ".join(n.host.address for n in stack.fleet.nodes.values())
    lines = [f"table inet {FLEET_CUT_TABLE} {{", "  chain forward {",
             "    type filter hook forward priority -10; policy accept;"]
    for v in vantages:
        addr = stack.fleet.agents[v].host.address
        lines.append(f"    ip saddr {addr} ip daddr {{ {nodes} }} drop")
        lines.append(f"    ip saddr {{ {nodes} }} ip daddr {addr} drop")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _apply_fleet_cut(stack: Stack, vantages: list[str]) -> None:
    router = stack.lab.router_ns
    netns.run(netns.exec_argv(router, ["nft", "delete", "table", "inet", FLEET_CUT_TABLE]),
              check=False)
    if vantages:
        netns.run(netns.exec_argv(router, ["nft", "-f", "-"]),
                  input_text=_fleet_cut_rules(stack, vantages))


def cut_vantage(agent: str) -> Action:
    """Partition a vantage from the fleet: it cannot reach any node, but still reaches the mesh
    (so the mesh hears it see everything down: an impaired vantage, not a stale one)."""
    return lambda stack: _apply_fleet_cut(stack, [agent])


def heal_vantages() -> Action:
    return lambda stack: _apply_fleet_cut(stack, [])


def loss_everywhere(percent: int) -> Action:
    def act(stack: Stack) -> None:
        for agent in stack.fleet.agents.values():
            stack.lab.set_loss(agent.host, percent)
    return act


def heal_all() -> Action:
    def act(stack: Stack) -> None:
        _apply_fleet_cut(stack, [])
        for host in [a.host for a in stack.fleet.agents.values()] + [
                n.host for n in stack.fleet.nodes.values()]:
            stack.lab.heal(host)
    return act


def together(*actions: Action) -> Action:
    def act(stack: Stack) -> None:
        for a in actions:
            a(stack)
    return act


# ---------------------------------------------------------------------- running


@dataclass
class Scenario:
    stack: Stack
    recorder: Recorder
    out: TextIO | None = None
    table_every: float = 0.0  # print the live table this often during a step (0: never)
    results: list[StepResult] = field(default_factory=list)

    def say(self, text: str) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)

    def run(self, steps: list[Step], deadline: float | None = None) -> list[StepResult]:
        """Run the steps in order; stop starting new ones after ``deadline`` (monotonic)."""
        for step in steps:
            if deadline is not None and time.monotonic() > deadline:
                self.say(f"  (time is up: skipping '{step.name}' and what follows)")
                break
            if step.settle:
                self.stack.wait_settled(120)
            self.results.append(self.run_step(step, deadline))
        return self.results

    def run_step(self, step: Step, deadline: float | None = None) -> StepResult:
        rec, stack = self.recorder, self.stack
        fault_at = time.time()
        step.action(stack)
        result = StepResult(step, fault_at)
        self.say(f"  [{time.strftime('%H:%M:%S')}] {step.name}")
        started = time.monotonic()
        wait_until = started + step.max_wait
        if deadline is not None:
            wait_until = min(wait_until, max(deadline, started + 5))
        next_table = started + self.table_every if self.table_every else float("inf")
        want_rotation = step.expect_state != "DOWN"
        native = bool(stack.options.native_checks)
        if step.expect_state is not None and step.expect_node is not None:
            node = step.expect_node
            while time.monotonic() < wait_until:
                v = rec.first_verdict(node, step.expect_state, fault_at)
                b = rec.first_balancer("vpn", node, want_rotation, fault_at)
                n = rec.first_balancer("native", node, want_rotation, fault_at) if native else None
                result.verdict_at = v.at if v else None
                result.balancer_at = b.at if b else None
                result.native_at = n.at if n else None
                if v and b and (n or not native):
                    break
                next_table = self._maybe_table(next_table)
                time.sleep(0.05)
        hold_until = time.monotonic() + step.hold
        if deadline is not None and step.expect_state is None:
            hold_until = min(hold_until, max(deadline, time.monotonic() + 5))
        while time.monotonic() < hold_until:
            if step.report_vantages:
                self._note_vantages(result)
            next_table = self._maybe_table(next_table)
            time.sleep(0.1)
        result.ended_at = time.time()
        result.changes = rec.verdicts_between(fault_at, result.ended_at)
        if self.table_every and self.out is not None:
            print(live_table(rec, stack), file=self.out, flush=True)
        self.say("      " + describe(result))
        return result

    def _note_vantages(self, result: StepResult) -> None:
        for node in self.recorder.view():
            for vantage, opinion in node.get("vantages", {}).items():
                if opinion == "IMPAIRED":
                    result.impaired.add(vantage)
                elif opinion == "STALE":
                    result.stale.add(vantage)

    def _maybe_table(self, next_table: float) -> float:
        if time.monotonic() < next_table or self.out is None:
            return next_table
        print(live_table(self.recorder, self.stack), file=self.out, flush=True)
        return time.monotonic() + self.table_every


def _fmt(seconds: float | None) -> str:
    return "   -  " if seconds is None else f"{seconds:6.2f}s"


def describe(r: StepResult) -> str:
    s = r.step
    if s.expect_state is not None:
        text = (f"{s.expect_node} -> {s.expect_state}: verdict {_fmt(r.to_verdict).strip()}, "
                f"HAProxy {_fmt(r.to_balancer).strip()}")
        if r.step.expect_state and r.native_at is not None:
            text += f" (HAProxy's own checks: {_fmt(r.to_native).strip()})"
        if not r.met:
            text += "  MISSED"
    else:
        downs = r.false_downs
        text = (f"verdict changes: {len(r.changes)}, false DOWN: {len(downs)}"
                + (f" ({', '.join(d.node for d in downs)})" if downs else ""))
        if r.impaired:
            text += f"; impaired vantages: {', '.join(sorted(r.impaired))}"
        if r.stale:
            text += f"; stale vantages: {', '.join(sorted(r.stale))}"
    return text


def live_table(recorder: Recorder, stack: Stack) -> str:
    """Nodes x vantages: each vantage's opinion, the verdict, HAProxy's view (ours, and its own
    checks' when it runs them), the votes and the failing checks with their reasons."""
    view = recorder.view()
    vantages = sorted(stack.fleet.agents)
    native = bool(stack.options.native_checks)

    def lb(backend: str, name: str) -> str:
        rotation = recorder.in_rotation(backend, name)
        return "-" if rotation is None else ("ready" if rotation else "out")

    lines = [f"    {'node':<7}" + "".join(f"{v:<10}" for v in vantages)
             + f"{'verdict':<10}{'HAProxy':<9}" + (f"{'native':<8}" if native else "")
             + "votes / failing checks"]
    for node in view:
        name = node["node"]
        ops = node.get("vantages", {})
        votes = " ".join(f"{k}={v}" for k, v in node.get("votes", {}).items())
        failing = ", ".join(recorder.failing_checks(name)[:4])
        lines.append(f"    {name:<7}" + "".join(f"{ops.get(v, '-'):<10}" for v in vantages)
                     + f"{node['state']:<10}{lb('vpn', name):<9}"
                     + (f"{lb('native', name):<8}" if native else "")
                     + votes + (f" / {failing}" if failing else ""))
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
