"""Capsule codec (RFC 9297 / RFC 9484): known encodings, round trips, malformed input, fuzzing.

Default fuzz runs use a few thousand examples in total; the ``slow`` variants push >= 100k.
"""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.protocols import capsules as cap

pytestmark = pytest.mark.quic

FAST = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck))

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


# ---------------------------------------------------------------------------- varints


@pytest.mark.parametrize(("value", "wire"), [
    # RFC 9000 appendix A.1 examples
    (151_288_809_941_952_652, bytes.fromhex("c2197c5eff14e88c")),
    (494_878_333, bytes.fromhex("9d7f3e7d")),
    (15_293, bytes.fromhex("7bbd")),
    (37, bytes.fromhex("25")),
])
def test_varint_rfc9000_examples(value: int, wire: bytes) -> None:
    assert cap.encode_varint(value) == wire
    assert cap.decode_varint(wire) == (value, len(wire))


def test_varint_accepts_non_minimal_encoding() -> None:
    assert cap.decode_varint(bytes.fromhex("4025")) == (37, 2)  # RFC 9000 A.1: 0x4025 is 37


@pytest.mark.parametrize("value", [-1, 1 << 62])
def test_varint_out_of_range(value: int) -> None:
    with pytest.raises(cap.CapsuleError):
        cap.encode_varint(value)


@pytest.mark.parametrize("wire", [b"", b"\x40", b"\x80\x00\x00", b"\xc0" + bytes(6)])
def test_varint_truncated(wire: bytes) -> None:
    with pytest.raises(cap.CapsuleError):
        cap.decode_varint(wire)


@given(st.integers(0, cap.MAX_VARINT))
@FAST
def test_varint_round_trip(value: int) -> None:
    wire = cap.encode_varint(value)
    assert cap.decode_varint(wire) == (value, len(wire))


# ---------------------------------------------------------------------------- capsules


def test_capsule_wire_format() -> None:
    wire = cap.encode_capsule(cap.CapsuleType.ADDRESS_ASSIGN, b"abc")
    assert wire == b"\x01\x03abc"
    assert cap.parse_capsules(wire) == [cap.Capsule(1, b"abc")]


def test_parser_reassembles_split_capsules_byte_by_byte() -> None:
    wire = (cap.encode_capsule(0, b"x" * 70) + cap.encode_capsule(0x1234, b"")
            + cap.encode_capsule(3, b"yz"))
    parser = cap.CapsuleParser()
    got: list[cap.Capsule] = []
    for i in range(len(wire)):
        got += parser.feed(wire[i:i + 1])
    parser.end()
    assert got == [cap.Capsule(0, b"x" * 70), cap.Capsule(0x1234, b""), cap.Capsule(3, b"yz")]


def test_stream_ending_inside_a_capsule_is_an_error() -> None:
    parser = cap.CapsuleParser()
    assert parser.feed(b"\x01\x05ab") == []
    assert parser.buffered == 4
    with pytest.raises(cap.CapsuleError, match="inside a capsule"):
        parser.end()


def test_oversized_capsule_rejected_before_buffering_it() -> None:
    parser = cap.CapsuleParser(max_capsule_length=100)
    with pytest.raises(cap.CapsuleError, match="over limit"):
        parser.feed(b"\x00" + cap.encode_varint(101))


def test_http_datagram_context_id() -> None:
    wire = cap.encode_http_datagram(0, b"ping")
    assert wire == b"\x00ping"
    assert cap.decode_http_datagram(wire) == (0, b"ping")
    assert cap.decode_http_datagram(cap.encode_http_datagram(300, b"")) == (300, b"")


# ------------------------------------------------------------------- CONNECT-IP payloads


def test_address_assign_known_bytes() -> None:
    value = bytes([0, 4, 10, 9, 0, 2, 32]) + bytes([0x41, 0x00, 6]) + V6("fd00::2").packed + b"\x40"
    got = cap.decode_prefixed_addresses(value, request=False)
    assert got == [cap.PrefixedAddress(0, V4("10.9.0.2"), 32),
                   cap.PrefixedAddress(256, V6("fd00::2"), 64)]
    assert cap.encode_prefixed_addresses(got) == bytes([0, 4, 10, 9, 0, 2, 32]) + (
        bytes([0x41, 0x00, 6]) + V6("fd00::2").packed + b"\x40")
    assert str(got[1].network) == "fd00::/64"


def test_empty_address_assign_is_legal_but_empty_request_is_not() -> None:
    assert cap.decode_prefixed_addresses(b"", request=False) == []
    with pytest.raises(cap.CapsuleError, match="empty"):
        cap.decode_prefixed_addresses(b"", request=True)


@pytest.mark.parametrize(("value", "match"), [
    (bytes([1, 5, 1, 2, 3, 4, 32]), "neither 4 nor 6"),
    (bytes([1, 4, 1, 2, 3, 4, 33]), "prefix length"),
    (bytes([1, 6]) + bytes(16) + b"\x81", "prefix length"),
    (bytes([1, 4, 1, 2, 3]), "truncated"),
    (bytes([1, 4, 1, 2, 3, 4]), "truncated"),
    (bytes([0x40]), "truncated"),
])
def test_malformed_prefixed_addresses(value: bytes, match: str) -> None:
    with pytest.raises(cap.CapsuleError, match=match):
        cap.decode_prefixed_addresses(value, request=False)


