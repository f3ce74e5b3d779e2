"""TLS keying-material export (RFC 5705) for ``key-derivation tls-ekm``.

Python 3.11's ``ssl`` has no ``export_keying_material``, so this calls OpenSSL's
``SSL_export_keying_material`` through ctypes on the ``SSL *`` inside CPython's ``_ssl`` object.
That relies on CPython's object layout (``PyObject_HEAD``, then a weakref, then ``SSL *``); every
step is checked and :func:`available` is False wherever it does not hold, in which case the
session simply does not offer TLS-EKM and the server falls back to the key-method-2 PRF.
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from functools import cache
from typing import Any

from probes.protocols.openvpn.packet import OpenVPNError

# PySSLSocket: PyObject_HEAD (refcount, type), PyObject *Socket, SSL *ssl
_SSL_POINTER_OFFSET = 2 * ctypes.sizeof(ctypes.c_void_p) + ctypes.sizeof(ctypes.c_void_p)


@cache
def _exporter() -> Any | None:
    if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 13):
        return None
    try:
        lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # dlsym sees libssl
        func = lib.SSL_export_keying_material
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_int
    func.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                     ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]
    return func


def available() -> bool:
    return _exporter() is not None


def export_keying_material(tls: ssl.SSLObject, label: bytes, length: int) -> bytes:
    """Export ``length`` bytes under ``label`` (no context) from an established TLS session."""
    func = _exporter()
    inner = getattr(tls, "_sslobj", None)
    if func is None or inner is None or type(inner).__name__ != "_SSLSocket":
        raise OpenVPNError("TLS keying-material export is not available here")
    pointer = ctypes.c_void_p.from_address(id(inner) + _SSL_POINTER_OFFSET).value
    if not pointer:
        raise OpenVPNError("no SSL object to export keying material from")
    out = ctypes.create_string_buffer(length)
    if func(pointer, out, length, label, len(label), None, 0, 0) != 1:
        raise OpenVPNError("SSL_export_keying_material failed")
    return out.raw
