"""``tunnelwatch paths``: path evidence by hand (docs/paths.md).

* ``paths lookup ADDR...``: which network the ASN table puts each address in — check a table
  before handing it to the mesh;
* ``paths trace HOST``: one trace from here, as an agent takes it (root or CAP_NET_RAW), hops
  with their networks;
* ``paths localise --traces FILE``: recorded traces in (JSON lines: a trace, a batch with
  traces, or ``{"now": t, "trace": {...}}``), the localisation the mesh would make out (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import msgspec

from probes.model import PathTrace, SchemaError, TraceProtocol

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _table(args: argparse.Namespace) -> Any:
    from probes.paths.asn import EMPTY, load_table  # noqa: PLC0415

    if not args.asn_table:
        return EMPTY
    return load_table(args.asn_table, args.asn_names, args.local_asn)


def lookup(args: argparse.Namespace) -> int:
    from probes.paths.asn import AsnTableError  # noqa: PLC0415

    try:
        table = _table(args)
    except AsnTableError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    for address in args.address:
        network = table.lookup(address)
        print(f"{address}\t{network.label}\t{network.describe()}")
    return EXIT_OK


def trace(args: argparse.Namespace) -> int:
    from probes.checks.traceroute import TraceUnavailable  # noqa: PLC0415
    from probes.checks.traceroute import trace as run  # noqa: PLC0415
    from probes.protocols.traceroute import TraceSpec  # noqa: PLC0415

    table = _table(args)
    spec = TraceSpec(source="", target=args.host, protocol=TraceProtocol(args.protocol),
                     port=args.port, flows=tuple(range(args.sport, args.sport + args.flows)),
                     big_size=args.big, max_ttl=args.max_ttl, probe_timeout=args.timeout)
    try:
        result = asyncio.run(run(spec))
    except (TraceUnavailable, OSError, ValueError) as exc:
        print(f"trace: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for flow in result.flows:
        print(f"flow sport {flow.sport}, {flow.size} bytes: {flow.stop.value}")
        for hop in flow.hops:
            where = table.lookup(hop.addr).describe() if hop.addr else ""
            rtt = f"{hop.rtt_seconds * 1000:.3f} ms" if hop.rtt_seconds is not None else ""
            extra = f" mtu {hop.mtu}" if hop.mtu else ""
            print(f"  {hop.ttl:3d}  {hop.addr or '*':<40} {rtt:>12}  {where}"
                  f"{'  ' + hop.reply.value if hop.reply else ''}{extra}")
    return EXIT_OK


def _records(lines: Any) -> list[tuple[float, PathTrace]]:
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            if isinstance(raw, dict) and "trace" in raw:
                trace = msgspec.convert(raw["trace"], PathTrace)
                out.append((float(raw.get("now", trace.wall_time)), trace))
            elif isinstance(raw, dict) and "traces" in raw:
                out.extend((t.wall_time, t) for t in msgspec.convert(raw["traces"],
                                                                      list[PathTrace]))
            else:
                trace = msgspec.convert(raw, PathTrace)
                out.append((trace.wall_time, trace))
        except (ValueError, msgspec.ValidationError) as exc:
            raise SchemaError(f"line {number}: {exc}") from None
    return out


def localise(args: argparse.Namespace) -> int:
    from probes.mesh.paths import PathEngine  # noqa: PLC0415
    from probes.paths.asn import AsnTableError  # noqa: PLC0415

    try:
        table = _table(args)
        with open(args.traces) as stream:
            records = _records(stream)
    except (AsnTableError, OSError, SchemaError) as exc:
        print(f"paths localise: {exc}", file=sys.stderr)
        return EXIT_USAGE
    nodes = {t.node for _, t in records}
    engine = PathEngine(table=table, nodes=nodes)
    now = 0.0
    for now, item in records:
        engine.ingest([item], now)
    wanted = [args.node] if args.node else sorted(nodes)
    out = {node: engine.node_view(node, now)["localisation"] for node in wanted}
    print(json.dumps(out, indent=2))
    return EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("paths", help="path evidence: ASN lookups, one trace, offline "
                                     "localisation")
    inner = p.add_subparsers(dest="paths_command", metavar="SUBCOMMAND", required=True)

    def table_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--asn-table", help="pyasn IPASN file, MRT RIB dump or bgpdump -m lines")
        q.add_argument("--asn-names", help="AS names: asnames.json or 'asn name' lines")
        q.add_argument("--local-asn", type=int, help="AS of the router that dumped its own RIB")

    q = inner.add_parser("lookup", help="the network of each address in the ASN table")
    table_args(q)
    q.add_argument("address", nargs="+")
    q.set_defaults(handler=lookup)

    q = inner.add_parser("trace", help="trace the path to a host as an agent does (root)")
    table_args(q)
    q.add_argument("host", help="IPv4 address")
    q.add_argument("--protocol", choices=[p.value for p in TraceProtocol], default="udp")
    q.add_argument("--port", type=int, default=51820, help="destination port (UDP/TCP)")
    q.add_argument("--flows", type=int, default=4, help="source ports, one flow each")
    q.add_argument("--sport", type=int, default=61000, help="the first flow's source port")
    q.add_argument("--big", type=int, default=1500, help="large DF probe size; 0: none")
    q.add_argument("--max-ttl", type=int, default=30)
    q.add_argument("--timeout", type=float, default=1.0, help="seconds per probe")
    q.set_defaults(handler=trace)

    q = inner.add_parser("localise", help="the mesh's localisation of recorded traces")
    table_args(q)
    q.add_argument("--traces", required=True, help="JSON lines of traces (or batches)")
    q.add_argument("--node", help="only this node")
    q.set_defaults(handler=localise)
