"""``tunnelwatch drain NODE [--wait] [--timeout S]`` and ``tunnelwatch ready NODE``.

``drain`` puts a node in DRAINING through the mesh's operator API: every balancer stops sending it
new flows (HAProxy ``drain``, nftlb ``off``, weight 0 in webhooks) while its existing sessions
continue. With ``--wait`` it then follows the node's effective sessions (sessions that moved
traffic lately, from ``telemetry.load``) and returns once they are at or below the mesh's
``weights.drain_done_sessions``: the node can be restarted without cutting anyone off. Exit 0
when drained, 1 at ``--timeout`` (the sessions left are printed), 2 on usage or API errors.

``ready`` clears the admin state; the node returns to the probes' verdict and, once UP, to its
full weight through slow start (docs/weights.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
POLL_SECONDS = 1.0


class ApiError(Exception):
    pass


def _call(url: str, method: str = "GET", token: str | None = None,
          body: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    if not url.startswith(("http://", "https://")):
        raise ApiError(f"not an http(s) URL: {url!r}")
    request = urllib.request.Request(url, data=data, method=method,  # noqa: S310 - checked above
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310 - checked
            answer: dict[str, Any] = json.load(resp)
            return answer
    except urllib.error.HTTPError as exc:
        text = exc.read()[:200].decode(errors="replace")
        raise ApiError(f"{method} {url}: HTTP {exc.code} {text}") from None
    except (OSError, ValueError) as exc:
        raise ApiError(f"{method} {url}: {exc}") from None


def _mesh(args: argparse.Namespace) -> tuple[str, str | None]:
    """The mesh's URL and the operator token (flag, $TUNNELWATCH_TOKEN or the config's file)."""
    url = args.url
    token_file = args.token_file
    if args.config:
        from probes.mesh.config import load_mesh_config  # noqa: PLC0415

        cfg = load_mesh_config(args.config)
        host, port = cfg.listen_host_port()
        url = url or f"http://{host}:{port}"
        token_file = token_file or cfg.operator_token_file
    token = os.environ.get("TUNNELWATCH_TOKEN")
    if token_file:
        token = Path(token_file).read_text().strip()
    return (url or "http://127.0.0.1:9480").rstrip("/"), token


def drain_progress(view: dict[str, Any]) -> tuple[bool | None, str]:
    """(done, what to say) from ``GET /v1/nodes/{id}``."""
    drain = view.get("drain")
    if drain is None:
        if view.get("state") != "DRAINING":
            return None, f"not draining (state {view.get('state')})"
        return None, "no session counts (weights off, or no telemetry.load for this node)"
    effective = drain.get("effective_sessions")
    sessions = drain.get("sessions")
    counts = (f"{effective:g} effective sessions" if effective is not None
              else f"{sessions} sessions" if sessions is not None else "no fresh session count")
    if drain["done"] is None:
        return None, counts
    return bool(drain["done"]), f"{counts} (done at <= {drain['bound']:g})"


def _admin(args: argparse.Namespace, action: str) -> tuple[str, dict[str, Any]] | None:
    """POST the operator action; (mesh URL, answer), or None after saying what failed."""
    try:
        url, token = _mesh(args)
        return url, _call(f"{url}/v1/nodes/{args.node}/{action}", "POST", token,
                          {"actor": args.actor})
    except (ApiError, OSError, ValueError) as exc:
        print(f"{action} {args.node}: {exc}", file=sys.stderr)
        return None


def handle_drain(args: argparse.Namespace) -> int:
    done_admin = _admin(args, "drain")
    if done_admin is None:
        return EXIT_USAGE
    url, answer = done_admin
    print(f"{args.node}: {answer.get('state')} (no new flows; existing sessions continue)")
    if not args.wait:
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    said = ""
    while True:
        try:
            done, text = drain_progress(_call(f"{url}/v1/nodes/{args.node}"))
        except ApiError as exc:
            done, text = None, str(exc)
        if text != said:
            print(f"  {text}", flush=True)
            said = text
        if done:
            print(f"{args.node}: drained, safe to restart")
            return EXIT_OK
        if time.monotonic() >= deadline:
            print(f"{args.node}: not drained after {args.timeout:g} s: {text}")
            return EXIT_FAILED
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def handle_ready(args: argparse.Namespace) -> int:
    done_admin = _admin(args, "ready")
    if done_admin is None:
        return EXIT_USAGE
    print(f"{args.node}: {done_admin[1].get('state')} (back to the probes' verdict; weight "
          "returns through slow start)")
    return EXIT_OK


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("node", help="node id")
    p.add_argument("--url", help="mesh URL (default: from --config, else http://127.0.0.1:9480)")
    p.add_argument("--config", help="mesh config file: its listen address and token file")
    p.add_argument("--token-file", help="operator token file (default: $TUNNELWATCH_TOKEN or "
                                        "the config's operator_token_file)")
    p.add_argument("--actor", default=os.environ.get("USER", "operator"),
                   help="who, for the audit log")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("drain", help="take a node out of new-flow selection; --wait for its "
                                     "sessions to leave")
    _common(p)
    p.add_argument("--wait", action="store_true", help="wait until its sessions have left")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="give up waiting after this many seconds (default 900: the brief's "
                        "5-15 minutes)")
    p.set_defaults(handler=handle_drain)
    r = sub.add_parser("ready", help="return a drained node to service (through slow start)")
    _common(r)
    r.set_defaults(handler=handle_ready)
