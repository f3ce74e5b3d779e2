"""A sans-I/O DNS codec for one question and its answer (RFC 1035): no sockets, no clocks.

:func:`build_query` makes a standard query; :func:`parse_response` reads what came back and
raises :class:`DnsError` (and nothing else) for anything malformed: short or truncated sections,
label pointers that loop or point forward, names over 255 bytes, counts that promise more
records than the message holds. What a response *means* for a check (SERVFAIL, a wrong address)
is the check's business; this module only says what the response says.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_RECORD_TAIL = struct.Struct("!HHIH")
MAX_NAME = 255  # bytes of a name in wire form (RFC 1035 2.3.4)
MAX_LABEL = 63
MAX_POINTERS = 64  # compression pointers followed for one name (a loop stops here at the latest)
MAX_RECORDS = 256  # records read from one section: more is not an answer to one question

FLAG_QR = 0x8000  # a response
FLAG_TC = 0x0200  # truncated
FLAG_RD = 0x0100  # recursion desired
FLAG_RA = 0x0080
CLASS_IN = 1


class RecordType(enum.IntEnum):
    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28


class Rcode(enum.IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


class DnsError(ValueError):
    """A message that is not a well-formed DNS message, or a name that cannot be queried."""


@dataclass(frozen=True, slots=True)
class Question:
    name: str  # lower case, no trailing dot
    rtype: int
    rclass: int


@dataclass(frozen=True, slots=True)
class Record:
    name: str  # lower case, no trailing dot
    rtype: int
    rclass: int
    ttl: int
    data: bytes  # RDATA as sent
    value: str | None = None  # A / AAAA: the address; CNAME: the target name


@dataclass(frozen=True, slots=True)
class Response:
    ident: int
    flags: int
    question: Question | None
    answers: tuple[Record, ...]

    @property
    def rcode(self) -> int:
        return self.flags & 0x000F

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TC)

    def addresses(self, rtype: int) -> list[str]:
        """Every address of type ``rtype`` (A or AAAA) in the answer section, in order."""
        return [r.value for r in self.answers if r.rtype == rtype and r.value is not None]


def rcode_name(rcode: int) -> str:
    try:
        return Rcode(rcode).name
    except ValueError:
        return f"RCODE{rcode}"


def encode_name(name: str) -> bytes:
    """``probe.example.com`` (a trailing dot allowed) in wire form; :class:`DnsError` for a
    name DNS cannot carry (an empty label, a label over 63 bytes, over 255 in all, not ASCII)."""
    text = name[:-1] if name.endswith(".") else name
    if not text:
        return b"\x00"
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise DnsError(f"not an ASCII name (use its IDNA form): {name!r}") from None
    out = bytearray()
    for label in raw.split(b"."):
        if not label or len(label) > MAX_LABEL:
            raise DnsError(f"bad label in {name!r}: labels are 1..{MAX_LABEL} bytes")
        out += bytes([len(label)]) + label
    out += b"\x00"
    if len(out) > MAX_NAME:
        raise DnsError(f"name longer than {MAX_NAME} bytes: {name!r}")
    return bytes(out)


def build_query(name: str, rtype: int, ident: int, *, recursion: bool = True) -> bytes:
    """One standard query for ``name`` / ``rtype`` (class IN) with id ``ident``."""
    flags = FLAG_RD if recursion else 0
    return (_HEADER.pack(ident & 0xFFFF, flags, 1, 0, 0, 0) + encode_name(name)
            + _QUESTION_TAIL.pack(rtype, CLASS_IN))


def response_ident(data: bytes) -> int | None:
    """The id of a message that at least has a header and says it is a response; else None.
    Lets a caller tell "not for us" from "for us, but broken" before parsing the rest."""
    if len(data) < _HEADER.size:
        return None
    ident, flags = struct.unpack_from("!HH", data)
    return ident if flags & FLAG_QR else None


def decode_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at ``offset`` and the offset just past it (past the first pointer, if any).

    A pointer must point strictly before the label it replaces, so a chain always ends; the
    number of pointers and the name's length are bounded too."""
    labels: list[str] = []
    length = 0
    end: int | None = None
    pos = offset
    pointers = 0
    while True:
        if pos >= len(data):
            raise DnsError(f"name at {offset} runs past the end of the message")
        size = data[pos]
        if size & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise DnsError("truncated compression pointer")
            target = ((size & 0x3F) << 8) | data[pos + 1]
            if target >= pos:
                raise DnsError(f"compression pointer at {pos} does not point backwards")
            pointers += 1
            if pointers > MAX_POINTERS:
                raise DnsError("too many compression pointers")
            if end is None:
                end = pos + 2
            pos = target
            continue
        if size & 0xC0:
            raise DnsError(f"reserved label type 0x{size & 0xC0:02x} at {pos}")
        pos += 1
        if size == 0:
            break
        if pos + size > len(data):
            raise DnsError(f"label at {pos - 1} runs past the end of the message")
        length += size + 1
        if length + 1 > MAX_NAME:
            raise DnsError(f"name longer than {MAX_NAME} bytes")
        labels.append(data[pos:pos + size].decode("latin-1").lower())
        pos += size
    return ".".join(labels), (pos if end is None else end)


