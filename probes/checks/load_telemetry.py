"""Node load telemetry: parsers for what the kernel counts, and the rates between two reads.

Pure: text in, numbers out; no clocks, no I/O (``probes.checks.load`` reads the files). Each
parser raises only :class:`LoadTelemetryError`, naming the line and field it could not read.

Sources (all as Linux 6.x prints them):

* ``/proc/stat`` — the ``cpu`` line: jiffies per mode (user nice system idle iowait irq softirq
  steal guest guest_nice). Busy = everything but idle and iowait; guest time is already inside
  user/nice and is not added twice.
* ``/proc/<pid>/stat`` — a process's ``utime`` and ``stime`` (fields 14, 15; the command name in
  parentheses may itself contain spaces and parentheses, so fields are counted from the last
  ``)``).
* ``/proc/net/softnet_stat`` — one line of hex columns per CPU: packets processed, dropped
  (backlog full), time squeezes (the softirq ran out of budget).
* ``/proc/net/snmp`` — the ``Udp:`` header and value lines: ``InErrors`` and ``RcvbufErrors``
  (a socket's receive buffer was full: the VPN daemon did not read fast enough).
* ``/proc/net/dev`` — per interface: receive bytes packets errs drop fifo frame compressed
  multicast, transmit bytes packets errs drop fifo colls carrier compressed.
* ``tc -s qdisc show`` — per qdisc: ``Sent B bytes P pkt (dropped D, overlimits O requeues R)``
  and ``backlog Bb Pp requeues R``; only root qdiscs are summed (children are inside them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from probes.model import NodeLoad


class LoadTelemetryError(ValueError):
    """A kernel counter file or command output could not be read."""


def _count(text: str, what: str, where: str, base: int = 10) -> int:
    """A non-negative integer counter (``base`` 16 for softnet_stat)."""
    digits = "0123456789abcdefABCDEF" if base == 16 else "0123456789"
    if not text or not text.isascii() or any(ch not in digits for ch in text):
        raise LoadTelemetryError(f"{where}: {what} is not a counter: {text[:40]!r}")
    return int(text, base)


# ---- CPU ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CpuTimes:
    busy: int  # jiffies not idle
    total: int
    cpus: int  # per-CPU lines seen (the cores a busy share is spread over)


def parse_proc_stat(text: str) -> CpuTimes:
    busy = total = -1
    cpus = 0
    for line_no, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "cpu":
            where = f"/proc/stat line {line_no}"
            if len(fields) < 5:
                raise LoadTelemetryError(f"{where}: cpu line has {len(fields) - 1} fields")
            # user nice system idle [iowait irq softirq steal [guest guest_nice]]
            values = [_count(v, f"cpu field {i + 1}", where) for i, v in enumerate(fields[1:9])]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            total = sum(values)
            busy = total - idle
        elif fields[0].startswith("cpu") and fields[0][3:].isdigit():
            cpus += 1
    if total < 0:
        raise LoadTelemetryError("/proc/stat: no aggregate cpu line")
    return CpuTimes(busy, total, max(cpus, 1))


def parse_process_stat(text: str) -> int:
    """``utime + stime`` of ``/proc/<pid>/stat``, in clock ticks."""
    end = text.rfind(")")
    if end < 0:
        raise LoadTelemetryError("/proc/<pid>/stat: no ')' closing the command name")
    fields = text[end + 1:].split()
    # after the name: state(3) ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    # cmajflt utime(14) stime(15)
    if len(fields) < 13:
        raise LoadTelemetryError(f"/proc/<pid>/stat: {len(fields)} fields after the name")
    return (_count(fields[11], "utime", "/proc/<pid>/stat")
            + _count(fields[12], "stime", "/proc/<pid>/stat"))


# ---- softnet, UDP, interfaces, qdiscs -------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Softnet:
    processed: int
    dropped: int
    squeezed: int


def parse_softnet_stat(text: str) -> Softnet:
    processed = dropped = squeezed = 0
    rows = 0
    for line_no, line in enumerate(text.splitlines(), 1):
        cols = line.split()
        if not cols:
            continue
        where = f"softnet_stat line {line_no}"
        if len(cols) < 3:
            raise LoadTelemetryError(f"{where}: {len(cols)} columns, expected at least 3")
        processed += _count(cols[0], "processed", where, 16)
        dropped += _count(cols[1], "dropped", where, 16)
        squeezed += _count(cols[2], "time_squeeze", where, 16)
        rows += 1
    if rows == 0:
        raise LoadTelemetryError("softnet_stat: no CPU rows")
    return Softnet(processed, dropped, squeezed)


@dataclass(frozen=True, slots=True)
class UdpCounters:
    in_datagrams: int
    in_errors: int
    rcvbuf_errors: int


def parse_snmp_udp(text: str) -> UdpCounters:
    """The ``Udp:`` section of ``/proc/net/snmp`` (header line, then values line)."""
    header: list[str] | None = None
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.startswith("Udp:"):
            continue
        cols = line.split()[1:]
        if header is None:
            header = cols
            continue
        where = f"/proc/net/snmp line {line_no}"
        if len(cols) != len(header):
            raise LoadTelemetryError(f"{where}: {len(cols)} values for {len(header)} names")
        row = dict(zip(header, cols, strict=True))
        try:
            return UdpCounters(_count(row["InDatagrams"], "InDatagrams", where),
                               _count(row["InErrors"], "InErrors", where),
                               _count(row["RcvbufErrors"], "RcvbufErrors", where))
        except KeyError as exc:
            raise LoadTelemetryError(f"{where}: no {exc.args[0]} column") from None
    raise LoadTelemetryError("/proc/net/snmp: no Udp: values")


@dataclass(frozen=True, slots=True)
class InterfaceCounters:
    rx_bytes: int
    rx_packets: int
    rx_drops: int
    tx_bytes: int
    tx_packets: int
    tx_drops: int

    def __add__(self, other: InterfaceCounters) -> InterfaceCounters:
        return InterfaceCounters(*(a + b for a, b in zip(_fields(self), _fields(other),
                                                         strict=True)))


def _fields(c: InterfaceCounters) -> tuple[int, ...]:
    return (c.rx_bytes, c.rx_packets, c.rx_drops, c.tx_bytes, c.tx_packets, c.tx_drops)


NO_TRAFFIC = InterfaceCounters(0, 0, 0, 0, 0, 0)


def parse_net_dev(text: str) -> dict[str, InterfaceCounters]:
    out: dict[str, InterfaceCounters] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        if ":" not in line or "|" in line:
            continue  # the two header lines
        name, _, rest = line.partition(":")
        name = name.strip()
        cols = rest.split()
        where = f"/proc/net/dev line {line_no}"
        if not name or len(cols) < 16:
            raise LoadTelemetryError(f"{where}: expected a name and 16 counters")
        v = [_count(c, f"column {i + 1}", where) for i, c in enumerate(cols[:16])]
        out[name] = InterfaceCounters(v[0], v[1], v[3], v[8], v[9], v[11])
    return out


@dataclass(frozen=True, slots=True)
class Qdisc:
    kind: str
    device: str
    root: bool
    sent_bytes: int = 0
    sent_packets: int = 0
    dropped: int = 0
    backlog_bytes: int = 0
    backlog_packets: int = 0


_QDISC = re.compile(r"^qdisc (?P<kind>\S+) (?P<handle>\S+)(?: dev (?P<dev>\S+))? "
                    r"(?P<where>root|parent \S+|ingress)?")
_SENT = re.compile(r"^\s*Sent (?P<bytes>\d+) bytes (?P<pkts>\d+) pkt \(dropped (?P<drop>\d+),")
_BACKLOG = re.compile(r"^\s*backlog (?P<bytes>[0-9.]+)(?P<unit>[KMG]?)b (?P<pkts>\d+)p")
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


def parse_tc_qdisc(text: str) -> list[Qdisc]:
    """``tc -s qdisc show [dev X]``: one :class:`Qdisc` per ``qdisc`` line with its stats."""
    out: list[Qdisc] = []
    current: dict[str, object] | None = None

    def finish() -> None:
        if current is not None:
            out.append(Qdisc(**current))  # type: ignore[arg-type]

    for line_no, line in enumerate(text.splitlines(), 1):
        if line.startswith("qdisc "):
            finish()
            m = _QDISC.match(line)
            if m is None:
                raise LoadTelemetryError(f"tc line {line_no}: not a qdisc line: {line[:60]!r}")
            current = {"kind": m["kind"], "device": m["dev"] or "", "root": m["where"] == "root"}
            continue
        if current is None:
            if line.strip():
                raise LoadTelemetryError(f"tc line {line_no}: statistics before any qdisc")
            continue
        if (sent := _SENT.match(line)) is not None:
            current.update(sent_bytes=int(sent["bytes"]), sent_packets=int(sent["pkts"]),
                           dropped=int(sent["drop"]))
        elif (backlog := _BACKLOG.match(line)) is not None:
            try:
                size = float(backlog["bytes"])
            except ValueError:
                raise LoadTelemetryError(f"tc line {line_no}: backlog size "
                                         f"{backlog['bytes']!r}") from None
            current.update(backlog_bytes=int(size * _UNITS[backlog["unit"]]),
                           backlog_packets=int(backlog["pkts"]))
    finish()
    return out


# ---- one read, and rates between two ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LoadCounters:
    """Everything one read of a node returns; ``at`` is the reader's monotonic clock."""

    at: float
    cpu: CpuTimes | None = None
    process_ticks: int | None = None  # the VPN daemon's utime + stime
    softnet: Softnet | None = None
    udp: UdpCounters | None = None
    interfaces: InterfaceCounters = NO_TRAFFIC  # summed over the interfaces read
    qdisc_dropped: int = 0
    qdisc_backlog_packets: int = 0
    sessions: int | None = None
    effective_sessions: float | None = None


