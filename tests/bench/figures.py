"""The headline figures of a benchmark run, gathered for one table at its end.

Each benchmark prints its figures where it measures them, with their detail. It also records the
headline ones here, one :func:`record` call per figure: ours, the peer or floor measured in the
same run beside it, and the load average then. ``tests/bench/conftest.py`` prints them all as one
table when the run ends, so ``make bench`` (or ``make bench-perf``) shows every comparison from
one run side by side, each ratio computed from the two figures of that run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


@dataclass(frozen=True, slots=True)
class Figure:
    what: str  # what is measured, and how much of the product's path it includes
    ours: float
    unit: str  # of ours and of the peer alike
    peer: float | None = None  # the peer or floor, measured in the same run the same way
    peer_name: str = ""
    target: str = ""  # the target, as text ("<= 90 us", ">= 2.5x")
    load: tuple[float, float, float] = field(default_factory=_load)

    @property
    def ratio(self) -> float | None:
        """ours / peer: above 1 ours is the larger (more probes per CPU-s, or more CPU)."""
        if self.peer is None or self.peer == 0 or not math.isfinite(self.peer):
            return None
        return self.ours / self.peer


RECORDED: list[Figure] = []


def record(what: str, ours: float, unit: str, *, peer: float | None = None,
           peer_name: str = "", target: str = "") -> None:
    """One figure of this run for the closing table (it is printed where measured as well)."""
    RECORDED.append(Figure(what, ours, unit, peer, peer_name, target))


def number(value: float) -> str:
    """Three significant figures at most, thousands grouped: 4,021 / 87.3 / 0.642."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(figures: list[Figure]) -> list[str]:
    """The figures as aligned text rows (a header first): figure, ours, peer, ratio, target,
    load average."""
    rows = [("figure", "ours", "peer or floor, same run", "ours/peer", "target", "load")]
    for f in figures:
        peer = "" if f.peer is None else f"{f.peer_name}: {number(f.peer)} {f.unit}"
        # two decimals down to 0.01, then three significant figures: a stall cut 200-fold
        # reads 0.00449x, not 0.00x
        ratio = "" if f.ratio is None else (f"{f.ratio:.2f}x" if abs(f.ratio) >= 0.01
                                            else f"{f.ratio:.3g}x")
        rows.append((f.what, f"{number(f.ours)} {f.unit}", peer, ratio, f.target,
                     " ".join(f"{x:.1f}" for x in f.load)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]
