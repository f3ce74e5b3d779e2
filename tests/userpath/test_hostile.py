"""Garbage through the tunnel ends in a clean reason: DNS answers, in-tunnel replies and TCP
segments that are malformed, forged or beside the point never raise out of the egress, DNS and
transaction steps.

The tunnel here is in memory (:class:`LoopTunnel`): a real node cannot be made to send
arbitrary bytes inside an authenticated tunnel, and the steps only see inner packets; the lab
tests (test_user_path_lab.py) run the same steps through real WireGuard and OpenVPN.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.checks.base import CheckResult, Fact, Stopwatch
from probes.checks.egress import egress_step
from probes.checks.resolve import dns_step
from probes.checks.transaction import transaction_step
from probes.checks.tunnel import Tunnel, run_through
from probes.checks.udp import Datagram, SendStamp
from probes.config import DnsCheck, EgressCheck, EgressTarget, TransactionCheck
from probes.model import Reason
from probes.protocols import dns, ipv4, reflector

SOURCE, NODE, RESOLVER, BEYOND = "10.201.0.2", "10.201.0.1", "198.51.100.53", "198.51.100.7"
FAST = settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
FEW = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
Responder = Callable[[bytes], list[bytes]]


class _Driver:
    def __init__(self) -> None:
        self.queue: deque[bytes] = deque()
        self.datagram: Datagram | None = None

    async def next_event(self, until: float) -> bytes | None:
        while not self.queue:
            if time.monotonic() >= until:
                return None
            await asyncio.sleep(min(0.005, max(until - time.monotonic(), 0)))
        packet = self.queue.popleft()
        self.datagram = Datagram(packet, time.monotonic(), None)
        return packet


class LoopTunnel:
    """A TunnelProbe whose tunnel hands every inner packet we send to ``respond``, and what it
    returns back to us."""

    def __init__(self, respond: Responder, resolvers: tuple[str, ...] = (RESOLVER,)) -> None:
        self.watch = Stopwatch()
        self.facts: dict[str, Fact] = {}
        self.deadline = time.monotonic() + 2.0
        self.respond, self.resolvers = respond, resolvers
        self.driver = _Driver()

    def send(self, packet: bytes) -> SendStamp:
        self.driver.queue.extend(self.respond(packet))
        return SendStamp(time.monotonic(), time.time_ns())

    async def establish(self) -> Tunnel:
        return Tunnel(self.driver, SOURCE, NODE, self.send,  # type: ignore[arg-type]
                      lambda event: event, self.resolvers)

    async def finish(self) -> None:
        return None


def _udp_of(packet: bytes) -> ipv4.UdpDatagram:
    parsed = ipv4.parse(packet)
    assert isinstance(parsed, ipv4.UdpDatagram)
    return parsed


def _dns_answer(body: Callable[[bytes], bytes]) -> Responder:
    """A resolver that answers every query with ``body(query)`` from RESOLVER:53."""
    def respond(packet: bytes) -> list[bytes]:
        query = _udp_of(packet)
        return [ipv4.udp_packet(RESOLVER, SOURCE, 53, query.sport, body(query.payload))]
    return respond


def _resolve(respond: Responder, **check: object) -> CheckResult:
    section = DnsCheck(name="probe.user.lab", attempt_timeout=0.05, **check)  # type: ignore[arg-type]

    async def step(tunnel: Tunnel, probe: object) -> CheckResult:
        return await dns_step(tunnel, probe, section)  # type: ignore[arg-type]

    return asyncio.run(run_through(LoopTunnel(respond), step))


A_RECORD = (dns.RecordType.A, bytes([198, 51, 100, 7]))


@pytest.mark.parametrize(("body", "reason", "detail"), [
    (lambda q: dns.build_response(q, answers=(A_RECORD,)), Reason.OK, ""),
    (lambda q: dns.build_response(q, rcode=dns.Rcode.SERVFAIL), Reason.DNS_SERVFAIL, "SERVFAIL"),
    (lambda q: dns.build_response(q, rcode=dns.Rcode.REFUSED), Reason.DNS_REFUSED, "REFUSED"),
    (lambda q: dns.build_response(q, rcode=dns.Rcode.NXDOMAIN), Reason.DNS_WRONG_ANSWER,
     "NXDOMAIN"),
    (dns.build_response, Reason.DNS_WRONG_ANSWER, "no A record"),
    (lambda q: dns.build_response(q, answers=((dns.RecordType.A, bytes(4)),)),
     Reason.DNS_WRONG_ANSWER, "none of the expected"),
    (lambda q: dns.build_response(q, answers=((dns.RecordType.A, b"\x01\x02"),)),
     Reason.BAD_RESPONSE, "A record of 2 bytes"),
    (lambda q: dns.build_response(dns.build_query("other.lab", 1, int.from_bytes(q[:2], "big")),
                                  answers=(A_RECORD,)), Reason.BAD_RESPONSE, "not to our question"),
    (lambda q: q[:2] + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\xc0\x0c", Reason.BAD_RESPONSE,
     "malformed"),
])
def test_each_kind_of_answer_has_its_reason(body: Callable[[bytes], bytes], reason: Reason,
                                            detail: str) -> None:
    result = _resolve(_dns_answer(body), expect=["198.51.100.7"])
    assert result.reason is reason, result
    assert detail in result.detail


def test_silence_is_a_timeout_after_every_attempt_and_icmp_is_unreachable() -> None:
    sent: list[bytes] = []
    result = _resolve(lambda p: sent.append(p) or [], attempts=3)
    assert result.reason is Reason.DNS_TIMEOUT and len(sent) == 3
    assert result.quality is not None and result.quality.loss_ratio == 1.0

    def port_unreachable(packet: bytes) -> list[bytes]:
        body = bytes([ipv4.ICMP_DEST_UNREACH, 3, 0, 0, 0, 0, 0, 0]) + packet[:28]
        return [ipv4.ipv4_packet(RESOLVER, SOURCE, ipv4.PROTO_ICMP, body)]

    result = _resolve(port_unreachable)
    assert result.reason is Reason.DNS_UNREACHABLE and "port unreachable" in result.detail


def test_forged_answers_are_not_taken_for_ours() -> None:
    """Wrong id, wrong source address or port: ignored (then a timeout), never believed."""
    def forged(packet: bytes) -> list[bytes]:
        query = _udp_of(packet)
        good = dns.build_response(query.payload, answers=(A_RECORD,))
        wrong_id = bytes([good[0] ^ 0xFF]) + good[1:]
        return [ipv4.udp_packet(RESOLVER, SOURCE, 53, query.sport, wrong_id),
                ipv4.udp_packet(BEYOND, SOURCE, 53, query.sport, good),
                ipv4.udp_packet(RESOLVER, SOURCE, 5353, query.sport, good)]

    assert _resolve(forged).reason is Reason.DNS_TIMEOUT


@FAST
@given(st.binary(max_size=300))
def test_garbage_dns_answers_end_in_a_clean_reason(garbage: bytes) -> None:
    def body(query: bytes) -> bytes:  # our id and the QR bit, so the parser reads the rest
        return query[:2] + bytes([0x80 | (garbage[:1] or b"\0")[0]]) + garbage[1:]

    result = _resolve(_dns_answer(body))
    if len(garbage) + 2 < 12:  # shorter than a header: not recognisably an answer to us
        assert result.reason is Reason.DNS_TIMEOUT and "2 runt or mismatched" in result.detail
        return
    assert result.reason in (Reason.OK, Reason.BAD_RESPONSE, Reason.DNS_SERVFAIL,
                             Reason.DNS_REFUSED, Reason.DNS_WRONG_ANSWER), result


def _egress(respond: Responder, wait: float = 0.3) -> CheckResult:
    section = EgressCheck(targets=[EgressTarget(name="beyond", address=BEYOND, udp_port=7447)],
                          echo_count=2, echo_interval=0.001)

    async def step(tunnel: Tunnel, probe: object) -> CheckResult:
        return await egress_step(tunnel, probe, section)  # type: ignore[arg-type]

    probe = LoopTunnel(respond)
    probe.deadline = time.monotonic() + wait
    return asyncio.run(run_through(probe, step))


def _answer(packet: bytes, *, beyond: bool) -> list[bytes]:
    """What a healthy path answers: the node's echo always, the target's if ``beyond``."""
    dst = socket_dst(packet)
    if dst == BEYOND and not beyond:
        return []
    if packet[9] == ipv4.PROTO_ICMP:
        ident, seq = struct.unpack_from("!HH", packet, 24)
        return [ipv4.ipv4_packet(dst, SOURCE, ipv4.PROTO_ICMP,
                                 ipv4.icmp_echo(ident, seq, packet[28:], reply=True))]
    udp = _udp_of(packet)
    req = udp.payload
    reply = reflector.Reflector().answer(req, (SOURCE, udp.sport), 0.0)
    assert reply is not None
    return [ipv4.udp_packet(dst, SOURCE, udp.dport, udp.sport, reply)]


def socket_dst(packet: bytes) -> str:
    return ".".join(str(b) for b in packet[16:20])


def test_egress_tells_a_dead_tunnel_from_a_node_that_forwards_nothing() -> None:
    assert _egress(lambda p: _answer(p, beyond=True)).reason is Reason.OK
    failed = _egress(lambda p: _answer(p, beyond=False))
    assert failed.reason is Reason.EGRESS_FAILED, failed
    assert "the node answers in the tunnel (2/2)" in failed.detail
    assert _egress(lambda p: []).reason is Reason.TUNNEL_NO_REPLY


@FEW
@given(st.lists(st.binary(max_size=80), max_size=4))
def test_garbage_in_tunnel_replies_end_in_a_clean_reason(garbage: list[bytes]) -> None:
    def respond(packet: bytes) -> list[bytes]:
        # garbage both raw and wrapped as if from the target (UDP to our port, ICMP errors)
        udp = ipv4.parse(packet)
        out = list(garbage)
        for g in garbage:
            if isinstance(udp, ipv4.UdpDatagram):
                out.append(ipv4.udp_packet(BEYOND, SOURCE, 7447, udp.sport, g))
            out.append(ipv4.ipv4_packet(BEYOND, SOURCE, ipv4.PROTO_ICMP, g))
        return out

    result = _egress(respond, wait=0.08)
    assert result.reason in (Reason.EGRESS_FAILED, Reason.TUNNEL_NO_REPLY), result


# ---- the TCP transaction -------------------------------------------------------------------

SERVER_ISS = 777


def _tcp_server(answer: bytes | None, *, rst_syn: bool = False) -> Responder:
    """A server at BEYOND:80 for one connection: SYN-ACK (or a RST), then to the request
    ``answer`` and a FIN (None: acknowledges and says nothing)."""
    def respond(packet: bytes) -> list[bytes]:
        seg = ipv4.parse(packet)
        if not isinstance(seg, ipv4.TcpSegment):
            return []

        def out(flags: int, seq: int, ack: int, payload: bytes = b"") -> bytes:
            return ipv4.tcp_packet(BEYOND, SOURCE, 80, seg.sport, seq=seq, ack=ack, flags=flags,
                                   window=65535, payload=payload)

        if seg.flags & ipv4.TCP_SYN:
            if rst_syn:
                return [out(ipv4.TCP_RST | ipv4.TCP_ACK, 0, seg.seq + 1)]
            return [out(ipv4.TCP_SYN | ipv4.TCP_ACK, SERVER_ISS, seg.seq + 1)]
        if not seg.payload:
            return []
        ack = seg.seq + len(seg.payload)
        if answer is None:
            return [out(ipv4.TCP_ACK, SERVER_ISS + 1, ack)]
        return [out(ipv4.TCP_ACK | ipv4.TCP_PSH, SERVER_ISS + 1, ack, answer),
                out(ipv4.TCP_ACK | ipv4.TCP_FIN, SERVER_ISS + 1 + len(answer), ack)]
    return respond


def _transact(respond: Responder, wait: float = 1.0, **check: object) -> CheckResult:
    section = TransactionCheck(address=BEYOND, port=80, tls=False, connect_timeout=0.5,
                               **check)  # type: ignore[arg-type]

    async def step(tunnel: Tunnel, probe: object) -> CheckResult:
        return await transaction_step(tunnel, probe, section)  # type: ignore[arg-type]

    probe = LoopTunnel(respond)
    probe.deadline = time.monotonic() + wait
    return asyncio.run(run_through(probe, step))


@pytest.mark.parametrize(("respond", "check", "reason", "detail"), [
    (_tcp_server(b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"), {}, Reason.OK, ""),
    (_tcp_server(b"HTTP/1.0 503 Busy\r\n\r\n"), {"expect_status": [200, 204]},
     Reason.UNEXPECTED_REPLY, "HTTP 503"),
    (_tcp_server(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"), {}, Reason.BAD_RESPONSE, "not an HTTP/1"),
    (_tcp_server(b""), {}, Reason.BAD_RESPONSE, "not an HTTP/1"),  # FIN, no answer
    (_tcp_server(None), {}, Reason.TIMEOUT, "HTTP answer stalled (http)"),
    (_tcp_server(None, rst_syn=True), {}, Reason.REFUSED, "nothing listens"),
    (lambda p: [], {}, Reason.TIMEOUT, "no SYN-ACK"),
    (lambda p: [ipv4.ipv4_packet(NODE, SOURCE, ipv4.PROTO_ICMP, bytes(
        [ipv4.ICMP_DEST_UNREACH, 1, 0, 0, 0, 0, 0, 0]) + p[:28])], {},
     Reason.ICMP_UNREACHABLE, "host unreachable from 10.201.0.1"),
])
def test_each_transaction_outcome_has_its_reason(respond: Responder, check: dict[str, object],
                                                 reason: Reason, detail: str) -> None:
    result = _transact(respond, **check)
    assert result.reason is reason, result
    assert detail in result.detail
    if reason is Reason.OK:
        assert result.facts["transaction_http_status"] == 204


@FEW
@given(st.lists(st.binary(max_size=80), max_size=4), st.binary(max_size=200))
def test_garbage_in_a_transaction_ends_in_a_clean_reason(garbage: list[bytes],
                                                         answer: bytes) -> None:
    server = _tcp_server(answer)

    def respond(packet: bytes) -> list[bytes]:
        out = list(garbage) + server(packet)
        seg = ipv4.parse(packet)
        for g in garbage:  # wrapped as if from the server: TCP to our port, ICMP errors
            if isinstance(seg, ipv4.TcpSegment):
                out.append(ipv4.ipv4_packet(BEYOND, SOURCE, ipv4.PROTO_TCP,
                                            seg.dport.to_bytes(2, "big")
                                            + seg.sport.to_bytes(2, "big") + g))
            out.append(ipv4.ipv4_packet(BEYOND, SOURCE, ipv4.PROTO_ICMP, g))
        return out

    result = _transact(respond, wait=0.3)
    assert result.reason in (Reason.OK, Reason.BAD_RESPONSE, Reason.TIMEOUT, Reason.REFUSED,
                             Reason.ICMP_UNREACHABLE), result
