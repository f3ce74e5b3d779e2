"""``tunnelwatch keygen wireguard --agent NAME``: a probe identity for one agent.

One key per agent per node (shared keys break handshakes; see docs/probes/wireguard.md). This
writes ``NAME.key`` (private, 0600), ``NAME.pub`` and, with ``--psk``, ``NAME.psk`` (0600) using
wireguard-tools, then prints the node-side ``[Peer]`` stanza and the equivalent ``wg set`` line.

With ``--ssh [USER@]HOST`` it also provisions the peer on the node over SSH (asyncssh), printing
the exact remote command first; ``--remove`` removes the agent's peer instead. The preshared key
travels on the SSH channel's stdin (``preshared-key /dev/stdin``), never on a command line.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probes.checks.remote import KnownHosts, ssh_output

_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class KeygenError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    agent: str
    private_key_file: Path
    public_key: str
    preshared_key_file: Path | None


def _wg(args: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True,
                              check=False, timeout=10)
    except FileNotFoundError:
        raise KeygenError("`wg` (wireguard-tools) is not installed") from None
    if done.returncode != 0:
        raise KeygenError(f"wg {args[0]} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _write_secret(path: Path, text: str) -> None:
    # create with 0600 from the start: never a moment where the key is world-readable
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")


def generate(agent: str, directory: Path, *, psk: bool, force: bool) -> AgentIdentity:
    if not agent or not set(agent) <= _NAME_OK or agent.startswith("."):
        raise KeygenError("--agent must be letters, digits, '-', '_' or '.'")
    directory.mkdir(parents=True, exist_ok=True)
    key_file, pub_file = directory / f"{agent}.key", directory / f"{agent}.pub"
    psk_file = directory / f"{agent}.psk" if psk else None
    targets = [p for p in (key_file, pub_file, psk_file) if p is not None]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise KeygenError(f"{existing[0]} exists (use --force to replace the identity)")
    for path in existing:
        path.unlink()
    private = _wg(["genkey"])
    public = _wg(["pubkey"], stdin=private + "\n")
    _write_secret(key_file, private)
    pub_file.write_text(public + "\n")
    if psk_file is not None:
        _write_secret(psk_file, _wg(["genpsk"]))
    return AgentIdentity(agent, key_file, public, psk_file)


def wg_set_argv(interface: str, public_key: str, allowed_ip: str | None, psk_path: str | None,
                remove: bool = False) -> list[str]:
    if remove:
        return ["wg", "set", interface, "peer", public_key, "remove"]
    argv = ["wg", "set", interface, "peer", public_key]
    if psk_path is not None:
        argv += ["preshared-key", psk_path]
    if allowed_ip is not None:
        argv += ["allowed-ips", allowed_ip]
    return argv


def peer_stanza(identity: AgentIdentity, allowed_ip: str | None) -> str:
    lines = ["[Peer]", f"# tunnelwatch probe agent {identity.agent}",
             f"PublicKey = {identity.public_key}"]
    if identity.preshared_key_file is not None:
        lines.append(f"PresharedKey = <contents of {identity.preshared_key_file}>")
    if allowed_ip is not None:
        lines.append(f"AllowedIPs = {allowed_ip}")
    return "\n".join(lines)


async def provision_ssh(target: str, argv: list[str], stdin: str | None, *, port: int = 22,
                        known_hosts: str | None = None, timeout: float = 15.0) -> None:
    """Run ``argv`` on ``target`` (``[user@]host``) over SSH, feeding ``stdin``; KeygenError on
    any failure. ``known_hosts``: a file, "none" to skip host key checks, or the user's default."""
    user, _, host = target.rpartition("@")
    checked: KnownHosts = () if known_hosts is None else None if known_hosts == "none" \
        else known_hosts
    await ssh_output(host, shlex.join(argv), error=KeygenError, username=user or None,
                     port=port, known_hosts=checked, stdin=stdin, timeout=timeout)


def _read_public(directory: Path, agent: str) -> str:
    try:
        return (directory / f"{agent}.pub").read_text().strip()
    except OSError as exc:
        raise KeygenError(f"cannot read {directory / f'{agent}.pub'}: {exc.strerror}") from None


