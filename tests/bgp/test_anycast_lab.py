"""The anycast controller against real BGP: gobgpd speakers per PoP, a BIRD upstream whose RIB
shows what the world would see."""

from __future__ import annotations

import asyncio

import pytest

from probes.mesh.bgp.controller import AnycastController
from probes.mesh.bgp.pop import Pin, PopState
from probes.mesh.bgp.speaker import GoBgpSpeaker
from probes.model import VerdictState as V
from tests.bgp.conftest import POPS, PREFIX, Anycast

pytestmark = [pytest.mark.bgp, pytest.mark.lab]

async def _bring_up(ctl: AnycastController) -> None:
    await ctl.start()
    for node, _pop, _role in [(f"{p}-n{j}", p, "node") for p in POPS for j in (1, 2)]:
        await ctl.on_verdict(node, V.UP)
    await asyncio.sleep(1.05)
    await ctl._apply(ctl.engine.tick(ctl.clock()))


def test_withdraw_drain_restore_guard_and_restart(anycast: Anycast) -> None:
    async def scenario() -> None:
        ctl = anycast.controller()
        await _bring_up(ctl)
        anycast.wait_paths({"pop1": 100, "pop2": 100, "pop3": 100})

        # every node of pop1 fails -> pop1's route leaves the peer's RIB
        await ctl.on_verdict("pop1-n1", V.DOWN)
        assert ctl.engine.state("pop1") is PopState.DRAINED
        await ctl.on_verdict("pop1-n2", V.DOWN)
        took = anycast.wait_paths({"pop2": 100, "pop3": 100})
        print(f"\nverdict -> withdrawal seen in the peer's RIB: {took * 1000:.0f} ms")

        # a degraded node soft-drains pop2: still announced, higher MED
        await ctl.on_verdict("pop2-n1", V.DEGRADED)
        anycast.wait_paths({"pop2": 1000, "pop3": 100})

        # the guard: pop3 failing too would be a second withdrawal -> held, announced (drained)
        await ctl.on_verdict("pop3-n1", V.DOWN)
        await ctl.on_verdict("pop3-n2", V.DOWN)
        assert ctl.engine.state("pop3") is PopState.DRAINED
        assert ctl.engine.guard_holds_total == 1
        anycast.wait_paths({"pop2": 1000, "pop3": 1000})

        # pop1 recovers: re-announced only after the hysteresis; then the held pop3 may go
        await ctl.on_verdict("pop1-n1", V.UP)
        await ctl.on_verdict("pop1-n2", V.UP)
        assert anycast.paths() == {"pop2": 1000, "pop3": 1000}
        await asyncio.sleep(1.05)
        await ctl._apply(ctl.engine.tick(ctl.clock()))
        anycast.wait_paths({"pop1": 100, "pop2": 1000})
        assert ctl.engine.state("pop3") is PopState.WITHDRAWN

        # the controller (standing for the mesh) dies: nothing is withdrawn by itself
        del ctl
        await asyncio.sleep(0.5)
        assert anycast.paths() == {"pop1": 100, "pop2": 1000}

        # a new controller adopts what the speakers announce: no change at all
        ctl2 = anycast.controller()
        await ctl2.start()
        assert {p: ctl2.engine.state(p) for p in POPS} == {
            "pop1": PopState.ANNOUNCED, "pop2": PopState.DRAINED, "pop3": PopState.WITHDRAWN}
        assert sum(rt.speaker.changes for rt in ctl2._pops.values()) == 0  # type: ignore[attr-defined]
        assert anycast.paths() == {"pop1": 100, "pop2": 1000}

    with anycast.control.entered():
        asyncio.run(scenario())


def test_pin_and_drift_repair(anycast: Anycast) -> None:
    async def scenario() -> None:
        ctl = anycast.controller()
        await _bring_up(ctl)
        anycast.wait_paths({"pop1": 100, "pop2": 100, "pop3": 100})
        await ctl.pin("pop2", Pin.WITHDRAWN, who="alice", note="maintenance window")
        anycast.wait_paths({"pop1": 100, "pop3": 100})
        assert ctl.engine.audit[-1]["who"] == "alice"
        # someone withdraws pop1 behind our back: reconcile puts it back
        await GoBgpSpeaker(anycast.daemons["pop1"].api_host,
                           local_asn=anycast.daemons["pop1"].asn).withdraw(PREFIX)
        anycast.wait_paths({"pop3": 100})
        await ctl.reconcile()
        anycast.wait_paths({"pop1": 100, "pop3": 100})
        await ctl.pin("pop2", None, who="alice")
        await asyncio.sleep(1.05)
        await ctl._apply(ctl.engine.tick(ctl.clock()))
        anycast.wait_paths({"pop1": 100, "pop2": 100, "pop3": 100})

    with anycast.control.entered():
        asyncio.run(scenario())


def test_speaker_session_loss_is_what_withdraws_a_dead_pop(anycast: Anycast) -> None:
    async def scenario() -> None:
        ctl = anycast.controller()
        await _bring_up(ctl)
        anycast.wait_paths({"pop1": 100, "pop2": 100, "pop3": 100})
        anycast.daemons["pop3"].stop()  # the PoP's speaker dies: BGP hold timer withdraws
        took = anycast.wait_paths({"pop1": 100, "pop2": 100}, timeout=15)
        print(f"\nspeaker stopped -> peer drops the path after {took:.1f} s")
        await ctl.reconcile()  # unreachable speaker: logged and counted, no exception
        assert ctl.speaker_errors_total >= 1

    with anycast.control.entered():
        asyncio.run(scenario())
