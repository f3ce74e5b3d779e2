"""A real strongSwan (charon) IKEv2 responder for the lab, with ESP in userspace. It
authenticates with the PSK, or with a certificate of the lab's PKI (the initiator always with
the PSK).

The kernel here has no ESP, so charon loads ``kernel-libipsec`` (ESP over a TUN device) next to
``kernel-netlink`` (routes). charon's pid file path is fixed under ``/run``, so each charon gets a
private tmpfs ``/run`` inside its ``ip netns exec`` mount namespace. It is configured through its
VICI socket in the lab directory with ``swanctl --load-all``.
"""

from __future__ import annotations

import itertools
import re
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from probes.lab.netns import LabError, run
from probes.lab.pki import CertFiles
from probes.lab.topology import wait_for

if TYPE_CHECKING:
    from probes.lab.topology import Host, Lab

CHARON = "/usr/lib/ipsec/charon"
PLUGINS = ("random nonce kdf openssl pem pkcs1 pkcs8 x509 pubkey revocation constraints "
           "kernel-libipsec kernel-netlink socket-default vici updown")
DEFAULT_PROPOSALS = ("aes256gcm16-prfsha256-ecp256", "aes256gcm16-prfsha256-x25519",
                     "aes256-sha256-modp2048", "aes256-sha1-modp2048")
_counter = itertools.count()
_EXCHANGE_TAGS = re.compile(r"\[(IKE|CFG|ENC)\]")
_EXCHANGE_NOISE = re.compile(r"endpoint changed|state change|scheduling (rekeying|reauth)|"
                             r"maximum IKE_SA lifetime")


def render_connection(name: str, *, local_addrs: str, remote_addrs: str, local_id: str,
                      remote_id: str, proposals: Sequence[str], local_ts: str, remote_ts: str,
                      esp_proposals: Sequence[str], psk: str, cert: Path | None = None,
                      pool: str | None = None) -> str:
    """swanctl.conf text for one connection (one setting per line: values run to EOL). The
    initiator authenticates with the PSK; the responder too, or with the certificate ``cert``
    (whose key swanctl finds in its ``private/`` directory). ``pool``: the name of a pool
    (:func:`render_pool`) initiators get their address from."""
    local_auth = ["      auth = psk"] if cert is None else [
        "      auth = pubkey", f"      certs = {cert}"]
    return "\n".join([
        "connections {",
        f"  {name} {{",
        "    version = 2",
        f"    local_addrs = {local_addrs}",
        f"    remote_addrs = {remote_addrs}",
        f"    proposals = {','.join(proposals)}",
        *([f"    pools = {pool}"] if pool else []),
        "    local {",
        *local_auth,
        f"      id = {local_id}",
        "    }",
        "    remote {",
        "      auth = psk",
        f"      id = {remote_id}",
        "    }",
        "    children {",
        "      net {",
        f"        local_ts = {local_ts}",
        f"        remote_ts = {remote_ts}",
        f"        esp_proposals = {','.join(esp_proposals)}",
        "      }",
        "    }",
        "  }",
        "}",
        "secrets {",
        f"  ike-{name} {{",
        f"    id-1 = {local_id}",
        # %any: one secret for every initiator identity (each agent still uses its own id)
        *([f"    id-2 = {remote_id}"] if remote_id != "%any" else []),
        # in hex: swanctl reads a secret that starts with "0x" as hex and one with "0s" as
        # base64, so a text PSK that starts so (1 in 2,048 random token_urlsafe ones) was
        # another key to charon than to the probe, which reads the psk file's text as is
        f"    secret = 0x{psk.encode().hex()}",
        "  }",
        "}",
        "",
    ])


def render_pool(name: str, addrs: str, dns: Sequence[str]) -> str:
    """swanctl.conf text for a pool of inner addresses, handed out with ``dns`` as
    INTERNAL_IP4_DNS to initiators that ask (a CP request)."""
    lines = ["pools {", f"  {name} {{", f"    addrs = {addrs}"]
    if dns:
        lines.append(f"    dns = {','.join(dns)}")
    return "\n".join([*lines, "  }", "}", ""])