def _wireguard(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    try:
        if args.allowed_ip is not None:
            ipaddress.ip_network(args.allowed_ip)
        if args.remove and not args.ssh:
            raise KeygenError("--remove needs --ssh (it removes the peer on the node)")
    except (ValueError, KeygenError) as exc:
        print(f"tunnelwatch keygen: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.remove:
            public = _read_public(directory, args.agent)
            argv = wg_set_argv(args.interface, public, None, None, remove=True)
            print(f"remote command on {args.ssh}: {shlex.join(argv)}")
            asyncio.run(provision_ssh(args.ssh, argv, None, port=args.ssh_port,
                                      known_hosts=args.known_hosts))
            print("removed")
            return 0
        identity = generate(args.agent, directory, psk=args.psk, force=args.force)
    except KeygenError as exc:
        print(f"tunnelwatch keygen: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {identity.private_key_file} (0600)"
          + (f" and {identity.preshared_key_file} (0600)" if identity.preshared_key_file else ""))
    print(f"public key: {identity.public_key}\n")
    print("# add to the node's WireGuard config:")
    print(peer_stanza(identity, args.allowed_ip) + "\n")
    psk_local = str(identity.preshared_key_file) if identity.preshared_key_file else None
    print("# or at runtime on the node (copy the .psk file there first):")
    print(shlex.join(wg_set_argv(args.interface, identity.public_key, args.allowed_ip, psk_local)))
    if not args.ssh:
        return 0
    remote_psk = "/dev/stdin" if identity.preshared_key_file else None
    argv = wg_set_argv(args.interface, identity.public_key, args.allowed_ip, remote_psk)
    stdin = identity.preshared_key_file.read_text() if identity.preshared_key_file else None
    print(f"\nremote command on {args.ssh}: {shlex.join(argv)}"
          + ("  (preshared key on stdin)" if stdin else ""))
    try:
        asyncio.run(provision_ssh(args.ssh, argv, stdin, port=args.ssh_port,
                                  known_hosts=args.known_hosts))
    except KeygenError as exc:
        print(f"tunnelwatch keygen: provisioning failed: {exc}", file=sys.stderr)
        return 1
    print("provisioned")
    return 0


def _secret(args: argparse.Namespace) -> int:
    """A random HMAC key or operator token (64 hex characters), mode 600."""
    from probes.model import signing  # noqa: PLC0415 - keeps the CLI start light

    path = Path(args.file)
    if path.exists() and not args.force:
        print(f"tunnelwatch keygen: error: {path} exists (use --force to replace it)",
              file=sys.stderr)
        return 2
    try:
        signing.write_key_file(path, signing.generate_key() + "\n")
    except OSError as exc:
        print(f"tunnelwatch keygen: error: {path}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {path} (0600): give the same file to both ends (agent and mesh, mesh and "
          "webhook receiver), or use it as operator_token_file")
    return 0


def _secrets(args: argparse.Namespace) -> int:
    from probes.cli.check_config import load_any  # noqa: PLC0415 - keeps the CLI start light
    from probes.config import ConfigError  # noqa: PLC0415
    from probes.model import signing  # noqa: PLC0415

    path = Path(args.config)
    try:
        load_any(path, args.kind)
    except ConfigError as exc:
        missing = sorted({p.missing_secret for p in exc.problems if p.missing_secret})
        for name in missing:
            file = Path(name)
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                signing.write_key_file(file, signing.generate_key() + "\n")
            except OSError as err:
                print(f"tunnelwatch keygen: error: {file}: {err.strerror}", file=sys.stderr)
                return 2
            print(f"wrote {file} (0600)")
    try:
        what = load_any(path, args.kind)
    except ConfigError as exc:
        print(f"keys written; the config still has problems:\n{exc}", file=sys.stderr)
        return 2
    print(f"{path}: ok ({what})")
    return 0


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("keygen", help="create probe identities (one per agent per node)")
    kinds = parser.add_subparsers(dest="keygen_kind", required=True, metavar="KIND")
    wg = kinds.add_parser("wireguard", help="a WireGuard key pair for one agent",
                          description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    wg.add_argument("--agent", required=True, help="agent name (file names derive from it)")
    wg.add_argument("--dir", default=".", help="where to write the key files (default .)")
    wg.add_argument("--psk", action="store_true", help="also create a preshared key")
    wg.add_argument("--allowed-ip", metavar="A.B.C.D/32",
                    help="the agent's tunnel address on the node (its AllowedIPs)")
    wg.add_argument("--interface", default="wg0", help="the node's WireGuard interface")
    wg.add_argument("--force", action="store_true", help="replace existing key files")
    wg.add_argument("--ssh", metavar="[USER@]HOST", help="provision the peer on this node")
    wg.add_argument("--ssh-port", type=int, default=22)
    wg.add_argument("--known-hosts", help="known_hosts file for --ssh ('none' disables checking)")
    wg.add_argument("--remove", action="store_true",
                    help="with --ssh: remove this agent's peer from the node")
    wg.set_defaults(handler=_wireguard)
    secret = kinds.add_parser("secret", help="an HMAC key or operator token file (mode 600)")
    secret.add_argument("file", help="where to write it")
    secret.add_argument("--force", action="store_true", help="replace an existing file")
    secret.set_defaults(handler=_secret)
    secrets = kinds.add_parser(
        "secrets", help="every missing key and token file a config names (throwaway keys)",
        description="Create every HMAC key and token file CONFIG names that does not exist yet "
                    "(64 random hex characters, mode 600, folders made as needed), then check "
                    "the config. For trying out an example: a real deployment gives each agent's "
                    "key to that agent and the mesh only (docs/operations.md).")
    secrets.add_argument("config", help="an agent or mesh config file")
    secrets.add_argument("--kind", choices=("agent", "mesh"), help="default: from its keys")
    secrets.set_defaults(handler=_secrets)
