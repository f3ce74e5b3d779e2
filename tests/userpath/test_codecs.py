"""The DNS codec and the reflector's wire format and answering logic."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.protocols import dns, reflector

FAST = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck))


def test_a_query_and_its_answer_round_trip() -> None:
    query = dns.build_query("Probe.User.Lab.", dns.RecordType.A, 0xBEEF)
    answer = dns.parse_response(dns.build_response(
        query, answers=((dns.RecordType.A, bytes([192, 0, 2, 1])),
                        (dns.RecordType.AAAA, bytes(15) + b"\x01"))))
    assert answer.ident == 0xBEEF and answer.rcode == dns.Rcode.NOERROR
    assert answer.question == dns.Question("probe.user.lab", dns.RecordType.A, dns.CLASS_IN)
    assert answer.addresses(dns.RecordType.A) == ["192.0.2.1"]
    assert answer.addresses(dns.RecordType.AAAA) == ["::1"]


@pytest.mark.parametrize(("name", "why"), [("a..b", "bad label"), ("x" * 64, "bad label"),
                                           (".".join(["abcdefg"] * 40), "longer than"),
                                           ("ünï.lab", "ASCII")])
def test_names_dns_cannot_carry_are_refused(name: str, why: str) -> None:
    with pytest.raises(dns.DnsError, match=why):
        dns.encode_name(name)


@pytest.mark.parametrize(("data", "why"), [
    (b"\x00\x01\x81\x80", "shorter than a DNS header"),
    (b"\x00\x01\x01\x00" + bytes(8), "not a response"),
    (b"\x00\x01\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
     "does not point backwards"),  # a pointer to itself: a loop
    (b"\x00\x01\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + b"\x00\x00\x01\x00\x01"
     + b"\x00\x00\x01", "truncated answer record"),
])
def test_malformed_responses_say_why(data: bytes, why: str) -> None:
    with pytest.raises(dns.DnsError, match=why):
        dns.parse_response(data)


@FAST
@given(st.binary(max_size=300))
def test_the_parser_raises_nothing_but_dns_error(data: bytes) -> None:
    with contextlib.suppress(dns.DnsError):
        dns.parse_response(data)


@pytest.mark.slow
@SLOW
@given(st.binary(max_size=300))
def test_the_parser_raises_nothing_but_dns_error_slow(data: bytes) -> None:
    with contextlib.suppress(dns.DnsError):
        dns.parse_response(data)


def test_the_reflector_answers_with_running_totals_and_never_amplifies() -> None:
    r = reflector.Reflector()
    session = b"12345678"
    first = r.answer(reflector.build_request(reflector.Kind.BURST, session, 0, 1200),
                     ("10.0.0.2", 4000), 10.0)
    second = r.answer(reflector.build_request(reflector.Kind.BURST, session, 1, 1200),
                      ("10.0.0.2", 4000), 10.25)
    assert first is not None and second is not None
    assert len(first) == reflector.REPLY_SIZE <= reflector.REQUEST_MIN
    reply = reflector.parse_reply(second)
    assert reply == reflector.Reply(reflector.Kind.BURST, session, 1, 2, 2400, 250_000)


def test_the_reflector_ignores_what_is_not_a_request_and_limits_each_source() -> None:
    r = reflector.Reflector(source_rate=10)
    assert r.answer(b"TWq1" + bytes(10), ("10.0.0.2", 1), 0.0) is None  # too short
    assert r.answer(b"XXXX" + bytes(60), ("10.0.0.2", 1), 0.0) is None
    request = reflector.build_request(reflector.Kind.ECHO, b"abcdefgh", 0)
    answered = sum(r.answer(request, ("10.0.0.3", 1), 0.0) is not None for _ in range(50))
    assert answered == 10 and r.stats.limited == 40 and r.stats.ignored == 2
    assert r.answer(request, ("10.0.0.4", 1), 0.0) is not None  # another source: its own bucket


def test_the_reflector_session_table_is_bounded() -> None:
    r = reflector.Reflector(max_sessions=4)
    for i in range(10):
        r.answer(reflector.build_request(reflector.Kind.ECHO, i.to_bytes(8, "big"), 0),
                 ("10.0.0.2", 1), 0.0)
    assert r.stats.sessions_evicted == 6


@FAST
@given(st.binary(max_size=1600))
def test_reflector_and_reply_parser_take_any_bytes(data: bytes) -> None:
    reflector.Reflector().answer(data, ("10.0.0.2", 1), 0.0)
    reflector.parse_reply(data)
