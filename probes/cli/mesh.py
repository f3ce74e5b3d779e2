"""``tunnelwatch mesh --config F`` (serve) and ``tunnelwatch mesh replay --config F --observations
obs.jsonl`` (run the engine over a recorded stream, print verdict changes as JSON lines)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from typing import Any

from probes.config import ConfigError
from probes.mesh.store import StoreError
from probes.model import SchemaError, encode
from probes.model.signing import KeyFileError
from probes.paths.asn import AsnTableError
from probes.startup import StartupError, os_error_line

EXIT_OK, EXIT_USAGE = 0, 2


def _load(path: str) -> Any:
    from probes.mesh.config import load_mesh_config  # noqa: PLC0415 - keep CLI start-up light

    return load_mesh_config(path)


def serve(args: argparse.Namespace) -> int:
    from probes.mesh.server import serve as run  # noqa: PLC0415

    logging.getLogger().setLevel(getattr(logging, args.log_level.upper()))
    try:
        cfg = _load(args.config)
        run(cfg)
    except (ConfigError, KeyFileError, StoreError, AsnTableError, StartupError) as exc:
        print(f"tunnelwatch mesh: {exc}", file=sys.stderr)  # one line: the operator's to fix
        return EXIT_USAGE
    except OSError as exc:  # a file or folder it may not use, or that is not there
        print(f"tunnelwatch mesh: {os_error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def replay(args: argparse.Namespace) -> int:
    from probes.mesh.paths import PathEngine  # noqa: PLC0415
    from probes.mesh.replay import parse_lines, replay_weights  # noqa: PLC0415
    from probes.mesh.replay import replay as run  # noqa: PLC0415
    from probes.mesh.server import open_table  # noqa: PLC0415
    from probes.mesh.weights import WeightEngine  # noqa: PLC0415

    try:
        cfg = _load(args.config)
        table = open_table(cfg)  # the live mesh's path evidence, as it would find it
    except (ConfigError, AsnTableError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    try:
        stream = sys.stdin.buffer if args.observations == "-" else open(args.observations, "rb")  # noqa: SIM115
    except OSError as exc:
        print(f"{args.observations}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    out = sys.stdout.buffer
    try:
        with stream:
            # the engines the live mesh runs: verdicts carry weights and path evidence as there
            changes: Iterable[Any] = (
                replay_weights(cfg.decision, cfg.node_infos(), cfg.weights, cfg.weight_nodes(),
                               parse_lines(stream), tick_seconds=cfg.tick_seconds)
                if args.weights
                else run(cfg.decision, cfg.node_infos(), parse_lines(stream), cfg.tick_seconds,
                         weights=(WeightEngine(cfg.weights, cfg.weight_nodes())
                                  if cfg.weights.enabled else None),
                         paths=PathEngine(cfg.paths, table, {n.id for n in cfg.nodes})))
            for change in changes:
                out.write(encode(change) + b"\n")
    except SchemaError as exc:
        out.flush()
        print(f"{args.observations}: {exc.path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out.flush()
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("mesh", help="run the decision mesh (or replay a recorded stream)")
    p.add_argument("--config", required=False, help="mesh config file (YAML)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.set_defaults(handler=_dispatch)
    inner = p.add_subparsers(dest="mesh_command", metavar="SUBCOMMAND")
    r = inner.add_parser("replay", help="run the engine over recorded observations (JSON lines)")
    r.add_argument("--config", required=True, help="mesh config file (YAML): nodes and policy")
    r.add_argument(
        "--observations", required=True, help="JSON lines of observations or batches ('-': stdin)"
    )
    r.add_argument("--weights", action="store_true",
                   help="print the weight changes (the stream's load reads through the config's "
                        "weights policy) instead of the verdict changes")
    r.set_defaults(handler=replay)


def _dispatch(args: argparse.Namespace) -> int:
    if not args.config:
        print("tunnelwatch mesh: --config is required", file=sys.stderr)
        return EXIT_USAGE
    return serve(args)
