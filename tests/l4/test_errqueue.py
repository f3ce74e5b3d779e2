"""Error-queue and kernel-timestamp ancillary data (probes/checks/errqueue.py).

Table tests on hand-built ancillary tuples, the real kernel's entries on loopback (no root), and
fuzzing: arbitrary bytes never raise, and an entry is found exactly when a readable one is there.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probes.checks.errqueue import (
    IP_RECVERR,
    IPV6_RECVERR,
    SO_EE_ORIGIN_ICMP,
    SO_EE_ORIGIN_ICMP6,
    SO_EE_ORIGIN_LOCAL,
    SO_TIMESTAMPNS,
    ExtendedError,
    enable_error_queue,
    enable_receive_timestamps,
    kernel_timestamp_ns,
    parse_extended_error,
)

pytestmark = pytest.mark.l4

Ancillary = list[tuple[int, int, bytes]]


def _ee(err: int, origin: int, icmp_type: int = 0, icmp_code: int = 0, info: int = 0) -> bytes:
    return struct.pack("=IBBBBII", err, origin, icmp_type, icmp_code, 0, info, 0)


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_pton(socket.AF_INET, address))


def _sockaddr_in6(address: str) -> bytes:
    return struct.pack("=HHI16sI", socket.AF_INET6, 0, 0,
                       socket.inet_pton(socket.AF_INET6, address), 0)


V4 = (socket.IPPROTO_IP, IP_RECVERR)
V6 = (socket.IPPROTO_IPV6, IPV6_RECVERR)

ERROR_CASES: list[tuple[str, Ancillary, ExtendedError | None]] = [
    ("ipv4 port unreachable with offender",
     [(*V4, _ee(errno.ECONNREFUSED, SO_EE_ORIGIN_ICMP, 3, 3) + _sockaddr_in("192.0.2.7"))],
     ExtendedError(errno.ECONNREFUSED, SO_EE_ORIGIN_ICMP, 3, 3, 0, "192.0.2.7")),
    ("ipv4 frag needed carries the next-hop mtu",
     [(*V4, _ee(errno.EMSGSIZE, SO_EE_ORIGIN_ICMP, 3, 4, 1400) + _sockaddr_in("10.1.2.3"))],
     ExtendedError(errno.EMSGSIZE, SO_EE_ORIGIN_ICMP, 3, 4, 1400, "10.1.2.3")),
    ("ipv6 packet too big with offender",
     [(*V6, _ee(errno.EMSGSIZE, SO_EE_ORIGIN_ICMP6, 2, 0, 1280) + _sockaddr_in6("2001:db8::1"))],
     ExtendedError(errno.EMSGSIZE, SO_EE_ORIGIN_ICMP6, 2, 0, 1280, "2001:db8::1")),
    ("ipv6 port unreachable",
     [(*V6, _ee(errno.ECONNREFUSED, SO_EE_ORIGIN_ICMP6, 1, 4) + _sockaddr_in6("::1"))],
     ExtendedError(errno.ECONNREFUSED, SO_EE_ORIGIN_ICMP6, 1, 4, 0, "::1")),
    ("local origin has no offender even with a sockaddr after it",
     [(*V4, _ee(errno.EMSGSIZE, SO_EE_ORIGIN_LOCAL, info=1500) + _sockaddr_in("127.0.0.1"))],
     ExtendedError(errno.EMSGSIZE, SO_EE_ORIGIN_LOCAL, 0, 0, 1500, None)),
    ("icmp without the offender sockaddr",
     [(*V4, _ee(errno.EHOSTUNREACH, SO_EE_ORIGIN_ICMP, 3, 1))],
     ExtendedError(errno.EHOSTUNREACH, SO_EE_ORIGIN_ICMP, 3, 1, 0, None)),
    ("icmp6 with a sockaddr cut inside the address",
     [(*V6, _ee(errno.ECONNREFUSED, SO_EE_ORIGIN_ICMP6, 1, 4) + _sockaddr_in6("::1")[:20])],
     ExtendedError(errno.ECONNREFUSED, SO_EE_ORIGIN_ICMP6, 1, 4, 0, None)),
    ("truncated sock_extended_err", [(*V4, _ee(errno.ECONNREFUSED, SO_EE_ORIGIN_ICMP)[:15])],
     None),
    ("empty payload", [(*V6, b"")], None),
    ("no ancillary data", [], None),
    ("a timestamp is not an error", [(socket.SOL_SOCKET, SO_TIMESTAMPNS, bytes(16))], None),
    ("recverr type at the wrong level", [(socket.SOL_SOCKET, IP_RECVERR, _ee(1, 2))], None),
    ("ipv6 type at the ipv4 level", [(socket.IPPROTO_IP, IPV6_RECVERR, _ee(1, 2))], None),
    ("a truncated entry is skipped for the next readable one",
     [(*V4, b"\x00" * 8), (*V4, _ee(errno.ENETUNREACH, SO_EE_ORIGIN_ICMP, 3, 0))],
     ExtendedError(errno.ENETUNREACH, SO_EE_ORIGIN_ICMP, 3, 0, 0, None)),
]


@pytest.mark.parametrize(("ancdata", "expected"), [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_parse_extended_error(ancdata: Ancillary, expected: ExtendedError | None) -> None:
    assert parse_extended_error(ancdata) == expected


def test_from_icmp_tells_icmp_origins_from_local() -> None:
    assert ExtendedError(0, SO_EE_ORIGIN_ICMP, 0, 0, 0, None).from_icmp
    assert ExtendedError(0, SO_EE_ORIGIN_ICMP6, 0, 0, 0, None).from_icmp
    assert not ExtendedError(0, SO_EE_ORIGIN_LOCAL, 0, 0, 0, None).from_icmp
    assert not ExtendedError(0, 0, 0, 0, 0, None).from_icmp


STAMP = struct.pack("=qq", 1_700_000_000, 123_456_789)
TIMESTAMP_CASES: list[tuple[str, Ancillary, int | None]] = [
    ("present", [(socket.SOL_SOCKET, SO_TIMESTAMPNS, STAMP)], 1_700_000_000_123_456_789),
    ("after an error entry", [(*V4, _ee(1, 2)), (socket.SOL_SOCKET, SO_TIMESTAMPNS, STAMP)],
     1_700_000_000_123_456_789),
    ("absent", [], None),
    ("short", [(socket.SOL_SOCKET, SO_TIMESTAMPNS, STAMP[:15])], None),
    ("wrong level", [(socket.IPPROTO_IP, SO_TIMESTAMPNS, STAMP)], None),
    ("wrong type", [(socket.SOL_SOCKET, SO_TIMESTAMPNS + 1, STAMP)], None),
]


@pytest.mark.parametrize(("ancdata", "expected"), [c[1:] for c in TIMESTAMP_CASES],
                         ids=[c[0] for c in TIMESTAMP_CASES])
def test_kernel_timestamp_ns(ancdata: Ancillary, expected: int | None) -> None:
    assert kernel_timestamp_ns(ancdata) == expected


# ------------------------------------------------------------------ the real kernel, loopback


def _closed_port(family: int, host: str) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def probe_socket(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, str]]:
    family, host = request.param
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        pytest.skip(f"no {family!r} here: {exc}")
    try:
        try:
            sock.connect((host, _closed_port(family, host)))
        except OSError as exc:
            pytest.skip(f"no {host} here: {exc}")
        yield sock, host
    finally:
        sock.close()


@pytest.mark.parametrize("probe_socket", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
                         ids=["ipv4", "ipv6"], indirect=True)
def test_kernel_port_unreachable_entry(probe_socket: tuple[socket.socket, str]) -> None:
    sock, host = probe_socket
    enable_error_queue(sock)
    sock.send(b"anyone there?")
    sock.settimeout(5.0)
    for _ in range(50):  # the ICMP error is queued asynchronously, right after the send
        try:
            _, ancdata, _, _ = sock.recvmsg(2048, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            break
        except BlockingIOError:
            time.sleep(0.01)
    else:
        pytest.fail("the kernel queued no error for a closed loopback port")
    entry = parse_extended_error(ancdata)
    v6 = sock.family == socket.AF_INET6
    expected = (SO_EE_ORIGIN_ICMP6, 1, 4) if v6 else (SO_EE_ORIGIN_ICMP, 3, 3)
    assert entry is not None
    assert (entry.origin, entry.icmp_type, entry.icmp_code) == expected
    assert entry.err == errno.ECONNREFUSED and entry.offender == host


def test_kernel_receive_timestamp_is_wall_clock() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5.0)
        enable_receive_timestamps(server)
        before = time.time_ns()
        client.sendto(b"stamp me", server.getsockname())
        data, ancdata, _, _ = server.recvmsg(2048, 512)
        after = time.time_ns()
    stamp = kernel_timestamp_ns(ancdata)
    assert data == b"stamp me" and stamp is not None
    assert before <= stamp <= after  # CLOCK_REALTIME, taken between send and read


# ------------------------------------------------------------------ fuzzing

LEVELS = st.sampled_from([socket.IPPROTO_IP, socket.IPPROTO_IPV6, socket.SOL_SOCKET, 0, 255])
KINDS = st.sampled_from([IP_RECVERR, IPV6_RECVERR, SO_TIMESTAMPNS, 0, 1])
ORIGINS = st.sampled_from([0, SO_EE_ORIGIN_LOCAL, SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6, 4, 255])
# arbitrary bytes, and well-formed headers with an arbitrary tail (so offenders get parsed too)
PAYLOADS = st.binary(max_size=64) | st.builds(
    lambda origin, tail: _ee(0, origin) + tail, ORIGINS, st.binary(max_size=40))
ANCILLARY = st.lists(st.tuples(LEVELS, KINDS, PAYLOADS), max_size=4)


def _check_ancillary(ancdata: Ancillary) -> None:
    readable_errors = [p for level, kind, p in ancdata
                       if (level, kind) in (V4, V6) and len(p) >= 16]
    entry = parse_extended_error(ancdata)
    assert (entry is None) == (not readable_errors)
    if entry is not None:
        assert entry.origin == readable_errors[0][4]
        assert entry.offender is None or entry.from_icmp
    stamps = [p for level, kind, p in ancdata
              if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS) and len(p) >= 16]
    stamp = kernel_timestamp_ns(ancdata)
    assert (stamp is None) == (not stamps)


@settings(max_examples=1000)
@given(ANCILLARY)
def test_fuzz_ancillary_never_raises(ancdata: Ancillary) -> None:
    _check_ancillary(ancdata)


@pytest.mark.slow
@settings(max_examples=100_000)
@given(ANCILLARY)
def test_fuzz_ancillary_long(ancdata: Ancillary) -> None:
    _check_ancillary(ancdata)
