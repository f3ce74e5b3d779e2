"""Node load telemetry without servers: the kernel counter parsers (on text as Linux 6.x prints
it), rates between reads, effective sessions, the read's script and sections; every parser
fuzzed (hypothesis): bad text is a LoadTelemetryError naming what, never another exception."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from probes.checks import load
from probes.checks import load_telemetry as lt

pytestmark = pytest.mark.agent

# captured on the CI machine kind (Debian 12, kernel 6.x), trimmed
PROC_STAT = """cpu  49430 0 9969 53350 703 0 535 1744 0 0
cpu0 21624 0 4380 30725 126 0 135 869 0 0
cpu1 27806 0 5588 22625 576 0 400 875 0 0
intr 123456 0 9 0
ctxt 9876543
"""
SOFTNET = """0002643b 00000000 00000001 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
00029b21 00000010 00000003 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000001 00000000 00000000
"""  # noqa: E501
SNMP = """Ip: Forwarding DefaultTTL InReceives
Ip: 1 64 100
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 5000 3 12 4000 10 0 0 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 0 0 0 0 0
"""  # noqa: E501
NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
  eth0: 1000000   1000    0    5    0     0          0         0   500000     800    0    1    0     0       0          0
wg0:2000 20 0 0 0 0 0 0 3000 30 0 2 0 0 0 0
"""  # noqa: E501
TC = """qdisc noqueue 0: dev lo root refcnt 2
 Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0)
 backlog 0b 0p requeues 0
qdisc pfifo 8001: dev eth0 root refcnt 3 limit 5p
 Sent 5000 bytes 50 pkt (dropped 7, overlimits 0 requeues 0)
 backlog 3Kb 2p requeues 0
qdisc fq_codel 10: dev eth0 parent 8001:1 limit 10240p flows 1024
 Sent 100 bytes 1 pkt (dropped 99, overlimits 0 requeues 0)
 backlog 0b 9p requeues 0
  maxpacket 0 drop_overlimit 0 new_flow_count 0 ecn_mark 0
"""
PID_STAT = ("4242 (wireguard-go (x) y) S 1 4242 4242 0 -1 4194560 300 0 0 0 150 50 0 0 20 0 "
            "9 0 1000 1234567 100 18446744073709551615\n")


def test_proc_stat_busy_is_everything_but_idle_and_iowait() -> None:
    cpu = lt.parse_proc_stat(PROC_STAT)
    assert cpu.total == 49430 + 9969 + 53350 + 703 + 535 + 1744
    assert cpu.busy == cpu.total - 53350 - 703
    assert cpu.cpus == 2


def test_process_stat_counts_from_the_last_parenthesis() -> None:
    assert lt.parse_process_stat(PID_STAT) == 150 + 50


def test_softnet_sums_every_cpu_in_hex() -> None:
    assert lt.parse_softnet_stat(SOFTNET) == lt.Softnet(0x2643B + 0x29B21, 0x10, 4)


def test_snmp_udp_section() -> None:
    assert lt.parse_snmp_udp(SNMP) == lt.UdpCounters(5000, 12, 10)


def test_net_dev_rows_and_sums() -> None:
    rows = lt.parse_net_dev(NET_DEV)
    assert rows["eth0"] == lt.InterfaceCounters(1_000_000, 1000, 5, 500_000, 800, 1)
    assert rows["wg0"] == lt.InterfaceCounters(2000, 20, 0, 3000, 30, 2)
    assert lt.sum_interfaces(rows) == rows["eth0"] + rows["wg0"]  # lo left out
    assert lt.sum_interfaces(rows, ["wg0"]) == rows["wg0"]
    with pytest.raises(lt.LoadTelemetryError, match="no interface 'eth9'"):
        lt.sum_interfaces(rows, ["eth9"])


def test_tc_qdisc_stats_and_sizes() -> None:
    qdiscs = lt.parse_tc_qdisc(TC)
    assert [(q.kind, q.device, q.root) for q in qdiscs] == [
        ("noqueue", "lo", True), ("pfifo", "eth0", True), ("fq_codel", "eth0", False)]
    assert qdiscs[1] == lt.Qdisc("pfifo", "eth0", True, 5000, 50, 7, 3072, 2)


