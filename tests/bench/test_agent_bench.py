"""Agent benchmarks (slow; figures are printed, never asserted). Run with

    .venv/bin/pytest tests/bench/test_agent_bench.py -m slow -s

* TCP connect and UDP request/response probes per CPU-second of the agent, side by side with
  prometheus-blackbox-exporter (tcp prober; dns prober over UDP for the UDP case, since it has
  no generic UDP prober) against the same local targets; blackbox's CPU read from
  /proc/<pid>/stat while a tight client loop drives its /probe endpoint;
* APScheduler with one job per target at 2,000 starts/s vs the agent's per-tier rounds +
  ``call_at`` dispatch: achieved rate, start error p50/p99, CPU;
* agent RSS with 10,000 targets scheduled;
* RTT error against a known delay (the lab's delay box) at 50 % of the agent's max UDP rate.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from probes.checks import l4
from probes.checks.base import CheckResult, execute
from tests.bench.figures import record

pytestmark = [pytest.mark.slow, pytest.mark.agent]

SECONDS = 5.0
TICKS = os.sysconf("SC_CLK_TCK")

# one process: TCP accept+close on argv[1], DNS-ish UDP responder on argv[2] (flips QR, NOERROR)
TARGETS = textwrap.dedent("""
    import socket, sys, threading
    BIND = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
    def tcp(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((BIND, port)); s.listen(4096)
        while True:
            c, _ = s.accept(); c.close()
    def udp(port):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((BIND, port))
        while True:
            d, peer = s.recvfrom(2048)
            if len(d) >= 12:
                s.sendto(d[:2] + b"\\x81\\x80" + d[4:], peer)
    threading.Thread(target=tcp, args=(int(sys.argv[1]),), daemon=True).start()
    udp(int(sys.argv[2]))
""")

DNS_QUERY = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             b"\x07example\x03com\x00\x00\x01\x00\x01")

BLACKBOX_CONFIG = textwrap.dedent("""
    modules:
      tcp_connect:
        prober: tcp
        timeout: 2s
      dns_udp:
        prober: dns
        timeout: 2s
        dns:
          query_name: example.com
          query_type: A
          transport_protocol: udp
          preferred_ip_protocol: ip4
          ip_protocol_fallback: false
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def targets() -> Iterator[tuple[int, int]]:
    tcp, udp = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-c", TARGETS, str(tcp), str(udp)])
    time.sleep(0.5)
    try:
        yield tcp, udp
    finally:
        _stop(proc)


def _run_loop(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


async def _closed_loop(probe: Callable[[], Awaitable[CheckResult]], seconds: float,
                       concurrency: int) -> tuple[int, int, float]:
    """Run probes back to back for ``seconds``: (probes, failures, agent CPU seconds)."""
    done = failed = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker() -> None:
        nonlocal done, failed
        while loop.time() < end:
            result = await probe()
            done += 1
            failed += not result.ok

    cpu0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, failed, time.process_time() - cpu0


async def _drive_blackbox(url: str, seconds: float, pid: int,
                          concurrency: int = 16) -> tuple[int, int, float]:
    done = failed = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker() -> None:
            nonlocal done, failed
            while loop.time() < end:
                async with s.get(url) as resp:
                    text = await resp.text()
                done += 1
                failed += "probe_success 1" not in text

        cpu0 = _cpu_seconds(pid)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, failed, _cpu_seconds(pid) - cpu0


@pytest.fixture(scope="module")
def blackbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    binary = shutil.which("prometheus-blackbox-exporter")
    if binary is None:
        pytest.skip("prometheus-blackbox-exporter not installed")
    d = tmp_path_factory.mktemp("blackbox")
    (d / "blackbox.yml").write_text(BLACKBOX_CONFIG)
    addr = f"127.0.0.1:{_free_port()}"
    proc = subprocess.Popen([binary, f"--config.file={d / 'blackbox.yml'}",
                             f"--web.listen-address={addr}", "--log.level=error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=d)
    time.sleep(1.0)
    try:
        yield f"http://{addr}", proc.pid
    finally:
        _stop(proc)


def _line(name: str, done: int, failed: int, cpu: float, seconds: float) -> float:
    per_cpu = done / cpu if cpu else float("nan")
    print(f"  {name:<34} {done:>8} probes ({failed} failed) in {seconds:.1f}s wall, "
          f"{cpu:6.2f} CPU-s -> {per_cpu:9.0f} probes/CPU-s, {done / seconds:8.0f}/s")
    return per_cpu


def test_probes_per_cpu_second_vs_blackbox(targets: tuple[int, int],
                                           blackbox: tuple[str, int]) -> None:
    tcp_port, udp_port = targets
    url, pid = blackbox
    tcp = l4.TcpParams(host="127.0.0.1", port=tcp_port)
    udp = l4.UdpParams(host="127.0.0.1", port=udp_port, send=DNS_QUERY,
                       expect_prefix=DNS_QUERY[:2] + b"\x81\x80")
    print("\nprobes per CPU-second (agent: uvloop if installed, through checks.base.execute)")
    a_tcp = _line("agent tcp connect", *_run_loop(_closed_loop(
        lambda: execute(l4.TCP, tcp, 1.0), SECONDS, 64)), SECONDS)
    a_udp = _line("agent udp request/response", *_run_loop(_closed_loop(
        lambda: execute(l4.UDP, udp, 1.0), SECONDS, 64)), SECONDS)
    b_tcp = _line("blackbox tcp_connect", *asyncio.run(_drive_blackbox(
        f"{url}/probe?module=tcp_connect&target=127.0.0.1:{tcp_port}", SECONDS, pid)),
        SECONDS)
    b_udp = _line("blackbox dns over udp", *asyncio.run(_drive_blackbox(
        f"{url}/probe?module=dns_udp&target=127.0.0.1:{udp_port}", SECONDS, pid)), SECONDS)
    print(f"  ratio tcp agent/blackbox per CPU-s: {a_tcp / b_tcp:5.1f}x   (target >= 4x)")
    record("TCP bare probe loop", a_tcp, "probes/CPU-s", peer=b_tcp,
           peer_name="blackbox /probe, Python client")
    record("UDP bare probe loop", a_udp, "probes/CPU-s", peer=b_udp,
           peer_name="blackbox dns /probe, Python client", target=">= 20,000")
    print(f"  ratio udp agent/blackbox per CPU-s: {a_udp / b_udp:5.1f}x   "
          f"(agent udp {a_udp:.0f}/CPU-s; target >= 15,000)")


# ------------------------------------------------------------------ scheduling precision


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _apscheduler_per_target(n: int, interval: float, seconds: float) -> tuple[int, list[
        float], float]:
    from datetime import datetime, timedelta

    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    errors: list[float] = []
    sched = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
    start = datetime.now().astimezone() + timedelta(seconds=1)

    async def job(due_offset: float) -> None:
        now = datetime.now().astimezone()
        # the start this job should have had in its current period
        elapsed = (now - start).total_seconds() - due_offset
        errors.append(elapsed - interval * round(elapsed / interval))

    for i in range(n):
        offset = interval * i / n
        sched.add_job(job, "interval", seconds=interval, args=[offset],
                      next_run_time=start + timedelta(seconds=offset), misfire_grace_time=10,
                      max_instances=2)
    cpu0 = time.process_time()
    sched.start()
    await asyncio.sleep(1 + seconds)
    sched.shutdown(wait=False)
    return len(errors), errors, time.process_time() - cpu0


async def _agent_dispatch(n: int, interval: float, seconds: float,
                          tcp_port: int) -> tuple[int, list[float], float, int]:
    from probes.agent.plan import PlannedCheck
    from probes.agent.scheduler import AgentScheduler, ProbeRun, ScheduleCore
    from probes.config import TierPolicy
    from probes.model import Tier

    ran = failed = 0

    def sink(run: ProbeRun) -> None:  # keeps nothing: like the agent's metrics sink
        nonlocal ran, failed
        ran += 1
        failed += not run.result.ok

    checks = [PlannedCheck(f"n{i}", "p", "pop", "r", "tcp", l4.TCP,
                           l4.TcpParams(host="127.0.0.1", port=tcp_port), Tier.L4)
              for i in range(n)]
    core = ScheduleCore({"l4": TierPolicy(interval=interval, timeout=1.0, fast_interval=0.5,
                                          jitter=0.1)}, max_rate=1e9)
    core.load(checks)
    sched = AgentScheduler(core, sink, max_concurrency=1024, max_start_lag=1.0)
    sched.stats.keep_lag_samples = 10_000_000
    gc.collect()
    gc.freeze()  # as the agent runtime does after loading its plan
    cpu0 = time.process_time()
    await sched.start()
    await asyncio.sleep(seconds)
    await sched.stop()
    gc.unfreeze()
    return ran, sched.stats.lag_samples, time.process_time() - cpu0, failed


def test_schedule_precision_at_2000_per_second(targets: tuple[int, int]) -> None:
    tcp_port, _ = targets
    n, interval, seconds = 4000, 2.0, 10.0  # 2,000 starts/s
    print(f"\nscheduling {n} checks every {interval:g}s = {n / interval:.0f} starts/s "
          f"for {seconds:g}s")
    ran, errors, cpu = _run_loop(_apscheduler_per_target(n, interval, seconds))
    print(f"  APScheduler, one job per target (no-op jobs): {ran / seconds:7.0f} starts/s, "
          f"start error p50 {_pct(errors, .5) * 1e3:7.2f} ms p99 {_pct(errors, .99) * 1e3:7.2f}"
          f" ms, {cpu / seconds:.2f} CPU-s/s")
    ran, lags, cpu, failed = _run_loop(_agent_dispatch(n, interval, seconds, tcp_port))
    lags = [abs(lag) for lag in lags]  # a start may come up to START_AHEAD early
    print(f"  agent: APScheduler per tier + call_at dispatch, real TCP probes: "
          f"{ran / seconds:7.0f} probes/s ({failed} failed), start error "
          f"p50 {_pct(lags, .5) * 1e3:.3f} ms p99 {_pct(lags, .99) * 1e3:.3f} ms "
          f"over {len(lags)} starts (target p99 <= 2 ms), {cpu / seconds:.2f} CPU-s/s")
    record("start error p99, 2,000/s", _pct(lags, .99) * 1e3, "ms", peer=_pct(errors, .99) * 1e3,
           peer_name="APScheduler, no-op jobs", target="<= 2 ms")


# ------------------------------------------------------------------ memory

RSS_SCRIPT = textwrap.dedent("""
    import asyncio, sys, yaml, time
    from pathlib import Path
    from probes.agent.runtime import Agent
    d = Path(sys.argv[1]); n = int(sys.argv[2]); port = int(sys.argv[3])
    targets = [{"id": f"node-{i}", "pool": f"pool-{i % 20}", "pop": f"pop-{i % 50}",
                "region": "eu", "address": "127.0.0.1", "l4": {"tcp_ports": [port]}}
               for i in range(n)]
    (d / "key").write_text("k" * 64)
    (d / "key").chmod(0o600)
    # the default tiers (L4 every 2 s): 10,000 targets are 5,000 probes/s
    cfg = {"agent": {"vantage": "bench", "listen": "127.0.0.1:1", "state_dir": str(d / "st"),
                     "max_probe_rate": 6000},
           "mesh": {"endpoints": ["http://127.0.0.1:9"], "key_id": "k", "key_file": "key"},
           "targets": targets}
    (d / "agent.yaml").write_text(yaml.safe_dump(cfg))
    async def main():
        agent = Agent(d / "agent.yaml", listen=f"127.0.0.1:{port + 1}")
        await agent.start()
        # the window probes are counted over: from the scheduler's start to the last scrape's
        # end, which is 12 s plus the scrapes' own time (up to seconds each when the loop is
        # busy): dividing by 12 s made the agent look as if it started more than was due
        stats = agent.scheduler.stats
        began, started0, refused0 = time.monotonic(), stats.started_total, stats.overloaded_total
        scrapes = []
        for _ in range(6):  # a Prometheus (another process: curl) scraping every 2 s
            await asyncio.sleep(2)
            t = time.monotonic()
            curl = await asyncio.create_subprocess_exec(
                "curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port + 1}/metrics")
            assert await curl.wait() == 0
            scrapes.append(time.monotonic() - t)
        window = time.monotonic() - began
        rss = [l for l in Path("/proc/self/status").read_text().splitlines()
               if l.startswith("VmRSS")][0]
        # start lag from the agent's own histogram (upper bucket bounds): samples kept for the
        # benchmark would be memory the agent does not use
        lag = agent.probe_stats.lag
        def bound(q):
            total, running = sum(lag.counts), 0
            for upper, count in zip([*lag.buckets, float("inf")], lag.counts):
                running += count
                if running >= q * total:
                    return upper
        print(max(scrapes), bound(.5), bound(.99), stats.overloaded_total - refused0)
        print(window, len(agent.checks), stats.started_total - started0, rss.split()[1])
        heavy = [m for m in ("aioquic", "cryptography", "OpenSSL", "nacl", "scapy",
                             "probes.checks.quic", "probes.checks.ikev2") if m in sys.modules]
        print(",".join(heavy) or "-")
        await agent.stop(drain_timeout=0)
    import uvloop; uvloop.run(main())
""")


def _agent_rss(tmp_path: Path, n: int, tcp_port: int) -> list[str]:
    folder = tmp_path / str(n)
    folder.mkdir()
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(folder), str(n),
                          str(tcp_port)], capture_output=True, text=True, timeout=300,
                         check=True)
    return out.stdout.split()[-9:]


def test_rss_with_10000_targets(targets: tuple[int, int], tmp_path: Path) -> None:
    """RSS of a TCP-only agent with 1 and with 10,000 targets (the default 2 s L4 interval,
    reporter spooling to a mesh that does not answer, /metrics scraped every 2 s by curl): the
    fixed part is the 1-target agent's, the per-target part the difference over 9,999."""
    tcp_port, _ = targets
    one = _agent_rss(tmp_path, 1, tcp_port)
    scrape, p50, p99, overloaded, window, checks, started, rss_kb, heavy = _agent_rss(
        tmp_path, 10_000, tcp_port)
    fixed, full = int(one[7]) / 1024, int(rss_kb) / 1024
    per_target = (full - fixed) * 1024 / 9_999
    share = int(started) / max(int(started) + int(overloaded), 1)
    seconds = float(window)
    print(f"\nagent RSS with {checks} targets scheduled (2 s L4 interval: 5,000 probes/s due; "
          f"{started} probes started in {seconds:.1f} s, {int(started) / seconds:.0f}/s, "
          f"{overloaded} refused as overloaded; reporter spooling, /metrics scraped every 2 s): "
          f"{full:.1f} MB (target <= 110 MB) = fixed {fixed:.1f} MB (the same agent with 1 "
          f"target; heavy modules loaded: {one[8]}) + {per_target:.2f} KB per target; slowest "
          f"scrape {float(scrape):.2f} s; start lag meanwhile p50 <= {float(p50) * 1e3:g} ms "
          f"p99 <= {float(p99) * 1e3:g} ms (histogram bounds); heavy modules with "
          f"10,000: {heavy}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if share < 0.5:
        print(f"  the agent started only {share:.0%} of the probes it was asked for: the machine "
              "is too loaded for this to be the RSS of an agent probing at 5,000/s")
    # each check starts at most once a round (all succeed: no fast re-probes), and a round
    # opens every 2 s: what the window holds, plus the round open at its start
    assert int(started) <= int(checks) * (seconds / 2 + 1), "more probes started than were due"
    record(f"RSS, 10,000 targets (fixed {fixed:.1f} MB + {per_target:.2f} KB each)", full, "MB",
           target="<= 110 MB")


# ------------------------------------------------------------------ RTT accuracy (lab)


def _tagged_query(i: int) -> bytes:
    """DNS_QUERY with a per-probe id and name, so the wire capture can pair each exchange."""
    return struct.pack("!H", i & 0xFFFF) + DNS_QUERY[2:13] + f"{i:07x}".encode() + DNS_QUERY[20:]


@pytest.mark.lab
def test_rtt_error_against_known_delay(lab: Any, tmp_path: Path) -> None:
    """The agent's UDP RTT against the truth, two ways: against the delay box's nominal delay
    (includes the box's own error: it is a Python process sharing the 2 cores with the agent and
    the echo server, and its delay drifts when it is late), and against kernel timestamps taken on
    the agent's interface (the agent's own error: its send timestamp vs the packet on the wire)."""
    from tests.bench import wiretap

    node, agent = lab.add_host("node1"), lab.add_host("agent1")
    node.popen([sys.executable, "-c", TARGETS, "7101", "7102", "0.0.0.0"],
               name="targets")
    time.sleep(0.5)
    params = l4.UdpParams(host=node.address, port=7102, send=DNS_QUERY)
    tag = itertools.count(1)

    async def measure(rate: float, seconds: float) -> tuple[dict[bytes, float], int]:
        rtts: dict[bytes, float] = {}
        tasks: set[asyncio.Task[CheckResult]] = set()
        loop = asyncio.get_running_loop()
        start = loop.time()
        count = int(rate * seconds)

        def done(task: asyncio.Task[CheckResult], key: bytes) -> None:
            tasks.discard(task)
            if task.result().ok:
                rtts[key] = task.result().phases["rtt"]

        for i in range(count):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            query = _tagged_query(next(tag))
            task = loop.create_task(execute(l4.UDP, msgspec.structs.replace(params, send=query),
                                            1.0))
            tasks.add(task)
            task.add_done_callback(functools.partial(done, key=wiretap.payload_key(query)))
        while tasks:
            await asyncio.sleep(0.05)
        return rtts, count

    # max rate = closed-loop throughput through the whole lab path (agent, router, echo server),
    # measured with the delay box already in the path, so 50 % of it loads nothing to saturation
    added = 0.020
    lab.set_delay(agent, added * 1000)
    with agent.entered():  # 512 in flight: enough that 20 ms x concurrency is not the limit
        done, _, cpu = _run_loop(_closed_loop(lambda: execute(l4.UDP, params, 1.0), 3.0, 512))
    max_rate = done / 3.0
    rate = max_rate / 2
    # the wire capture runs through the baseline too: what the box adds is the wire RTT with it
    # minus the wire RTT without it (the path's own round trip is not the box's)
    capture = tmp_path / "wire.bin"
    tap = agent.popen([sys.executable, "-c", wiretap.SCRIPT, "eth0", "7102", str(capture)],
                      name="wiretap")
    tap_log = lab.dir / f"{agent.name}-wiretap.log"
    deadline = time.monotonic() + 10
    while not (tap_log.exists() and b"ready" in tap_log.read_bytes()):
        assert time.monotonic() < deadline and tap.poll() is None, "wire capture did not start"
        time.sleep(0.05)
    lab.set_delay(agent, 0)
    with agent.entered():
        base, _ = _run_loop(measure(rate, 3.0))
    base_p50 = statistics.median(base.values())
    lab.set_delay(agent, added * 1000)
    with agent.entered():
        cpu0 = time.process_time()
        delayed, sent = _run_loop(measure(rate, 5.0))
        rate_cpu = time.process_time() - cpu0  # the agent's CPU in the 50 % run itself
        # the same at 100/s: an idle agent, so what remains is mostly the delay box's own error
        slow, slow_sent = _run_loop(measure(100.0, 5.0))
    time.sleep(0.5)
    lab.stop_process(tap)
    lab.set_delay(agent, 0)
    wire = wiretap.wire_rtts(capture)
    base_wire = [wire[k] for k in base if k in wire]
    assert base_wire, "no baseline exchange seen on the wire"
    base_wire_p50 = statistics.median(base_wire)

    def figures(rtts: dict[bytes, float]) -> str:
        nominal = [abs(r - added - base_p50) for r in rtts.values()]
        own = [abs(r - wire[k]) for k, r in rtts.items() if k in wire]
        box = [wire[k] - base_wire_p50 for k in rtts if k in wire]
        return (f"vs the nominal delay |error| p50 {_pct(nominal, .5) * 1e3:.3f} ms p99 "
                f"{_pct(nominal, .99) * 1e3:.3f} ms; vs the wire (kernel stamps on the agent's "
                f"interface, {len(own)} pairs) |error| p50 {_pct(own, .5) * 1e3:.3f} ms p99 "
                f"{_pct(own, .99) * 1e3:.3f} ms; the box really added (wire RTT minus the "
                f"baseline's wire p50 {base_wire_p50 * 1e3:.3f} ms) p50 "
                f"{_pct(box, .5) * 1e3:.3f} ms p99 {_pct(box, .99) * 1e3:.3f} ms")

    print(f"\nRTT error, 20 ms delay box, 100 probes/s (reference): {len(slow)}/{slow_sent} "
          f"replies; {figures(slow)}")
    print(f"RTT error, 20 ms delay box, {rate:.0f} probes/s (50 % of the {max_rate:.0f}/s "
          f"closed-loop max through the lab path, {done / cpu:.0f} probes/CPU-s at that max; "
          f"agent CPU in this run {sent / rate_cpu:.0f} probes/CPU-s):"
          f" {len(delayed)}/{sent} replies; baseline p50 {base_p50 * 1e3:.3f} ms; "
          f"{figures(delayed)} (target <= 0.1 / 1 ms); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
