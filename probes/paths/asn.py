"""Which network (AS) an address belongs to, from a table the operator provides. No lookups on
the network, ever: the table is a file, read once.

Formats, told apart by their content (gzip and bzip2 compressed files are opened as such):

* **pyasn's IPASN data** (``pyasn_util_convert.py`` output): ``prefix<TAB>asn`` per line,
  ``;`` comments;
* **an MRT routing table dump** (RFC 6396: RouteViews/RIS ``rib`` files, ``bird``'s
  ``protocol mrt``): origins from the AS paths, see :mod:`probes.paths.mrt`;
* **``bgpdump -m`` lines** (``TABLE_DUMP2|time|B|peer|peer_as|prefix|as_path|...``).

Names come from an optional second file: pyasn's ``asnames.json`` (``{"64500": "NAME"}``) or
``asn name`` lines.

Lookups are longest-prefix matches over the table flattened into disjoint address ranges
(a more specific prefix cuts a hole in the one containing it), so one lookup is one binary
search. An address the table does not know is ``private`` when it is in private or special
address space (RFC 1918, CGN, link-local, ...) and ``unknown`` otherwise.
"""

from __future__ import annotations

import bisect
import bz2
import gzip
import ipaddress
import json
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from probes.paths import mrt

PRIVATE, UNKNOWN = "private", "unknown"


class AsnTableError(ValueError):
    """The table (or names) file cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Network:
    """Where an address is. ``asn`` None: not in the table (``label`` says private/unknown)."""

    asn: int | None
    name: str = ""
    private: bool = False  # private or special-purpose address space

    @property
    def label(self) -> str:
        """What metrics and summaries call it: the AS number, or private / unknown."""
        if self.asn is not None:
            return str(self.asn)
        return PRIVATE if self.private else UNKNOWN

    def describe(self) -> str:
        if self.asn is None:
            return "a private address" if self.private else "an unknown address"
        return f"AS{self.asn}" + (f" ({self.name})" if self.name else "")


class _Ranges:
    """Disjoint [start, end] ranges with a value each, sorted for bisect."""

    def __init__(self, starts: array[int] | list[int], ends: array[int] | list[int],
                 values: array[int]) -> None:
        self.starts, self.ends, self.values = starts, ends, values

    @classmethod
    def build(cls, entries: list[tuple[int, int, int]], wide: bool) -> _Ranges:
        """``entries``: (start, end, asn) of prefixes; more specific ones win."""
        # containing ranges first, so a nested one is met while its container is open
        entries.sort(key=lambda e: (e[0], -e[1]))
        starts: array[int] | list[int] = [] if wide else array("I")
        ends: array[int] | list[int] = [] if wide else array("I")
        values = array("I")

        def emit(lo: int, hi: int, value: int) -> None:
            if lo <= hi:
                starts.append(lo)
                ends.append(hi)
                values.append(value)

        stack: list[tuple[int, int]] = []  # (end, asn) of the open, enclosing prefixes
        pos = 0
        last: tuple[int, int] | None = None
        for start, end, asn in entries:
            if (start, end) == last:
                continue  # the same prefix twice: the first one stays
            last = (start, end)
            while stack and stack[-1][0] < start:
                top_end, top_asn = stack.pop()
                emit(pos, top_end, top_asn)
                pos = top_end + 1
            if stack:
                emit(pos, start - 1, stack[-1][1])
            pos = start
            stack.append((end, asn))
        while stack:
            top_end, top_asn = stack.pop()
            emit(pos, top_end, top_asn)
            pos = top_end + 1
        return cls(starts, ends, values)

    def find(self, value: int) -> int | None:
        i = bisect.bisect_right(self.starts, value) - 1
        if i >= 0 and value <= self.ends[i]:
            return int(self.values[i])
        return None

    def __len__(self) -> int:
        return len(self.values)


class AsnTable:
    """Prefix -> origin AS, plus AS names. Immutable once built."""

    def __init__(self, prefixes: Iterable[tuple[str, int]] = (),
                 names: dict[int, str] | None = None) -> None:
        v4: list[tuple[int, int, int]] = []
        v6: list[tuple[int, int, int]] = []
        count = 0
        for prefix, asn in prefixes:
            net = ipaddress.ip_network(prefix, strict=False)
            start = int(net.network_address)
            (v4 if net.version == 4 else v6).append((start, start + net.num_addresses - 1,
                                                      asn))
            count += 1
        self.prefixes = count
        self._v4 = _Ranges.build(v4, wide=False)
        self._v6 = _Ranges.build(v6, wide=True)
        self.names = dict(names or {})
        self.source = ""

    def lookup(self, address: str) -> Network:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return Network(None)
        table = self._v4 if ip.version == 4 else self._v6
        asn = table.find(int(ip))
        private = not ip.is_global
        if asn is None:
            return Network(None, private=private)
        return Network(asn, self.names.get(asn, ""), private)

    def name(self, asn: int) -> str:
        return self.names.get(asn, "")

    def __len__(self) -> int:
        return self.prefixes


EMPTY = AsnTable()


# ------------------------------------------------------------------------------------ files


def _read(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        if raw[:3] == b"BZh":
            return bz2.decompress(raw)
    except (OSError, EOFError, ValueError) as exc:
        raise AsnTableError(f"{path}: cannot read: {exc}") from None
    return raw


def parse_ipasn(text: str, source: str = "<ipasn>") -> Iterator[tuple[str, int]]:
    """pyasn IPASN lines: ``prefix<TAB>asn``; ``;`` starts a comment."""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise AsnTableError(f"{source} line {number}: expected 'prefix asn', got {line!r}")
        yield _checked(parts[0], parts[1], source, number)


def parse_bgpdump(text: str, source: str = "<bgpdump>") -> Iterator[tuple[str, int]]:
    """``bgpdump -m`` lines: the prefix is field 6, the AS path field 7; origin = its last AS
    (a trailing ``{a,b}`` set counts as its smallest member)."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 7 or not fields[0].startswith("TABLE_DUMP"):
            raise AsnTableError(f"{source} line {number}: not a bgpdump -m TABLE_DUMP line")
        path = fields[6].split()
        if not path:
            continue
        last = path[-1]
        members = last.strip("{}").split(",") if last.startswith("{") else [last]
        if not all(m.isdigit() for m in members):
            raise AsnTableError(f"{source} line {number}: bad AS path {fields[6]!r}")
        yield _checked(fields[5], str(min(int(m) for m in members)), source, number)


