"""Builders shared by the mesh tests: observations, fleets, engines."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

from probes.mesh.decision import DecisionEngine, NodeInfo
from probes.mesh.policy import DecisionPolicy
from probes.model import Observation, Quality, Reason, Verdict, VerdictState

OPERATOR_TOKEN = "operator-secret-token-for-the-tests-0123"  # 32 bytes at least

_seq = itertools.count(1)


def obs(
    node: str,
    vantage: str,
    ok: bool,
    *,
    check: str = "wg",
    kind: str = "wireguard.handshake",
    reason: Reason | None = None,
    quality: Quality | None = None,
    seq: int | None = None,
    at: float = 0.0,
) -> Observation:
    return Observation(
        node=node,
        check=check,
        vantage=vantage,
        seq=next(_seq) if seq is None else seq,
        wall_time=at,
        ok=ok,
        reason=(Reason.OK if ok else Reason.TIMEOUT) if reason is None else reason,
        duration_seconds=0.01,
        kind=kind,
        quality=quality,
    )


def fleet(nodes: int, pool_of: int | None = None) -> list[NodeInfo]:
    """``nodes`` nodes named n0.., in pools of ``pool_of`` (one pool when None)."""
    size = pool_of or nodes
    return [
        NodeInfo(f"n{i}", f"p{i // size}", pop=f"pop{i % 3}", region="eu") for i in range(nodes)
    ]


def engine(
    nodes: int = 1, policy: DecisionPolicy | None = None, pool_of: int | None = None
) -> DecisionEngine:
    return DecisionEngine(policy or DecisionPolicy(), fleet(nodes, pool_of))


def states(eng: DecisionEngine) -> dict[str, VerdictState]:
    return {name: node.state for name, node in eng.nodes.items()}


def round_of(
    eng: DecisionEngine,
    now: float,
    results: dict[tuple[str, str], bool],
    **kw: object,
) -> list[Verdict]:
    """One observation per (node, vantage) at ``now``."""
    batch = [obs(n, v, ok, at=now, **kw) for (n, v), ok in results.items()]  # type: ignore[arg-type]
    return eng.observe(batch, now)


def everyone(
    nodes: Iterable[str], vantages: Iterable[str], ok: bool
) -> dict[tuple[str, str], bool]:
    return {(n, v): ok for n in nodes for v in vantages}


def write_mesh_config(
    folder: Path,
    nodes: int,
    agents: Iterable[str],
    *,
    port: int = 9480,
    extra: str = "",
    pool_of: int | None = None,
    infos: Iterable[NodeInfo] | None = None,
) -> Path:
    """A mesh config with fresh keys (one per agent) and an operator token, in ``folder``.
    Nodes: ``nodes`` named n0.. in pools of ``pool_of``, or exactly ``infos`` when given."""
    from probes.model.signing import generate_key, write_key_file

    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"listen: 127.0.0.1:{port}",
        "database: mesh.db",
        "operator_token_file: token",
        "agents:",
    ]
    for agent in agents:
        write_key_file(folder / f"{agent}.key", generate_key() + "\n")
        lines.append(f"  - {{name: {agent}, key_file: {agent}.key}}")
    lines.append("nodes:")
    for info in fleet(nodes, pool_of) if infos is None else infos:
        lines.append(f"  - {{id: {info.node}, pool: {info.pool}, pop: {info.pop}, "
                     f"region: {info.region}}}")
    write_key_file(folder / "token", OPERATOR_TOKEN + "\n")
    path = folder / "mesh.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path
