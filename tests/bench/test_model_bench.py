"""Wire-model throughput: msgspec decode+validate of observation batches, beside the standard
library's json.loads (which validates nothing) as the peer. Prints figures; asserts none."""

from __future__ import annotations

import json
import time

import pytest

from probes.model import (
    SCHEMA_VERSION,
    Observation,
    ObservationBatch,
    Quality,
    Reason,
    decode_batch,
    encode,
)

pytestmark = pytest.mark.slow


def _batch(n: int) -> bytes:
    obs = [Observation(node=f"node{i % 500}", check="wireguard.session", vantage="fra-a",
                       seq=i, wall_time=1.79e9 + i, ok=i % 7 != 0,
                       reason=Reason.OK if i % 7 else Reason.TIMEOUT, duration_seconds=0.004,
                       kind="wireguard.session", phases={"handshake": 0.0038},
                       quality=Quality(sent=5, received=5, rtt_p50_seconds=0.0004))
           for i in range(n)]
    return encode(ObservationBatch(version=SCHEMA_VERSION, agent="fra-a", batch_seq=1,
                                   sent_at=1.79e9, observations=obs))


def _rate(fn, data: bytes, records: int, seconds: float = 1.0) -> float:  # type: ignore[no-untyped-def]
    done, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        fn(data)
        done += records
    return done / (time.process_time() - start)


def test_decode_rate() -> None:
    data = _batch(1000)
    ours = _rate(decode_batch, data, 1000)
    peer = _rate(json.loads, data, 1000)
    print(f"\nobservations decoded+validated per CPU-second: msgspec {ours:,.0f}; "
          f"json.loads (no validation) {peer:,.0f}; ratio {ours / peer:.2f}x")
    assert ours > 0
