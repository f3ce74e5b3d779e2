"""The operator's ASN table: formats, longest-prefix match, private/unknown marks, bad files."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import ipaddress
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.paths import mrt
from probes.paths.asn import AsnTable, AsnTableError, load_table, parse_bgpdump, parse_ipasn

pytestmark = pytest.mark.paths

DATA = Path(__file__).parent / "data"


# ------------------------------------------------------------------------------ an MRT writer


def _record(mrt_type: int, subtype: int, body: bytes) -> bytes:
    return struct.pack("!IHHI", 1700000000, mrt_type, subtype, len(body)) + body


def _peer_index(peers: list[int]) -> bytes:
    body = struct.pack("!IH", 0x0A000001, 0) + struct.pack("!H", len(peers))
    for i, asn in enumerate(peers):
        body += struct.pack("!B4s4sI", 2, bytes(4), bytes([10, 0, 0, i + 1]), asn)
    return _record(13, 1, body)


def _as_path(*segments: tuple[int, list[int]], size: int = 4) -> bytes:
    value = b"".join(struct.pack("!BB", t, len(a))
                     + b"".join(struct.pack("!I" if size == 4 else "!H", x) for x in a)
                     for t, a in segments)
    return struct.pack("!BBB", 0x40, 2, len(value)) + value


def _rib(prefix: str, entries: list[tuple[int, bytes]], addpath: bool = False) -> bytes:
    net = ipaddress.ip_network(prefix)
    raw = net.network_address.packed[:(net.prefixlen + 7) // 8]
    body = struct.pack("!IB", 0, net.prefixlen) + raw + struct.pack("!H", len(entries))
    for peer, attrs in entries:
        body += struct.pack("!HI", peer, 0) + (struct.pack("!I", 7) if addpath else b"")
        origin = struct.pack("!BBBB", 0x40, 1, 1, 0)
        body += struct.pack("!H", len(origin + attrs)) + origin + attrs
    subtype = (2 if net.version == 4 else 4) + (6 if addpath else 0)
    return _record(13, subtype, body)


def test_mrt_table_dump_v2_origins() -> None:
    seq = mrt.AS_SEQUENCE
    dump = (_peer_index([65000, 65001, 65002])
            + _rib("192.0.2.0/24", [(0, _as_path((seq, [65000, 64510, 64500])))])
            # the origin most peers see wins (MOAS)
            + _rib("198.51.100.0/24", [(0, _as_path((seq, [65000, 64501]))),
                                       (1, _as_path((seq, [65001, 64502]))),
                                       (2, _as_path((seq, [65002, 64502])))])
            # a trailing AS_SET: its smallest member
            + _rib("203.0.113.0/25", [(0, _as_path((seq, [65000]), (mrt.AS_SET, [64999, 64600])))])
            + _rib("2001:db8::/32", [(0, _as_path((seq, [65000, 64496])))])
            + _rib("10.20.0.0/16", [(0, _as_path((seq, [65000, 64497])))], addpath=True)
            # the dumping router's own route: empty AS path
            + _rib("10.30.0.0/16", [(0, b"")]))
    assert list(mrt.origins(dump)) == [
        ("192.0.2.0/24", 64500), ("198.51.100.0/24", 64502), ("203.0.113.0/25", 64600),
        ("2001:db8::/32", 64496), ("10.20.0.0/16", 64497)]
    assert ("10.30.0.0/16", 64512) in list(mrt.origins(dump, local_asn=64512))


def test_mrt_table_dump_v1() -> None:
    attrs = _as_path((mrt.AS_SEQUENCE, [7018, 3356]), size=2)
    body = (struct.pack("!HH", 0, 0) + ipaddress.IPv4Address("198.18.0.0").packed
            + struct.pack("!BBI", 15, 1, 0) + bytes(4) + struct.pack("!HH", 7018, len(attrs))
            + attrs)
    assert list(mrt.origins(_record(12, 1, body))) == [("198.18.0.0/15", 3356)]


def test_a_recorded_bird_rib_dump() -> None:
    """The PoP router's RIB as BIRD dumped it in the path lab (tests/paths/record.py)."""
    table = load_table(DATA / "lab-rib.mrt", DATA / "lab-asnames.txt", local_asn=64500)
    assert table.lookup("10.200.1.2").describe() == "AS64510 (transit-1)"  # t1, from pa
    assert table.lookup("10.200.4.2").asn == 64520  # t2b
    assert table.lookup("10.64.0.2").asn == 64500  # the node's LAN: pop's own route
    assert table.lookup("192.0.2.1").asn is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_mrt_bytes_raise_only_mrt_error(data: bytes) -> None:
    try:
        list(mrt.origins(_record(13, 2, data)))
        list(mrt.origins(_peer_index([1]) + _record(13, 4, data)))
        list(mrt.origins(data))
    except mrt.MrtError:
        pass


