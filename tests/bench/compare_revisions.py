"""The protocol benchmarks of two revisions side by side (run by hand, not collected by pytest).

    flock /work/.bench.lock .venv/bin/python tests/bench/compare_revisions.py BASE [--rounds 3]

BASE is a git revision (checked out into a temporary worktree, removed afterwards) or the path
of a checkout. Both revisions' own benchmark files run with this interpreter (each tree first
on ``PYTHONPATH``), alternately, ``--rounds`` times, so a change of the machine's load falls on
both sides alike. Each figure is the median over the rounds; the ratio is this tree's figure
over BASE's, and ``change`` says by how much this tree is worse (+) or better (-) for the
figure's direction. The load average is printed with every round.

Figures: WireGuard client CPU per handshake (in memory), IKEv2 initiator time per
SA_INIT+IKE_AUTH per proposal (in memory), OpenVPN reset probes per second and client CPU per
tls probe against a real OpenVPN server, IKEv2 auth probe wall time against strongSwan, and the
agent's TCP and UDP probes per CPU-second, and the mesh's observations per CPU-second (with and
without its snapshot children) and decision p99 under load and idle (``--only mesh``: that bench
alone, ~1.5 min per run).

    flock /work/.bench.lock .venv/bin/python tests/bench/compare_revisions.py BASE --shared \
        [--this REV] [--rounds 5] [--only GROUP]

measures like for like instead: the same script, this tree's tests/bench/same_driver.py, runs
against each revision's code (its ``probes`` first on ``sys.path``), the two sides alternating
and their order swapped every round. A revision's own benchmark file may measure differently
(another clock, sample count or span), which the default mode would count as a change of the
code. ``--this`` measures a revision in place of this working tree. Beside the change of the
medians, ``paired`` is the median of the rounds' own ratios and ``best`` compares each side's
best round (load only adds cost).

    .venv/bin/python tests/bench/compare_revisions.py --lines COMMIT [COMMIT ...]

prints instead how many lines of probes/ each commit added or removed: physical lines, and code
lines (not blank, not a comment, not a docstring), and their sums: a change's size when other
work landed between its commits. The last line gives probes/ at HEAD beside probes/ without the
commits' change (HEAD minus the sums).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Figure:
    name: str
    pattern: str  # one group: the number (unused by --shared, whose script names its figures)
    unit: str
    lower_is_better: bool


@dataclass(frozen=True)
class Bench:
    test: str
    figures: tuple[Figure, ...]


PROPOSALS = ("aes256gcm16-prfsha256-curve25519", "aes256gcm16-prfsha256-ecp256",
             "aes256gcm16-prfsha384-ecp384", "aes256-sha256-modp2048")
BENCHES = (
    Bench("tests/bench/test_wireguard_bench.py::test_client_cpu_per_handshake", (
        Figure("wireguard client CPU/handshake",
               r"client CPU per completed handshake: ([\d.]+) us", "us", True),)),
    Bench("tests/bench/test_ikev2_bench.py::test_initiator_cpu_per_auth", tuple(
        Figure(f"ikev2 initiator {p.split('-')[-1]}",
               re.escape(p) + r": initiator CPU per SA_INIT\+IKE_AUTH ([\d.]+) ms", "ms", True)
        for p in PROPOSALS)),
    Bench("tests/bench/test_openvpn_bench.py::test_openvpn_probe_bench", (
        Figure("openvpn reset probes/s", r"openvpn reset probes: ([\d,]+)/s sequential", "/s",
               False),
        Figure("openvpn tls probe client CPU", r"tls probe: client CPU ([\d.]+) ms", "ms", True),
    )),
    Bench("tests/bench/test_ikev2_bench.py::test_probe_wall_time_against_strongswan", (
        Figure("ikev2 auth probe wall (strongSwan)", r"auth: median ([\d.]+) ms", "ms", True),)),
    Bench("tests/bench/test_agent_bench.py::test_probes_per_cpu_second_vs_blackbox", (
        Figure("agent tcp probes/CPU-s",
               r"agent tcp connect .*-> +([\d.]+) probes/CPU-s", "/CPU-s", False),
        Figure("agent udp probes/CPU-s",
               r"agent udp request/response .*-> +([\d.]+) probes/CPU-s", "/CPU-s", False),
    )),
    Bench("tests/bench/test_mesh_bench.py::test_mesh_ingest_throughput_and_latency", (
        Figure("mesh obs/CPU-s (mesh process)",
               r"mesh process [\d.]+ CPU-s = ([\d,]+) obs/CPU-s", "/CPU-s", False),
        Figure("mesh obs/CPU-s (+ snapshot children)",
               r"after the last batch: ([\d,]+) obs/CPU-s counting them", "/CPU-s", False),
        Figure("mesh decision p99 at 80 % of max rate",
               r"deciding requests: p50 [\d.]+ ms, p99 ([\d.]+) ms", "ms", True),
        Figure("mesh decision p99, idle mesh",
               r"decision latency on an idle mesh .*p99 ([\d.]+) ms", "ms", True),
    )),
)


def _spread(values: list[float]) -> str:
    return "[" + " ".join(f"{v:g}" for v in values) + "]"


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


SHARED_GROUPS = ("wireguard", "ikev2", "openvpn", "ikev2_lab", "agent")
SHARED_FIGURES: dict[str, Figure] = {}  # as same_driver.py names them, in the order seen


def _run_shared(tree: Path, group: str) -> dict[str, float]:
    """``same_driver.py``'s figures for ``group`` measured on ``tree``'s code (their units and
    directions land in ``SHARED_FIGURES``)."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "tests/bench/same_driver.py"), str(tree), group],
        capture_output=True, text=True, check=False)
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("FIGURE "):
            name, value, unit, better = line[len("FIGURE "):].rsplit(" ", 3)
            found[name] = float(value)
            SHARED_FIGURES[name] = Figure(name, "", unit, better == "lower")
    if proc.returncode != 0 or not found:
        print(f"    {tree}: {group} exit {proc.returncode}\n{proc.stderr[-2000:]}",
              file=sys.stderr)
    return found


