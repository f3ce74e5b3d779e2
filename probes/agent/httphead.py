"""HTTP/1.1 request heads for the agent's endpoints, parsed strictly and within fixed bounds
(sans-I/O: bytes in, a :class:`Head` or a :class:`BadRequest` out).

Only what Prometheus, blackbox-style relabeling, curl and operators send is taken: an
origin-form target (``/path?query``), ``HTTP/1.0`` or ``HTTP/1.1``, CRLF line ends, header
names that are tokens, no obsolete line folding, one ``Host`` in HTTP/1.1, a ``Content-Length``
of at most :data:`BODY_LIMIT` (the body is read and dropped: no endpoint takes one) and no
``Transfer-Encoding``. Anything else is refused with a status and a sentence saying what was
wrong, before any handler runs; a head longer than :data:`HEAD_LIMIT` is refused before it is
complete, so a client cannot make the agent buffer more than that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus

HEAD_LIMIT = 8192  # request line and headers, with their CRLFs
MAX_HEADERS = 32
BODY_LIMIT = 64 * 1024  # a request body (none is used) is read and dropped up to this size

_END = b"\r\n\r\n"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")  # origin-form: visible ASCII, starting with "/"
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")  # no CTLs but HTAB


class BadRequest(ValueError):
    """A request the agent refuses: ``status`` (400, 413, 431, 501, 505) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Head:
    method: str
    path: str  # percent-decoded
    query: str  # raw, as sent (see :func:`query_params`)
    headers: dict[str, str]  # lower-case names; a repeated header's values joined by ", "
    keep_alive: bool
    content_length: int
    size: int  # bytes of the head, blank line included


def head_size(buf: bytes) -> int | None:
    """The length of the complete head at the start of ``buf``, None while it is incomplete;
    :class:`BadRequest` once ``buf`` holds more than :data:`HEAD_LIMIT` bytes without one."""
    end = buf.find(_END, 0, HEAD_LIMIT + len(_END))
    if end >= 0:
        return end + len(_END)
    if len(buf) > HEAD_LIMIT:
        raise BadRequest(431, f"Request head longer than {HEAD_LIMIT} bytes")
    if b"\n\n" in buf or b"\n\r\n" in buf:  # a head ended with bare LFs would never end here
        raise BadRequest(400, "Request lines must end with CRLF")
    return None


def parse_head(buf: bytes) -> Head | None:
    """The request head at the start of ``buf``: None while it is incomplete (and within
    :data:`HEAD_LIMIT`), :class:`BadRequest` when it is not a request the agent takes."""
    size = head_size(buf)
    if size is None:
        return None
    lines = buf[:size - len(_END)].split(b"\r\n")
    method, path, query, version = _request_line(lines[0])
    headers = _headers(lines[1:])
    if version == (1, 1) and ("host" not in headers or "," in headers["host"]):
        raise BadRequest(400, "An HTTP/1.1 request needs exactly one Host header")
    if "transfer-encoding" in headers:
        raise BadRequest(501, "Transfer-Encoding is not accepted; send Content-Length")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "keep-alive" in tokens if version == (1, 0) else "close" not in tokens
    return Head(method, path, query, headers, keep_alive, _content_length(headers), size)


def _request_line(line: bytes) -> tuple[str, str, str, tuple[int, int]]:
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise BadRequest(400, "Bad request line: expected METHOD /path?query HTTP/1.1")
    version = _VERSION.fullmatch(parts[2])
    if version is None:
        raise BadRequest(400, "Bad request line: expected METHOD /path?query HTTP/1.1")
    major, minor = int(version[1]), int(version[2])
    if (major, minor) not in ((1, 0), (1, 1)):
        raise BadRequest(505, f"HTTP version {major}.{minor} is not supported")
    path, _, query = parts[1].decode("ascii").partition("?")
    return parts[0].decode("ascii"), unquote(path, errors="replace"), query, (major, minor)


def _headers(lines: list[bytes]) -> dict[str, str]:
    if len(lines) > MAX_HEADERS:
        raise BadRequest(431, f"More than {MAX_HEADERS} request headers")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # also obs-fold, spaces before the colon
            raise BadRequest(400, f"Bad header line {_shown(line)}")
        if not _FIELD_VALUE.fullmatch(value):
            raise BadRequest(400, f"Bad characters in header {_shown(name)}")
        key, text = name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _content_length(headers: dict[str, str]) -> int:
    given = headers.get("content-length")
    if given is None:
        return 0
    values = {v.strip() for v in given.split(",")}  # repeated, each must say the same
    text = values.pop() if len(values) == 1 else ""
    if not (text.isascii() and text.isdigit()):
        raise BadRequest(400, f"Bad Content-Length {_shown(given.encode('latin-1'))}")
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(BODY_LIMIT)) or int(digits) > BODY_LIMIT:
        raise BadRequest(413, f"Request body larger than {BODY_LIMIT} bytes")
    return int(digits)


def _shown(text: bytes) -> str:
    return repr(text[:64].decode("latin-1"))


def query_params(query: str) -> dict[str, str]:
    """``a=1&b=x+y`` -> {"a": "1", "b": "x y"}, percent-decoded (UTF-8; undecodable bytes
    replaced); a repeated name keeps its first value, as ``request.query.get`` did."""
    params: dict[str, str] = {}
    for pair in query.split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        params.setdefault(unquote_plus(name, errors="replace"),
                          unquote_plus(value, errors="replace"))
    return params
