"""Hypothesis fuzzing of every WireGuard parser: nothing escapes the core (a bad datagram is a
BadDatagram event); the helpers raise only WireGuardError.

Default runs use a few thousand examples in total; the ``slow`` variants push >= 100k.
"""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.checks.tunnel import parse_echo_reply
from probes.checks.udp import parse_error_queue_message
from probes.checks.wireguard_telemetry import TelemetryError, parse_dump
from probes.model import Reason
from probes.protocols import wireguard as wg
from tests.wireguard.wg_responder import Responder

pytestmark = pytest.mark.wireguard

SERVER = os.urandom(32)
CLIENT = os.urandom(32)
CONFIG = wg.InitiatorConfig(CLIENT, wg.public_key(SERVER))
WALL = 1_700_000_000 * 10**9
SENDER = 0x01020304
PEER = ("192.0.2.1", 51820)

FAST = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=100_000, deadline=None, suppress_health_check=list(HealthCheck))


def _pending() -> wg.WireGuardInitiator:
    conn = wg.WireGuardInitiator(CONFIG)
    conn.initiate(1.0, WALL, sender_index=SENDER)
    conn.datagrams_to_send(1.0)
    return conn


def _established() -> wg.WireGuardInitiator:
    conn = wg.WireGuardInitiator(CONFIG)
    responder = Responder(SERVER, conn.public_key)
    conn.initiate(1.0, WALL, sender_index=SENDER)
    reply = responder.handle(conn.datagrams_to_send(1.0)[0][0])
    assert reply is not None
    conn.receive_datagram(reply, PEER, 1.0)
    return conn


# datagrams that look like ours: right type, right size, our index, random rest
def _shaped(kind: int, size: int) -> st.SearchStrategy[bytes]:
    head = struct.pack("<B3xI", kind, SENDER)
    return st.binary(min_size=size - 8, max_size=size - 8).map(lambda rest: head + rest)


DATAGRAMS = st.one_of(
    st.binary(max_size=200),
    _shaped(wg.MESSAGE_RESPONSE, wg.RESPONSE_SIZE),
    st.binary(min_size=84, max_size=84).map(
        lambda rest: struct.pack("<B3xI", 2, 77) + rest[:4] + struct.pack("<I", SENDER) + rest[8:]),
    _shaped(wg.MESSAGE_COOKIE_REPLY, wg.COOKIE_REPLY_SIZE),
    st.binary(min_size=24, max_size=120).map(lambda rest: struct.pack("<B3xI", 4, SENDER) + rest),
    _shaped(wg.MESSAGE_INITIATION, wg.INITIATION_SIZE),
)


def _feed(conn: wg.WireGuardInitiator, data: bytes) -> None:
    conn.receive_datagram(data, PEER, 2.0)
    while conn.next_event() is not None:
        pass


def _check_receive_pending(data: bytes) -> None:
    _feed(_pending(), data)


def _check_receive_established(data: bytes) -> None:
    _feed(_established(), data)


def _check_scalars(last: bytes, wall_ns: int, key_text: str, ip: bytes) -> None:
    for call in (lambda: wg.next_timestamp(wall_ns, last), lambda: wg.parse_tai64n(last),
                 lambda: wg.decode_key(key_text), lambda: wg.strip_padding(ip),
                 lambda: wg.WireGuardInitiator(CONFIG, last_timestamp=last),
                 lambda: wg.InitiatorConfig(last + last + last, ip[:32] or bytes(31))):
        with contextlib.suppress(wg.WireGuardError):
            call()


SCALARS = (st.binary(max_size=16), st.integers(min_value=-(10**20), max_value=2**70),
           st.text(max_size=60), st.binary(min_size=1, max_size=80))


@FAST
@given(DATAGRAMS)
def test_fuzz_receive_while_handshaking(data: bytes) -> None:
    _check_receive_pending(data)


@FAST
@given(DATAGRAMS)
def test_fuzz_receive_when_established(data: bytes) -> None:
    _check_receive_established(data)


@FAST
@given(*SCALARS)
def test_fuzz_timestamps_keys_and_ip(last: bytes, wall_ns: int, key_text: str, ip: bytes) -> None:
    _check_scalars(last, wall_ns, key_text, ip)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 100k examples outlast the default 300 s limit
@SLOW
@given(DATAGRAMS)
def test_fuzz_receive_while_handshaking_100k(data: bytes) -> None:
    _check_receive_pending(data)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 100k examples outlast the default 300 s limit
@SLOW
@given(DATAGRAMS)
def test_fuzz_receive_when_established_100k(data: bytes) -> None:
    _check_receive_established(data)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 100k examples outlast the default 300 s limit
@SLOW
@given(*SCALARS)
def test_fuzz_timestamps_keys_and_ip_100k(last: bytes, wall_ns: int, key_text: str,
                                          ip: bytes) -> None:
    _check_scalars(last, wall_ns, key_text, ip)


# --- the shell's parsers: ICMP error queue, echo replies, `wg show dump` ---------------------

ANCILLARY = st.lists(st.tuples(st.sampled_from([0, 1, 41]), st.sampled_from([11, 25, 35, 2]),
                               st.binary(max_size=48)), max_size=3)
DUMP_ROWS = st.lists(st.lists(st.sampled_from(["(none)", "off", "0", "7", "a" * 43 + "=", "x", ""])
                              | st.text(max_size=8), max_size=10), max_size=5)


def _check_shell_parsers(ancdata: list[tuple[int, int, bytes]], packet: bytes,
                         rows: list[list[str]]) -> None:
    error = parse_error_queue_message(ancdata)
    assert error is None or isinstance(error.reason, Reason)
    echo = parse_echo_reply(packet)
    assert echo is None or all(0 <= v <= 0xFFFF for v in echo)
    for interface in ("", "wg0"):
        with contextlib.suppress(TelemetryError):
            parse_dump("\n".join("\t".join(r) for r in rows), interface)


@FAST
@given(ANCILLARY, st.binary(max_size=64), DUMP_ROWS)
def test_fuzz_shell_parsers(ancdata: list[tuple[int, int, bytes]], packet: bytes,
                            rows: list[list[str]]) -> None:
    _check_shell_parsers(ancdata, packet, rows)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 100k examples outlast the default 300 s limit
@SLOW
@given(ANCILLARY, st.binary(max_size=64), DUMP_ROWS)
def test_fuzz_shell_parsers_100k(ancdata: list[tuple[int, int, bytes]], packet: bytes,
                                 rows: list[list[str]]) -> None:
    _check_shell_parsers(ancdata, packet, rows)