def test_address_request_with_id_zero_rejected() -> None:
    with pytest.raises(cap.CapsuleError, match="request ID 0"):
        cap.decode_prefixed_addresses(bytes([0, 4, 0, 0, 0, 0, 32]), request=True)
    ok = cap.decode_prefixed_addresses(bytes([7, 4, 0, 0, 0, 0, 32]), request=True)
    assert ok == [cap.PrefixedAddress(7, V4("0.0.0.0"), 32)]


def _range(start: str, end: str, proto: int = 0) -> cap.AddressRange:
    return cap.AddressRange(ipaddress.ip_address(start), ipaddress.ip_address(end), proto)


def test_route_advertisement_round_trip() -> None:
    ranges = [_range("10.0.0.0", "10.0.0.255"), _range("10.0.1.0", "10.0.1.255"),
              _range("0.0.0.0", "255.255.255.255", 17), _range("::", "ffff::")]
    value = cap.encode_route_advertisement(ranges)
    assert len(value) == 3 * 10 + 34
    assert cap.decode_route_advertisement(value) == ranges


@pytest.mark.parametrize("ranges", [
    [_range("10.0.0.9", "10.0.0.1")],  # start after end
    [_range("10.0.1.0", "10.0.1.255"), _range("10.0.0.0", "10.0.0.255")],  # not sorted
    [_range("10.0.0.0", "10.0.1.0"), _range("10.0.1.0", "10.0.2.0")],  # overlap
    [_range("::", "::1"), _range("10.0.0.0", "10.0.0.1")],  # IPv6 before IPv4
    [_range("0.0.0.0", "1.0.0.0", 17), _range("2.0.0.0", "3.0.0.0", 6)],  # protocol order
])
def test_route_advertisement_ordering_rules(ranges: list[cap.AddressRange]) -> None:
    with pytest.raises(cap.CapsuleError):
        cap.decode_route_advertisement(cap.encode_route_advertisement(ranges))


# ------------------------------------------------------------------------------- fuzzing

_request_ids = st.integers(1, cap.MAX_VARINT)
_prefixed = st.one_of(
    st.builds(cap.PrefixedAddress, _request_ids, st.integers(0, 2**32 - 1).map(V4),
              st.integers(0, 32)),
    st.builds(cap.PrefixedAddress, _request_ids, st.integers(0, 2**128 - 1).map(V6),
              st.integers(0, 128)))
ROUND_TRIP = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


@given(st.lists(_prefixed, max_size=5))
@ROUND_TRIP
def test_prefixed_addresses_round_trip(addresses: list[cap.PrefixedAddress]) -> None:
    wire = cap.encode_prefixed_addresses(addresses)
    assert cap.decode_prefixed_addresses(wire, request=False) == addresses


@given(st.lists(st.tuples(st.integers(0, cap.MAX_VARINT), st.binary(max_size=300)), max_size=6),
       st.data())
@ROUND_TRIP
def test_capsule_stream_round_trip_with_random_splits(items: list[tuple[int, bytes]],
                                                      data: st.DataObject) -> None:
    wire = b"".join(cap.encode_capsule(t, v) for t, v in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    parser = cap.CapsuleParser()
    got: list[cap.Capsule] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got += parser.feed(wire[a:b])
    parser.end()
    assert got == [cap.Capsule(t, v) for t, v in items]


def _only_capsule_errors(blob: bytes) -> None:
    """Every decoder on arbitrary bytes: a result or CapsuleError, never anything else."""
    for fn in (lambda b: cap.parse_capsules(b, 4096),
               lambda b: cap.decode_prefixed_addresses(b, request=False),
               lambda b: cap.decode_prefixed_addresses(b, request=True),
               cap.decode_route_advertisement,
               cap.decode_http_datagram,
               cap.decode_varint):
        with contextlib.suppress(cap.CapsuleError):
            fn(blob)
    parser = cap.CapsuleParser(4096)
    try:
        for i in range(0, len(blob), 7):
            for capsule in parser.feed(blob[i:i + 7]):
                assert len(capsule.value) <= 4096
    except cap.CapsuleError:
        pass


# bytes that look like capsules: a known type and a plausible length, random body
_shaped = st.tuples(st.sampled_from([0, 1, 2, 3]), st.binary(max_size=80)).map(
    lambda tv: cap.encode_capsule(tv[0], tv[1]))
_blobs = st.one_of(st.binary(max_size=300), _shaped,
                   st.lists(_shaped, max_size=4).map(b"".join))


# valid CONNECT-IP payloads with one byte changed and a random cut: close to the real thing
_mutated = st.tuples(st.lists(_prefixed, min_size=1, max_size=3).map(cap.encode_prefixed_addresses),
                     st.integers(0, 1000), st.integers(0, 255), st.integers(0, 1000)).map(
    lambda t: (t[0][:t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1:])[:t[3]])
_blobs = st.one_of(_blobs, _mutated)


@given(_blobs)
@FAST
def test_fuzz_decoders_raise_only_capsule_error(blob: bytes) -> None:
    _only_capsule_errors(blob)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@given(_blobs)
@SLOW
def test_fuzz_decoders_raise_only_capsule_error_slow(blob: bytes) -> None:
    _only_capsule_errors(blob)