# ------------------------------------------------------------------------------ text formats


def test_pyasn_ipasn_and_names(tmp_path: Path) -> None:
    table_file = tmp_path / "ipasn.dat"
    table_file.write_text("; IP-ASN32-DAT file\n; comment\n192.0.2.0/24\t64500\n"
                          "192.0.2.128/25\t64501\n2001:db8::/32\t64502\n")
    names = tmp_path / "asnames.json"
    names.write_text('{"64500": "EXAMPLE-NET", "64501": "TRANSIT"}')
    table = load_table(table_file, names)
    assert len(table) == 3
    assert table.lookup("192.0.2.1").describe() == "AS64500 (EXAMPLE-NET)"
    assert table.lookup("192.0.2.200").name == "TRANSIT"
    assert table.lookup("2001:db8::5").asn == 64502
    # gzip and bzip2 compressed, the same
    for name, pack in (("t.gz", gzip.compress), ("t.bz2", bz2.compress)):
        packed = tmp_path / name
        packed.write_bytes(pack(table_file.read_bytes()))
        assert load_table(packed).lookup("192.0.2.200").asn == 64501


def test_bgpdump_lines(tmp_path: Path) -> None:
    text = ("TABLE_DUMP2|1700000000|B|10.0.0.1|65000|198.51.100.0/24|65000 64510 64500|IGP|"
            "10.0.0.1|0|0||NAG||\n"
            "TABLE_DUMP2|1700000000|B|10.0.0.1|65000|203.0.113.0/24|65000 {64600,9}|IGP|"
            "10.0.0.1|0|0||NAG||\n")
    assert list(parse_bgpdump(text)) == [("198.51.100.0/24", 64500), ("203.0.113.0/24", 9)]
    path = tmp_path / "rib.txt"
    path.write_text(text)
    assert load_table(path).lookup("198.51.100.9").asn == 64500


def test_names_as_lines(tmp_path: Path) -> None:
    table = tmp_path / "t"
    table.write_text("10.0.0.0/8 64500\n")
    names = tmp_path / "n"
    names.write_text("# asn name\nAS64500 Lab transit\n")
    assert load_table(table, names).lookup("10.1.2.3").name == "Lab transit"


@pytest.mark.parametrize(("text", "where"), [
    ("192.0.2.0/24\n", "line 1"),
    ("192.0.2.0/24 64500\nnot-a-prefix 1\n", "line 2"),
    ("192.0.2.0/24 99999999999\n", "line 1"),
])
def test_bad_tables_name_the_line(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "bad.dat"
    path.write_text(text)
    with pytest.raises(AsnTableError, match=where):
        load_table(path)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AsnTableError, match="cannot read"):
        load_table(tmp_path / "none")


def test_unknown_and_private_addresses_are_marked() -> None:
    table = AsnTable([("198.51.100.0/24", 64500)])
    assert table.lookup("198.51.100.7").label == "64500"
    assert table.lookup("10.1.2.3").label == "private"
    assert table.lookup("100.64.0.1").label == "private"  # CGN space
    assert table.lookup("8.8.8.8").label == "unknown"
    assert table.lookup("not an address").label == "unknown"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32),
                          st.integers(1, 70000)), max_size=40),
       st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40))
def test_lookup_is_the_longest_prefix_match(prefixes: list[tuple[int, int, int]],
                                            addresses: list[int]) -> None:
    nets: dict[ipaddress.IPv4Network, int] = {}
    for start, length, asn in prefixes:
        net = ipaddress.IPv4Network((start, length), strict=False)
        nets.setdefault(net, asn)  # the first of a prefix given twice stays
    table = AsnTable([(str(n), a) for n, a in nets.items()])
    for value in addresses:
        addr = ipaddress.IPv4Address(value)
        matches = [n for n in nets if addr in n]
        want = nets[max(matches, key=lambda n: n.prefixlen)] if matches else None
        assert table.lookup(str(addr)).asn == want


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_text_tables_raise_only_table_errors(text: str) -> None:
    for parse in (parse_ipasn, parse_bgpdump):
        with contextlib.suppress(AsnTableError):
            list(parse(text))
