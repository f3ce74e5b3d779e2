"""Durations in config files: seconds as a number, or a Prometheus-style string.

``interval: 2`` and ``interval: 2s`` mean the same; so do ``0.5`` and ``500ms``, ``90`` and
``1m30s``. The string form is Prometheus's (``[0-9]+`` followed by a unit, units from the
largest to the smallest, each at most once): ``ms``, ``s``, ``m``, ``h``, ``d``, ``w``, ``y``
(a year is 365 days, as in Prometheus). A config field is a duration when its type is
:data:`Duration`; to msgspec it is a plain ``float``, so everything else that converts these
structs (snapshots, the wire) is unchanged, and :mod:`probes.configschema` turns the strings into
seconds before the conversion.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

DURATION_EXTRA = {"duration": True}
Duration = Annotated[float, msgspec.Meta(extra=DURATION_EXTRA)]

_UNITS = (("y", 365 * 86400.0), ("w", 7 * 86400.0), ("d", 86400.0), ("h", 3600.0),
          ("m", 60.0), ("s", 1.0), ("ms", 0.001))
_SYNTAX = re.compile("".join(rf"(?:(?P<{unit}>[0-9]+){unit})?" for unit, _ in _UNITS))


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus-style duration (``"1m30s"`` -> 90.0); ValueError otherwise."""
    match = _SYNTAX.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"expected seconds or a duration like 500ms, 2s or 1m30s, got {text!r}")
    return sum(int(match[unit]) * seconds for unit, seconds in _UNITS if match[unit])


def is_duration(meta: Any) -> bool:
    """Whether a ``msgspec.Meta`` (or anything) marks a :data:`Duration`."""
    return isinstance(meta, msgspec.Meta) and meta.extra == DURATION_EXTRA