def test_rates_between_two_reads() -> None:
    a = lt.LoadCounters(at=10.0, cpu=lt.CpuTimes(100, 1000, 2), process_ticks=0,
                        softnet=lt.Softnet(0, 0, 0), udp=lt.UdpCounters(0, 0, 0),
                        interfaces=lt.InterfaceCounters(0, 0, 0, 0, 0, 0))
    b = lt.LoadCounters(at=12.0, cpu=lt.CpuTimes(400, 1500, 2), process_ticks=50,
                        softnet=lt.Softnet(10, 4, 2), udp=lt.UdpCounters(9, 6, 6),
                        interfaces=lt.InterfaceCounters(2000, 20, 2, 1000, 10, 0),
                        qdisc_dropped=8, qdisc_backlog_packets=3, sessions=5,
                        effective_sessions=7.5)
    load_ = lt.node_load(a, b, clock_ticks=100, daemon_cores=1.0)
    assert load_.interval_seconds == 2.0
    assert load_.cpu_busy_ratio == 0.6  # host 300/500; the daemon 25/100 per s of one core
    assert load_.softnet_drops_per_second == 2.0
    assert load_.softnet_squeezes_per_second == 1.0
    assert load_.udp_receive_errors_per_second == 3.0
    assert load_.packets_per_second == 15.0
    assert load_.bytes_per_second == 1500.0
    assert load_.interface_drops_per_second == 1.0
    assert load_.qdisc_drops_per_second == 4.0 and load_.qdisc_backlog_packets == 3.0
    assert (load_.active_sessions, load_.effective_sessions) == (5, 7.5)
    assert load_.drops_per_second == 2.0 + 3.0 + 1.0 + 4.0
    # the daemon busier than the host (a single-threaded server on one core)
    busy = lt.node_load(a, lt.LoadCounters(at=12.0, cpu=lt.CpuTimes(150, 1500, 2),
                                           process_ticks=180), clock_ticks=100)
    assert busy.cpu_busy_ratio == 0.9


def test_counters_that_went_backwards_rate_zero_not_negative() -> None:
    a = lt.LoadCounters(at=0.0, softnet=lt.Softnet(0, 100, 100),
                        interfaces=lt.InterfaceCounters(10**9, 10**6, 5, 10**9, 10**6, 5))
    b = lt.LoadCounters(at=1.0, softnet=lt.Softnet(0, 1, 1),
                        interfaces=lt.InterfaceCounters(10, 1, 0, 10, 1, 0))
    rates = lt.node_load(a, b)
    assert rates.softnet_drops_per_second == 0 and rates.bytes_per_second == 0
    with pytest.raises(lt.LoadTelemetryError, match="apart"):
        lt.node_load(b, b)


def test_effective_sessions_weigh_sessions_by_recent_traffic() -> None:
    eff = lt.EffectiveSessions(window_seconds=10.0, unit_bytes_per_second=1000.0, min_bytes=100)
    assert eff.observe(0.0, {"light": 0, "heavy": 0, "idle": 0}) == 0.0  # nothing to rate yet
    # 10 s: light moved 500 B (50 B/s: counts 1), heavy 50 kB (5 kB/s: counts 5), idle 32 B
    assert eff.observe(10.0, {"light": 500, "heavy": 50_000, "idle": 32}) == 6.0
    # 30 s: light silent for 20 s (only its window counts), heavy still at 5 kB/s
    assert eff.observe(30.0, {"light": 500, "heavy": 150_000, "idle": 64}) == 5.0
    assert eff.observe(31.0, {"heavy": 10}) == 0.0  # counter reset: a new session
    assert eff.observe(41.0, {"heavy": 20_010}) == 2.0


