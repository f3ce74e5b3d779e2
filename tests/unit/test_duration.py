"""Durations in config files: Prometheus-style strings and numbers; the parser and the schema
walk never fail with anything but a reasoned problem (hypothesis)."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.config import AgentConfig, ConfigError, parse_yaml
from probes.configschema import prepare
from probes.duration import parse_duration


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("2s", 2.0), ("1m30s", 90.0), ("1h", 3600.0), ("1d2h", 93600.0),
    ("1w", 604800.0), ("1y", 31536000.0), ("0s", 0.0), ("1m0s500ms", 60.5), (" 2s ", 2.0)])
def test_prometheus_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "2", "2x", "s", "1.5s", "30s1m", "-1s", "1m1m", "2 s"])
def test_not_durations(text: str) -> None:
    with pytest.raises(ValueError, match="expected seconds or a duration"):
        parse_duration(text)


@given(st.lists(st.integers(0, 10_000), min_size=7, max_size=7))
def test_composed_durations_sum_their_parts(parts: list[int]) -> None:
    units = ("y", "w", "d", "h", "m", "s", "ms")
    scale = (31536000, 604800, 86400, 3600, 60, 1, 0.001)
    text = "".join(f"{n}{u}" for n, u in zip(parts, units, strict=True) if n) or "0s"
    assert parse_duration(text) == pytest.approx(sum(n * s for n, s in zip(parts, scale,
                                                                           strict=True)))


@given(st.text(max_size=20))
def test_any_text_is_a_duration_or_a_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        assert parse_duration(text) >= 0


_yaml_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False),
                       st.sampled_from(["2s", "500ms", "x", "127.0.0.1", "tcp", ""]))
_yaml_value: Any = st.recursive(_yaml_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["agent", "vantage", "targets", "tiers", "l4", "id",
                                     "interval", "timeout", "listen", "tcp_ports", "checks",
                                     "address", "pool", "pop", "region", "x"]), inner,
                    max_size=5)), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["agent", "targets", "tiers", "mesh", "paths", "zz"]),
                       _yaml_value, max_size=5))
def test_the_schema_walk_reports_problems_and_never_raises(data: dict[str, Any]) -> None:
    prepared, problems = prepare(data, AgentConfig)
    assert all(path.startswith("$") and message for path, message in problems)
    if not problems:  # what the walk passes, msgspec converts
        msgspec.convert(prepared, AgentConfig, strict=False)


def test_parse_yaml_turns_duration_strings_into_seconds() -> None:
    text = ("agent: {vantage: v}\ntargets: []\n"
            "tiers: {l4: {interval: 1m30s, timeout: 2s, fast_interval: 500ms}}\n")
    cfg, _ = parse_yaml(text, AgentConfig)
    assert (cfg.tiers["l4"].interval, cfg.tiers["l4"].timeout) == (90.0, 2.0)
    with pytest.raises(ConfigError, match=r"\$\.tiers\.l4\.timeout \(line 3\)"):
        parse_yaml(text.replace("2s", "2q"), AgentConfig)
