"""The HA lab: a 3-member etcd cluster, mesh replicas (real ``tunnelwatch mesh`` processes on
the etcd store) and a recording webhook receiver, each on a lab host of its own. Used by the HA
tests, the failover benchmark and ``tunnelwatch demo --ha``.

The driving process talks to the lab from the receiver's host (``hook``): its HTTP calls run
inside ``hook.entered()``, and the receiver's listening socket is created there too. The
observation stream is synthetic (signed batches as three agents would post them): what is shown
here is the replicas' behaviour, not the probes'.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from probes.lab.etcd import EtcdCluster
from probes.lab.netns import LabError
from probes.lab.topology import Host, Lab
from probes.mesh.publish.envelope import decode_envelope
from probes.model import Observation, ObservationBatch, Reason, Verdict, encode, signing

AGENTS = ("va", "vb", "vc")
HOOK_KEY = b"0123456789abcdef0123456789abcdef"
MESH_PORT = 9480
HOOK_PORT = 9999
LEASE_TTL = 3
CLOCK_MARGIN = 1.0


@dataclass(frozen=True)
class Delivery:
    key: str  # Idempotency-Key
    node: str
    seq: int
    digest: str  # sha256 of the body
    source: str  # the sending replica's address
    at: float  # monotonic time the delivery was answered
    started: float  # monotonic time its request line and headers had arrived


class Recorder(BaseHTTPRequestHandler):
    """A webhook receiver that records every verified delivery and answers after ``delay``."""

    deliveries: ClassVar[list[Delivery]] = []
    delay: ClassVar[float] = 0.02
    # while set and not yet opened, answers wait for it: a backlog builds up behind it, so a
    # fault that follows its opening lands mid-delivery however slowly the machine posts
    hold: ClassVar[threading.Event | None] = None
    lock = threading.Lock()

    def do_POST(self) -> None:
        started = time.monotonic()
        body = self.rfile.read(int(self.headers["Content-Length"]))
        hold = self.hold
        if hold is not None:
            hold.wait(30)
        ok = signing.verify(HOOK_KEY, self.headers[signing.HEADER_TIMESTAMP], body,
                            self.headers[signing.HEADER_SIGNATURE])
        time.sleep(self.delay)
        if ok:
            verdict = decode_envelope(body).verdict
            with self.lock:
                self.deliveries.append(Delivery(self.headers["Idempotency-Key"], verdict.node,
                                                verdict.seq, hashlib.sha256(body).hexdigest(),
                                                self.client_address[0], time.monotonic(),
                                                started))
        self.send_response(204 if ok else 401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Replica:
    name: str
    host: Host
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def base(self) -> str:
        return f"http://{self.host.address}:{MESH_PORT}"


@dataclass
class HACluster:
    lab: Lab
    etcd: EtcdCluster
    hook: Host
    replicas: list[Replica] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    agent_seq: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AGENTS, 0))

    # ---- set-up ---------------------------------------------------------------------------

    @classmethod
    def build(cls, lab: Lab, replicas: int = 3, nodes: int = 6) -> HACluster:
        etcd = EtcdCluster(lab, [lab.add_host(f"e{i}") for i in (1, 2, 3)])
        hook = lab.add_host("hook")
        cluster = cls(lab, etcd, hook)
        etcd.start()
        Recorder.deliveries = []
        Recorder.hold = None  # a test that failed while holding leaves no wait behind
        with hook.entered():
            cluster.server = ThreadingHTTPServer((hook.address, HOOK_PORT), Recorder)
        threading.Thread(target=cluster.server.serve_forever, daemon=True).start()
        lab.on_close(cluster.close_receiver)
        for i in range(1, replicas + 1):
            host = lab.add_host(f"m{i}")
            folder = lab.dir / f"m{i}"
            folder.mkdir()
            cluster.replicas.append(Replica(f"m{i}", host, cluster._config(folder, host,
                                                                          f"m{i}", nodes)))
        for replica in cluster.replicas:
            cluster.start(replica)
        return cluster

    def close_receiver(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def _config(self, folder: Path, host: Host, name: str, nodes: int) -> Path:
        signing.write_key_file(folder / "hook.key", HOOK_KEY)
        lines = [f"listen: {host.address}:{MESH_PORT}", "database: mesh.db", "agents:"]
        for agent in AGENTS:
            key = self.lab.dir / f"{agent}.key"
            if not key.exists():
                signing.write_key_file(key, signing.generate_key())
            lines.append(f"  - {{name: {agent}, key_file: {key}}}")
        lines.append("nodes:")
        lines += [f"  - {{id: n{i}, pool: p{i}}}" for i in range(nodes)]
        endpoints = ", ".join(f"'{e}'" for e in self.etcd.endpoints)
        url = f"http://{self.hook.address}:{HOOK_PORT}/hook"
        # no dwell: the fault stream flips nodes every few rounds, posted as fast as it goes
        lines += ["decision:", "  damping: {enabled: false}", "  min_dwell_seconds: 0",
                  "store:", "  type: etcd", f"  endpoints: [{endpoints}]",
                  f"  prefix: /tw/{self.lab.run_id}", f"  replica: {name}",
                  f"  lease_ttl_seconds: {LEASE_TTL}", f"  clock_margin_seconds: {CLOCK_MARGIN}",
                  "  request_timeout_seconds: 0.5",
                  "publishers:",
                  f"  - {{type: webhook, name: hook, url: '{url}', key_id: k1,"
                  " key_file: hook.key, timeout: 2.0,",
                  "     retry: {initial_backoff: 0.05, max_backoff: 0.3, poll_interval: 0.05}}"]
        path = folder / "mesh.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    # ---- replicas -------------------------------------------------------------------------

    def start(self, replica: Replica, timeout: float = 60.0) -> None:
        replica.proc = replica.host.popen(
            [sys.executable, "-m", "probes.cli", "mesh", "--config", str(replica.config)],
            name="mesh")
        replica.started_at = time.monotonic()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get(replica, "/healthz")
                return
            except OSError:
                time.sleep(0.05)
            if replica.proc.poll() is not None:
                raise LabError(f"{replica.name} exited (logs in {self.lab.dir})")
        raise LabError(f"{replica.name} did not come up")

    def kill(self, replica: Replica) -> None:
        if replica.proc is not None and replica.proc.poll() is None:
            os.kill(replica.proc.pid, signal.SIGKILL)
            replica.proc.wait(10)
            self.lab.untrack(replica.proc.pid)

    def alive(self) -> list[Replica]:
        return [r for r in self.replicas if r.proc is not None and r.proc.poll() is None]

    def get(self, replica: Replica, path: str, timeout: float = 5.0) -> Any:
        url = replica.base + path
        with self.hook.entered(), urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310
            return json.load(r)

    def text(self, replica: Replica, path: str) -> str:
        url = replica.base + path
        with self.hook.entered(), urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310
            return str(r.read().decode())

    def leader_header(self, replica: Replica, path: str = "/v1/verdicts") -> str | None:
        url = replica.base + path
        with self.hook.entered(), urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310
            leader: str | None = r.headers.get("X-Tunnelwatch-Leader")
            return leader

    def leader(self, among: list[Replica] | None = None) -> Replica | None:
        """The replica that says it is leading (and may publish), if any."""
        for replica in among or self.alive():
            try:
                if self.get(replica, "/v1/leader", timeout=2.0)["leading"]:
                    return replica
            except OSError:
                continue
        return None

    def wait_leader(self, among: list[Replica] | None = None, timeout: float = 30.0) -> Replica:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.leader(among)
            if found is not None:
                return found
            time.sleep(0.02)
        raise LabError("no leader")

    # ---- the fault stream -----------------------------------------------------------------

    def round(self, r: int, nodes: int = 6) -> list[ObservationBatch]:
        """One round of batches: every node fails or passes everywhere, at its own rhythm."""
        out = []
        for agent in AGENTS:
            items = []
            for i in range(nodes):
                self.agent_seq[agent] += 1
                ok = (r // (2 + i % 3)) % 2 == 0
                items.append(Observation(node=f"n{i}", check="wg", vantage=agent,
                                         seq=self.agent_seq[agent], wall_time=time.time(), ok=ok,
                                         reason=Reason.OK if ok else Reason.TIMEOUT,
                                         duration_seconds=0.01, kind="wireguard.handshake"))
            out.append(ObservationBatch(version=1, agent=agent, batch_seq=r + 1,
                                        sent_at=time.time(), observations=items))
        return out

    def post_round(self, r: int, nodes: int = 6) -> None:
        """Post round ``r`` to every live replica (agents report to all of them)."""
        for batch in self.round(r, nodes):
            body = encode(batch)
            key = signing.load_key(self.lab.dir / f"{batch.agent}.key")
            for replica in self.alive():
                headers = signing.signed_headers(batch.agent, batch.agent, key, body, time.time())
                req = urllib.request.Request(replica.base + "/v1/batches",  # noqa: S310
                                             data=body, headers=headers)
                try:
                    with self.hook.entered(), urllib.request.urlopen(req, timeout=10):  # noqa: S310
                        pass
                except urllib.error.HTTPError as exc:
                    log = self.lab.dir / f"{replica.host.name}-mesh.log"
                    tail = log.read_text()[-3000:] if log.exists() else ""
                    raise LabError(f"{replica.name}: {exc.code} {exc.read()!r}\n{tail}"
                                   ) from None

    def log(self, replica: Replica, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The shared log as ``replica`` serves it (retried: a replica that just got etcd
        back fails fast for a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return list(self.get(replica, "/v1/verdicts?after=0&limit=100000")["log"])
            except urllib.error.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def wait_delivered(self, replica: Replica, timeout: float = 60.0) -> set[str]:
        """Until every key of the shared log has reached the receiver; the wanted keys."""
        deadline = time.monotonic() + timeout
        while True:
            want = {log_key(e) for e in self.log(replica)}
            got = {d.key for d in list(Recorder.deliveries)}
            if want <= got or time.monotonic() > deadline:
                return want
            time.sleep(0.1)


def log_key(entry: dict[str, Any]) -> str:
    """The idempotency key of a ``/v1/verdicts?after=`` log entry."""
    return msgspec.convert(entry["verdict"], Verdict).idempotency_key


def delivery_problems(log: list[dict[str, Any]], deliveries: list[Delivery]) -> list[str]:
    """What is wrong with the deliveries against the shared log (empty: nothing lost, nothing
    out of order, no duplicate without the same key and body)."""
    problems: list[str] = []
    want = [log_key(e) for e in log]
    if len(set(want)) != len(want):
        problems.append("the shared log holds a verdict (node, epoch, seq) twice")
    got = {d.key for d in deliveries}
    if lost := set(want) - got:
        problems.append(f"lost: {sorted(lost)[:5]}")
    if invented := got - set(want):
        problems.append(f"delivered but not in the log: {sorted(invented)[:5]}")
    bodies: dict[str, set[str]] = defaultdict(set)
    for d in deliveries:
        bodies[d.key].add(d.digest)
    if any(len(b) != 1 for b in bodies.values()):
        problems.append("a duplicate key came with a different body")
    log_seqs: dict[str, list[int]] = defaultdict(list)
    for e in log:  # the log itself: per node, revision order is seq order
        log_seqs[e["verdict"]["node"]].append(e["verdict"]["seq"])
    if any(s != sorted(s) for s in log_seqs.values()):
        problems.append("the log is out of seq order for a node")
    firsts: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for d in deliveries:
        if d.key not in seen:
            seen.add(d.key)
            firsts[d.node].append(d.seq)
    if firsts != log_seqs:
        problems.append("first deliveries per node do not follow the log order")
    return problems


def check_deliveries(log: list[dict[str, Any]], deliveries: list[Delivery]) -> None:
    """Raise (for tests) unless nothing was lost, reordered or duplicated with another body."""
    problems = delivery_problems(log, deliveries)
    if problems:
        raise AssertionError("; ".join(problems))