def _checked(prefix: str, asn: str, source: str, number: int) -> tuple[str, int]:
    try:
        ipaddress.ip_network(prefix, strict=False)
        value = int(asn)
    except ValueError as exc:
        raise AsnTableError(f"{source} line {number}: {exc}") from None
    if not 0 <= value < 2**32:
        raise AsnTableError(f"{source} line {number}: AS number {value} out of range")
    return prefix, value


def parse_names(data: bytes, source: str = "<names>") -> dict[int, str]:
    """pyasn's asnames JSON, or ``asn name`` lines (``AS`` prefix allowed)."""
    text = data.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
            return {int(k): str(v) for k, v in raw.items()}
        except (ValueError, AttributeError) as exc:
            raise AsnTableError(f"{source}: not an AS names JSON object: {exc}") from None
    names: dict[int, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        head, _, name = line.partition(" ")
        try:
            names[int(head.upper().removeprefix("AS"))] = name.strip()
        except ValueError:
            raise AsnTableError(f"{source} line {number}: expected 'asn name'") from None
    return names


def load_table(path: str | Path, names: str | Path | None = None,
               local_asn: int | None = None) -> AsnTable:
    """Read a table file in any supported format (and a names file)."""
    p = Path(path)
    data = _read(p)
    entries: Iterable[tuple[str, int]]
    if mrt.looks_like_mrt(data):
        try:
            entries = list(mrt.origins(data, local_asn))
        except mrt.MrtError as exc:
            raise AsnTableError(f"{p}: {exc}") from None
    else:
        text = data.decode("utf-8", "replace")
        first = next((line for line in text.splitlines() if line.strip()), "")
        parse = parse_bgpdump if first.startswith("TABLE_DUMP") else parse_ipasn
        entries = list(parse(text, str(p)))
    table = AsnTable(entries, parse_names(_read(Path(names)), str(names)) if names else None)
    table.source = str(p)
    return table