def _record_value(data: bytes, rtype: int, rdata_at: int, rdata: bytes) -> str | None:
    if rtype == RecordType.A:
        if len(rdata) != 4:
            raise DnsError(f"A record of {len(rdata)} bytes")
        return str(ipaddress.IPv4Address(rdata))
    if rtype == RecordType.AAAA:
        if len(rdata) != 16:
            raise DnsError(f"AAAA record of {len(rdata)} bytes")
        return str(ipaddress.IPv6Address(rdata))
    if rtype == RecordType.CNAME:
        target, end = decode_name(data, rdata_at)
        if end != rdata_at + len(rdata):
            raise DnsError("CNAME data does not match its length")
        return target
    return None


def parse_response(data: bytes) -> Response:
    """A DNS response's header, question and answer section (authority and additional records
    are not read: one question's answer is all a check needs). :class:`DnsError` if malformed."""
    if len(data) < _HEADER.size:
        raise DnsError(f"{len(data)} bytes: shorter than a DNS header")
    ident, flags, qdcount, ancount, _ns, _ar = _HEADER.unpack_from(data)
    if not flags & FLAG_QR:
        raise DnsError("not a response (QR bit clear)")
    if qdcount > 1:
        raise DnsError(f"{qdcount} questions in a response to one")
    if ancount > MAX_RECORDS:
        raise DnsError(f"{ancount} answers: more than {MAX_RECORDS}")
    pos = _HEADER.size
    question = None
    if qdcount:
        name, pos = decode_name(data, pos)
        if pos + _QUESTION_TAIL.size > len(data):
            raise DnsError("truncated question")
        rtype, rclass = _QUESTION_TAIL.unpack_from(data, pos)
        pos += _QUESTION_TAIL.size
        question = Question(name, rtype, rclass)
    answers = []
    for _ in range(ancount):
        name, pos = decode_name(data, pos)
        if pos + _RECORD_TAIL.size > len(data):
            raise DnsError("truncated answer record")
        rtype, rclass, ttl, rdlength = _RECORD_TAIL.unpack_from(data, pos)
        pos += _RECORD_TAIL.size
        if pos + rdlength > len(data):
            raise DnsError("answer data runs past the end of the message")
        rdata = data[pos:pos + rdlength]
        answers.append(Record(name, rtype, rclass, ttl, rdata,
                              _record_value(data, rtype, pos, rdata)))
        pos += rdlength
    return Response(ident, flags, question, tuple(answers))


def build_response(query: bytes, rcode: int = 0, answers: tuple[tuple[int, bytes], ...] = (),
                   ttl: int = 60) -> bytes:
    """A response to ``query`` (its header id and question echoed) with ``answers`` as
    (type, RDATA) records for the question's name (compressed as a pointer to it). For tests
    and the lab's tools; a real resolver answers in the lab."""
    if len(query) < _HEADER.size:
        raise DnsError("query shorter than a header")
    ident, flags, qdcount = struct.unpack_from("!HHH", query)
    if qdcount != 1:
        raise DnsError("a query with one question expected")
    _, end = decode_name(query, _HEADER.size)
    question = query[_HEADER.size:end + _QUESTION_TAIL.size]
    header = _HEADER.pack(ident, FLAG_QR | FLAG_RA | (flags & FLAG_RD) | (rcode & 0xF), 1,
                          len(answers), 0, 0)
    body = b"".join(b"\xc0\x0c" + _RECORD_TAIL.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata
                    for rtype, rdata in answers)
    return header + question + body
