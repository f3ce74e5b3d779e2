"""Sans-I/O OpenVPN 2.6 client core: packet codec, wrapping, reliability, TLS session, data.

No sockets, no clocks, no asyncio here: the caller passes bytes and ``now`` and sends what
:meth:`ClientSession.datagrams_to_send` returns. :class:`OpenVPNError` is the only exception the
core raises on bad input.
"""

from probes.protocols.openvpn.packet import ControlPacket, Opcode, OpenVPNError
from probes.protocols.openvpn.session import ClientSession, SessionOptions

__all__ = ["ClientSession", "ControlPacket", "Opcode", "OpenVPNError", "SessionOptions"]
