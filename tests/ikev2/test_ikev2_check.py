"""The asyncio shell over loopback against the in-memory responder (no root needed)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest

from probes.checks.base import PlanContext, execute
from probes.checks.ikev2 import AUTH, FAMILY, INIT, TUNNEL, Ikev2Params, run_level
from probes.model import Reason
from tests.ikev2.fake_responder import FakeResponder

pytestmark = pytest.mark.ikev2


class _Server(asyncio.DatagramProtocol):
    def __init__(self, answer: Callable[[bytes], bytes | None], nat_t: bool) -> None:
        self.answer, self.nat_t = answer, nat_t
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        try:
            reply = self.answer(data)
        except Exception:  # the fake responder is strict; a probe bug shows up as a timeout
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(bytes(4) + reply if self.nat_t else reply, addr)


@asynccontextmanager
async def serve(answer: Callable[[bytes], bytes | None]) -> AsyncIterator[tuple[int, int]]:
    loop = asyncio.get_running_loop()
    t500, _ = await loop.create_datagram_endpoint(lambda: _Server(answer, False),
                                                  local_addr=("127.0.0.1", 0))
    t4500, _ = await loop.create_datagram_endpoint(lambda: _Server(answer, True),
                                                   local_addr=("127.0.0.1", 0))
    try:
        yield t500.get_extra_info("sockname")[1], t4500.get_extra_info("sockname")[1]
    finally:
        t500.close()
        t4500.close()


def _params(ports: tuple[int, int], **kw: object) -> Ikev2Params:
    base: dict[str, object] = dict(host="127.0.0.1", port=ports[0], nat_t_port=ports[1],
                                   psk="secret", remote_id="node.test", retransmit_initial=0.1,
                                   proposals=("aes256gcm16-prfsha256-ecp256",))
    base.update(kw)
    return Ikev2Params(**base)  # type: ignore[arg-type]


async def test_auth_ok_and_nat_float_over_loopback() -> None:
    responder = FakeResponder(address=("127.0.0.1", 0), behind_nat=True)
    async with serve(responder.handle) as ports:
        responder.address = ("127.0.0.1", ports[0])
        result = await execute(AUTH, _params(ports), 3.0)
    assert result.ok, result
    assert result.facts["nat_t"] is True and result.facts["responder_auth_verified"] is True
    assert result.facts["delete_acked"] is True and responder.deleted == [1]
    assert set(result.phases) >= {"sa_init", "auth", "delete"}


async def test_failures_are_results_never_exceptions() -> None:
    responder = FakeResponder(address=("127.0.0.1", 0), wrong_auth=True)
    async with serve(responder.handle) as ports:
        forged = await execute(AUTH, _params(ports), 3.0)
        wrong = await execute(AUTH, _params(ports, psk="nope"), 3.0)
        none = await execute(INIT, _params(ports, proposals=("aes128-sha256-modp2048",)), 3.0)
    assert forged.reason is Reason.AUTH_FAILED and responder.deleted == [1], forged
    assert forged.facts["delete_acked"] is True  # the IKE SA the responder holds is gone
    assert wrong.reason is Reason.AUTH_FAILED, wrong
    assert none.reason is Reason.NO_PROPOSAL_CHOSEN and none.facts["alive"] is True, none

    async with serve(lambda data: os.urandom(len(data))) as ports:  # noise back: dropped
        noise = await execute(INIT, _params(ports), 0.6)
    assert noise.reason is Reason.BAD_RESPONSE and noise.facts.get("alive") is not True, noise

    async with serve(lambda data: None) as ports:  # silence
        silent = await execute(INIT, _params(ports), 0.4)
    assert silent.reason is Reason.TIMEOUT, silent

    refuse = FakeResponder(address=("127.0.0.1", 0), refuse_child=True)
    async with serve(refuse.handle) as ports:
        child = await execute(TUNNEL, _params(ports, ping="10.8.0.1"), 3.0)
    assert child.reason is Reason.CHILD_SA_FAILED and child.facts["child_sa_error"], child

    missing = await run_level(_params((1, 2), psk=None), 1.0, "auth")
    assert missing.reason is Reason.PROBE_ERROR
    bad = await run_level(_params((1, 2), proposals=("rot13-md5",)), 1.0, "init")
    assert bad.reason is Reason.PROBE_ERROR


async def test_tunnel_without_echo_replies_is_tunnel_no_reply() -> None:
    """The fake responder negotiates the CHILD_SA but routes nothing: every echo is lost."""
    responder = FakeResponder(address=("127.0.0.1", 0))

    def answer(data: bytes) -> bytes | None:
        if data[:4] != bytes(4) and len(data) > 8 and data[:4] == b"\x11\x22\x33\x44":
            return None  # ESP to the responder's SPI: swallowed
        return responder.handle(data)

    async with serve(answer) as ports:
        result = await execute(TUNNEL, _params(ports, echo_count=3, echo_interval=0.01), 3.0)
    assert result.reason is Reason.TUNNEL_NO_REPLY, result
    assert result.quality is not None
    assert result.quality.sent == 3 and result.quality.loss_ratio == 1
    assert responder.deleted == [3, 1]  # the CHILD_SA, then the IKE SA


def test_resolve_failure() -> None:
    name = "no-such-host.invalid"
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(name, 500)
    result = asyncio.run(run_level(Ikev2Params(host=name), 1.0, "init"))
    assert result.reason is Reason.RESOLVE_FAILED


def params_from_target(target: Any, base_dir: Path) -> dict[str, Any]:
    return {p.kind.name: p.params for p in FAMILY.plan(PlanContext(target, base_dir))}


def test_params_from_config_target(tmp_path: Path) -> None:
    from probes.config import IKEv2Target, Target

    target = Target(id="n1", pool="p", pop="fra", region="eu", address="192.0.2.10",
                    ikev2=IKEv2Target(psk_file="psk", remote_id="node.example",
                                      ping="10.210.0.1", echo_count=3))
    built = params_from_target(target, tmp_path)
    assert set(built) == {"ikev2.init", "ikev2.auth", "ikev2.tunnel"}
    assert built["ikev2.auth"].psk_file == str(tmp_path / "psk")
    assert built["ikev2.tunnel"].host == "192.0.2.10" and built["ikev2.tunnel"].echo_count == 3
    bare = Target(id="n2", pool="p", pop="fra", region="eu", address="192.0.2.11",
                  ikev2=IKEv2Target())
    assert set(params_from_target(bare, tmp_path)) == {"ikev2.init"}
    plan = pytest.importorskip("probes.agent.plan")  # the agent's planner picks these up
    planned = plan.plan_target(target, tmp_path, tmp_path)
    assert {c.check for c in planned} >= {"ikev2.init", "ikev2.auth", "ikev2.tunnel"}
