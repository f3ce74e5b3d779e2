"""The /probe body is written directly; it must be what a fresh prometheus_client registry of
blackbox_exporter's families would expose for the same result, byte for byte (the registry
below is the oracle: how /probe answered before)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from probes.agent.http import probe_exposition
from probes.checks.base import CheckResult
from probes.model import Quality, Reason


def _oracle(result: CheckResult, timeout: float) -> bytes:
    registry = CollectorRegistry(auto_describe=True)
    Gauge("probe_success", "Whether the probe succeeded.", registry=registry).set(
        1 if result.ok else 0)
    Gauge("probe_duration_seconds", "How long the probe took.", registry=registry).set(
        result.duration_seconds)
    Gauge("probe_timeout_seconds", "The probe's time budget.", registry=registry).set(timeout)
    phases = Gauge("probe_phase_duration_seconds", "Duration of each probe phase.", ["phase"],
                   registry=registry)
    for phase, seconds in result.phases.items():
        phases.labels(phase).set(seconds)
    reason = Gauge("probe_failure_reason", "1 for the closed-enum reason of a failed probe.",
                   ["reason"], registry=registry)
    if not result.ok:
        reason.labels(result.reason.value).set(1)
    q = result.quality
    if q is not None:
        if q.rtt_p50_seconds is not None:
            Gauge("probe_rtt_seconds", "Median RTT of the probe's exchanges.",
                  registry=registry).set(q.rtt_p50_seconds)
        if q.sent:
            Gauge("probe_loss_ratio", "Share of exchanges without a reply.",
                  registry=registry).set(q.loss_ratio)
    return generate_latest(registry)


@pytest.mark.parametrize("result", [
    CheckResult(True, Reason.OK, 0.000123, phases={"connect": 0.000123}),
    CheckResult(False, Reason.TIMEOUT, 1.0, phases={}),
    CheckResult(False, Reason.REFUSED, 1e-7, phases={"connect": 1e-7, 'odd"\\\nphase': 2.5}),
    CheckResult(True, Reason.OK, 12345678.9, quality=Quality(sent=10, received=7,
                                                            rtt_p50_seconds=0.0213)),
    CheckResult(False, Reason.BAD_RESPONSE, 0.2, quality=Quality(sent=0, received=0)),
])
@pytest.mark.parametrize("timeout", [0.1, 1.0, 4.5])
def test_probe_body_is_what_a_registry_would_expose(result: CheckResult, timeout: float) -> None:
    assert probe_exposition(result, timeout) == _oracle(result, timeout)


FINITE_OR_NOT = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=200, deadline=None)
@given(ok=st.booleans(), duration=FINITE_OR_NOT, timeout=FINITE_OR_NOT,
       phases=st.dictionaries(st.text(max_size=8), FINITE_OR_NOT, max_size=3),
       reason=st.sampled_from(list(Reason)), rtt=st.none() | FINITE_OR_NOT,
       sent=st.integers(0, 5), loss=FINITE_OR_NOT)
def test_any_result_is_exposed_as_a_registry_would(
        ok: bool, duration: float, timeout: float, phases: dict[str, float], reason: Reason,
        rtt: float | None, sent: int, loss: float) -> None:
    result = CheckResult(ok, reason, duration, phases=phases,
                         quality=Quality(sent=sent, received=0, loss_ratio=loss,
                                         rtt_p50_seconds=rtt))
    assert probe_exposition(result, timeout) == _oracle(result, timeout)