def sum_interfaces(counters: Mapping[str, InterfaceCounters],
                   names: Iterable[str] = ()) -> InterfaceCounters:
    """The named interfaces (a missing one is an error), or every one but loopback."""
    wanted = list(names)
    if not wanted:
        wanted = [n for n in counters if n != "lo"]
    total = NO_TRAFFIC
    for name in wanted:
        if name not in counters:
            raise LoadTelemetryError(f"/proc/net/dev: no interface {name!r}")
        total = total + counters[name]
    return total


def _rate(new: int, old: int, seconds: float) -> float:
    """Per second; a counter that went backwards (wrapped, reset) gives 0, not a negative."""
    return max(0, new - old) / seconds


def node_load(prev: LoadCounters, cur: LoadCounters, *, clock_ticks: int = 100,
              daemon_cores: float = 1.0) -> NodeLoad:
    """The load between two reads (``cur.at`` after ``prev.at``)."""
    seconds = cur.at - prev.at
    if not seconds > 0:
        raise LoadTelemetryError(f"reads {seconds:g} s apart: no interval to rate over")
    busy: float | None = None
    if cur.cpu is not None and prev.cpu is not None and cur.cpu.total > prev.cpu.total:
        busy = max(0, cur.cpu.busy - prev.cpu.busy) / (cur.cpu.total - prev.cpu.total)
    if cur.process_ticks is not None and prev.process_ticks is not None:
        own = _rate(cur.process_ticks, prev.process_ticks, seconds) / clock_ticks / daemon_cores
        busy = own if busy is None else max(busy, own)
    softnet_drops = softnet_squeezes = udp_errors = 0.0
    if cur.softnet is not None and prev.softnet is not None:
        softnet_drops = _rate(cur.softnet.dropped, prev.softnet.dropped, seconds)
        softnet_squeezes = _rate(cur.softnet.squeezed, prev.softnet.squeezed, seconds)
    if cur.udp is not None and prev.udp is not None:
        udp_errors = _rate(cur.udp.in_errors, prev.udp.in_errors, seconds)
    a, b = cur.interfaces, prev.interfaces
    return NodeLoad(
        interval_seconds=round(seconds, 6),
        cpu_busy_ratio=None if busy is None else round(min(busy, 1.0), 6),
        softnet_drops_per_second=round(softnet_drops, 6),
        softnet_squeezes_per_second=round(softnet_squeezes, 6),
        udp_receive_errors_per_second=round(udp_errors, 6),
        packets_per_second=round(_rate(a.rx_packets + a.tx_packets,
                                       b.rx_packets + b.tx_packets, seconds), 6),
        bytes_per_second=round(_rate(a.rx_bytes + a.tx_bytes, b.rx_bytes + b.tx_bytes,
                                     seconds), 6),
        interface_drops_per_second=round(_rate(a.rx_drops + a.tx_drops, b.rx_drops + b.tx_drops,
                                               seconds), 6),
        qdisc_backlog_packets=float(cur.qdisc_backlog_packets),
        qdisc_drops_per_second=round(_rate(cur.qdisc_dropped, prev.qdisc_dropped, seconds), 6),
        active_sessions=cur.sessions,
        effective_sessions=(None if cur.effective_sessions is None
                            else round(cur.effective_sessions, 6)))


