"""Every protocol core, through the shared driver and its real check, against a server that
answers with random datagrams: always a failed result with a clean closed-enum reason, never an
exception and never ``probe-error`` (what a crash inside a check becomes).

The "server" is a UDP socket on loopback that answers each datagram the check sends with the
next generated reply, shaped like an answer of the protocol (type bytes, our SPI or index, then
random) or entirely random. Slow variants push more examples."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probes.checks import ikev2, openvpn, quic, wireguard
from probes.checks.base import CheckKind, CheckResult, execute
from probes.model import Reason
from probes.protocols import wireguard as wg

FAST = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
TIMEOUT = 0.25

# a reply is made from the request it answers: a few bytes of it kept, the rest random
Reply = tuple[int, bytes]  # (bytes of the request to keep in front, random rest)
REPLIES = st.lists(st.tuples(st.sampled_from([0, 1, 4, 8, 16]), st.binary(max_size=300)),
                   min_size=1, max_size=3)


class _Garbage(asyncio.DatagramProtocol):
    def __init__(self, replies: list[Reply], shape: Callable[[bytes, Reply], bytes]) -> None:
        self.replies = replies
        self.shape = shape
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.DatagramTransport)
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        for reply in self.replies:
            self.transport.sendto(self.shape(data, reply), addr)


async def _against(replies: list[Reply], shape: Callable[[bytes, Reply], bytes],
                   check: Callable[[int], CheckResult | object]) -> CheckResult:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Garbage(replies, shape), local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        result = await check(port)  # type: ignore[misc]
        assert isinstance(result, CheckResult)
        return result
    finally:
        transport.close()


def _run(kind: CheckKind[object], params_of: Callable[[int], object], replies: list[Reply],
         shape: Callable[[bytes, Reply], bytes]) -> CheckResult:
    async def check(port: int) -> CheckResult:
        return await execute(kind, params_of(port), TIMEOUT)
    return asyncio.run(_against(replies, shape, check))


def _keep(request: bytes, reply: Reply) -> bytes:
    keep, rest = reply
    return request[:keep] + rest


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Throwaway key files: a WireGuard agent key, an IKEv2 PSK the responder does not know."""
    folder = tmp_path_factory.mktemp("material")
    (folder / "agent.key").write_text(wg.encode_key(os.urandom(32)))
    (folder / "psk").write_text("not-the-responders-key")
    return {"wg_key": str(folder / "agent.key"), "psk": str(folder / "psk")}


def _wg_shape(request: bytes, reply: Reply) -> bytes:
    kind, rest = reply
    # a response / cookie reply / transport packet naming the initiation's sender index
    message = (wg.MESSAGE_RESPONSE, wg.MESSAGE_COOKIE_REPLY, wg.MESSAGE_TRANSPORT)[kind % 3]
    if kind % 2:
        return struct.pack("<B3xI", message, 7) + request[4:8] + rest
    return rest


def _wireguard(replies: list[Reply], material: dict[str, str]) -> CheckResult:
    server = wg.encode_key(wg.public_key(os.urandom(32)))
    return _run(wireguard.HANDSHAKE, lambda port: wireguard.WireGuardParams(
        host="127.0.0.1", port=port, server_public_key=server,
        private_key_file=material["wg_key"]), replies, _wg_shape)


def _openvpn(replies: list[Reply], material: dict[str, str]) -> CheckResult:
    # with bytes of the request kept: our opcode and session id echoed, then random
    return _run(openvpn.RESET, lambda port: openvpn.OpenVPNParams(host="127.0.0.1", port=port),
                replies, _keep)


def _ikev2(replies: list[Reply], material: dict[str, str]) -> CheckResult:
    # with 8 or 16 bytes kept: our SPI (and the responder's zero one), then random
    return _run(ikev2.AUTH, lambda port: ikev2.Ikev2Params(
        host="127.0.0.1", port=port, psk_file=material["psk"]), replies, _keep)


def _quic(replies: list[Reply], material: dict[str, str]) -> CheckResult:
    # aioquic drops what it cannot read (no event): such a check times out
    return _run(quic.HANDSHAKE, lambda port: quic.QuicParams(host="127.0.0.1", port=port),
                replies, _keep)


# each core's check, and the reasons a server answering garbage may get
CORES: dict[str, tuple[Callable[[list[Reply], dict[str, str]], CheckResult], set[Reason]]] = {
    "wireguard": (_wireguard, {Reason.BAD_RESPONSE, Reason.TIMEOUT, Reason.COOKIE_THEN_TIMEOUT}),
    "openvpn": (_openvpn, {Reason.BAD_PACKET, Reason.RESET_IGNORED, Reason.BAD_RESPONSE,
                           Reason.TIMEOUT}),
    "ikev2": (_ikev2, {Reason.TIMEOUT, Reason.BAD_RESPONSE, Reason.BAD_PACKET,
                       Reason.NO_PROPOSAL_CHOSEN, Reason.INVALID_KE, Reason.AUTH_FAILED}),
    "quic": (_quic, {Reason.TIMEOUT, Reason.BAD_RESPONSE, Reason.TLS_FAILED, Reason.NO_ALPN,
                     Reason.CERT_VERIFY_FAILED}),
}


def _check(core: str, replies: list[Reply], material: dict[str, str]) -> None:
    run, reasons = CORES[core]
    result = run(replies, material)
    assert not result.ok and result.reason in reasons, result


@pytest.mark.parametrize("core", sorted(CORES))
@FAST
@given(replies=REPLIES)
def test_every_core_through_the_driver_on_garbage(core: str, replies: list[Reply],
                                                   material: dict[str, str]) -> None:
    _check(core, replies, material)


@pytest.mark.slow
@pytest.mark.parametrize("core", sorted(CORES))
@SLOW
@given(replies=REPLIES)
def test_every_core_through_the_driver_on_garbage_long(core: str, replies: list[Reply],
                                                        material: dict[str, str]) -> None:
    _check(core, replies, material)
