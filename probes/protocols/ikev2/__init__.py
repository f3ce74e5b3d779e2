"""Sans-I/O IKEv2 initiator (RFC 7296) for health probes: wire codec (:mod:`.payloads`), crypto
(:mod:`.crypto`), proposal strings (:mod:`.proposals`), the state machine (:mod:`.initiator`) and
ESP-in-UDP with AES-GCM for in-tunnel echoes (:mod:`.esp`).
"""

from probes.protocols.ikev2.payloads import IKEv2Error

__all__ = ["IKEv2Error"]