def _run(tree: Path, bench: Bench) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "slow", "-s", "-q", "-p", "no:cacheprovider",
         bench.test], cwd=tree, env=env, capture_output=True, text=True, check=False)
    found = {}
    for figure in bench.figures:
        match = re.search(figure.pattern, proc.stdout)
        if match:
            found[figure.name] = float(match.group(1).replace(",", ""))
    if proc.returncode != 0 or len(found) != len(bench.figures):
        print(f"    {tree.name}: {bench.test} exit {proc.returncode}, "
              f"{len(found)}/{len(bench.figures)} figures\n{proc.stdout[-2000:]}",
              file=sys.stderr)
    return found


def _sizes(source: str | None) -> tuple[int, int]:
    """(physical lines, code lines) of a module's source; (0, 0) when it does not exist."""
    if source is None:
        return 0, 0
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docstrings.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    code = {line for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type not in skip for line in range(tok.start[0], tok.end[0] + 1)}
    return len(source.splitlines()), len(code - docstrings)


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(HERE), *args], capture_output=True, text=True,
                          check=False)


def line_counts(commits: list[str]) -> None:
    total_physical = total_code = 0
    for commit in commits:
        changed = _git("diff", "--no-renames", "--name-only", f"{commit}^", commit, "--",
                       "probes").stdout.split()
        physical = code = 0
        for path in (p for p in changed if p.endswith(".py")):
            sides = []
            for rev in (f"{commit}^", commit):
                shown = _git("show", f"{rev}:{path}")
                sides.append(_sizes(shown.stdout if shown.returncode == 0 else None))
            physical += sides[1][0] - sides[0][0]
            code += sides[1][1] - sides[0][1]
        total_physical += physical
        total_code += code
        subject = _git("log", "-1", "--format=%s", commit).stdout.strip()[:60]
        print(f"{commit[:8]}  physical {physical:+6d}  code {code:+6d}  {subject}")
    print(f"{'sum':<8}  physical {total_physical:+6d}  code {total_code:+6d}")
    # both sides for the same behaviour: probes/ as it is, and as it would be without the
    # commits' change (other work since the first of them grew probes/ as well)
    now_physical = now_code = 0
    for path in _git("ls-tree", "-r", "--name-only", "HEAD", "--", "probes").stdout.split():
        if path.endswith(".py"):
            physical, code = _sizes(_git("show", f"HEAD:{path}").stdout)
            now_physical += physical
            now_code += code
    print(f"probes/ at HEAD: physical {now_physical}  code {now_code}; without these commits: "
          f"physical {now_physical - total_physical}  code {now_code - total_code}")


