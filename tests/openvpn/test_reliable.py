"""Reliability layer: in-order delivery, ACK of every packet, retransmission driven by ``now``."""

from __future__ import annotations

import pytest

from probes.protocols.openvpn.packet import MAX_ACKS, Opcode
from probes.protocols.openvpn.reliable import (
    RECEIVE_WINDOW,
    SEND_WINDOW,
    ReliableReceiver,
    ReliableSender,
)

pytestmark = pytest.mark.openvpn
C = Opcode.CONTROL_V1


def test_receiver_delivers_in_order_and_acks_everything() -> None:
    rx = ReliableReceiver()
    assert rx.receive(1, C, b"b") == []
    assert rx.receive(2, C, b"c") == []
    assert [p for _, _, p in rx.receive(0, C, b"a")] == [b"a", b"b", b"c"]
    assert rx.receive(1, C, b"b") == []  # duplicate: not delivered again...
    assert rx.take_acks() == (1, 2, 0)  # ...but still ACKed (once per pending set)
    assert not rx.has_acks


def test_receiver_drops_beyond_window_without_ack() -> None:
    rx = ReliableReceiver()
    assert rx.receive(RECEIVE_WINDOW, C, b"far") == []
    assert not rx.has_acks


def test_receiver_acks_in_batches_of_eight() -> None:
    rx = ReliableReceiver()
    for i in range(10):
        rx.receive(i, C, b"")
    assert len(rx.take_acks()) == MAX_ACKS
    assert rx.take_acks() == (8, 9)


def test_sender_retransmits_with_backoff_until_acked() -> None:
    tx = ReliableSender(initial_timeout=1.0, max_timeout=3.0)
    mid = tx.queue(C, b"x")
    assert [m for m, _, _ in tx.due(0.0)] == [mid]
    assert tx.timer() == 1.0
    assert tx.due(0.5) == []
    assert len(tx.due(1.0)) == 1 and tx.timer() == 3.0  # 1 s then 2 s
    assert len(tx.due(3.0)) == 1 and tx.timer() == 6.0  # capped at 3 s
    assert tx.retransmissions == 2
    tx.ack((mid,))
    assert tx.timer() is None and tx.is_acked(mid) and tx.due(100.0) == []


def test_sender_without_retransmit_sends_once() -> None:
    tx = ReliableSender(retransmit=False)
    tx.queue(C, b"x")
    assert len(tx.due(0.0)) == 1
    assert tx.due(1000.0) == [] and tx.timer() is None


def test_sender_window_limits_packets_in_flight() -> None:
    tx = ReliableSender()
    for _ in range(SEND_WINDOW + 2):
        tx.queue(C, b"")
    assert len(tx.due(0.0)) == SEND_WINDOW
    tx.ack((0, 1))
    assert [m for m, _, _ in tx.due(0.1)] == [SEND_WINDOW, SEND_WINDOW + 1]
    assert not tx.is_acked(SEND_WINDOW) and not tx.is_acked(99)


def test_expedite_makes_sent_packets_due_now() -> None:
    tx = ReliableSender(initial_timeout=5.0)
    tx.queue(C, b"exit")
    tx.due(0.0)
    assert tx.due(1.0) == []
    tx.expedite(1.0)
    assert len(tx.due(1.0)) == 1 and tx.retransmissions == 1
    tx.queue(C, b"never sent")
    tx.expedite(1.0)  # a packet not yet sent goes out once, as a first send
    assert len(tx.due(1.0)) == 2


def test_fewest_sends_of_what_waits_for_an_ack() -> None:
    """Silence is judged by the least-tried pending packet: one ACKed early does not count."""
    tx = ReliableSender(initial_timeout=0.25)
    assert tx.fewest_sends_unacked == 0
    tx.queue(C, b"a")
    tx.queue(C, b"b")
    assert tx.fewest_sends_unacked == 0  # queued, not sent
    tx.due(0.0)
    assert tx.fewest_sends_unacked == 1
    tx.due(0.25)  # both retried once (timeout doubles to 0.5)
    tx.ack((0,))
    tx.due(0.75)  # b retried again
    assert tx.fewest_sends_unacked == 3 and tx.unacked == 1
    tx.ack((1,))
    assert tx.fewest_sends_unacked == 0


@pytest.mark.parametrize(("retry", "timeout", "first"), [
    (1.0, 5.0, 1.0),  # the default functional tier: the configured retry
    (1.0, 1.0, 0.25),  # a 1 s handshake timeout: retries at 0.25 s and 0.75 s
    (0.5, 1.0, 0.25),
    (1.0, 0.1, 0.05),  # never below 50 ms
])
def test_two_retries_fit_in_the_timeout(retry: float, timeout: float, first: float) -> None:
    from probes.checks.base import first_retry_after

    assert first_retry_after(retry, timeout) == pytest.approx(first)
