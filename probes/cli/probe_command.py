"""``tunnelwatch probe <command>`` for every probe command a check family declares: the
subcommand's flags built from its options struct, and its run (the contract is
:class:`probes.checks.base.ProbeCommand`'s)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from probes.checks.base import ConfigError, Planned, ProbeCommand, plan_once
from probes.cli.probe import add_common_arguments, run_and_report, usage_error
from probes.config import parse_host_port, split_host_port
from probes.configref import field_comment
from probes.duration import DURATION_EXTRA, parse_duration

_DEST = "option:"  # namespace prefix of the options' flags (apart from --timeout, --json, ...)


def default_state_dir() -> Path:
    """Where the one-shot CLI keeps what checks remember between runs (WireGuard timestamps)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tunnelwatch"


def _flags(command: ProbeCommand[Any], name: str) -> list[str]:
    generated = "--" + name.replace("_", "-")
    older = [flag for flag, field in command.aliases.items() if field == name]
    return [generated, *(flag for flag in older if flag != generated)]


def _base_type(t: mi.Type) -> mi.Type:
    """``X | None`` -> ``X``."""
    if isinstance(t, mi.UnionType):
        rest = [u for u in t.types if not isinstance(u, mi.NoneType)]
        if len(rest) == 1:
            return rest[0]
    return t


def _duration(text: str) -> float:
    """A duration flag: seconds, or ``500ms``, ``2s``, ``1m30s`` as in the config."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected hex digits, got {text!r}") from None


_SCALARS: dict[type[mi.Type], Any] = {mi.IntType: int, mi.FloatType: float, mi.StrType: str,
                                      mi.BytesType: _hex}


def _help(command: ProbeCommand[Any], f: mi.Field) -> str:
    text = field_comment(command.options, f.name)
    default = command.defaults.get(f.name, f.default)
    if default not in (msgspec.NODEFAULT, None, False, "", (), []):
        shown = ", ".join(default) if isinstance(default, tuple | list) else default
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return text.replace("%", "%%")


def _add_option(parser: argparse.ArgumentParser, command: ProbeCommand[Any],
                f: mi.Field) -> None:
    t = _base_type(f.type)
    settings: dict[str, Any] = {"dest": _DEST + f.name, "default": argparse.SUPPRESS,
                                "help": _help(command, f)}
    if isinstance(t, mi.BoolType):
        settings["action"] = argparse.BooleanOptionalAction
    elif isinstance(t, mi.LiteralType):
        settings.update(choices=t.values, type=type(t.values[0]))
    elif isinstance(t, mi.ListType | mi.VarTupleType):
        settings.update(action="append", type=_SCALARS[type(t.item_type)],
                        metavar=f.name.upper())
    elif isinstance(t, mi.Metadata) and t.extra == DURATION_EXTRA:
        settings.update(type=_duration, metavar=f.name.upper())
    else:
        settings.update(type=_SCALARS[type(t)], metavar=f.name.upper())
    if f.required and f.name not in command.defaults:
        settings["required"] = True
    parser.add_argument(*_flags(command, f.name), **settings)
    for flag, field in command.negated.items():
        if field == f.name:
            parser.add_argument(flag, dest=_DEST + f.name, action="store_false",
                                default=argparse.SUPPRESS, help=f"{f.name}: off")


def add_command(sub: Any, command: ProbeCommand[Any]) -> None:
    parser = sub.add_parser(command.name, help=command.help,
                            description=command.description or command.help)
    node = "HOST:PORT" if command.port_required else "HOST[:PORT]"
    parser.add_argument("--endpoint", metavar=node, help="the node: a name, IPv4 or [IPv6]")
    for name in command.positional:
        parser.add_argument(f"positional_{name}", metavar=name.upper(), nargs="?",
                            type=int if name == "port" else str,
                            help=f"the node's {name} (older spelling of --endpoint)")
    info = mi.type_info(command.options)
    assert isinstance(info, mi.StructType)
    # the node's port comes with --endpoint; a --port of its own only where the older spelling
    # named the host alone (``probe quic HOST --port N``)
    port_flag = command.positional == ("host",)
    for f in info.fields:
        if f.name != "host" and (f.name != "port" or port_flag):
            _add_option(parser, command, f)
    if command.state_files:
        parser.add_argument("--state-file", metavar="F",
                            help="what the check keeps between runs (default: "
                                 f"{default_state_dir() / command.state_files[0]})")
        parser.add_argument("--no-state", action="store_true",
                            help="keep nothing (a stepped-back clock may then be refused)")
    add_common_arguments(parser, default_timeout=command.default_timeout)
    parser.set_defaults(handler=lambda args: run_command(command, args))


def _node(command: ProbeCommand[Any], args: argparse.Namespace) -> tuple[str, int | None]:
    host = getattr(args, "positional_host", None)
    port = getattr(args, "positional_port", None)
    if args.endpoint is not None:
        if host is not None:
            raise ValueError("give the node either with --endpoint or positionally, not both")
        if command.port_required:
            return parse_host_port(args.endpoint)
        return split_host_port(args.endpoint)
    if host is None:
        form = "HOST PORT" if "port" in command.positional else "HOST"
        raise ValueError("--endpoint is required" + (f" (or {form})" if command.positional
                                                     else ""))
    if command.port_required and port is None:
        raise ValueError("the node's PORT is required")
    return host, port


def _where(command: ProbeCommand[Any], path: str) -> str:
    """A problem's field path ("$.canary") as the flags that set it ("--canary/--ping: ")."""
    name = path.removeprefix("$").lstrip(".").split(".", 1)[0].split("[", 1)[0]
    return "/".join(_flags(command, name)) + ": " if name else ""


def choose(command: ProbeCommand[Any], args: argparse.Namespace) -> Planned:
    """The check the arguments ask for. ValueError or ConfigError: a usage error."""
    host, port = _node(command, args)
    given = {key.removeprefix(_DEST): value for key, value in vars(args).items()
             if key.startswith(_DEST)}
    state_dir = None if getattr(args, "no_state", False) else default_state_dir()
    state_files = ({command.state_files[0]: args.state_file}
                   if getattr(args, "state_file", None) else {})
    return plan_once(command, host, port, given, state_dir=state_dir, state_files=state_files,
                     where=lambda path: _where(command, path))


def run_command(command: ProbeCommand[Any], args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        return usage_error("--timeout must be > 0")
    try:
        chosen = choose(command, args)
    except (ValueError, ConfigError) as exc:
        return usage_error(str(exc))
    return run_and_report(chosen.kind, chosen.params, args.timeout, args.json)
