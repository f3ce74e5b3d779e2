"""``tunnelwatch lab up|down|status``: a lab that outlives the command, for poking at by hand.

``lab up`` builds namespaces, a router and a fleet of real servers, writes agent configs for
every agent into the lab directory, prints where everything is, and leaves it running.
``lab down`` tears a lab down from its state file (processes by PID, then namespaces);
``lab status`` lists running labs, whether their processes are alive and whether their owner
(the process that built them) still runs; ``lab down --orphans`` tears down the labs whose owner
is gone (a test run killed with SIGKILL, a crashed demo), and leaves every other lab alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _up(args: argparse.Namespace) -> int:
    from probes.lab import Lab  # noqa: PLC0415 - keeps the CLI start fast
    from probes.lab.fleet import Fleet  # noqa: PLC0415

    lab = Lab("cli", keep_dir=True)
    try:
        nodes = [f"node{i + 1}" for i in range(args.nodes)]
        agents = [f"agent{i + 1}" for i in range(args.agents)]
        fleet = Fleet.build(lab, nodes, agents)
        configs = [fleet.agent_config(a, lab.dir / "agents") for a in agents]
    except BaseException:
        lab.close()
        raise
    print(f"lab {lab.run_id} is up; files in {lab.dir}")
    for node in fleet.nodes.values():
        print(f"  {node.name:<8} ns {node.host.ns:<22} {node.host.address:<12} "
              f"wg :{node.wireguard.port} ({node.wireguard.interface}) "
              f"openvpn {node.openvpn.proto}:{node.openvpn.port} ike :500")
    for agent in fleet.agents.values():
        print(f"  {agent.name:<8} ns {agent.host.ns:<22} {agent.host.address:<12}")
    for cfg in configs:
        print(f"  agent config: {cfg}")
    print(f"run commands inside with: ip netns exec {lab.prefix}agent1 ...")
    print(f"tear down with: tunnelwatch lab down {lab.run_id}")
    # leave it running: processes are in their own sessions and outlive this command
    return 0


def _down(args: argparse.Namespace) -> int:
    from probes.lab import destroy, list_labs  # noqa: PLC0415
    from probes.lab.topology import orphans  # noqa: PLC0415

    if args.orphans:  # only labs whose owner is gone; with run ids, only those of them
        found = orphans()
        ids = [i for i in found if i in args.run_ids] if args.run_ids else found
        if not ids:
            print("no orphaned labs")
            return 0
    else:
        ids = [lab["run_id"] for lab in list_labs()] if args.all else args.run_ids
    if not ids:
        print("nothing to tear down (give a run id, --orphans or --all)", file=sys.stderr)
        return 2
    known = {lab["run_id"] for lab in list_labs()}
    code = 0
    for run_id in ids:
        removed = destroy(run_id)
        if not removed and run_id not in known:  # a typo must not look like a clean teardown
            print(f"tunnelwatch lab down: no lab {run_id!r} (tunnelwatch lab status lists them)",
                  file=sys.stderr)
            code = 2
            continue
        print(f"lab {run_id}: removed {len(removed)} item(s)")
        for item in removed:
            print(f"  {item}")
    return code


def _status(args: argparse.Namespace) -> int:
    from probes.lab import leftovers, list_labs  # noqa: PLC0415
    from probes.lab.topology import orphans, owner_alive  # noqa: PLC0415

    labs = list_labs()
    stateless = [i for i in orphans() if i not in {lab["run_id"] for lab in labs}]
    if not labs and not stateless:
        print("no labs running")
    for lab in labs:
        alive = [x for x in leftovers(lab["run_id"]) if x.startswith("process")]
        owner = "running" if owner_alive(lab) else "GONE (orphan: tunnelwatch lab down --orphans)"
        print(f"lab {lab['run_id']} ({lab['name']}), owner pid {lab['owner_pid']} {owner}, "
              f"dir {lab['dir']}: {len(lab.get('hosts', {}))} hosts, "
              f"{len(alive)}/{len(lab.get('processes', []))} processes alive")
        for name, address in lab.get("hosts", {}).items():
            print(f"  {name:<10} {address}")
        if args.verbose_status:
            for p in lab.get("processes", []):
                state = "alive" if Path(f"/proc/{p['pid']}").exists() else "gone"
                print(f"    pid {p['pid']:<8} {p['label']:<30} {state}")
    for run_id in stateless:
        print(f"lab {run_id}: namespaces without a state file (orphan: "
              "tunnelwatch lab down --orphans)")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("lab", help="build, list or tear down a lab of real VPN servers")
    lab_sub = p.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    up = lab_sub.add_parser("up", help="build a lab and leave it running")
    up.add_argument("--nodes", type=int, default=1)
    up.add_argument("--agents", type=int, default=1)
    up.set_defaults(handler=_up)
    down = lab_sub.add_parser("down", help="tear down labs by run id")
    down.add_argument("run_ids", nargs="*")
    down.add_argument("--all", action="store_true", help="every lab on this machine")
    down.add_argument("--orphans", action="store_true",
                      help="the labs whose owner process is gone (with run ids: only those)")
    down.set_defaults(handler=_down)
    status = lab_sub.add_parser("status", help="list labs")
    status.add_argument("--processes", dest="verbose_status", action="store_true")
    status.set_defaults(handler=_status)
