"""Pieces of the Prometheus text exposition format written by hand, byte for byte what
``prometheus_client.generate_latest`` writes: the agent's and the mesh's ``/metrics`` write their
per-target and per-node lines themselves (in slices, or kept between scrapes) instead of
through the registry."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.utils import floatToGoString

_library_float: Callable[[float], str] = floatToGoString  # typed


def go_float(value: float) -> str:
    """The library's value formatting (``floatToGoString``), byte for byte. Inside (-1e6, 1e6)
    that is ``repr``: Go's formatting only differs for infinities, NaN and large numbers, where
    it switches to exponents sooner. Nearly every value of an exposition is there (counts,
    seconds), and a scrape formats ~25,000 of them for a 4,000-target agent."""
    if -1e6 < value < 1e6:
        return repr(float(value))
    return _library_float(value)


def escape_label_value(value: str) -> str:
    """A label value as the text format (and generate_latest) writes it."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