# ---- effective sessions ----------------------------------------------------------------------

@dataclass(slots=True)
class _Peer:
    history: list[tuple[float, int]] = field(default_factory=list)  # (at, bytes so far)
    last: tuple[float, int] | None = None  # the previous read: the recent rate is since then


MIN_SPAN_SECONDS = 0.5  # a rate over less than this is noise


class EffectiveSessions:
    """Sessions weighted by their recent traffic (the brief's "effective sessions").

    Feed it every read's byte counter per session (rx + tx, as the node counts them). A session
    counts when its traffic over the last ``window_seconds`` reached ``min_bytes`` (keepalive-only
    and silent sessions count nothing), and then counts ``max(1, rate / unit_bytes_per_second)``,
    its rate being what it moved since the previous read: a light session counts one, a heavy one
    as many units of traffic as it moves now. The window decides who is a session; the rate is
    the latest, so a client that turns heavy weighs in at the next read, not after a window of
    averaging (the mesh smooths the figure). History is kept at a few points per window, so
    memory stays small per session.
    """

    POINTS_PER_WINDOW = 4

    def __init__(self, window_seconds: float = 30.0, unit_bytes_per_second: float = 125_000.0,
                 min_bytes: int = 1024) -> None:
        if not (window_seconds > 0 and unit_bytes_per_second > 0 and min_bytes >= 0):
            raise ValueError("window and unit must be > 0, min_bytes >= 0")
        self.window = window_seconds
        self.unit = unit_bytes_per_second
        self.min_bytes = min_bytes
        self._peers: dict[str, _Peer] = {}

    def observe(self, now: float, byte_counters: Mapping[str, int]) -> float:
        """Take one read (``now`` on a monotonic clock); return the effective sessions."""
        gap = self.window / self.POINTS_PER_WINDOW
        horizon = now - self.window
        effective = 0.0
        peers = self._peers
        for key, total in byte_counters.items():
            peer = peers.get(key)
            if peer is None:
                peer = peers[key] = _Peer()
            history = peer.history
            if history and total < history[-1][1]:
                history.clear()  # counter reset: the session was re-created
                peer.last = None
            if not history or now - history[-1][0] >= gap:
                history.append((now, total))
            else:
                history[-1] = (history[-1][0], total)
            # the oldest point inside the window (or the one just before it) is the base
            while len(history) > 1 and history[1][0] <= horizon:
                del history[0]
            last, peer.last = peer.last, (now, total)
            moved = total - history[0][1]
            if moved < self.min_bytes or moved <= 0 or last is None:
                continue
            recent = (total - last[1]) / max(now - last[0], MIN_SPAN_SECONDS)
            effective += max(1.0, recent / self.unit)
        for gone in [k for k in peers if k not in byte_counters]:
            del peers[gone]
        return effective
