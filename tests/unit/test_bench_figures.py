"""The closing table of a benchmark run (tests/bench/figures.py, printed by its conftest)."""

from __future__ import annotations

import math

from tests.bench.figures import Figure, number, table


def test_ratio_is_ours_over_the_peer_of_the_same_run() -> None:
    assert Figure("x", 3_000.0, "probes/CPU-s", peer=1_500.0).ratio == 2.0
    assert Figure("x", 1.0, "ms").ratio is None  # no peer: no ratio
    assert Figure("x", 1.0, "ms", peer=0.0).ratio is None
    assert Figure("x", 1.0, "ms", peer=math.nan).ratio is None


def test_table_rows_line_up_with_every_column() -> None:
    rows = table([
        Figure("TCP bare probe loop", 12_345.6, "probes/CPU-s", peer=4_000.0,
               peer_name="blackbox", target=">= 4x", load=(5.0, 4.25, 3.0)),
        Figure("RSS", 104.26, "MB", target="<= 110 MB", load=(1.0, 1.0, 1.0)),
    ])
    assert rows[0].split()[:2] == ["figure", "ours"]
    assert "12,346 probes/CPU-s" in rows[1] and "blackbox: 4,000 probes/CPU-s" in rows[1]
    assert "3.09x" in rows[1] and ">= 4x" in rows[1] and rows[1].endswith("5.0 4.2 3.0")
    assert "104 MB" in rows[2] and "x " not in rows[2]
    # the columns start at the same offset in every row
    assert rows[1].index("12,346") == rows[2].index("104 MB") == rows[0].index("ours")


def test_numbers_keep_three_significant_figures() -> None:
    assert [number(v) for v in (4021.4, 87.31, 0.6423, math.inf)] == [
        "4,021", "87.3", "0.642", "inf"]


def test_a_ratio_far_below_one_keeps_its_figures() -> None:
    """A loop stall cut from 879 ms to 3.95 ms is a ratio of 0.0045, not "0.00x"."""
    rows = table([Figure("stall", 3.95, "ms", peer=879.0, peer_name="one step")])
    assert "0.00449x" in rows[1]
    rows = table([Figure("cpu", 47.7, "ms", peer=655.0, peer_name="one step")])
    assert "0.07x" in rows[1]
