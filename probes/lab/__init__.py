"""Network-namespace lab with real VPN servers, used by tests, benchmarks and the demo.

See :class:`probes.lab.topology.Lab`. Everything runs as root inside namespaces whose names carry a
per-run id; teardown removes every namespace, interface and process the lab created.
"""

from probes.lab.impair import Direction
from probes.lab.keys import WgKeyPair, wg_keypair, wg_psk
from probes.lab.netns import LabError
from probes.lab.topology import Host, Lab, destroy, leftovers, list_labs
from probes.lab.wireguard import WgPeer

__all__ = ["Direction", "Host", "Lab", "LabError", "WgKeyPair", "WgPeer", "destroy", "leftovers",
           "list_labs", "wg_keypair", "wg_psk"]
