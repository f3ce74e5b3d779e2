"""The lab: hosts in network namespaces joined through one router namespace.

```
 host "node1"  10.77.1.2/24 ─eth0══r-node1─┐
 host "agent1" 10.77.2.2/24 ─eth0══r-agent1┼─ router (ip_forward=1, nftables impairments)
 ...                                        ┘
```

Every name carries a per-run id (``tw-<id>-<host>`` for namespaces, ``tw<id>...`` for the few
interfaces whose names are global), so parallel runs never collide. Interfaces are created
directly inside their namespaces, so deleting the namespaces deletes them.

Teardown stops every process the lab started (by PID: SIGTERM, then SIGKILL), then deletes the
namespaces. It runs on normal exit, on exceptions and on Ctrl-C (``with Lab(...)``), and
``tunnelwatch lab down`` can finish a lab left behind by a killed process from its state file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from probes.lab import netns
from probes.lab.impair import Direction, LinkState, render_ruleset
from probes.lab.netns import LabError

if TYPE_CHECKING:
    from probes.lab.haproxy import HAProxyServer
    from probes.lab.openvpn import OpenVPNServer
    from probes.lab.pki import PKI
    from probes.lab.strongswan import StrongSwanServer
    from probes.lab.wireguard import WgPeer, WireGuardServer

STATE_DIR = Path("/run/tunnelwatch-lab")
PREFIX = "tw-"
SUBNET = "10.77"

# run ids of the labs this process created: lets a test session check its own leftovers only,
# even while other runs share the machine
CREATED_RUN_IDS: list[str] = []
# the labs of this process not closed yet: torn down by close_all() when the process is told to
# stop (a CI timeout's SIGTERM), whatever the code that opened them was doing
OPEN_LABS: weakref.WeakValueDictionary[str, Lab] = weakref.WeakValueDictionary()


def _stop_pid(pid: int, grace: float = 2.0) -> None:
    """SIGTERM, wait, SIGKILL: only ever for PIDs this lab started."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (state-file cleanup): poll /proc instead
            if not _alive(pid):
                return
            done = 0
        if done:
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): tells a process from a later one that got
    the same pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Host:
    """One namespace on the lab network."""

    lab: Lab
    name: str
    index: int
    ns: str
    router_if: str  # the router-side interface of this host's link

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index}.2"

    @property
    def gateway(self) -> str:
        return f"{SUBNET}.{self.index}.1"

    def run(self, argv: Sequence[str], *, check: bool = True, input_text: str | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return netns.run(netns.exec_argv(self.ns, argv), check=check, input_text=input_text,
                         timeout=timeout)

    def popen(self, argv: Sequence[str], *, name: str | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process here; the lab stops it at teardown. Output goes to
        ``lab.dir/<name>.log``."""
        label = name or Path(argv[0]).name
        log = self.lab.dir / f"{self.name}-{label}.log"
        proc = netns.popen(self.ns, argv, log_path=log, env=env)
        self.lab.track(proc.pid, f"{self.name}:{label}")
        return proc

    def entered(self) -> contextlib.AbstractContextManager[None]:
        return netns.entered(self.ns)


@dataclass
class _Tracked:
    pid: int
    label: str


@dataclass
class Lab:
    """A lab run. Use as a context manager; ``close()`` is idempotent."""

    name: str = "lab"
    run_id: str = field(default_factory=lambda: secrets.token_hex(3)[:5])
    keep_dir: bool = False
    hosts: dict[str, Host] = field(default_factory=dict)
    _procs: list[_Tracked] = field(default_factory=list)
    _links: dict[str, LinkState] = field(default_factory=dict)
    _delayboxes: dict[str, int] = field(default_factory=dict)
    _cleanups: list[Any] = field(default_factory=list)
    _pki: PKI | None = None
    _closed: bool = False

    def __post_init__(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, veth, nftables)")
        self.prefix = f"{PREFIX}{self.run_id}-"
        self.dir = Path(tempfile.mkdtemp(prefix=f"tunnelwatch-lab-{self.name}-{self.run_id}-"))
        self.router_ns = f"{self.prefix}router"
        CREATED_RUN_IDS.append(self.run_id)
        OPEN_LABS[self.run_id] = self
        self._write_state()
        try:
            netns.create(self.router_ns)
            self._router("sysctl", "-qw", "net.ipv4.ip_forward=1")
            self._router("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
            self._apply_rules()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        OPEN_LABS.pop(self.run_id, None)
        for cleanup in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        for tracked in reversed(self._procs):
            _stop_pid(tracked.pid)
        for ns in netns.list_names(self.prefix):
            netns.delete(ns)
        for sock in Path("/var/run/wireguard").glob(f"tw{self.run_id}*.sock"):
            with contextlib.suppress(OSError):
                sock.unlink()
        self._state_file.unlink(missing_ok=True)
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def track(self, pid: int, label: str) -> None:
        self._procs.append(_Tracked(pid, label))
        self._write_state()

    def untrack(self, pid: int) -> None:
        self._procs = [t for t in self._procs if t.pid != pid]
        self._write_state()

    def stop_process(self, proc: subprocess.Popen[bytes]) -> None:
        _stop_pid(proc.pid)
        self.untrack(proc.pid)

    def on_close(self, fn: Any) -> None:
        self._cleanups.append(fn)

    @property
    def _state_file(self) -> Path:
        return STATE_DIR / f"{self.run_id}.json"

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {"run_id": self.run_id, "name": self.name, "dir": str(self.dir),
                 "prefix": self.prefix, "owner_pid": os.getpid(),
                 "owner_start": _start_time(os.getpid()),
                 "processes": [{"pid": t.pid, "label": t.label} for t in self._procs],
                 "hosts": {h.name: h.address for h in self.hosts.values()}}
        self._state_file.write_text(json.dumps(state, indent=2))

    # ------------------------------------------------------------------ topology

    def _router(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return netns.run(netns.exec_argv(self.router_ns, argv))

    def add_host(self, name: str) -> Host:
        if name in self.hosts:
            raise LabError(f"host {name!r} exists")
        index = len(self.hosts) + 1
        if index > 250:
            raise LabError("too many hosts")
        ns = f"{self.prefix}{name}"
        router_if = f"r-{name}"[:15]
        host = Host(self, name, index, ns, router_if)
        netns.create(ns)
        self.hosts[name] = host
        self._write_state()
        netns.run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth",
                   "peer", "name", router_if, "netns", self.router_ns])
        netns.run(["ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0"])
        netns.run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        netns.run(["ip", "-n", ns, "route", "add", "default", "via", host.gateway])
        netns.run(["ip", "-n", self.router_ns, "addr", "add", f"{host.gateway}/24",
                   "dev", router_if])
        netns.run(["ip", "-n", self.router_ns, "link", "set", router_if, "up"])
        self._links[router_if] = LinkState()
        return host

    def host(self, name: str) -> Host:
        return self.hosts[name]

    # ------------------------------------------------------------------ impairments

    def _apply_rules(self) -> None:
        netns.run(netns.exec_argv(self.router_ns, ["nft", "-f", "-"]),
                  input_text=render_ruleset(self._links))

    def set_loss(self, host: Host, percent: int,
                 direction: Direction = Direction.EGRESS) -> None:
        """Drop ``percent``% of the host's packets at the router (default: those it sends)."""
        if not 0 <= percent <= 100:
            raise ValueError("percent must be 0..100")
        st = self._links[host.router_if]
        st.loss_percent, st.loss_direction = percent, direction
        self._apply_rules()

    def partition(self, host: Host) -> None:
        self._links[host.router_if].partitioned = True
        self._apply_rules()

    def heal(self, host: Host) -> None:
        """Remove every impairment of this host's link (loss, partition, black hole, delay)."""
        self._links[host.router_if] = LinkState()
        self._apply_rules()
        self.set_delay(host, 0)

    def black_hole_pmtu(self, host: Host, on: bool = True) -> None:
        """Drop ICMP fragmentation-needed on its way to ``host`` (a PMTU black hole)."""
        self._links[host.router_if].drop_icmp_frag_needed = on
        self._apply_rules()

    def set_mtu(self, host: Host, mtu: int) -> None:
        """Lower the MTU of the router's link toward ``host`` (the router answers frag-needed)."""
        self._router("ip", "link", "set", host.router_if, "mtu", str(mtu))

    def set_delay(self, host: Host, delay_ms: float) -> None:
        """Delay the packets ``host`` sends by ``delay_ms`` through a TUN delay box."""
        table = str(100 + host.index)
        tun = f"dly{host.index}"
        old = self._delayboxes.pop(host.name, None)
        if old is not None:
            netns.run(netns.exec_argv(self.router_ns, ["ip", "rule", "del", "pref", table]),
                      check=False)
            _stop_pid(old)
            self.untrack(old)
        self._links[host.router_if].delay_ms = delay_ms
        if delay_ms <= 0:
            return
        proc = netns.popen(self.router_ns,
                           [_python(), "-m", "probes.lab.delaybox", tun, str(delay_ms)],
                           log_path=self.dir / f"delaybox-{host.name}.log")
        self.track(proc.pid, f"delaybox:{host.name}")
        self._delayboxes[host.name] = proc.pid
        deadline = time.monotonic() + 60  # stops at once if the box dies
        while not Path(f"/proc/{proc.pid}").exists() or not self._has_link(tun):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise LabError(f"delay box did not start (see {self.dir})")
            time.sleep(0.02)
        self._router("ip", "link", "set", tun, "up")
        self._router("sysctl", "-qw", f"net.ipv4.conf.{tun}.rp_filter=0")
        netns.run(netns.exec_argv(self.router_ns,
                                  ["ip", "route", "replace", "default", "dev", tun,
                                   "table", table]))
        self._router("ip", "rule", "add", "iif", host.router_if, "lookup", table, "pref", table)

    def _has_link(self, ifname: str) -> bool:
        proc = netns.run(netns.exec_argv(self.router_ns, ["ip", "link", "show", ifname]),
                         check=False)
        return proc.returncode == 0

    # ------------------------------------------------------------------ servers

    def pki(self) -> PKI:
        from probes.lab.pki import PKI  # noqa: PLC0415 - keeps `cryptography` off the import path

        if self._pki is None:
            self._pki = PKI(self.dir / "pki")
        return self._pki

    def start_wireguard(self, host: Host, *, peers: Sequence[WgPeer] = (), port: int = 51820,
                        tunnel_address: str = "10.201.0.1/24") -> WireGuardServer:
        from probes.lab.wireguard import WireGuardServer  # noqa: PLC0415

        server = WireGuardServer(self, host, port=port, tunnel_address=tunnel_address)
        server.start(peers)
        return server

    def start_openvpn(self, host: Host, **kwargs: Any) -> OpenVPNServer:
        from probes.lab.openvpn import OpenVPNServer  # noqa: PLC0415

        server = OpenVPNServer(self, host, **kwargs)
        server.start()
        return server

    def start_strongswan(self, host: Host, **kwargs: Any) -> StrongSwanServer:
        from probes.lab.strongswan import StrongSwanServer  # noqa: PLC0415

        server = StrongSwanServer(self, host, **kwargs)
        server.start()
        return server

    def start_haproxy(self, host: Host, **kwargs: Any) -> HAProxyServer:
        from probes.lab.haproxy import HAProxyServer  # noqa: PLC0415

        server = HAProxyServer(self, host, **kwargs)
        server.start()
        return server


def _python() -> str:
    import sys  # noqa: PLC0415

    return sys.executable


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------- leftovers


def list_labs() -> list[dict[str, Any]]:
    if not STATE_DIR.is_dir():
        return []
    labs = []
    for f in sorted(STATE_DIR.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            labs.append(json.loads(f.read_text()))
    return labs


def close_all() -> list[str]:
    """Tear down every lab this process has open (on SIGTERM/SIGHUP, before exiting);
    the run ids closed."""
    closed = []
    for lab in list(OPEN_LABS.values()):
        lab.close()
        closed.append(lab.run_id)
    return closed


def owner_alive(state: dict[str, Any]) -> bool:
    """Whether the process that made a lab still runs (the same process: pid and start time)."""
    pid = state.get("owner_pid")
    if not isinstance(pid, int) or not _alive(pid):
        return False
    started = state.get("owner_start")
    return started is None or _start_time(pid) == started


def orphans() -> list[str]:
    """Run ids of labs whose owner is gone: a state file whose process died (SIGKILL), or lab
    namespaces with no state file at all (the state is written before any namespace)."""
    labs = list_labs()
    found = [lab["run_id"] for lab in labs if not owner_alive(lab)]
    known = {lab["run_id"] for lab in labs}
    for ns in netns.list_names(PREFIX):
        run_id = ns[len(PREFIX):].split("-", 1)[0]
        if run_id not in known and run_id not in found:
            found.append(run_id)
    return found


def destroy(run_id: str) -> list[str]:
    """Tear down a lab from its state file (its owner died). Returns what was removed."""
    removed: list[str] = []
    state_file = STATE_DIR / f"{run_id}.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {"prefix": f"{PREFIX}{run_id}-", "processes": [], "dir": ""}
    for p in reversed(state.get("processes", [])):
        if _alive(p["pid"]):
            _stop_pid(p["pid"])
            removed.append(f"process {p['pid']} ({p['label']})")
    for ns in netns.list_names(state["prefix"]):
        # whatever still runs inside (a lab whose state file was lost lists no processes): a
        # deleted namespace lives on as long as a process holds it
        for pid in netns.pids(ns):
            _stop_pid(pid)
            removed.append(f"process {pid} (in {ns})")
        netns.delete(ns)
        removed.append(f"namespace {ns}")
    for sock in Path("/var/run/wireguard").glob(f"tw{run_id}*.sock"):
        sock.unlink(missing_ok=True)
    if state.get("dir"):
        shutil.rmtree(state["dir"], ignore_errors=True)
    state_file.unlink(missing_ok=True)
    return removed


def leftovers(run_id: str | None = None) -> Iterator[str]:
    """What a lab (or every lab) left behind: namespaces, processes, WireGuard sockets."""
    prefix = f"{PREFIX}{run_id}-" if run_id else PREFIX
    for ns in netns.list_names(prefix):
        yield f"namespace {ns}"
    for lab in list_labs():
        if run_id and lab.get("run_id") != run_id:
            continue
        for p in lab.get("processes", []):
            if _alive(p["pid"]):
                yield f"process {p['pid']} ({p['label']})"
    sock_glob = f"tw{run_id}*.sock" if run_id else "tw*.sock"
    for sock in Path("/var/run/wireguard").glob(sock_glob):
        yield f"wireguard socket {sock}"
