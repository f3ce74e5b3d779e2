"""etcd for the lab: a 3-member cluster with one lab host per member, or one member on loopback.

One host per member so that ``lab.partition(host)`` cuts exactly one member off, and so that a
mesh replica can be cut from etcd alone with :func:`block_etcd` (an nftables rule in the
replica's own namespace dropping its packets to the etcd client port). Members are killed with
SIGKILL and restarted on their data directory, where they rejoin (lab-recipes.md section 7).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from probes.lab.netns import LabError
from probes.lab.topology import Host, Lab

CLIENT_PORT = 2379
PEER_PORT = 2380
# short raft timings: a lost etcd leader is replaced in about a second
RAFT_FLAGS = ["--heartbeat-interval", "100", "--election-timeout", "1000",
              "--log-level", "warn", "--logger", "zap"]


def healthy(endpoint: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/health", timeout=timeout) as r:  # noqa: S310
            return bool(json.load(r).get("health") == "true")
    except (OSError, ValueError):
        return False


@dataclass
class EtcdMember:
    name: str
    host: Host
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://{self.host.address}:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host.address}:{PEER_PORT}"


class EtcdCluster:
    """A 3-member (or n-member) etcd cluster on lab hosts; the lab stops it at teardown."""

    def __init__(self, lab: Lab, hosts: Sequence[Host]) -> None:
        self.lab = lab
        self.members = [EtcdMember(f"e{i + 1}", h, lab.dir / f"etcd-e{i + 1}")
                        for i, h in enumerate(hosts)]
        self.token = f"tw-{lab.run_id}"

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def member(self, name: str) -> EtcdMember:
        return next(m for m in self.members if m.name == name)

    def _argv(self, m: EtcdMember, state: str) -> list[str]:
        cluster = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return ["etcd", "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", cluster, "--initial-cluster-token", self.token,
                "--initial-cluster-state", state, *RAFT_FLAGS]

    def start(self, timeout: float = 60.0) -> None:
        for m in self.members:
            m.proc = m.host.popen(self._argv(m, "new"), name=m.name)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 60.0, members: Sequence[EtcdMember] = ()) -> None:
        """Until every given member (default: the running ones) says healthy, checked from
        inside its own host."""
        wanted = list(members) or [m for m in self.members if self.running(m)]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._healthy_from_host(m) for m in wanted):
                return
            time.sleep(0.1)
        raise LabError(f"etcd not healthy after {timeout} s (logs in {self.lab.dir})")

    def _healthy_from_host(self, m: EtcdMember) -> bool:
        with m.host.entered():
            return healthy(m.client_url)

    @staticmethod
    def running(m: EtcdMember) -> bool:
        return m.proc is not None and m.proc.poll() is None

    def kill(self, name: str) -> None:
        """SIGKILL one member (no graceful leave: a crash)."""
        m = self.member(name)
        if m.proc is not None and m.proc.poll() is None:
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(10)
            self.lab.untrack(m.proc.pid)

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Start a killed member again on its data directory: it rejoins the cluster."""
        m = self.member(name)
        if self.running(m):
            return
        m.proc = m.host.popen(self._argv(m, "existing"), name=m.name)
        self.wait_healthy(timeout, [m])


def block_etcd(host: Host, on: bool = True) -> None:
    """Drop (or stop dropping) what ``host`` sends to any etcd client port: the host stays
    reachable for everything else, it only loses etcd."""
    table = "tw_etcd_block"
    if on:
        rules = (f"table inet {table} {{\n chain out {{ type filter hook output priority 0;"
                 f" tcp dport {CLIENT_PORT} drop; }}\n}}\n")
        host.run(["nft", "-f", "-"], input_text=rules)
    else:
        host.run(["nft", "delete", "table", "inet", table], check=False)


class LoopbackEtcd:
    """One etcd member on 127.0.0.1 for tests that need a real etcd but no lab (no root)."""

    def __init__(self, data_dir: Path, client_port: int, peer_port: int) -> None:
        self.data_dir = data_dir
        self.endpoint = f"http://127.0.0.1:{client_port}"
        self.peer = f"http://127.0.0.1:{peer_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.data_dir.parent / "etcd.log", "ab")  # noqa: SIM115 - owned by Popen
        with log:
            self.proc = subprocess.Popen(
                ["etcd", "--name", "solo", "--data-dir", str(self.data_dir),
                 "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                 "--listen-peer-urls", self.peer, "--initial-advertise-peer-urls", self.peer,
                 "--initial-cluster", f"solo={self.peer}", *RAFT_FLAGS],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not healthy(self.endpoint):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise LabError("loopback etcd did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        # SIGKILL: a lone member blocks for seconds on SIGTERM, and tests keep no data
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