def test_script_sections_round_trip() -> None:
    params = load.LoadParams(node="n1", daemon_pid_file="/run/x y.pid",
                             wireguard_interface="wg0", ikev2=True)
    text = load.script(params)
    assert "'/run/x y.pid'" in text and "wg show wg0 dump" in text and "swanctl --list-sas" in text
    out = "\n".join(f"{load._MARK}{name}\n{body}" for name, body in
                    [("stat", PROC_STAT), ("dev", NET_DEV), ("tc", TC), ("pid", PID_STAT)])
    parts = load.sections("noise before\n" + out)
    assert set(parts) == {"stat", "dev", "tc", "pid"}
    counters = load.counters_from(parts, params, 1.0, {"a": 10}, lt.EffectiveSessions())
    assert counters.process_ticks == 200 and counters.qdisc_dropped == 7
    assert counters.qdisc_backlog_packets == 2 and counters.sessions == 1
    with pytest.raises(lt.LoadTelemetryError, match="no /proc/stat"):
        load.counters_from({"dev": NET_DEV}, params, 1.0, None, lt.EffectiveSessions())


IKE_SAS = """lab: #6, ESTABLISHED, IKEv2, 818e1e172aa1c550_i cb9c752afdeb270b_r*
  local  'vpnnode.lab' @ 10.200.0.1[4500]
  remote 'client1.lab' @ 10.200.0.2[4500]
  AES_CBC-256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048
  established 5s ago, rekeying in 13965s
  net: #1, reqid 1, INSTALLED, TUNNEL-in-UDP, ESP:AES_CBC-128/HMAC_SHA2_256_128
    installed 5s ago, rekeying in 3318s, expires in 3955s
    in  c6c1a6c9,    336 bytes,     4 packets,     0s ago
    out c7f1ee6d,   1000 bytes,     5 packets,     0s ago
    local  10.210.1.0/24
    remote 10.210.2.0/24
(unnamed): #7, CONNECTING, IKEv2, 82f21de0e399aea2_i 0000000000000000_r
  remote '%any' @ 10.200.0.3[500]
"""


def test_ikev2_sessions_are_established_sas_with_their_child_bytes() -> None:
    assert load.ikev2_sessions(IKE_SAS) == {"client1.lab@10.200.0.2[4500]": 1336}


# ---- fuzz ------------------------------------------------------------------------------------

PARSERS = [lt.parse_proc_stat, lt.parse_process_stat, lt.parse_softnet_stat,
           lt.parse_snmp_udp, lt.parse_net_dev, lt.parse_tc_qdisc]
SAMPLES = [PROC_STAT, PID_STAT, SOFTNET, SNMP, NET_DEV, TC]


def _mutations() -> st.SearchStrategy[str]:
    """Real outputs cut, spliced and sprinkled with junk, plus plain random text."""
    real = st.sampled_from(SAMPLES)
    cut = st.tuples(real, st.integers(0, 2000)).map(lambda t: t[0][: t[1]])
    junk = st.text(alphabet=st.sampled_from(list(" \t\n:()-,abcdefxyzKMGbp0123456789@#é\x00")),
                   max_size=200)
    spliced = st.tuples(real, junk, st.integers(0, 2000)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2]:])
    return st.one_of(cut, spliced, junk, st.text(max_size=300))


@given(text=_mutations(), which=st.integers(0, len(PARSERS) - 1))
def test_parsers_fail_only_with_their_error(text: str, which: int) -> None:
    with contextlib.suppress(lt.LoadTelemetryError):
        PARSERS[which](text)


@given(text=_mutations())
def test_sections_and_sessions_never_crash(text: str) -> None:
    load.sections(text)
    load.ikev2_sessions(text)


@given(st.lists(st.tuples(st.floats(0, 5), st.dictionaries(st.sampled_from("abc"),
                                                           st.integers(0, 10**7), max_size=3)),
                max_size=30))
def test_effective_sessions_are_bounded(reads: list[tuple[float, dict[str, int]]]) -> None:
    """Never negative; never more than the sessions' own rates allow; silent sessions add 0."""
    eff = lt.EffectiveSessions(window_seconds=10.0, unit_bytes_per_second=1000.0, min_bytes=1)
    now = 0.0
    for dt, counters in reads:
        now += dt + 0.001
        value = eff.observe(now, counters)
        assert value >= 0.0
        assert value <= sum(max(1.0, total / lt.MIN_SPAN_SECONDS / 1000.0)
                            for total in counters.values()) + 1e-9
