"""The WireGuard check shell over real loopback UDP against the in-memory responder.

These need no root: the responder runs as an asyncio datagram endpoint on 127.0.0.1. The real
server (wireguard-go) is exercised by test_wg_lab.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP

from probes.checks import wireguard as check
from probes.checks.base import PlanContext
from probes.checks.registry import kind as get_kind
from probes.checks.tunnel import parse_echo_reply
from probes.config import Target, WireGuardTarget
from probes.model import Reason
from probes.protocols import wireguard as wg
from tests.wireguard.wg_responder import Responder

pytestmark = pytest.mark.wireguard


class _Server(asyncio.DatagramProtocol):
    """Loopback UDP front for the responder; answers in-tunnel ICMP echo requests."""

    def __init__(self, responder: Responder, drop: Callable[[bytes], bool]) -> None:
        self.responder = responder
        self.drop = drop
        self.transport: asyncio.DatagramTransport | None = None
        self.seen: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen.append(data)
        if self.drop(data):
            return
        self.responder.source = f"{addr[0]}:{addr[1]}".encode()
        if data[0] == wg.MESSAGE_TRANSPORT:
            counter = int.from_bytes(data[8:16], "little")
            plain = wg.aead_open(self.responder.receive_key, counter, data[16:], b"")
            if plain:
                request = IP(wg.strip_padding(plain))
                reply = IP(src=request.dst, dst=request.src) / ICMP(
                    type=0, id=request[ICMP].id, seq=request[ICMP].seq) / request[ICMP].payload
                assert self.transport is not None
                self.transport.sendto(self.responder.seal(bytes(reply)), addr)
            return
        answer = self.responder.handle(data)
        if answer is not None:
            assert self.transport is not None
            self.transport.sendto(answer, addr)


@pytest.fixture
def files(tmp_path: Path, keys: dict[str, bytes]) -> dict[str, str]:
    out = {}
    for name in ("client", "psk"):
        path = tmp_path / f"{name}.key"
        path.write_text(wg.encode_key(keys[name]) + "\n")
        out[name] = str(path)
    out["state"] = str(tmp_path / "state" / "wg-timestamps.json")
    return out


@pytest.fixture
async def server(responder: Responder) -> AsyncIterator[tuple[_Server, int]]:
    loop = asyncio.get_running_loop()
    proto = _Server(responder, lambda _data: False)
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    yield proto, port
    transport.close()


def _params(files: dict[str, str], keys: dict[str, bytes], port: int,
            **overrides: object) -> check.WireGuardParams:
    base: dict[str, object] = dict(
        host="127.0.0.1", port=port, server_public_key=wg.encode_key(wg.public_key(keys["server"])),
        private_key_file=files["client"], preshared_key_file=files["psk"],
        state_file=files["state"], retry_interval=0.2, tunnel_address="10.201.0.2/32",
        canary="10.201.0.1", echo_count=10, echo_interval=0.001)
    base.update(overrides)
    return check.WireGuardParams(**base)  # type: ignore[arg-type]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_registered_kinds() -> None:
    assert get_kind("wireguard.handshake") is check.HANDSHAKE
    assert get_kind("wireguard.session") is check.SESSION


async def test_handshake_ok(server: tuple[_Server, int], files: dict[str, str],
                            keys: dict[str, bytes]) -> None:
    result = await check.run_handshake(_params(files, keys, server[1]), 2.0)
    assert result.ok and result.reason is Reason.OK, result
    assert set(result.phases) == {"resolve", "handshake"}
    assert result.facts["cookie_used"] is False
    assert float(result.facts["handshake_rtt_seconds"]) > 0
    for _ in range(100):  # the keepalive is in flight on loopback; give the loop a moment
        if any(d[0] == wg.MESSAGE_TRANSPORT and len(d) == 32 for d in server[0].seen):
            break
        await asyncio.sleep(0.01)
    assert any(d[0] == wg.MESSAGE_TRANSPORT and len(d) == 32 for d in server[0].seen)
    assert stat.S_IMODE(os.stat(files["state"]).st_mode) == 0o600


async def test_session_reports_tunnel_quality(server: tuple[_Server, int], files: dict[str, str],
                                              keys: dict[str, bytes]) -> None:
    result = await check.run_session(_params(files, keys, server[1]), 3.0)
    assert result.ok, result
    q = result.quality
    assert q is not None and q.sent == 10 and q.received == 10 and q.loss_ratio == 0
    assert q.rtt_p50_seconds is not None and q.rtt_max_seconds is not None
    assert 0 < q.rtt_p50_seconds <= q.rtt_max_seconds
    assert result.facts["keepalive_sent"] is True


async def test_cookie_path(server: tuple[_Server, int], files: dict[str, str],
                           keys: dict[str, bytes]) -> None:
    server[0].responder.under_load = True
    result = await check.run_handshake(_params(files, keys, server[1]), 2.0)
    assert result.ok, result
    assert result.facts["cookie_used"] is True and result.facts["mac2_used"] is True
    assert "cookie" in result.phases and server[0].responder.cookies_sent == 1


async def test_cookie_then_timeout(server: tuple[_Server, int], files: dict[str, str],
                                   keys: dict[str, bytes]) -> None:
    proto = server[0]
    proto.responder.under_load = True
    # answer the first initiation (with a cookie), then go silent
    proto.drop = lambda data: data[0] == 1 and proto.responder.cookies_sent >= 1
    result = await check.run_handshake(_params(files, keys, server[1]), 0.6)
    assert not result.ok and result.reason is Reason.COOKIE_THEN_TIMEOUT, result


async def test_silence_is_timeout_with_explanation(server: tuple[_Server, int],
                                                   files: dict[str, str],
                                                   keys: dict[str, bytes]) -> None:
    server[0].drop = lambda _data: True
    result = await check.run_handshake(_params(files, keys, server[1]), 0.5)
    assert result.reason is Reason.TIMEOUT and not result.ok
    assert "does not know this agent's key" in result.detail
    assert int(result.facts["initiations_sent"]) >= 2  # retransmitted within the budget


async def test_closed_port_is_icmp_unreachable(files: dict[str, str],
                                               keys: dict[str, bytes]) -> None:
    result = await check.run_handshake(_params(files, keys, _free_udp_port()), 1.0)
    assert result.reason is Reason.ICMP_UNREACHABLE, result
    assert "type 3 code 3" in result.detail


async def test_wrong_psk_is_bad_response(server: tuple[_Server, int], files: dict[str, str],
                                         keys: dict[str, bytes]) -> None:
    server[0].responder.preshared_key = b"\x05" * 32
    result = await check.run_handshake(_params(files, keys, server[1]), 1.0)
    assert result.reason is Reason.BAD_RESPONSE and "preshared" in result.detail


async def test_tunnel_no_reply_and_loss(server: tuple[_Server, int], files: dict[str, str],
                                        keys: dict[str, bytes]) -> None:
    proto = server[0]
    proto.drop = lambda data: data[0] == 4 and len(data) > 32
    result = await check.run_session(_params(files, keys, server[1], echo_count=3), 3.0)
    assert result.reason is Reason.TUNNEL_NO_REPLY and result.quality is not None
    assert result.quality.loss_ratio == 1.0

    drops = iter(range(1000))
    proto.drop = lambda data: data[0] == 4 and len(data) > 32 and next(drops) % 2 == 0
    result = await check.run_session(_params(files, keys, server[1], loss_threshold=0.2), 3.0)
    assert result.reason is Reason.TUNNEL_LOSS and result.quality is not None
    assert result.quality.loss_ratio == 0.5


async def test_stepped_back_clock_after_restart(server: tuple[_Server, int],
                                                files: dict[str, str],
                                                keys: dict[str, bytes]) -> None:
    params = _params(files, keys, server[1])
    now = 1_800_000_000 * 10**9
    first = await check.run_handshake(params, 2.0, wall_ns=lambda: now)
    assert first.ok
    # "restart": a fresh check run, same state file, clock an hour behind
    second = await check.run_handshake(params, 2.0, wall_ns=lambda: now - 3600 * 10**9)
    assert second.ok, second
    # without the state file the responder (like wireguard-go) drops the stale timestamp
    forgetful = _params(files, keys, server[1], state_file=None)
    third = await check.run_handshake(forgetful, 0.5, wall_ns=lambda: now - 3600 * 10**9)
    assert third.reason is Reason.TIMEOUT


async def test_config_problems_are_probe_errors(files: dict[str, str],
                                                keys: dict[str, bytes]) -> None:
    bad = _params(files, keys, 9, private_key_file="/nonexistent/key")
    result = await check.run_handshake(bad, 0.5)
    assert result.reason is Reason.PROBE_ERROR and "cannot read" in result.detail
    result = await check.run_handshake(_params(files, keys, 9, server_public_key="nope"), 0.5)
    assert result.reason is Reason.PROBE_ERROR
    result = await check.run_handshake(_params(files, keys, 9, host="no-such-host.invalid"), 2.0)
    assert result.reason is Reason.RESOLVE_FAILED


def test_timestamp_store_roundtrip_and_monotonic(tmp_path: Path) -> None:
    store = check.TimestampStore(tmp_path / "ts.json")
    assert store.load("k") is None
    later, earlier = wg.tai64n(2 * 10**18), wg.tai64n(10**18)
    store.save("k", later)
    store.save("k", earlier)  # never moves backwards
    assert store.load("k") == later
    (tmp_path / "ts.json").write_text("not json")
    assert store.load("k") is None


def test_parse_echo_reply() -> None:
    reply = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=0, id=5, seq=9) / b"x")
    assert parse_echo_reply(reply) == (5, 9)
    request = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, id=5, seq=9))
    assert parse_echo_reply(request) is None


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_parse_echo_reply(data: bytes) -> None:
    out = parse_echo_reply(data)
    assert out is None or all(0 <= v <= 0xFFFF for v in out)


def planned(target: Target, base_dir: Path, state_dir: Path | None = None) -> dict[str, Any]:
    return {p.kind.name: p.params
            for p in check.FAMILY.plan(PlanContext(target, base_dir, state_dir))}


def test_params_from_target_for_the_agent_plan(tmp_path: Path) -> None:
    section = WireGuardTarget(port=51999, server_public_key="K" * 43 + "=",
                              private_key_file="keys/a.key", preshared_key_file="/abs/a.psk",
                              tunnel_address="10.201.0.2/32", canary="10.201.0.1", echo_count=7)
    target = Target(id="n1", pool="p", pop="fra", region="eu", address="10.77.1.2",
                    wireguard=section)
    out = planned(target, tmp_path, state_dir=tmp_path / "state")
    assert set(out) == {"wireguard.handshake", "wireguard.session"}
    params = out["wireguard.session"]
    assert (params.host, params.port, params.echo_count) == ("10.77.1.2", 51999, 7)
    assert params.private_key_file == str(tmp_path / "keys" / "a.key")
    assert params.preshared_key_file == "/abs/a.psk"
    assert params.state_file == str(tmp_path / "state" / "wireguard-timestamps.json")
    no_canary = Target(id="n1", pool="p", pop="fra", region="eu", address="10.77.1.2",
                       wireguard=msgspec.structs.replace(section, canary=None))
    assert set(planned(no_canary, tmp_path)) == {"wireguard.handshake"}
    assert planned(
        Target(id="n2", pool="p", pop="fra", region="eu", address="10.77.1.3"), tmp_path) == {}