@contextlib.contextmanager
def _checkout(revision: str, scratch: str, name: str) -> Iterator[Path]:
    """``revision``'s tree: the directory itself, or a temporary detached worktree of it."""
    if Path(revision).is_dir():
        yield Path(revision)
        return
    tree = Path(scratch) / name
    subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(tree), revision],
                   check=True, capture_output=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(tree)],
                       check=False)


def _worse(figure: Figure, base: float, this: float) -> float:
    """By how many percent ``this`` is worse than ``base`` (negative: better)."""
    return (this / base - 1) * 100 if figure.lower_is_better else (base / this - 1) * 100


def _table(rows: list[tuple[Figure, list[float], list[float]]], rounds: int) -> None:
    """One line a figure: (figure, base values, this tree's values). ``change`` compares the
    medians over the rounds; ``paired`` is the median of each round's own this/base ratio (the
    two sides of a round ran back to back, so a load that drifts between rounds cancels);
    ``best`` compares the best round of each side (the least CPU, the most probes)."""
    print(f"\n{'figure':<38} {'base':>10} {'this':>10} {'this/base':>9} {'change':>8} "
          f"{'paired':>7} {'best':>7}  unit   (median of {rounds} alternating rounds; load now "
          f"{_loadavg()})")
    for figure, old, new in rows:
        if not old or not new:
            print(f"{figure.name:<38} {'missing':>10}")
            continue
        best = min if figure.lower_is_better else max
        a, b = statistics.median(old), statistics.median(new)
        paired = "-"  # a round that lost one side's figure would pair the rest wrongly
        if len(old) == len(new):
            ratio = statistics.median(y / x for x, y in zip(old, new, strict=True))
            paired = f"{_worse(figure, 1.0, ratio):+6.1f}%"
        print(f"{figure.name:<38} {a:10.3f} {b:10.3f} {b / a:9.3f} "
              f"{_worse(figure, a, b):+7.1f}% {paired:>7} "
              f"{_worse(figure, best(old), best(new)):+6.1f}%  {figure.unit}   base "
              f"{_spread(old)} this {_spread(new)}")


def main() -> int:
    if sys.argv[1:2] == ["--lines"]:
        line_counts(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="git revision or checkout directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="", help="run the benches (or with --shared the "
                        "groups) whose name contains this")
    parser.add_argument("--shared", action="store_true",
                        help="one measuring script (same_driver.py) for both revisions")
    parser.add_argument("--this", default=str(HERE),
                        help="the revision or checkout to compare (default: this tree)")
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {"base": {}, "this": {}}
    with (tempfile.TemporaryDirectory(prefix="tw-base-") as scratch,
          _checkout(args.base, scratch, "base") as base,
          _checkout(args.this, scratch, "this") as this):
        for round_ in range(args.rounds):
            sides = [("base", base), ("this", this)]
            if args.shared and round_ % 2:  # neither side always runs first
                sides.reverse()
            jobs = ([(g, functools.partial(_run_shared, group=g)) for g in SHARED_GROUPS
                     if args.only in g] if args.shared else
                    [(b.test, functools.partial(_run, bench=b)) for b in BENCHES
                     if args.only in b.test])
            for label, job in jobs:
                for side, tree in sides:
                    print(f"round {round_ + 1} {side:<4} load {_loadavg()}  {label}", flush=True)
                    for name, value in job(tree).items():
                        figures[side].setdefault(name, []).append(value)
    shown = (SHARED_FIGURES.values() if args.shared else
             [f for b in BENCHES if args.only in b.test for f in b.figures])
    _table([(f, figures["base"].get(f.name, []), figures["this"].get(f.name, []))
            for f in shown], args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