class StrongSwanServer:
    """One charon in a host namespace. By default a PSK responder for any initiator."""

    def __init__(self, lab: Lab, host: Host, *, psk: str | None = None,
                 local_id: str = "node.lab", remote_id: str = "agent.lab",
                 proposals: Sequence[str] = DEFAULT_PROPOSALS,
                 esp_proposals: Sequence[str] = ("aes256gcm16", "aes128gcm16", "aes128-sha256"),
                 local_ts: str | None = None, remote_ts: str = "10.211.0.0/16",
                 charon_settings: str = "", swanctl_conf: str | None = None,
                 cert: CertFiles | None = None, cacerts: Sequence[Path] = (),
                 pool: str | None = None, pool_dns: Sequence[str] = ()) -> None:
        """``pool``: a range (CIDR) initiators get their inner address from, with
        ``pool_dns`` as their resolvers (remote access: TSi is then the address given)."""
        self.lab, self.host = lab, host
        self.n = next(_counter)
        self.name = f"charon{self.n}"
        self.dir = lab.dir / self.name
        self.dir.mkdir()
        self.psk = psk or secrets.token_urlsafe(18)
        self.local_id, self.remote_id = local_id, remote_id
        self.psk_file = self.dir / "psk"
        self.psk_file.write_text(self.psk + "\n")
        self.psk_file.chmod(0o600)
        # an address "behind" the responder, for in-tunnel echoes
        self.inner_address = f"10.210.{self.n % 250}.1"
        self.local_ts = local_ts or f"{self.inner_address}/32"
        self.remote_ts = remote_ts
        self.proposals = list(proposals)
        self.vici_socket = self.dir / "charon.vici"
        self.conf_file = self.dir / "strongswan.conf"
        self.swanctl_file = self.dir / "swanctl.conf"
        if cert is not None:
            self._install_credentials(cert, cacerts)
        self.conf_file.write_text(
            "charon {\n"
            f"  load = {PLUGINS}\n"
            f"  plugins {{\n    vici {{\n      socket = unix://{self.vici_socket}\n    }}\n  }}\n"
            "  filelog {\n    stderr {\n      default = 1\n      ike = 2\n    }\n  }\n"
            "  syslog {\n    daemon {\n      default = -1\n    }\n  }\n"
            f"{charon_settings}\n"
            "}\n")
        self.swanctl_file.write_text(swanctl_conf or render_connection(
            "lab", local_addrs=host.address, remote_addrs="%any", local_id=local_id,
            remote_id=remote_id, proposals=self.proposals, local_ts=self.local_ts,
            remote_ts="dynamic" if pool else remote_ts, esp_proposals=esp_proposals,
            psk=self.psk, cert=None if cert is None else cert.cert,
            pool="labpool" if pool else None)
            + (render_pool("labpool", pool, pool_dns) if pool else ""))
        self.proc: subprocess.Popen[bytes] | None = None

    def _install_credentials(self, cert: CertFiles, cacerts: Sequence[Path]) -> None:
        """swanctl loads keys and CA certificates from directories beside its config file: the
        key into ``private/``, the chain's CAs into ``x509ca/`` (charon sends the intermediates
        with its certificate, never the root)."""
        for sub, files in (("private", (cert.key,)), ("x509ca", tuple(cacerts))):
            (self.dir / sub).mkdir(exist_ok=True)
            for path in files:
                shutil.copy(path, self.dir / sub / path.name)

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host.address, 500)

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise LabError(f"{self.name} already running")
        self.vici_socket.unlink(missing_ok=True)
        self.host.run(["ip", "addr", "replace", f"{self.inner_address}/32", "dev", "lo"])
        self.proc = self.host.popen(
            ["sh", "-c", f"mount -t tmpfs tmpfs /run && exec {CHARON}"], name=self.name,
            env={"STRONGSWAN_CONF": str(self.conf_file)})
        proc = self.proc
        wait_for(lambda: self.vici_socket.exists() or proc.poll() is not None, 60,
                 f"{self.name} VICI socket")
        if proc.poll() is not None:
            raise LabError(f"charon exited with {proc.returncode} (see {self.lab.dir})")
        self.swanctl(["--load-all", "--file", str(self.swanctl_file)])

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop_process(self.proc)
            self.proc = None
        self.vici_socket.unlink(missing_ok=True)

    def swanctl(self, args: Sequence[str], *, check: bool = True,
                timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return run(["swanctl", *args, "--uri", f"unix://{self.vici_socket}"], check=check,
                   timeout=timeout)

    def list_sas(self) -> str:
        return self.swanctl(["--list-sas"]).stdout

    def exchange_log(self) -> str:
        """The log lines about credentials and the IKE exchanges (messages parsed and sent,
        proposals, peer config, authentication, certificates), whole: what a failing
        assertion should show. The rest (start-up, packets, endpoint and state changes) is
        noise that pushed the telling lines out of a truncated tail."""
        return "\n".join(line for line in self.log().splitlines()
                         if _EXCHANGE_TAGS.search(line) and not _EXCHANGE_NOISE.search(line))

    def log(self) -> str:
        path: Path = self.lab.dir / f"{self.host.name}-{self.name}.log"
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""
