"""DNS through the tunnel: one query to the resolver the node gives its users
(docs/probes/user-path.md).

The query goes from our tunnel address to the resolver as a UDP datagram inside the tunnel —
the path a user's stub resolver takes. The resolver is the protocol section's
``dns_resolver``, or the first one the node pushed (OpenVPN ``dhcp-option DNS``). Up to
``attempts`` sends of the same query (same id and port), ``attempt_timeout`` apart; the answer
must come from the resolver's address and port 53 to our port, carry our id and our question.

Reasons: ``dns-timeout`` (no answer), ``dns-unreachable`` (an ICMP error quoting our query:
nothing listens, or a router says no), ``dns-servfail``, ``dns-refused``, ``dns-wrong-answer``
(NXDOMAIN or another rcode, no address of the type asked, or none of the expected ones), and
``bad-response`` for a message that does not parse (its reason in the detail).
"""

from __future__ import annotations

import ipaddress
import secrets
import time

from probes.checks.base import CheckResult, ProbeFailure
from probes.checks.tunnel import Tunnel, TunnelProbe
from probes.checks.udp import round_trip_seconds
from probes.config import DnsCheck
from probes.model import Quality, Reason
from probes.protocols import dns, ipv4

DNS_PORT = 53


async def dns_step(tunnel: Tunnel, probe: TunnelProbe, check: DnsCheck) -> CheckResult:
    """Resolve ``check.name`` through ``tunnel``; judge as the module says."""
    if not tunnel.resolvers:
        raise ProbeFailure(Reason.BAD_RESPONSE, "the node pushed no resolver and none is "
                                                "configured (dns_resolver)", "dns")
    resolver = tunnel.resolvers[0]
    probe.facts["dns_resolver"] = resolver
    rtype = dns.RecordType[check.type]
    ident = secrets.randbelow(0x10000)
    sport = 1024 + secrets.randbelow(64_000)
    query = ipv4.udp_packet(tunnel.source, resolver, sport, DNS_PORT,
                            dns.build_query(check.name, rtype, ident))
    ignored = 0  # datagrams from the resolver to our port that are not an answer to us
    for attempt in range(1, check.attempts + 1):
        stamp = tunnel.send(query)
        until = min(probe.deadline, time.monotonic() + check.attempt_timeout)
        while (got := await tunnel.receive(until)) is not None:
            packet, datagram = got
            parsed = ipv4.parse(packet)
            answer = _ours(parsed, resolver, sport, ident)
            if answer is None:
                ignored += _from_resolver(parsed, resolver, sport)
                continue
            probe.watch.lap("dns")
            probe.facts["dns_attempts"] = attempt
            rtt = round_trip_seconds(stamp, datagram) if stamp is not None else None
            quality = Quality(sent=attempt, received=1, loss_ratio=round(1 - 1 / attempt, 6),
                              rtt_p50_seconds=rtt, rtt_p99_seconds=rtt, rtt_max_seconds=rtt)
            return _judge(probe, check, rtype, answer, quality)
        if time.monotonic() >= probe.deadline:
            break
    probe.watch.lap("dns")
    if ignored:
        probe.facts["dns_ignored_answers"] = ignored
    aside = f" ({ignored} runt or mismatched answer(s) ignored)" if ignored else ""
    return probe.watch.result(
        False, Reason.DNS_TIMEOUT, facts=probe.facts,
        quality=Quality(sent=check.attempts, received=0, loss_ratio=1.0),
        detail=f"no answer from {resolver} through the tunnel to {check.attempts} "
               f"quer{'y' if check.attempts == 1 else 'ies'} for {check.name}{aside}")


def _from_resolver(parsed: ipv4.Packet | None, resolver: str, sport: int) -> int:
    """1 for a datagram from the resolver's port 53 to ours (whatever it holds), else 0."""
    return int(isinstance(parsed, ipv4.UdpDatagram) and parsed.src == resolver
               and parsed.sport == DNS_PORT and parsed.dport == sport)


def _ours(parsed: ipv4.Packet | None, resolver: str, sport: int,
          ident: int) -> bytes | ipv4.IcmpError | None:
    """The DNS message (or the ICMP error) that answers our query; None for anything else."""
    if isinstance(parsed, ipv4.IcmpError):
        mine = (parsed.proto == ipv4.PROTO_UDP and parsed.dst == resolver
                and parsed.first == sport and parsed.second == DNS_PORT)
        return parsed if mine else None
    if (not isinstance(parsed, ipv4.UdpDatagram) or parsed.src != resolver
            or parsed.sport != DNS_PORT or parsed.dport != sport):
        return None
    return parsed.payload if dns.response_ident(parsed.payload) == ident else None


def _judge(probe: TunnelProbe, check: DnsCheck, rtype: int, answer: bytes | ipv4.IcmpError,
           quality: Quality) -> CheckResult:
    watch, facts = probe.watch, probe.facts

    def fail(reason: Reason, detail: str) -> CheckResult:
        return watch.result(False, reason, quality=quality, facts=facts, detail=detail)

    if isinstance(answer, ipv4.IcmpError):
        return fail(Reason.DNS_UNREACHABLE, f"query for {check.name}: {answer.describe()}")
    try:
        response = dns.parse_response(answer)
    except dns.DnsError as exc:
        return fail(Reason.BAD_RESPONSE, f"malformed DNS answer: {exc}")
    question = response.question
    if question is None or question.name != check.name.lower().rstrip(".") or (
            question.rtype != rtype):
        return fail(Reason.BAD_RESPONSE, "the answer is not to our question")
    rcode = response.rcode
    facts["dns_rcode"] = dns.rcode_name(rcode)
    if rcode == dns.Rcode.SERVFAIL:
        return fail(Reason.DNS_SERVFAIL, f"{check.name}: SERVFAIL from the resolver")
    if rcode == dns.Rcode.REFUSED:
        return fail(Reason.DNS_REFUSED, f"{check.name}: REFUSED by the resolver")
    if rcode != dns.Rcode.NOERROR:
        return fail(Reason.DNS_WRONG_ANSWER, f"{check.name}: {dns.rcode_name(rcode)}")
    addresses = response.addresses(rtype)
    if not addresses:
        truncated = " (truncated)" if response.truncated else ""
        return fail(Reason.DNS_WRONG_ANSWER, f"{check.name}: no {check.type} record{truncated}")
    facts["dns_answer"] = ",".join(addresses[:4])
    expected = {str(ipaddress.ip_address(value)) for value in check.expect}
    if expected and not set(addresses) & expected:
        return fail(Reason.DNS_WRONG_ANSWER,
                    f"{check.name}: {', '.join(addresses[:4])}, none of the expected "
                    f"{', '.join(check.expect[:4])}")
    return watch.result(True, Reason.OK, quality=quality, facts=facts)
